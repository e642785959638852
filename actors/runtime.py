"""The Ray runtime: the loop's stages on Ray Serve, Ray Data, a scorer actor pool and Ray Train.

:class:`RayRuntime` implements :class:`gold_ray.run.runtime.Runtime`; the loop
(:class:`gold_ray.run.loop.Distiller`) is the same object as in process. Where each step runs:

- ``produce``: prompt rows stream through :func:`actors.pipeline.generate_iteration` (the teacher's
  Serve deployment called by the run's :class:`~actors.pipeline.TeacherCaller` actor, parsing in
  the caller, probes scored by the energy-scorer pool);
- ``train``: an order to the run's Ray Train worker group (:class:`actors.training.RayTrainStep`,
  started with the teacher and kept for the run), DDP over ``resources.train_workers``, its MLflow
  child run under the run's; rank 0's step count comes back to
  :attr:`~gold_ray.run.runtime.Runtime.progress` while it trains;
- ``score`` (an iteration's probes, the final noise filter): the same scorer pool, over a Ray
  dataset of the records, or in one call to one of its actors when they fit one scoring batch;
  the pool's actors (:class:`actors.scoring.ScorerPool`) start with the first scoring and keep
  the student loaded for the run, each new student reaching them as weights;
- ``evaluate``: on one of the pool's warm scorers (the student's weights sent to it), so no model
  runs in the driver actor.
- ``answer`` (the teacher-as-classifier row): the same Serve deployment, one ``generate_batch`` call
  per ``teacher.batch_size`` prompts.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.run.runtime import Produced, Runtime
from gold_ray.run.store import read_parts
from gold_ray.student.model import Student
from gold_ray.student.training import Recipe
from gold_ray.teacher.parsing import Deduplicator
from gold_ray.types import Generation, Prompt, SamplingParams

logger = logging.getLogger(__name__)

SCRATCH_DIRS = ("tmp", "ray_train")
"""Scratch folders of the Ray stages in the run directory; only an interrupted run needs them."""

PRODUCE_STATS = ("output_tokens", "prompt_tokens", "seconds", "tokens_per_s", "samples_per_s", "scored", "scorer_actors",
                 "retried", "streamed")
"""The pipeline statistics a produce step reports to the loop."""


class RayRuntime(Runtime):
    """The stages on Ray (see the module docstring).

    Args:
        app_name: The Serve application that holds (or will hold) the teacher deployment.
        engine_factory: Builds the teacher engine inside each Serve replica (tests pass a factory of
            a test engine); None builds the configured engine.
    """

    def __init__(self, app_name: str, engine_factory: Any = None):
        self.app_name = app_name
        self.engine_factory = engine_factory
        self._train = None
        self._scorers = None
        self._caller = None

    def start(self) -> None:
        """Start the run's training workers, the teacher deployment (replicas build their engines;
        no HTTP proxy: the run calls it through Ray) and its caller, kept for the whole run."""
        from actors.teacher import ConfigEngineFactory, start_teacher

        cfg = self.run.cfg
        factory = self.engine_factory or ConfigEngineFactory(cfg.teacher, cfg.seed, model_path=self.run.teacher_path)
        # The training workers start beside the teacher, so their start-up overlaps the first
        # generate stage instead of delaying the first training.
        self._train_step().start()
        start_teacher(cfg, factory, name=self.app_name, http=False)
        self._teacher_caller()

    def _teacher_caller(self) -> Any:
        """The run's :class:`actors.pipeline.TeacherCaller` actor, started once."""
        if self._caller is None:
            from actors.pipeline import start_caller

            self._caller = start_caller(self.app_name, self.run.task)
        return self._caller

    def _train_step(self) -> Any:
        if self._train is None:
            from actors.training import RayTrainStep

            run = self.run
            self._train = RayTrainStep(run.cfg, run.cfg.task.name, run.student_path, run.run_dir / "ray_train",
                                       mlflow_parent=lambda: self.run.tracking,
                                       keep_workers=run.cfg.resources.train_keep_workers)
        return self._train

    def _scorer_pool(self) -> Any:
        """The run's warm energy scorers (:class:`actors.scoring.ScorerPool`); they start on first use."""
        if self._scorers is None:
            from actors.scoring import ScorerPool

            self._scorers = ScorerPool(self.run.cfg, self.run.task)
        return self._scorers

    def close(self) -> None:
        """Stop the training workers and delete the teacher application; a finished run's scratch folders go too."""
        from ray import serve

        if self._train is not None:
            self._train.close()
            self._train = None
        if self._scorers is not None:
            self._scorers.close()
            self._scorers = None
        if self._caller is not None:
            import ray

            ray.kill(self._caller)
            self._caller = None
        try:
            serve.delete(self.app_name)
        except Exception:  # noqa: BLE001 - best-effort cleanup; the run's result matters more
            logger.warning("could not delete Serve app %s", self.app_name)
        if (self.run.run_dir / "student").is_dir():
            for scratch in SCRATCH_DIRS:
                shutil.rmtree(self.run.run_dir / scratch, ignore_errors=True)

    def produce(self, prompts: list[Prompt], iteration: int, kind: str, student: Student | None,
                checkpoint: Path | None, dedup: Deduplicator) -> Produced:
        """Stream the prompts through Serve and Ray Data; probes are scored from ``checkpoint``."""
        from actors.pipeline import generate_iteration

        tmp = self.run.run_dir / "tmp" / f"{kind}-it{iteration:03d}.parquet"
        ckpt = str(checkpoint) if student is not None and checkpoint is not None else None
        stats = generate_iteration(prompts, self.run.cfg, self.run.task, self.app_name, ckpt, tmp,
                                   iteration=iteration, dedup=dedup, on_progress=self.progress,
                                   scorer_pool=self._scorer_pool(), caller=self._teacher_caller())
        records = read_parts([tmp])
        tmp.unlink(missing_ok=True)
        return records, {k: stats.get(k) for k in PRODUCE_STATS}

    def train(
        self, student: Student, records: list[dict[str, Any]], recipe: Recipe, val_records: Sequence[dict] = ()
    ) -> dict[str, Any]:
        """An order to the run's Ray Train workers; the trained weights come back into ``student``."""
        return self._train_step()(student, records, recipe, val_records, on_progress=self.progress)

    def score(self, student: Student, checkpoint: Path | None, records: list[dict[str, Any]]) -> np.ndarray:
        """The scorer pool's scores of ``records`` (from ``checkpoint``, the student on disk)."""
        if checkpoint is None or not records:
            return super().score(student, checkpoint, records)
        if len(records) <= self.run.cfg.resources.scorer_batch_size:
            # A dozen probes: one call to a warm scorer, not a dataset (Ray Data's start costs more).
            self.progress("scored", 0, len(records))
            scores = self._scorer_pool().score_records(checkpoint, records)
            self.progress("scored", len(records), len(records))
            return scores
        import ray.data

        from actors.pipeline import block_rows
        from actors.scoring import SCORE_COLUMN, score_dataset

        # The target too: a text-to-text energy reads the answer, and the ``nll`` score the label.
        task = self.run.task
        rows = [{**{k: r.get(k) for k in (*task.field_names, task.target_key)}, "_row": i} for i, r in enumerate(records)]
        ds = score_dataset(ray.data.from_items(rows), self.run.cfg, str(checkpoint), self.run.task,
                           pool=self._scorer_pool())
        scores = np.full(len(records), np.nan)
        self.progress("scored", 0, len(records))
        done = 0
        for block in block_rows(ds):
            for row in block:
                scores[int(row["_row"])] = float(row[SCORE_COLUMN])
            done += len(block)
            self.progress("scored", done, len(records))
        return scores

    def answer(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """The Serve teacher's answers, one ``generate_batch`` call per ``teacher.batch_size`` prompts."""
        from ray import serve

        from actors.teacher import DEPLOYMENT_NAME, params_to_dict, prompt_to_dict, row_to_generation

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self.app_name)
        size = self.run.cfg.teacher.batch_size
        wire = params_to_dict(params)
        out: list[Generation] = []
        for start in range(0, len(prompts), size):
            requests = [{"prompt": prompt_to_dict(p), "params": wire} for p in prompts[start : start + size]]
            out.extend(row_to_generation(row) for row in handle.generate_batch.remote(requests).result())
        return out

    def evaluate(self, student: Student, checkpoint: Path | None, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The student's metrics, computed on one of the run's warm scorers (no model runs in the driver actor)."""
        if not records:
            return {}
        return self._scorer_pool().evaluate(student, records)
