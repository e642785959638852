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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig
from gold_ray.errors import UserError
from gold_ray.run import store
from gold_ray.run.rundir import RunReadError, run_config, run_task
from gold_ray.run.tasks import TaskSpec

FREE_KEYS: tuple[str, ...] = (
    "student", "baselines", "resources", "tracking", "output",
    "strategy.score", "strategy.band_lo", "strategy.band_hi", "strategy.energy_temperature",
    "strategy.energy_mode", "strategy.noise_filter_top", "strategy.band_length_quantile",
    "strategy.hold_band_near_chance", "strategy.feedback_pool_size",
    "strategy.feedback_per_prompt", "strategy.s3_error_share", "strategy.progen_feedback_ratio",
    "strategy.progen_damping", "strategy.progen_max_candidates",
    "teacher.serve", "teacher.request_timeout_s", "teacher.max_retries", "teacher.retry_backoff_s",
    "task.eval_path", "task.eval_limit", "task.iteration_eval_limit",
    "budget.max_teacher_tokens",
)
"""Config keys (and sections) in which a fork may differ from the run it starts from: what comes
after the first teacher pass (the student, the band and its score, feedback that is still empty
then), where the run's resources come from, and the real evaluation set. Every other key must be
equal (the teacher, the task, the seed, the budget, the strategy, the prompts)."""


class ForkError(UserError, ValueError):
    """``output.fork_from`` names no run a new run can start from (the message says why)."""


@dataclass(frozen=True)
class ForkSource:
    """A checked first teacher pass to start from (:func:`check_fork`).

    Attributes:
        path: The source run directory, absolute.
        state: Its state as committed with the pass (``first-pass.json``).
        task: The task, to write the pending probes with.
        pending: The probes the pass wrote for scoring later, unscored (None: it wrote none).
    """

    path: Path
    state: dict[str, Any]
    task: TaskSpec
    pending: list[dict[str, Any]] | None


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


def check_fork(cfg: RunConfig, task: TaskSpec, run_dir: Path) -> ForkSource:
    """Check that a run in ``run_dir`` can start from the first teacher pass of ``cfg.output.fork_from``.

    Reads only: nothing is written or removed before this has passed.

    Raises:
        ForkError: the source is ``run_dir`` itself or no run directory, has not committed its first
            pass, differs from ``cfg`` in a key outside :data:`FREE_KEYS` or in its task, or lacks a
            part of that pass.
    """
    source = Path(str(cfg.output.fork_from)).expanduser().absolute()
    where = f"output.fork_from={cfg.output.fork_from}"
    if source.resolve() == run_dir.absolute().resolve():
        raise ForkError(f"{where}: a run cannot start from itself (output.dir is the same folder)")
    try:
        saved = run_config(source)
        source_task = run_task(source, saved)
    except RunReadError as err:
        raise ForkError(f"{where}: {err}") from err
    first = store.load_state(source, store.FIRST_PASS_FILE)
    committed = store.load_state(source)
    if first is None or committed is None or (committed["iteration"], committed["stage"]) == (0, None):
        raise ForkError(f"{where}: {source} has no committed first teacher pass ({store.FIRST_PASS_FILE}): the run "
                        "has not finished iteration 0's generate stage, or was made by a gold-ray that did not keep it")
    changed = config_differences(saved, cfg.model_dump(mode="json"))
    if changed:
        raise ForkError(f"{where}: the run there differs in what its first teacher pass depends on "
                        f"({'; '.join(changed)}); only {', '.join(FREE_KEYS)} may differ")
    if source_task.model_dump(mode="json") != task.model_dump(mode="json"):
        raise ForkError(f"{where}: its task ({source / store.TASK_FILE}) is not this run's task {cfg.task.name!r}")
    missing = [rel for rel in first["parts"] if not (source / rel).is_file()]
    pending = _pending_probes(source, first)
    if missing or pending is False:
        raise ForkError(f"{where}: parts of its first teacher pass are missing in {source} "
                        f"({', '.join(missing) or 'the iteration-0 probes'})")
    return ForkSource(source, first, task, pending or None)


def copy_fork(source: ForkSource, run_dir: Path) -> dict[str, Any]:
    """Copy a checked first teacher pass into ``run_dir``; the state to commit there.

    That is the source's state as committed with the pass, without its MLflow run, with
    ``forked_from``; it is kept as this run's own ``first-pass.json`` too (a fork can be forked).
    """
    for rel in source.state["parts"]:
        # Through a temporary file, fsynced and renamed, as every part: the commit may follow at once.
        store.atomic_write_bytes(run_dir / rel, (source.path / rel).read_bytes())
    if source.pending is not None:
        store.write_part(store.part_path(run_dir, store.PENDING_PROBES, 0), source.task, source.pending)
    state = {k: v for k, v in source.state.items() if k != "mlflow_run_id"}
    state["forked_from"] = str(source.path)
    store.atomic_write_json(run_dir / store.FIRST_PASS_FILE, state)
    return state


def _pending_probes(source: Path, first: dict[str, Any]) -> list[dict[str, Any]] | None | bool:
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
