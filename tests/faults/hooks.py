"""The test suite's one fault hook (see :mod:`gold_ray.run.faults`).

``tests/conftest.py`` points ``$GOLD_RAY_FAULT_HOOK`` at :func:`dispatch` and
``$GOLD_RAY_FAULT_PLANS`` at a folder, in the test process and in every Ray worker. A test plans a
fault with :func:`plan_fault`; when production code reaches a matching :func:`gold_ray.run.faults.fault_point`,
in whatever process, the hook fails there once (its marker file records that it did).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

PLANS_ENV = "GOLD_RAY_FAULT_PLANS"
"""Folder of planned faults, one JSON file each."""


def plans_dir() -> Path:
    """The folder this process reads planned faults from."""
    return Path(os.environ[PLANS_ENV])


def plan_fault(point: str, marker: Path, *, action: str = "raise", gate: Path | None = None, **match: Any) -> Path:
    """Plan one fault: at ``point``, where the context equals ``match``, fail once.

    Args:
        point: The fault point's name (``train.step`` …).
        marker: Written when the fault fires; while it exists the plan does not fire again.
        action: ``raise`` (an exception), ``kill`` (SIGKILL of the process, as on a lost node),
            ``hold`` (write ``marker`` as JSON, with the process id and Ray node id, then block until
            ``gate`` exists: the test kills the process or its node there, knowing where it is), or
            ``record`` (append one JSON line to ``marker`` every time the point is reached, with the
            process id and Ray node id: where the work ran; it never fails).
        gate: For ``hold``: the file whose creation releases the hold.
        **match: Context values the point must carry.

    Returns:
        The plan file (removed by :func:`clear_plans`).
    """
    if action == "hold" and gate is None:
        raise ValueError("a hold needs a gate")
    path = plans_dir() / f"{uuid.uuid4().hex}.json"
    plan = {"point": point, "marker": str(marker), "action": action, "match": match,
            "gate": str(gate) if gate else None}
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def where() -> dict[str, Any]:
    """This process: its id and, inside a Ray worker or driver, the id of its Ray node."""
    info: dict[str, Any] = {"pid": os.getpid(), "node_id": None}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray here: the pid alone says where
        pass
    return info


def read_records(marker: Path) -> list[dict[str, Any]]:
    """The lines a ``record`` plan wrote to ``marker`` (none if it never fired)."""
    if not marker.is_file():
        return []
    return [json.loads(line) for line in marker.read_text(encoding="utf-8").splitlines() if line.strip()]


def clear_plans() -> None:
    """Remove every planned fault."""
    for path in plans_dir().glob("*.json"):
        path.unlink(missing_ok=True)


def dispatch(name: str, context: dict[str, Any]) -> None:
    """The hook: fail here when a planned fault matches and has not fired yet."""
    folder = os.environ.get(PLANS_ENV)
    if not folder:
        return
    for path in sorted(Path(folder).glob("*.json")):
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if plan["point"] != name or any(context.get(k) != v for k, v in plan["match"].items()):
            continue
        marker = Path(plan["marker"])
        if plan["action"] == "record":
            line = json.dumps({"point": name, **where(), "context": {k: str(v) for k, v in context.items()}})
            with marker.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
            continue
        if marker.exists():
            continue
        if plan["action"] == "hold":
            # Written whole, then renamed: the test reads it as soon as it appears.
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"point": name, **where(), "context": {k: str(v) for k, v in context.items()}}),
                           encoding="utf-8")
            os.replace(tmp, marker)
            gate = Path(plan["gate"])
            deadline = time.monotonic() + 900
            while not gate.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the test's gate {gate} did not open (hold at {name} {context})")
                time.sleep(0.05)
            continue
        marker.write_text(f"fault at {name} {context}\n", encoding="utf-8")
        if plan["action"] == "kill":
            _wait_until_checkpoint_registered()
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at {name} {context} (marker {marker})")


def _wait_until_checkpoint_registered(timeout_s: float = 120.0) -> None:
    """Inside a Ray Train worker: wait until the controller has recorded the latest checkpoint.

    A worker killed before the controller polled its report loses that checkpoint, and the retry
    starts from the one before; the kill test waits so that it exercises the common case, a worker
    dying well after its last checkpoint. Outside Ray Train this returns at once.
    """
    try:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        storage = ray.train.get_context().get_storage()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return
    if ckpt is None:
        return
    snapshot = Path(storage.experiment_fs_path) / "checkpoint_manager_snapshot.json"
    name = Path(ckpt.path).name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.is_file() and name in snapshot.read_text(encoding="utf-8", errors="replace"):
            return
        time.sleep(0.2)
