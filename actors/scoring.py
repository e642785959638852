"""Energy (OOD) scoring of generated samples by a pool of Ray Data actors.

Each :class:`EnergyScorer` actor loads the current student checkpoint once and scores every batch
it is given; :func:`score_dataset` puts a pool of them behind ``Dataset.map_batches`` so scoring
streams alongside generation. Only accepted samples are scored: a row with a reject reason, or
without its input fields, gets ``NaN``.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import numpy as np
import ray

from gold_ray.config import RunConfig
from gold_ray.run.faults import fault_point
from gold_ray.run.tasks import TaskSpec, load_task

SCORE_COLUMN = "score"
"""Column the scorer writes (float64; NaN for rows that were not scored)."""

SCORED_AT_COLUMN = "scored_at"
"""Wall-clock time (``time.time()``) the row's batch was scored; lets a caller check streaming."""

SCORED_BY_COLUMN = "scored_by"
"""``host:pid`` of the scorer actor that scored the row's batch (how many actors did the work)."""


def _missing(value: Any) -> bool:
    """True for the ways an absent string shows up in a numpy batch: None, NaN, empty."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def scorable_rows(batch: dict[str, np.ndarray], task: TaskSpec) -> list[int]:
    """Indices of the rows of ``batch`` that are accepted samples with every input field.

    Args:
        batch: A numpy batch; a missing ``reject_reason`` column means no row was rejected.
        task: The task whose input fields must be present.

    Returns:
        Row indices, ascending.
    """
    n = len(next(iter(batch.values()))) if batch else 0
    reasons = batch.get("reject_reason")
    out = []
    for i in range(n):
        if reasons is not None and not _missing(reasons[i]):
            continue
        if any(name not in batch or _missing(batch[name][i]) for name in task.field_names):
            continue
        out.append(i)
    return out


class EnergyScorer:
    """Ray Data class UDF: adds a float ``score`` column (energy by default) to each batch.

    Args:
        checkpoint_dir: Folder of a saved student (``Student.save``).
        task_name_or_path: The task, as a shipped name, a task YAML path or a :class:`TaskSpec`.
        score: ``energy``, ``msp``, ``nll`` or ``random`` (see ``Student.ood_scores``).
        temperature: Energy temperature T.
        mode: Text-to-text energy mode, ``masked`` or ``code_faithful``.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        task_name_or_path: str | TaskSpec,
        score: str = "energy",
        temperature: float = 1.0,
        mode: str = "masked",
    ):
        # Imported here so that building a pipeline on the driver does not load torch.
        from gold_ray.student.model import load_student

        self.task = (
            task_name_or_path if isinstance(task_name_or_path, TaskSpec) else load_task(task_name_or_path)
        )
        self.student = load_student(checkpoint_dir, self.task)
        self.score = score
        self.temperature = temperature
        self.mode = mode
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def _record(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        keys = [*self.task.field_names, self.task.target_key]
        return {k: (None if k not in batch or _missing(batch[k][i]) else str(batch[k][i])) for k in keys}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` with ``score`` (NaN where not scored), ``scored_at`` and ``scored_by`` added."""
        n = len(next(iter(batch.values()))) if batch else 0
        fault_point("score.batch", rows=n)
        scores = np.full(n, np.nan, dtype=np.float64)
        rows = scorable_rows(batch, self.task)
        if rows:
            records = [self._record(batch, i) for i in rows]
            values = self.student.ood_scores(
                records, score=self.score, temperature=self.temperature, mode=self.mode
            )
            scores[rows] = np.asarray(values, dtype=np.float64)
        batch[SCORE_COLUMN] = scores
        batch[SCORED_AT_COLUMN] = np.full(n, time.time(), dtype=np.float64)
        batch[SCORED_BY_COLUMN] = np.full(n, self.identity, dtype=object)
        return batch


def scorer_resources(cfg: RunConfig) -> dict[str, Any]:
    """``num_cpus`` (and ``num_gpus`` and custom ``resources`` when the config asks) of one scorer actor."""
    r = cfg.resources
    resources: dict[str, Any] = {"num_cpus": r.scorer_num_cpus}
    if r.scorer_num_gpus > 0:
        resources["num_gpus"] = r.scorer_num_gpus
    if r.scorer_resources:
        resources["resources"] = dict(r.scorer_resources)
    return resources


def score_dataset(
    ds: ray.data.Dataset, cfg: RunConfig, checkpoint_dir: str, task: str | TaskSpec
) -> ray.data.Dataset:
    """``ds`` with a ``score`` column computed by a pool of :class:`EnergyScorer` actors (lazy).

    The pool size is ``resources.scorer_min_actors`` (default: the maximum) to
    ``scorer_max_actors``; the score, its temperature and the text-to-text mode come from the ``strategy`` section.

    Args:
        ds: Rows with the task's input fields (and ``reject_reason``, if any row is rejected).
        cfg: The run config.
        checkpoint_dir: The student checkpoint to score with.
        task: The task (name, YAML path or spec).

    Returns:
        The lazily mapped dataset.
    """
    r, s = cfg.resources, cfg.strategy
    return ds.map_batches(
        EnergyScorer,
        compute=ray.data.ActorPoolStrategy(min_size=r.scorer_min_actors or r.scorer_max_actors,
                                           max_size=r.scorer_max_actors),
        batch_size=r.scorer_batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "checkpoint_dir": str(checkpoint_dir),
            "task_name_or_path": task,
            "score": s.score,
            "temperature": s.energy_temperature,
            "mode": s.energy_mode,
        },
        **scorer_resources(cfg),
    )
