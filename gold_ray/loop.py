"""The distillation loop, in one process: the reference the Ray runtime must match.

:class:`Distiller` runs any strategy over four committed stages per iteration::

    generate  the teacher writes training samples; parse; store accepted and rejected parts
    train     the student trains on everything kept so far; it is saved and evaluated
    probe     the teacher writes probe samples; the student scores them (energy by default)
    feedback  the strategy picks the next feedback pool

then a final stage trains the student (fresh by default) on all kept data with the strategy's
final loss, evaluates it and saves it in HF format.

After every stage the state (counters, feedback pool, dedup hashes, parts, checkpoint) is committed
atomically to ``state.json``; a run restarted with ``resume=True`` continues after the last
committed stage with no committed sample lost or repeated.

Teacher, scoring and training are injected callables, so the Ray driver reuses this loop with Serve,
Ray Data and Ray Train behind them; the defaults run everything in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray import store
from gold_ray.config import RunConfig
from gold_ray.evaluation import evaluate_student, load_eval_records, seeded_subset
from gold_ray.labelling import answer_prompts, read_answer
from gold_ray.models import allow_remote_code, is_chat_model, resolve_model
from gold_ray.ood import score_quantiles
from gold_ray.parsing import Deduplicator, ParseResult, parse_batch
from gold_ray.strategies import Strategy, StrategyContext, build_strategy
from gold_ray.student import Student, build_student, check_student_model, load_student
from gold_ray.tasks import TaskSpec, load_task, resolve_data_path
from gold_ray.tracking import build_tracker
from gold_ray.types import Prompt, SamplingParams, TeacherEngine

STAGES = ("generate", "train", "probe", "feedback")

TRAINING_PARTS = ("train-", "probe-")
"""Name prefixes of the Parquet parts that hold training data."""

logger = logging.getLogger(__name__)

EventFn = Callable[[str, dict[str, Any]], None]
ScoreFn = Callable[[Student, list[dict[str, Any]]], np.ndarray]
ProduceFn = Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]]
TrainFn = Callable[..., dict[str, Any]]


class RunDirError(RuntimeError):
    """The output directory holds a different run and neither resume nor overwrite was asked for."""


class TooManyRejectsError(RuntimeError):
    """An iteration rejected more than ``budget.max_reject_share`` of its samples."""


def resolve_prompt_style(cfg: RunConfig, teacher_path: str | None) -> str:
    """``chat`` or ``continuation``: the configured style, else what the teacher model implies."""
    if cfg.teacher.prompt_style != "auto":
        return cfg.teacher.prompt_style
    if cfg.teacher.engine == "openai":
        return "chat"  # a remote endpoint's tokenizer is not ours to inspect
    chat = is_chat_model(cfg.teacher.model)
    if chat is not None:
        return "chat" if chat else "continuation"
    if teacher_path is None:
        return "chat"
    from transformers import AutoTokenizer

    trust = allow_remote_code(cfg.teacher.trust_remote_code, teacher_path, "teacher")
    tok = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust)
    return "chat" if getattr(tok, "chat_template", None) else "continuation"


IDENTITY_KEYS = ("seed", "task.name", "strategy.name", "teacher.model", "student.model")
"""Config keys that make a run what it is: ``--resume`` refuses a run directory that differs in one."""


def identity_changes(run_dir: Path, cfg: RunConfig) -> list[str]:
    """``key: saved -> now`` for each of :data:`IDENTITY_KEYS` where the run saved in ``run_dir`` differs
    from ``cfg`` (an unreadable saved config counts as a change; no saved config, as none)."""
    import yaml

    path = run_dir / store.CONFIG_FILE
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return [f"its {store.CONFIG_FILE} is unreadable: {err}"]
    now = cfg.model_dump(mode="json")
    changes = []
    for key in IDENTITY_KEYS:
        old, new = saved, now
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = new.get(part) if isinstance(new, dict) else None
        if old != new:
            changes.append(f"{key}: {old!r} there, {new!r} now")
    return changes


def prepare_run_dir(cfg: RunConfig, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """Create or reopen the run directory; refuse to clobber a different run.

    Returns:
        The directory and its committed state (None for a fresh run).
    """
    run_dir = Path(cfg.output.dir)
    state = store.load_state(run_dir)
    occupied = state is not None or (run_dir / store.CONFIG_FILE).exists()
    if occupied and not resume:
        if not cfg.output.overwrite:
            raise RunDirError(
                f"output.dir {run_dir} already holds a run; pass --resume to continue it "
                "or --overwrite (output.overwrite=true) to replace it"
            )
        shutil.rmtree(run_dir)
        state = None
    if occupied and resume:
        changed = identity_changes(run_dir, cfg)
        if changed:
            raise RunDirError(
                f"output.dir {run_dir} holds a different run ({'; '.join(changed)}); --resume continues "
                "only the same run: use another output.dir, or --overwrite to replace it"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    # A process killed mid-write leaves its hidden temporary file; it was never data.
    store.remove_temp_files(run_dir)
    if state is None:
        (run_dir / store.CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    return run_dir, state


def write_task_copy(run_dir: Path, task: TaskSpec) -> None:
    """Keep the run's task spec in the run directory (``task.yaml``).

    ``task.name`` may be a path relative to where the run started; the copy lets ``gold-ray
    predict`` and ``gold-ray report`` read the run from anywhere.
    """
    import yaml

    text = yaml.safe_dump(task.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
    store.atomic_write_bytes(run_dir / store.TASK_FILE, text.encode("utf-8"))


def _fresh_state(cfg: RunConfig) -> dict[str, Any]:
    return {
        "version": 1,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "iteration": 0,
        "stage": None,  # last committed stage of `iteration`
        "finished": False,
        "feedback": [],
        "dedup": [],
        "parts": [],
        "checkpoint": None,
        "teacher_tokens": 0,
        "iterations": [],
        "strategy_state": {},
    }


class Distiller:
    """Runs one distillation (see the module docstring).

    Args:
        cfg: The run config.
        engine: A ready teacher engine; built from ``cfg.teacher`` on first use when None.
        produce: Replaces generation, parsing and probe scoring as one step:
            ``produce(prompts, iteration, kind, checkpoint_dir_or_None, dedup) -> (records, stats)``
            returns every row, accepted and rejected (the Ray driver streams them through Serve,
            Ray Data and a scorer pool).
        score: Replaces in-process scoring (used for the optional noise filter).
        train: Replaces in-process training (the Ray driver uses Ray Train).
        resume: Continue the run committed in ``cfg.output.dir``.
        on_event: Called with (stage, info) after every stage, for progress and logs.
        tracker: An object with ``log_metrics(dict, step)`` and ``log_artifact(path)`` (MLflow).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        engine: TeacherEngine | None = None,
        produce: ProduceFn | None = None,
        score: ScoreFn | None = None,
        train: TrainFn | None = None,
        resume: bool = False,
        on_event: EventFn | None = None,
        tracker: Any = None,
    ):
        self.cfg = cfg
        self.task: TaskSpec = load_task(cfg.task.name)
        self.strategy: Strategy = build_strategy(cfg.strategy.name)
        self.eval_file = self._eval_file()
        # Before the run directory exists: a bad strategy input must not leave a half-made run.
        self.strategy_inputs = self.strategy.prepare(self.task, cfg, self.eval_file)
        # Every input is checked before the run directory is touched: a bad model reference or
        # data file must neither leave a half-made run behind nor replace one (--overwrite).
        self.teacher_path: str | None = None
        if engine is None and cfg.teacher.engine != "openai":
            self.teacher_path = resolve_model(cfg.teacher.model)
        self.prompt_style = resolve_prompt_style(cfg, self.teacher_path)
        self.student_path = resolve_model(cfg.student.model)
        check_student_model(self.task, cfg.student, self.student_path)
        self.eval_records = self._load_eval()
        self.iteration_eval_records = self._iteration_eval()
        self.run_dir, state = prepare_run_dir(cfg, resume)
        write_task_copy(self.run_dir, self.task)
        self.state = state or _fresh_state(cfg)
        self._engine = engine
        self._produce = produce
        self._score = score or self._score_in_process
        self._train = train or self._train_in_process
        self.on_event = on_event or (lambda stage, info: None)
        self.tracker = tracker
        self.student: Student | None = None
        self.dedup = Deduplicator(self.state["dedup"])

    # ---- plumbing -------------------------------------------------------------------------

    def _eval_file(self) -> Path | None:
        path = self.cfg.task.eval_path
        return resolve_data_path(path, self.cfg.task.data_dir) if path else self.task.eval_path(self.cfg.task.data_dir)

    def _load_eval(self) -> list[dict[str, Any]]:
        if self.eval_file is None:
            return []
        return load_eval_records(self.task, self.eval_file, limit=self.cfg.task.eval_limit)

    def _iteration_eval(self) -> list[dict[str, Any]]:
        limit = self.cfg.task.iteration_eval_limit
        if limit is None:
            return self.eval_records
        # Drawn from the final evaluation records, so every iteration's examples are among the final ones.
        return seeded_subset(self.eval_records, limit)

    def engine(self) -> TeacherEngine:
        """The teacher engine, built on first use."""
        if self._engine is None:
            from gold_ray.engines import build_engine

            self._engine = build_engine(self.cfg.teacher, self.teacher_path or self.cfg.teacher.model, self.cfg.seed)
        return self._engine

    def sampling(self) -> SamplingParams:
        """Sampling parameters from the teacher config."""
        t = self.cfg.teacher
        return SamplingParams(t.temperature, t.top_p, t.top_k, t.max_new_tokens, seed=self.cfg.seed)

    def _rng(self, iteration: int, stage: str) -> np.random.Generator:
        # One stream per (seed, iteration, stage): a resumed stage draws exactly what it would have.
        return np.random.default_rng([self.cfg.seed, iteration, STAGES.index(stage)])

    def _ctx(self, iteration: int, stage: str) -> StrategyContext:
        return StrategyContext(
            task=self.task,
            config=self.cfg,
            prompt_style=self.prompt_style,
            rng=self._rng(iteration, stage),
            iteration=iteration,
            feedback=list(self.state["feedback"]),
            student=self.student,
            extra=self.strategy_inputs,
            memory=copy.deepcopy(self.state.get("strategy_state") or {}),
            records=self.training_records,
        )

    def _commit(self, iteration: int, stage: str) -> None:
        self.state["iteration"] = iteration
        self.state["stage"] = stage
        self.state["dedup"] = self.dedup.state()
        store.commit_state(self.run_dir, self.state)
        store.atomic_write_json(self.run_dir / "metrics.json", self.metrics())

    def _iter_metrics(self, iteration: int) -> dict[str, Any]:
        its = self.state["iterations"]
        while len(its) <= iteration:
            its.append({"iteration": len(its)})
        return its[iteration]

    def metrics(self) -> dict[str, Any]:
        """Run metrics so far: per iteration, totals and the final evaluation."""
        its = self.state["iterations"]
        totals: Counter[str] = Counter()
        for m in its:
            for stage in ("generate", "probe"):
                for k, v in m.get(stage, {}).get("rejected_by_reason", {}).items():
                    totals[f"rejected_{k}"] += v
                totals["accepted"] += m.get(stage, {}).get("accepted", 0)
        return {
            "task": self.task.name,
            "strategy": self.cfg.strategy.name,
            "seed": self.cfg.seed,
            "teacher": self.cfg.teacher.model,
            "student": self.cfg.student.model,
            "teacher_tokens": self.state["teacher_tokens"],
            "iterations": its,
            "totals": dict(totals),
            "final": self.state.get("final", {}),
        }

    # ---- stages ---------------------------------------------------------------------------

    def _produce_in_process(
        self, prompts: list[Prompt], iteration: int, kind: str, score: bool, dedup: Deduplicator
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Generate, parse and (for probes) score in this process; every row is returned.

        ``classify`` prompts are answered and read as labels (:mod:`gold_ray.labelling`); their
        texts are not deduplicated again (they were when they were written or loaded).
        """
        t0 = time.perf_counter()
        generations = answer_prompts(self.engine(), prompts, self.sampling()) if prompts else []
        seconds = time.perf_counter() - t0
        written = [i for i, p in enumerate(prompts) if p.kind != "classify"]
        parsed = parse_batch(self.task, [prompts[i] for i in written], [generations[i] for i in written], dedup)
        results: list[ParseResult] = [ParseResult(None, "error", "")] * len(prompts)
        confidence = [float("nan")] * len(prompts)
        for i, r in zip(written, parsed, strict=True):
            results[i] = r
        for i, (p, g) in enumerate(zip(prompts, generations, strict=True)):
            if p.kind != "classify":
                continue
            if g.error is not None:
                results[i] = ParseResult(None, "error", str(g.error)[:2000] or "teacher error")
            else:
                results[i], confidence[i] = read_answer(self.task, p, g.text, g.option_logprobs)
        records = []
        for i, (p, g, r) in enumerate(zip(prompts, generations, results, strict=True)):
            rec: dict[str, Any] = {
                "id": f"it{iteration:03d}-{kind}-{i:05d}",
                "iteration": iteration,
                "kind": kind,
                "requested_label": p.label,
                "raw_text": g.text if g.error is None else "",
                "reject_reason": r.reason,
                "reject_detail": r.detail or (g.error or ""),
                "score": float("nan"),
                "output_tokens": g.output_tokens,
                "style": p.meta.get("style"),
                "confidence": confidence[i],
                "option_logprobs": json.dumps(list(g.option_logprobs)) if g.option_logprobs is not None else None,
            }
            if r.fields is not None:
                rec.update(r.fields)
                if self.task.is_classification and p.kind != "classify":
                    rec["label"] = p.label
            records.append(rec)
        tokens = sum(g.output_tokens for g in generations)
        stats: dict[str, Any] = {
            "output_tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "samples_per_s": round(len(prompts) / seconds, 3) if seconds > 0 else None,
        }
        accepted = [r for r in records if r["reject_reason"] is None]
        if score and accepted and self.student is not None:
            t1 = time.perf_counter()
            scores = self._score(self.student, accepted)
            for rec, value in zip(accepted, scores, strict=True):
                rec["score"] = float(value)
            stats["score_seconds"] = round(time.perf_counter() - t1, 3)
        return records, stats

    def _generate_records(self, prompts: list[Prompt], iteration: int, kind: str) -> tuple[list, list, dict]:
        prompts = [
            dataclasses.replace(p, meta={**p.meta, "uid": f"it{iteration}-{kind}-{i}"}) for i, p in enumerate(prompts)
        ]
        checkpoint = self.state.get("checkpoint") if kind == "probe" else None
        if self._produce is not None:
            ckpt = str(self.run_dir / checkpoint) if checkpoint else None
            records, stats = self._produce(prompts, iteration, kind, ckpt, self.dedup)
        else:
            records, stats = self._produce_in_process(prompts, iteration, kind, checkpoint is not None, self.dedup)
        accepted = [r for r in records if r["reject_reason"] is None]
        rejected = [r for r in records if r["reject_reason"] is not None]
        self.state["teacher_tokens"] += int(stats.get("output_tokens", 0))
        stats = {
            **stats,
            "requested": len(prompts),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "rejected_by_reason": dict(Counter(r["reject_reason"] for r in rejected)),
        }
        scores = np.array([r.get("score", np.nan) for r in accepted], dtype=float)
        if np.isfinite(scores).any():
            stats["scores"] = score_quantiles(scores)
        share = len(rejected) / max(1, len(prompts))
        # Small batches are noisy, so they stop the run only when nothing at all was accepted.
        if share > self.cfg.budget.max_reject_share and (len(prompts) >= 8 or not accepted):
            raise self._too_many_rejects(iteration, kind, len(prompts), rejected, stats["rejected_by_reason"])
        return accepted, rejected, stats

    def _too_many_rejects(
        self, iteration: int, kind: str, requested: int, rejected: list[dict[str, Any]], reasons: dict[str, int]
    ) -> TooManyRejectsError:
        """The error that stops a run whose teacher writes mostly rejects, its rejects kept on disk."""
        # Written but never committed: there to be read, and replaced when the stage is resumed.
        path = store.part_path(self.run_dir, f"rejects-{kind}", iteration)
        store.write_part(path, self.task, rejected)
        top = max(reasons, key=reasons.get)
        example = next(r.get("reject_detail") or "" for r in rejected if r["reject_reason"] == top)
        share = len(rejected) / max(1, requested)
        return TooManyRejectsError(
            f"iteration {iteration} ({kind}): {len(rejected)} of {requested} samples rejected "
            f"({share:.0%} > budget.max_reject_share={self.cfg.budget.max_reject_share}); "
            f"reasons: {reasons}; e.g. {top}: {example[:300]!r}. The rejects are in {path}. "
            "Check the teacher and the task's prompts."
        )

    def _write(self, kind: str, iteration: int, records: list[dict[str, Any]]) -> None:
        path = store.part_path(self.run_dir, kind, iteration)
        store.write_part(path, self.task, records)
        rel = str(path.relative_to(self.run_dir))
        if rel not in self.state["parts"]:
            self.state["parts"].append(rel)

    def training_records(self) -> list[dict[str, Any]]:
        """All accepted training and probe records committed so far (not rejects, not LLKD's pool)."""
        parts = [self.run_dir / p for p in self.state["parts"] if Path(p).name.startswith(TRAINING_PARTS)]
        return store.read_parts(parts)

    def _score_in_process(self, student: Student, records: list[dict[str, Any]]) -> np.ndarray:
        s = self.cfg.strategy
        return student.ood_scores(records, score=s.score, temperature=s.energy_temperature, mode=s.energy_mode)

    def _train_in_process(
        self, student: Student, records: list[dict[str, Any]], epochs: int, loss: str, alpha: float, beta: float
    ) -> dict[str, Any]:
        return student.fit(records, epochs, loss=loss, alpha=alpha, beta=beta, seed=self.cfg.seed)

    def _new_student(self) -> Student:
        # The run seed, as the Ray train stage passes it, so a run's students match on both runtimes.
        return build_student(self.task, self.cfg.student, self.student_path, seed=self.cfg.seed)

    def _evaluate(self, student: Student, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        records = self.eval_records if records is None else records
        if not records:
            return {}
        return evaluate_student(student, self.task, records)

    def _holdout(self, probes: list[dict[str, Any]]) -> dict[str, Any]:
        """Without a real evaluation set: the student's metrics on the fresh probes (``holdout_*``).

        The probes of an iteration are written after its training stage, so the student has not
        seen them: a synthetic hold-out, labelled by the label the teacher was asked for.
        """
        if self.eval_records or self.student is None or not probes:
            return {}
        ev = evaluate_student(self.student, self.task, probes)
        return {f"holdout_{k}": v for k, v in ev.items() if isinstance(v, int | float)}

    def _emit(self, stage: str, iteration: int, info: dict[str, Any]) -> None:
        self.on_event(stage, {"iteration": iteration, "iterations": self.cfg.strategy.iterations, **info})
        if self.tracker is not None:
            flat = {f"{stage}.{k}": v for k, v in info.items() if isinstance(v, int | float) and v is not None}
            self.tracker.log_metrics(flat, step=iteration)

    def _requested(self, iteration: int) -> int:
        per = self.cfg.per_iteration_samples()
        if iteration == self.cfg.strategy.iterations - 1:
            return self.cfg.budget.samples - per * (self.cfg.strategy.iterations - 1)
        return per

    def _budget_left(self) -> bool:
        cap = self.cfg.budget.max_teacher_tokens
        return cap is None or self.state["teacher_tokens"] < cap

    def run_iteration(self, iteration: int, done: str | None) -> None:
        """Run the stages of one iteration that come after ``done`` (the last committed stage)."""
        start = STAGES.index(done) + 1 if done else 0
        # Probes come out of the same budget as training samples, so that strategies with and
        # without probes spend the same teacher calls (probes are training data too).
        requested = self._requested(iteration)
        n_probe = 0
        if self.strategy.uses_probes and requested > 1:
            n_probe = max(1, round(requested * self.cfg.strategy.probe_fraction))
        for stage in STAGES[start:]:
            m = self._iter_metrics(iteration)
            ctx = self._ctx(iteration, stage)
            if stage == "generate":
                n = requested - n_probe if self._budget_left() else 0
                prompts = self.strategy.train_prompts(ctx, n)
                acc, rej, stats = self._generate_records(prompts, iteration, "train")
                # A strategy that labels texts (LLKD) spends the rest of the stage's calls on it.
                label = self.strategy.label_prompts(ctx, acc, max(0, n - len(prompts)))[: max(0, n - len(prompts))]
                if label:
                    labelled, rej_label, label_stats = self._generate_records(label, iteration, "classify")
                    labelled = self.strategy.review_labels(ctx, labelled)
                    self._write("pool", iteration, [{**r, "label": None} for r in acc])
                    acc, rej, stats = labelled, rej + rej_label, _merge_label_stats(stats, label_stats)
                self._write("train", iteration, acc)
                self._write("rejects-train", iteration, rej)
                stats.update(ctx.stats)
                m["generate"] = stats
            elif stage == "train":
                t0 = time.perf_counter()
                if self.student is None or not self.strategy.continue_student:
                    self.student = self._new_student()
                ctx.student = self.student
                available = self.training_records()
                mask = self.strategy.train_mask(ctx, available)
                records = [r for r, keep in zip(available, mask, strict=True) if keep]
                fit = self._train(self.student, records, self.cfg.student.epochs_per_iteration, "ce", 1.0, 1.0)
                ckpt = self.run_dir / "checkpoints" / f"it{iteration:03d}"
                self.student.save(ckpt)
                old = self.state.get("checkpoint")
                self.state["checkpoint"] = str(ckpt.relative_to(self.run_dir))
                if old and old != self.state["checkpoint"]:
                    shutil.rmtree(self.run_dir / old, ignore_errors=True)
                ev = self._evaluate(self.student, self.iteration_eval_records)
                # ``seconds`` is the whole stage (fit, checkpoint, evaluation); the fit's own time
                # is kept as ``fit_seconds`` so stage timings add up.
                fit = {("fit_seconds" if k == "seconds" else k): v for k, v in fit.items()}
                m["train"] = {"records": len(records), "available": len(available), **fit, **ev, **ctx.stats,
                              "seconds": round(time.perf_counter() - t0, 3)}
                stats = m["train"]
            elif stage == "probe":
                prompts = self.strategy.probe_prompts(ctx, n_probe)
                acc, rej, stats = self._generate_records(prompts, iteration, "probe")
                stats.update(self._holdout(acc))
                self._write("probe", iteration, acc)
                self._write("rejects-probe", iteration, rej)
                m["probe"] = stats
            else:  # feedback
                probes = store.read_parts([store.part_path(self.run_dir, "probe", iteration)])
                fb = self.strategy.update_feedback(ctx, probes)
                self.state["feedback"] = fb
                probe_ids = {r["id"] for r in probes}
                new = sum(r["id"] in probe_ids for r in fb)
                m["feedback"] = {"size": len(fb), "ids": [r["id"] for r in fb], "new": new, **ctx.stats}
                stats = {"size": len(fb), **ctx.stats}
            self.state["strategy_state"] = ctx.memory
            self._commit(iteration, stage)
            self._emit(stage, iteration, stats)

    def _restore_student(self) -> None:
        ckpt = self.state.get("checkpoint")
        if ckpt and self.student is None and (self.run_dir / ckpt).exists():
            self.student = load_student(self.run_dir / ckpt, self.task)

    def run(self) -> dict[str, Any]:
        """Run (or resume) the whole distillation; returns the run metrics."""
        if self.state.get("finished"):
            if not (self.run_dir / "report.html").exists():
                self._write_report()
            return self.metrics()
        self._restore_student()
        it, done = self.state["iteration"], self.state["stage"]
        if done == STAGES[-1]:
            it, done = it + 1, None
        while it < self.cfg.strategy.iterations:
            self.run_iteration(it, done)
            it, done = it + 1, None
        self.state["final"] = self.final_stage()
        self.state["finished"] = True
        self._commit(self.cfg.strategy.iterations - 1, STAGES[-1])
        card = store.dataset_card(self.task, self.metrics(), self.state["parts"])
        store.atomic_write_bytes(self.run_dir / "dataset_card.md", card.encode("utf-8"))
        self._write_report()
        return self.metrics()

    def _write_report(self) -> None:
        # A report that fails to render must not fail a finished run: `gold-ray report` rebuilds it.
        try:
            from gold_ray.report import write_report

            write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - logged; the run's outputs are already committed
            logger.warning("could not write %s: %s", self.run_dir / "report.html", err)

    def final_stage(self) -> dict[str, Any]:
        """Train the final student on all kept data, evaluate it and save it under ``student/``."""
        t0 = time.perf_counter()
        ctx = self._ctx(self.cfg.strategy.iterations, "train")
        records = self.training_records()
        if self.cfg.strategy.noise_filter_top > 0 and self.student is not None:
            scores = self._score(self.student, records)
            for rec, s in zip(records, scores, strict=True):
                rec["score"] = float(s)
        keep = self.strategy.keep_for_training(ctx, records)
        kept = [r for r, k in zip(records, keep, strict=True) if k]
        loss, alpha, beta = self.strategy.final_loss(ctx)
        student = self._new_student() if (self.cfg.student.final_fresh or self.student is None) else self.student
        fit = self._train(student, kept, self.cfg.student.final_epochs, loss, alpha, beta)
        out = self.run_dir / "student"
        student.save(out)
        self.student = student
        ev = self._evaluate(student)
        final = {
            "records": len(kept),
            "dropped_by_noise_filter": len(records) - len(kept),
            "loss": loss,
            "seconds": round(time.perf_counter() - t0, 3),
            "fit": fit,
            **ev,
        }
        info = {k: v for k, v in final.items() if k != "fit"}
        self._emit("final", self.cfg.strategy.iterations, {**info, "train_loss": fit.get("loss")})
        return final


def _merge_label_stats(written: dict[str, Any], labelled: dict[str, Any]) -> dict[str, Any]:
    """One generate stage's statistics from its two passes (texts written, then labelled).

    ``accepted`` counts the labelled records (the stage's training data); requests, rejects and
    tokens add up over both passes.
    """
    reasons = Counter(written.get("rejected_by_reason", {})) + Counter(labelled.get("rejected_by_reason", {}))
    return {
        **written,
        "requested": written["requested"] + labelled["requested"],
        "accepted": labelled["accepted"],
        "rejected": written["rejected"] + labelled["rejected"],
        "rejected_by_reason": dict(reasons),
        "output_tokens": int(written.get("output_tokens", 0)) + int(labelled.get("output_tokens", 0)),
        "written": written["accepted"],
        "label_requested": labelled["requested"],
        "label_seconds": labelled.get("seconds"),
    }


def distill_in_process(cfg: RunConfig, *, resume: bool = False, on_event: EventFn | None = None,
                       engine: TeacherEngine | None = None) -> dict[str, Any]:
    """Run a whole distillation in this process (no Ray), tracked in MLflow as the Ray driver does it.

    With ``tracking.enabled`` the run is an MLflow run (nested under ``tracking.parent_run_id``
    when set; a resumed run continues its own) with the config as params, per-stage metrics, the
    final metrics, ``metrics.json`` and the student.

    Args:
        cfg: The run config.
        resume: Continue the run committed in ``cfg.output.dir``.
        on_event: Progress callback.
        engine: A ready teacher engine (tests); built from ``cfg.teacher`` when None.

    Returns:
        The run metrics, with ``mlflow`` (tracking URI and run id) when tracking is on.
    """
    distiller = Distiller(cfg, engine=engine, resume=resume, on_event=on_event)
    if not cfg.tracking.enabled:
        return distiller.run()
    tracker = build_tracker(cfg, distiller.run_dir)
    try:
        known = distiller.state.get("mlflow_run_id")
        run_id = tracker.start(f"{cfg.strategy.name}-{distiller.task.name}-seed{cfg.seed}", resume_run_id=known)
        if run_id != known:
            tracker.log_params(cfg)
        distiller.state["mlflow_run_id"] = run_id
        distiller.tracker = tracker
        metrics = distiller.run()
        tracker.finish(metrics, distiller.run_dir, step=cfg.strategy.iterations)
    except BaseException:
        if tracker.run_id:
            tracker.end("FAILED")
        raise
    return metrics
