"""What the Ray tests share: configs, prompts, ports, polling, and engines that Serve replicas build.

Ray workers import this module by name (``tests.raykit``): ``tests/conftest.py`` puts the checkout on
``PYTHONPATH`` of every worker, so an engine class defined here is pickled by reference and built
inside a Serve replica like any other class. The non-Ray helpers of the fault tests stay in
:mod:`tests.faults.faultkit`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig
from gold_ray.testing import FakeTeacherEngine
from gold_ray.types import Generation, Prompt, SamplingParams
from tests.faults.faultkit import SometimesGarbageEngine

# --- ports, addresses and polling --------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_marked(marker: str) -> None:
    """Kill, by pid, any process (but this one) whose command line names ``marker``: what is left of
    a Ray cluster a test started, found by its unique temp dir; other Ray clusters are untouched."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        except psutil.Error:
            pass


def listening_hosts(port: int) -> set[str]:
    """The addresses the sockets of this machine listening on TCP ``port`` are bound to."""
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def external_ipv4() -> str | None:
    """An IPv4 address of this machine other than loopback (the one a default route would use), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: connect on UDP only picks a route
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


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


# --- configs, prompts and Serve ----------------------------------------------------------------


def make_cfg(**sections: dict[str, Any]) -> RunConfig:
    """A RunConfig sized for a 2-core test box, with ``sections`` merged over it."""
    data: dict[str, Any] = {
        "teacher": {"batch_size": 4, "max_retries": 0, "serve": {"num_cpus": 0.25}},
        "resources": {
            "scorer_min_actors": 1,
            "scorer_max_actors": 1,
            "scorer_num_cpus": 0.25,
            "scorer_batch_size": 4,
        },
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        merged = dict(data.get(name, {}))
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        data[name] = merged
    return RunConfig.model_validate(data)


def chat_prompts(n: int, labels: tuple[str, ...] = ("positive", "negative")) -> list[Prompt]:
    """``n`` distinct chat prompts with alternating labels."""
    return [
        Prompt(
            kind="train",
            label=labels[i % len(labels)],
            messages=({"role": "user", "content": f"Write movie review number {i}."},),
            meta={"style": f"style-{i % 3}"},
        )
        for i in range(n)
    ]


def running_replicas(app_name: str) -> int:
    """RUNNING replicas of the teacher deployment of Serve application ``app_name`` (0 if none)."""
    from ray import serve

    from actors.teacher import DEPLOYMENT_NAME

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


# --- engines and map functions that Ray workers run --------------------------------------------


class GatedEngine(FakeTeacherEngine):
    """The fake engine, except that prompts after the first ``hold_after`` wait for a gate file.

    Lets a test prove streaming without timing guesses: the test opens the gate only once it
    has seen a scored row, so later generations necessarily come after the first score.
    """

    def __init__(self, gate: str, hold_after: int, timeout_s: float = 120.0, **kw: Any):
        super().__init__(**kw)
        self.gate = Path(gate)
        self.hold_after = hold_after
        self.timeout_s = timeout_s

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Wait for the gate once ``hold_after`` prompts were answered, then answer as usual."""
        if self.calls >= self.hold_after:
            deadline = time.monotonic() + self.timeout_s
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().generate(prompts, params)


class CrashOnceEngine(FakeTeacherEngine):
    """The fake engine, except that the first call of a pipeline in the whole cluster kills its replica process.

    A marker file makes the crash happen once: the replacement replica answers normally. Serve's
    health probe (one unlabelled prompt) never crashes it: on a busy machine the probe could come
    first, and the replica would be replaced before the pipeline's call ever met the crash.
    """

    def __init__(self, marker: str, **kw: Any):
        super().__init__(**kw)
        self.marker = Path(marker)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Exit the process on the first labelled call (no cleanup, like a crash), else answer."""
        if not self.marker.exists() and any(p.label for p in prompts):
            self.marker.write_text("crashed")
            os._exit(1)
        return super().generate(prompts, params)


class PidEngine(FakeTeacherEngine):
    """Answers with the process id of the replica that runs it (which replica a call landed on)."""

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One ``pid <process id>`` answer per prompt."""
        return [Generation(text=f"pid {os.getpid()}", output_tokens=1) for _ in prompts]


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
