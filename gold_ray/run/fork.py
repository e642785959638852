"""Starting a run from another run's first teacher pass (``output.fork_from``).

Two runs that differ only in what follows iteration 0's teacher pass (the score that picks GOLD's
feedback band, the student and its training) share that pass when one starts from the other's:
their comparison then sees the difference asked for, not two draws of the teacher. The same seed
alone does not give them the same pass once they run on different machines (the teacher's float
rounding differs, and one changed token changes every sample after it).

Every run keeps the state it committed with that pass (:data:`~gold_ray.run.store.FIRST_PASS_FILE`).
A fork copies that state and the parts it names into its own directory, and the loop goes on from
there as a resumed run would: it trains iteration 0's student on the copied samples and scores the
copied probes with it. The teacher tokens of the shared pass count in both runs' totals.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig
from gold_ray.errors import UserError
from gold_ray.run import store
from gold_ray.run.rundir import RunReadError, run_config
from gold_ray.run.tasks import TaskSpec

FREE_KEYS: tuple[str, ...] = (
    "student", "baselines", "resources", "tracking", "output",
    "strategy.score", "strategy.band_lo", "strategy.band_hi", "strategy.energy_temperature",
    "strategy.energy_mode", "strategy.noise_filter_top", "strategy.feedback_pool_size",
    "teacher.serve", "teacher.batch_size", "teacher.request_timeout_s", "teacher.max_retries",
    "teacher.retry_backoff_s",
    "task.data_dir", "task.eval_path", "task.eval_limit", "task.iteration_eval_limit",
    "budget.max_reject_share",
)
"""Config keys (and sections) in which a fork may differ from the run it starts from: nothing the
first teacher pass depends on. Every other key must be equal."""


class ForkError(UserError, ValueError):
    """``output.fork_from`` names no run a new run can start from (the message says why)."""


def config_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: saved there, now here`` for every config leaf outside :data:`FREE_KEYS` that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        if path in FREE_KEYS:
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_differences(old, new, f"{path}.")
        elif old != new:
            out.append(f"{path}: {old!r} there, {new!r} here")
    return out


def fork_state(cfg: RunConfig, task: TaskSpec, run_dir: Path) -> dict[str, Any]:
    """Copy the first teacher pass of ``cfg.output.fork_from`` into ``run_dir``; its state to commit there.

    Nothing is written before every check has passed. The returned state is the source's as
    committed after iteration 0's generate stage, without its MLflow run, with ``forked_from``.

    Raises:
        ForkError: the source is no run directory, has not committed its first pass, differs from
            ``cfg`` in a key outside :data:`FREE_KEYS` or in its task, or lacks a part its state names.
    """
    source = Path(str(cfg.output.fork_from)).expanduser()
    where = f"output.fork_from={cfg.output.fork_from}"
    try:
        saved = run_config(source)
    except RunReadError as err:
        raise ForkError(f"{where}: {err}") from err
    if source.resolve() == run_dir.resolve():
        raise ForkError(f"{where}: a run cannot start from itself (output.dir is the same folder)")
    first = store.load_state(source, store.FIRST_PASS_FILE)
    if first is None:
        raise ForkError(f"{where}: no {store.FIRST_PASS_FILE} in {source}: the run has not committed its first "
                        "teacher pass yet, or was made by a gold-ray that did not keep it")
    changed = config_differences(saved, cfg.model_dump(mode="json"))
    if changed:
        raise ForkError(f"{where}: the run there differs in what its first teacher pass depends on "
                        f"({'; '.join(changed)}); only {', '.join(FREE_KEYS)} may differ")
    source_task = source / store.TASK_FILE
    if source_task.is_file():
        from gold_ray.run.rundir import run_task

        if run_task(source).model_dump(mode="json") != task.model_dump(mode="json"):
            raise ForkError(f"{where}: its task ({source_task}) is not this run's task {cfg.task.name!r}")
    copies = [(source / rel, run_dir / rel) for rel in first["parts"]]
    missing = [str(src) for src, _ in copies if not src.is_file()]
    pending = _pending_probes(source, first, task)
    if missing or pending is False:
        raise ForkError(f"{where}: parts of its first teacher pass are missing ({', '.join(missing) or 'the probes'})")
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    if pending:
        store.write_part(store.part_path(run_dir, store.PENDING_PROBES, 0), task, pending)
    store.atomic_write_json(run_dir / store.FIRST_PASS_FILE, first)
    state = {k: v for k, v in first.items() if k != "mlflow_run_id"}
    state["forked_from"] = str(source.resolve())
    return state


def _pending_probes(source: Path, first: dict[str, Any], task: TaskSpec) -> list[dict[str, Any]] | None | bool:
    """The probes the first pass wrote for later scoring, as they were before scoring.

    None when the pass wrote none (a strategy without probes, or one that writes them later); False
    when it did and they are gone. Once the source's probe stage has committed them (and its
    feedback stage removed the pending part) they are its iteration-0 probe parts, the accepted
    ones scored: the scores are cleared again, the fork's own student scores them.
    """
    if not first.get("pending_probes"):
        return None
    pending = store.part_path(source, store.PENDING_PROBES, 0)
    if pending.is_file():
        return store.read_parts([pending])
    accepted, rejected = store.part_path(source, "probe", 0), store.part_path(source, "rejects-probe", 0)
    if not (accepted.is_file() and rejected.is_file()):
        return False
    return [{**r, "score": math.nan} for r in store.read_parts([accepted])] + store.read_parts([rejected])
