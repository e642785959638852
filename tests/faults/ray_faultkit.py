"""Ray-side helpers of the fault tests: engines and map functions that Ray workers run.

Ray workers cannot import the test folder, so this module and :mod:`faultkit` are registered with
Ray's cloudpickle to travel by value.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faultkit
import ray.cloudpickle
from faultkit import SometimesGarbageEngine

from gold_ray.types import Generation, Prompt, SamplingParams

ray.cloudpickle.register_pickle_by_value(faultkit)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll ``check`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


def wait_for_gate(gate: Path, timeout_s: float = 900.0) -> None:
    """Block until ``gate`` exists.

    Raises:
        TimeoutError: ``gate`` did not appear within ``timeout_s``. Passing on instead would let
            held work run before the fault it was held for, and the test would then fail on a
            misleading assertion (or, worse, pass without the fault landing where it claims).
    """
    if not wait_until(gate.exists, timeout_s, 0.05):
        raise TimeoutError(f"the test's gate {gate} did not open within {timeout_s:.0f} s")


class HoldAtEngine(SometimesGarbageEngine):
    """The sometimes-garbage engine, except that one prompt (by uid) stops it, once, until a gate opens.

    On that prompt it writes ``marker`` and waits for ``gate``: the test then knows the run is
    inside that stage, kills the driver, and opens the gate.
    """

    def __init__(self, hold_uid: str, marker: str, gate: str, **kw: Any):
        super().__init__(**kw)
        self.hold_uid = hold_uid
        self.marker = Path(marker)
        self.gate = Path(gate)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Answer as the parent does, after holding on the chosen prompt the first time it comes."""
        if not self.marker.exists() and any(p.meta.get("uid") == self.hold_uid for p in prompts):
            self.marker.write_text("holding")
            wait_for_gate(self.gate)
        return super().generate(prompts, params)


def gated_row(row: dict[str, Any], *, gate: str, first_free: int) -> dict[str, Any]:
    """Pass ``row`` on; rows from index ``first_free`` on wait for ``gate`` first."""
    if row["i"] >= first_free:
        wait_for_gate(Path(gate))
    return row
