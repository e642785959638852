"""Runtimes: how the stages of a run execute. The loop (:mod:`gold_ray.run.loop`) decides *what* runs.

A :class:`Runtime` owns the four things a stage asks of the machine:

``produce``   the teacher answers prompts; answers are parsed into records (accepted and
              rejected, built by :func:`gold_ray.run.store.make_record`) and probes are scored
``train``     the student trains on records with a :class:`~gold_ray.student.training.Recipe`
``score``     the student's OOD scores of records (the final noise filter)
``evaluate``  the student's metrics on labelled records
``answer``    the teacher's raw answers to prompts (the teacher-as-classifier reference row)

Two implementations, each passed to :class:`~gold_ray.run.loop.Distiller` at construction:

- :class:`InProcessRuntime` (here): everything in this process (``gold-ray distill --local``);
  the reference the Ray runtime is tested against.
- ``actors.runtime.RayRuntime``: the teacher on Ray Serve, generation and scoring through Ray Data
  and a scorer actor pool, training on Ray Train, evaluation as a Ray task beside the scorers.

They differ in where the work runs, never in what it computes: parsing, records, the training loop
(:func:`gold_ray.student.training.fit`), OOD scores and metrics are the same functions on both.

Both report how far a running stage has got the same way: they call :attr:`Runtime.progress`
(``progress(unit, done, total, **counts)``: samples answered with rejects so far, records scored,
training steps done of planned), which the loop sets to a :class:`StageProgress` for each stage;
it reaches the loop's ``on_event`` as ``progress`` events, at most one per stage per second.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.config import RunConfig
from gold_ray.run import store
from gold_ray.run.tasks import TaskSpec
from gold_ray.student.evaluation import evaluate_student
from gold_ray.student.model import Student
from gold_ray.student.training import Recipe, planned_steps
from gold_ray.teacher.labelling import answer_prompts, read_answer
from gold_ray.teacher.parsing import Deduplicator, ParseResult, parse_batch
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine


@dataclass
class RunContext:
    """What a runtime learns about the run it serves when the loop binds it.

    Attributes:
        cfg: The run config.
        task: The task.
        run_dir: The run directory.
        student_path: The resolved student model.
        teacher_path: The resolved teacher model (None for a remote endpoint).
        tracking: ``{"tracking_uri", "run_id"}`` of the run's MLflow run, once it has one.
    """

    cfg: RunConfig
    task: TaskSpec
    run_dir: Path
    student_path: str
    teacher_path: str | None
    tracking: dict[str, str] | None = None


ProgressFn = Callable[..., None]
"""``progress(unit, done, total, **counts)``: how far the running stage has got (see :class:`StageProgress`)."""

Produced = tuple[list[dict[str, Any]], dict[str, Any]]
"""What :meth:`Runtime.produce` returns: ``(records, stats)``, every record in prompt order."""


def no_progress(unit: str, done: int, total: int, **counts: Any) -> None:
    """A :data:`ProgressFn` that reports nothing (outside a stage)."""


class StageProgress:
    """The counts of one running stage, sent on as ``progress`` events at a bounded rate.

    A runtime calls it as ``progress(unit, done, total, **counts)`` whenever its count moves:
    ``samples`` answered by the teacher (``rejected`` so far, ``scored`` so far), ``scored``
    records, training ``steps`` done of planned (``phase``: the recipe of a final-stage candidate).
    The first call of a stage is sent at once, later ones at most every ``min_interval_s``
    seconds: enough for a live view and for JSON logs, few enough to cross Ray from the driver actor.
    The rate and the time left of the current count are measured here, where the work happens.

    Args:
        emit: Receives each event's info (the loop adds stage and iteration).
        min_interval_s: Least seconds between two events.
        clock: Monotonic seconds (tests pass a fake clock).
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None], *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.emit = emit
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._phase: tuple[str, Any] | None = None
        self._phase_start = 0.0
        self._phase_done = 0
        self._last: float | None = None
        self.sent = 0

    def __call__(self, unit: str, done: int, total: int, **counts: Any) -> None:
        """Record the count; send it when the last event is old enough."""
        now = self.clock()
        phase = (unit, counts.get("phase"))
        if phase != self._phase:
            self._phase, self._phase_start, self._phase_done = phase, now, done
        if self._last is not None and now - self._last < self.min_interval_s:
            return
        self._last = now
        elapsed = now - self._phase_start
        rate = (done - self._phase_done) / elapsed if elapsed > 0 and done > self._phase_done else None
        remaining = max(0, total - done) / rate if rate else None
        self.sent += 1
        self.emit({"unit": unit, "done": int(done), "total": int(total), **counts,
                   "rate_per_s": round(rate, 3) if rate else None,
                   "remaining_s": round(remaining, 1) if remaining is not None else None})


class Runtime(ABC):
    """Where and how a run's stages execute (see the module docstring)."""

    run: RunContext
    progress: ProgressFn = staticmethod(no_progress)
    """Set by the loop for each stage (a :class:`StageProgress`); the runtime calls it as its counts move."""

    def bind(self, run: RunContext) -> None:
        """Attach the runtime to a run (before its first stage)."""
        self.run = run

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start what the runtime needs for the whole run (the Ray runtime: the teacher)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` started and remove scratch files of a finished run."""

    @abstractmethod
    def produce(self, prompts: list[Prompt], iteration: int, kind: str, student: Student | None,
                checkpoint: Path | None, dedup: Deduplicator) -> Produced:
        """Answer ``prompts``; returns every record (accepted and rejected, in prompt order) and stats.

        Args:
            prompts: The stage's prompts (each with ``meta["uid"]``).
            iteration: The iteration (record ids).
            kind: ``train``, ``probe`` or ``classify``.
            student: The current student, when accepted records are to be scored (probes).
            checkpoint: The same student saved on disk (what a remote scorer loads).
            dedup: The run's deduplicator, updated in place in prompt order.

        Returns:
            ``(records, stats)`` with ``output_tokens``, ``prompt_tokens`` (0 where the engine does not
            count them), ``seconds``, ``tokens_per_s``,
            ``samples_per_s`` and runtime-specific counters.
        """

    @abstractmethod
    def train(
        self, student: Student, records: list[dict[str, Any]], recipe: Recipe, val_records: Sequence[dict] = ()
    ) -> dict[str, Any]:
        """Train ``student`` in place; returns :func:`gold_ray.student.training.fit`'s metrics."""

    def score(self, student: Student, checkpoint: Path | None, records: list[dict[str, Any]]) -> np.ndarray:
        """The student's OOD scores of ``records`` (the strategy section's score), reported as ``scored``."""
        s = self.run.cfg.strategy
        # Chunks of whole scoring batches: the same batches, so the same scores, as in one call.
        step = SCORE_CHUNK_BATCHES * student.eval_batch_size
        out = []
        self.progress("scored", 0, len(records))
        for begin in range(0, len(records), step):
            chunk = records[begin : begin + step]
            out.append(student.ood_scores(chunk, score=s.score, temperature=s.energy_temperature, mode=s.energy_mode))
            self.progress("scored", begin + len(chunk), len(records))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)

    def evaluate(self, student: Student, checkpoint: Path | None, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The student's metrics on labelled ``records`` (empty without records)."""
        if not records:
            return {}
        return evaluate_student(student, self.run.task, records)

    @abstractmethod
    def answer(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """The teacher's answers to ``prompts``, unparsed, in order (classify prompts with options are
        scored: :func:`gold_ray.teacher.labelling.answer_prompts`); failures come back with ``error`` set."""


SCORE_CHUNK_BATCHES = 4
"""Scoring batches between two progress counts of the in-process scorer."""


def sampling_params(cfg: RunConfig) -> SamplingParams:
    """Sampling parameters of every teacher request, from the ``teacher`` section."""
    t = cfg.teacher
    return SamplingParams(t.temperature, t.top_p, t.top_k, t.max_new_tokens)


class InProcessRuntime(Runtime):
    """Every stage in this process: the teacher engine, parsing, scoring and training.

    Args:
        engine: A ready teacher engine; built from the ``teacher`` section on first use when None.
    """

    def __init__(self, engine: TeacherEngine | None = None):
        self._engine = engine

    def engine(self) -> TeacherEngine:
        """The teacher engine, built on first use."""
        if self._engine is None:
            from gold_ray.teacher.engines import build_engine

            cfg = self.run.cfg
            self._engine = build_engine(cfg.teacher, self.run.teacher_path or cfg.teacher.model, cfg.seed)
        return self._engine

    def produce(self, prompts: list[Prompt], iteration: int, kind: str, student: Student | None,
                checkpoint: Path | None, dedup: Deduplicator) -> Produced:
        """Generate, parse and (with a student) score in this process; see :meth:`Runtime.produce`.

        ``classify`` prompts are answered and read as labels (:mod:`gold_ray.teacher.labelling`); their
        texts are not deduplicated again (they were when they were written or loaded).
        """
        task = self.run.task
        results: list[ParseResult] = [ParseResult(None, "error", "")] * len(prompts)
        confidence = [float("nan")] * len(prompts)
        generations = []
        seconds, rejected = 0.0, 0
        # One engine batch at a time, parsed as it comes (in prompt order, so deduplication is
        # unchanged), so that the stage can say how many samples are done and how many were rejected.
        step = max(1, self.run.cfg.teacher.batch_size)
        self.progress("samples", 0, len(prompts), rejected=0)
        for begin in range(0, len(prompts), step):
            chunk = prompts[begin : begin + step]
            t0 = time.perf_counter()
            answers = answer_prompts(self.engine(), chunk, sampling_params(self.run.cfg))
            seconds += time.perf_counter() - t0
            generations.extend(answers)
            written = [i for i, p in enumerate(chunk) if p.kind != "classify"]
            parsed = parse_batch(task, [chunk[i] for i in written], [answers[i] for i in written], dedup)
            for i, r in zip(written, parsed, strict=True):
                results[begin + i] = r
            for i, (p, g) in enumerate(zip(chunk, answers, strict=True)):
                if p.kind != "classify":
                    continue
                if g.error is not None:
                    results[begin + i] = ParseResult(None, "error", str(g.error)[:2000] or "teacher error")
                else:
                    results[begin + i], confidence[begin + i] = read_answer(task, p, g.text, g.option_logprobs)
            rejected += sum(r.fields is None for r in results[begin : begin + len(chunk)])
            self.progress("samples", begin + len(chunk), len(prompts), rejected=rejected)
        records = [
            store.make_record(
                task, iteration=iteration, kind=kind, index=i, requested_label=p.label,
                raw_text=g.text if g.error is None else "", reject_reason=r.reason,
                reject_detail=r.detail or (g.error or ""), fields=r.fields, output_tokens=g.output_tokens,
                style=p.meta.get("style"), confidence=confidence[i],
                option_logprobs=json.dumps(list(g.option_logprobs)) if g.option_logprobs is not None else None,
            )
            for i, (p, g, r) in enumerate(zip(prompts, generations, results, strict=True))
        ]
        tokens = sum(g.output_tokens for g in generations)
        stats: dict[str, Any] = {
            "output_tokens": tokens,
            "prompt_tokens": sum(g.prompt_tokens for g in generations),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "samples_per_s": round(len(prompts) / seconds, 3) if seconds > 0 else None,
        }
        accepted = [r for r in records if r["reject_reason"] is None]
        if student is not None and accepted:
            t1 = time.perf_counter()
            for rec, value in zip(accepted, self.score(student, checkpoint, accepted), strict=True):
                rec["score"] = float(value)
            stats["score_seconds"] = round(time.perf_counter() - t1, 3)
        return records, stats

    def answer(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """The engine's answers in this process (:func:`gold_ray.teacher.labelling.answer_prompts`)."""
        return answer_prompts(self.engine(), prompts, params) if prompts else []

    def train(
        self, student: Student, records: list[dict[str, Any]], recipe: Recipe, val_records: Sequence[dict] = ()
    ) -> dict[str, Any]:
        """:func:`gold_ray.student.training.fit` in this process."""
        total = planned_steps(recipe, len(records), student.batch_size)
        self.progress("steps", 0, total, phase=recipe.name)

        def on_step(info: dict[str, Any]) -> None:
            self.progress("steps", info["step"], total, phase=recipe.name)

        return student.fit(records, recipe.epochs, recipe=recipe, seed=self.run.cfg.seed, val_records=val_records,
                           on_step=on_step)
