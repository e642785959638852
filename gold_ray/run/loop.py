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

Where each stage runs is the :class:`~gold_ray.run.runtime.Runtime`'s business, passed in at
construction: :class:`~gold_ray.run.runtime.InProcessRuntime` by default, ``actors.runtime.RayRuntime``
on Ray (Serve, Ray Data, a scorer pool, Ray Train). The loop is the same code on both.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.config import RunConfig
from gold_ray.errors import UserError
from gold_ray.models import allow_remote_code, is_chat_model, resolve_model
from gold_ray.reporting.tracking import NullTracker, Tracker, build_tracker
from gold_ray.run import store
from gold_ray.run.diversity import records_diversity
from gold_ray.run.faults import fault_point
from gold_ray.run.fork import check_fork, copy_fork
from gold_ray.run.runtime import InProcessRuntime, Produced, RunContext, Runtime, StageProgress, no_progress
from gold_ray.run.tasks import TaskSpec, load_task
from gold_ray.strategies import Strategy, StrategyContext, build_strategy
from gold_ray.student.evaluation import load_task_eval, seeded_subset, task_eval_file
from gold_ray.student.model import Student, build_student, check_student_model, load_student
from gold_ray.student.ood import score_quantiles, score_spread
from gold_ray.student.training import (
    choose_recipe,
    final_recipes,
    in_loop_recipe,
    in_share,
    learning_check,
    synthetic_split,
)
from gold_ray.teacher.parsing import Deduplicator
from gold_ray.types import Prompt, TeacherEngine

STAGES = ("generate", "train", "probe", "feedback")

TRAINING_PARTS = ("train-", "probe-")
"""Name prefixes of the Parquet parts that hold training data."""

logger = logging.getLogger(__name__)

EventFn = Callable[[str, dict[str, Any]], None]

STAGE_EVENTS = (*STAGES, "final")
"""Events sent once a stage is committed. The loop's ``on_event`` also gets ``plan`` (once, at the
start: the samples each iteration's generate and probe stages request) and ``progress`` (within a
stage, at most once a second: see :class:`~gold_ray.run.runtime.StageProgress`); the Ray driver
actor adds ``log`` (a warning of gold-ray's own, for the terminal)."""


class RunDirError(UserError, RuntimeError):
    """The output directory holds a different run and neither resume nor overwrite was asked for."""


class TooManyRejectsError(UserError, RuntimeError):
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


LABEL_CHECK_MIN_READ = 4
"""Fewest samples of a label, read back by the teacher, for the label's agreement to count in
:func:`label_check_skip_reason` (fewer are too noisy to call a lean)."""

LABEL_CHECK_LEAN = 0.5
"""The label check is skipped when some label's agreement, over the run so far, is below this share
of the best label's: the teacher then reads its own samples with a lean, and rejecting what it
disagrees with would keep mostly the labels it favours. The embedded teacher on AG News read its
own samples as written at Sports 39/39, Business 16/38, Sci/Tech 5/40, World 2/36 (worst 0.06 of
the best; the check had cost GOLD and ZeroGen 15 to 26 points there); on SST-2, where the check
helps, five demo runs agreed at 0.43 to 0.81 per label in total, the lower label at 0.6 to 0.9 of
the higher, and judged on the run's totals the check would have stood down on iteration 0 of two
of them and on no other batch."""


def label_agreement(records: list[dict[str, Any]], read: list[str | None]) -> dict[str, list[int]]:
    """Per requested label: ``[samples the teacher read as that label, samples it read]`` (unanswered ones left out)."""
    out: dict[str, list[int]] = {}
    for rec, label in zip(records, read, strict=True):
        if label:
            pair = out.setdefault(rec["label"], [0, 0])
            pair[0] += label == rec["label"]
            pair[1] += 1
    return out


def label_check_skip_reason(agreement: dict[str, list[int]], n_labels: int) -> str | None:
    """Why the teacher's readings of its own samples should reject nothing, or None to apply them.

    Two cases carry no information a check could use: the teacher agrees with itself no more often
    than chance (``1 / n_labels``), or it agrees far more on some labels than on others (below
    :data:`LABEL_CHECK_LEAN` of the best label's rate, among labels with at least
    :data:`LABEL_CHECK_MIN_READ` readings), so that rejecting would unbalance the data.

    Args:
        agreement: :func:`label_agreement`'s counts.
        n_labels: The task's number of labels.
    """
    read = sum(n for _, n in agreement.values())
    if not read:
        return None
    overall = sum(a for a, _ in agreement.values()) / read
    rates = {label: a / n for label, (a, n) in agreement.items() if n >= LABEL_CHECK_MIN_READ}
    shown = ", ".join(f"{label} {a}/{n}" for label, (a, n) in sorted(agreement.items()))
    if len(rates) >= 2:
        best = max(rates, key=rates.__getitem__)
        worst = min(rates, key=rates.__getitem__)
        if rates[worst] < LABEL_CHECK_LEAN * rates[best]:
            return (f"the teacher reads its own samples with a lean to {best!r} ({shown}): "
                    f"rejecting what it disagrees with would keep mostly that label")
    if overall <= 1 / max(1, n_labels):
        return f"the teacher read its own samples as the label they were written for no more often than chance ({shown})"
    return None


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


def prepare_run_dir(cfg: RunConfig, resume: bool, task: TaskSpec | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Create or reopen the run directory; refuse to clobber a different run.

    A run that starts anew here with ``output.fork_from`` starts committed after iteration 0's
    generate stage, with the first teacher pass of the run named there (:mod:`gold_ray.run.fork`;
    ``task`` is this run's task, loaded from the config when not given). The fork is checked before
    ``--overwrite`` removes anything.

    Returns:
        The directory and its committed state (None for a fresh run).
    """
    run_dir = Path(cfg.output.dir)
    state = store.load_state(run_dir)
    if state is not None and state["stage"] is not None and state["stage"] not in STAGES:
        raise store.StateFileError(f"{run_dir / store.STATE_FILE}: stage must be one of {', '.join(STAGES)} "
                                   f"or null, got {state['stage']!r}")
    occupied = state is not None or (run_dir / store.CONFIG_FILE).exists()
    if occupied and not resume and not cfg.output.overwrite:
        raise RunDirError(
            f"output.dir {run_dir} already holds a run; pass --resume to continue it "
            "or --overwrite (output.overwrite=true) to replace it"
        )
    fresh = state is None or not resume
    source = check_fork(cfg, task or load_task(cfg.task.name), run_dir) if cfg.output.fork_from and fresh else None
    if occupied and not resume:
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
        # With a fork the state is committed last: a fork that dies while copying leaves no run.
        state = copy_fork(source, run_dir) if source else None
        store.atomic_write_bytes(run_dir / store.CONFIG_FILE, cfg.to_yaml().encode("utf-8"))
        if state is not None:
            store.commit_state(run_dir, state)
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
        runtime: Where the stages run (:mod:`gold_ray.run.runtime`); default: in this process.
        engine: A ready teacher engine for the default in-process runtime (tests).
        resume: Continue the run committed in ``cfg.output.dir``.
        on_event: Called with (stage, info) after every stage, for progress and logs.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        runtime: Runtime | None = None,
        engine: TeacherEngine | None = None,
        resume: bool = False,
        on_event: EventFn | None = None,
    ):
        self.cfg = cfg
        self.task: TaskSpec = load_task(cfg.task.name)
        self.strategy: Strategy = build_strategy(cfg.strategy.name)
        # The local evaluation file, if any: strategies must never take it as their own input.
        self.eval_file = task_eval_file(self.task, cfg.task)
        # Before the run directory exists: a bad strategy input must not leave a half-made run.
        self.strategy_inputs = self.strategy.prepare(self.task, cfg, self.eval_file)
        # Every input is checked before the run directory is touched: a bad model reference or
        # data file must neither leave a half-made run behind nor replace one (--overwrite).
        teacher_path: str | None = None
        if engine is None and cfg.teacher.engine != "openai":
            teacher_path = resolve_model(cfg.teacher.model)
        self.prompt_style = resolve_prompt_style(cfg, teacher_path)
        self.student_path = resolve_model(cfg.student.model)
        check_student_model(self.task, cfg.student, self.student_path)
        evalset = load_task_eval(self.task, cfg.task)
        self.eval_records, self.eval_source, self.eval_note = evalset.records, evalset.source, evalset.note
        self.iteration_eval_records = self._iteration_eval()
        self.run_dir, state = prepare_run_dir(cfg, resume, self.task)
        write_task_copy(self.run_dir, self.task)
        self.state = state or _fresh_state(cfg)
        self.runtime: Runtime = runtime or InProcessRuntime(engine)
        self.runtime.bind(RunContext(cfg, self.task, self.run_dir.resolve(), self.student_path, teacher_path))
        self.on_event = on_event or (lambda stage, info: None)
        self.tracker: Tracker = NullTracker()
        self.student: Student | None = None
        self.dedup = Deduplicator(self.state["dedup"])
        self.stages = {"generate": self.generate_stage, "train": self.train_stage, "probe": self.probe_stage,
                       "feedback": self.feedback_stage}
        """Each stage of an iteration, in order: ``stage(iteration, n_probe, ctx) -> stats``."""

    # ---- plumbing -------------------------------------------------------------------------

    def _iteration_eval(self) -> list[dict[str, Any]]:
        limit = self.cfg.task.iteration_eval_limit
        if limit is None:
            return self.eval_records
        # Drawn from the final evaluation records, so every iteration's examples are among the final ones.
        return seeded_subset(self.eval_records, limit)

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
            student_near_chance=self._near_chance(iteration),
            extra=self.strategy_inputs,
            memory=copy.deepcopy(self.state.get("strategy_state") or {}),
            records=self.training_records,
        )

    def _near_chance(self, iteration: int) -> bool:
        # Read, not created: _iter_metrics would add an empty entry for an iteration not yet run.
        its = self.state["iterations"]
        return iteration < len(its) and bool((its[iteration].get("train") or {}).get("near_chance"))

    def _commit(self, iteration: int, stage: str) -> None:
        self.state["iteration"] = iteration
        self.state["stage"] = stage
        self.state["dedup"] = self.dedup.state()
        if (iteration, stage) == (0, "generate"):
            # What a run forked from this one starts from (gold_ray.run.fork). Before the commit: a
            # run that dies between the two writes both again when it resumes.
            store.atomic_write_json(self.run_dir / store.FIRST_PASS_FILE, self.state)
        store.commit_state(self.run_dir, self.state)
        store.atomic_write_json(self.run_dir / "metrics.json", self.metrics())
        if stage == "train":
            self._drop_stale_checkpoints()

    def _drop_stale_checkpoints(self) -> None:
        """Delete every checkpoint but the one the committed state names."""
        keep = self._checkpoint()
        folder = self.run_dir / "checkpoints"
        if keep is None or not folder.is_dir():
            return
        for old in folder.iterdir():
            if old.is_dir() and old != keep:
                shutil.rmtree(old, ignore_errors=True)

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
            "teacher_prompt_tokens": int(self.state.get("teacher_prompt_tokens") or 0),
            "eval_source": self.eval_source,
            "forked_from": self.state.get("forked_from"),
            "iterations": its,
            "totals": dict(totals),
            "final": self.state.get("final", {}),
        }

    # ---- what every stage uses ------------------------------------------------------------

    def _generate_records(
        self, prompts: list[Prompt], iteration: int, kind: str, token_cap: int | None = None
    ) -> tuple[list, list, dict]:
        prompts = _with_uids(prompts, iteration, kind)
        scorer = self.student if kind == "probe" else None
        ckpt = self._checkpoint() if scorer is not None else None
        caps = None if token_cap is None else [(len(prompts), token_cap)]
        records, stats = self._produce(prompts, iteration, kind, scorer, ckpt, caps)
        stats.pop("sent_per_segment", None)
        self._count_teacher_tokens(stats)
        return self._kind_result(records, stats, iteration, kind)

    def _generate_pass(
        self, prompts: list[Prompt], probes: list[Prompt], iteration: int,
        token_caps: tuple[int, int] | None = None,
    ) -> tuple[tuple[list, list, dict], tuple[list, list, dict]]:
        """One teacher pass for an iteration's training and probe prompts (``probes_before_training``).

        The probes go in the same runtime call after the training prompts (deduplicated after
        them, as when they were written a stage later) and are not scored here: the probe stage
        scores them with the student trained in between. Their records get their own kind and ids
        (``itNNN-probe-...``, numbered from 0), exactly as a probe stage's own pass would.

        Returns:
            ``(accepted, rejected, stats)`` of the training prompts, then of the probes; each side's
            counts, tokens and (by output-token share) seconds are its own.
        """
        sent = _with_uids(prompts, iteration, "train") + _with_uids(probes, iteration, "probe")
        # With a token budget the training prompts stop at their own share, so the probes keep theirs.
        caps = None if token_caps is None else [(len(prompts), token_caps[0]), (len(sent), token_caps[1])]
        records, stats = self._produce(sent, iteration, "train", None, None, caps)
        n_train = stats.pop("sent_per_segment", [len(prompts)])[0]
        self._count_teacher_tokens(stats)
        train, probe = records[:n_train], records[n_train:]
        for j, rec in enumerate(probe):
            rec.update(id=store.record_id(iteration, "probe", j), kind="probe")
        parts = split_pass_stats(stats, [len(train), len(probe)],
                                 [sum(int(r.get("output_tokens") or 0) for r in side) for side in (train, probe)])
        if "unsent" in stats:
            parts[0]["unsent"], parts[1]["unsent"] = len(prompts) - len(train), len(probes) - len(probe)
        return (self._kind_result(train, parts[0], iteration, "train"),
                self._kind_result(probe, parts[1], iteration, "probe"))

    def _count_teacher_tokens(self, stats: dict[str, Any]) -> None:
        self.state["teacher_tokens"] += int(stats.get("output_tokens", 0))
        self.state["teacher_prompt_tokens"] = (int(self.state.get("teacher_prompt_tokens") or 0)
                                               + int(stats.get("prompt_tokens") or 0))

    def _kind_result(
        self, records: list[dict[str, Any]], stats: dict[str, Any], iteration: int, kind: str
    ) -> tuple[list, list, dict]:
        """Accepted and rejected records of one kind and their stage statistics; too many rejects stop the run.

        The stop counts what the teacher failed to write (errors, refusals, unparsable or repeated
        samples), not what the label check turned away afterwards: a check that rejects every one
        of a few probes says the teacher disagrees with itself, not that the run is broken.
        """
        written = [r for r in records if r["reject_reason"] is None]
        share = (len(records) - len(written)) / max(1, len(records))
        # Small batches are noisy, so they stop the run only when nothing at all was accepted.
        if share > self.cfg.budget.max_reject_share and (len(records) >= 8 or not written):
            rejected = [r for r in records if r["reject_reason"] is not None]
            raise self._too_many_rejects(iteration, kind, len(records), rejected,
                                         dict(Counter(r["reject_reason"] for r in rejected)))
        if (kind in ("train", "probe") and self.cfg.teacher.check_labels and self.task.is_classification
                and not self.strategy.teacher_labels):
            stats = {**stats, "label_check": self._check_labels(records)}
        accepted = [r for r in records if r["reject_reason"] is None]
        rejected = [r for r in records if r["reject_reason"] is not None]
        stats = {
            **stats,
            "requested": len(records),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "rejected_by_reason": dict(Counter(r["reject_reason"] for r in rejected)),
        }
        scores = np.array([r.get("score", np.nan) for r in accepted], dtype=float)
        if np.isfinite(scores).any():
            stats["scores"] = score_quantiles(scores)
        return accepted, rejected, stats

    def _check_labels(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Reject the accepted samples that the teacher, asked to classify them, reads as another label.

        The teacher answers through the runtime (:meth:`Runtime.answer`) with the prompt of the
        teacher row (:func:`gold_ray.student.evaluation.teacher_readings`).
        A sample it leaves unanswered is kept: there is no reading to disagree with. The check
        rejects nothing when the run's readings so far lean to some labels or sit at chance
        (:func:`label_check_skip_reason`); the run's totals are kept in ``state["label_agreement"]``.

        Returns:
            ``checked``, ``rejected``, ``agreement`` (this batch's :func:`label_agreement`),
            ``skipped`` (why it rejected nothing, when it stood down) and ``seconds``.
        """
        from gold_ray.student.evaluation import FEWSHOT_PARAMS, teacher_readings

        todo = [r for r in records if r["reject_reason"] is None and r.get("label") is not None]
        if not todo:
            return {"checked": 0, "rejected": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        read = teacher_readings(lambda batch: self.runtime.answer(batch, FEWSHOT_PARAMS), self.task, todo,
                                prompt_style=self.prompt_style, max_demo_chars=self.cfg.strategy.max_demo_chars)
        agreement = label_agreement(todo, read)
        # Judged on every reading of the run so far: a batch of a few dozen samples leans by chance
        # (SST-2 demo batches down to 0.26 of the other label's rate, the runs' totals 0.6 to 0.9).
        run_total = {label: list(pair) for label, pair in self.state.get("label_agreement", {}).items()}
        for label, (agree, n) in agreement.items():
            pair = run_total.setdefault(label, [0, 0])
            pair[0], pair[1] = pair[0] + agree, pair[1] + n
        self.state["label_agreement"] = run_total
        out: dict[str, Any] = {"checked": len(todo), "rejected": 0, "agreement": agreement}
        skip = label_check_skip_reason(run_total, len(self.task.label_names))
        if skip:
            # Numbered as the progress lines number iterations (from 1).
            logger.warning("iteration %d/%d, %s samples: label check skipped: %s", todo[0].get("iteration", 0) + 1,
                           self.cfg.strategy.iterations, todo[0].get("kind", "train"), skip)
            out["skipped"] = skip
        else:
            for rec, label in zip(todo, read, strict=True):
                if label and label != rec["label"]:
                    rec.update(reject_reason="label_check", score=float("nan"),
                               reject_detail=f"asked for {rec['label']!r}, the teacher reads it as {label!r}")
                    out["rejected"] += 1
        return {**out, "seconds": round(time.perf_counter() - t0, 3)}

    def _produce(
        self, prompts: list[Prompt], iteration: int, kind: str, scorer: Student | None, ckpt: Path | None,
        token_caps: list[tuple[int, int]] | None,
    ) -> Produced:
        """The runtime's records of ``prompts``, in order.

        With ``token_caps`` (``budget.teacher_tokens``), ``[(end, cap), ...]``: the prompts before
        each ``end`` (after the previous one) are sent in chunks of ``teacher.batch_size`` while the
        run's teacher output tokens are below that segment's ``cap``; the rest of the segment is not
        sent, and the next segment starts. ``stats["sent_per_segment"]`` counts the records of each.
        """
        if token_caps is None:
            return self.runtime.produce(prompts, iteration, kind, scorer, ckpt, self.dedup)
        spent = int(self.state["teacher_tokens"])
        size = self.cfg.teacher.batch_size
        records: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        sent: list[int] = []
        begin = 0
        for end, cap in token_caps:
            before = len(records)
            for start in range(begin, end, size):
                if spent >= cap:
                    break
                chunk, stats = self.runtime.produce(prompts[start : min(start + size, end)], iteration, kind, scorer,
                                                    ckpt, self.dedup)
                # Ids are positions in the stage, not in the chunk: a chunk's runtime numbers from 0.
                for i, rec in enumerate(chunk):
                    rec["id"] = store.record_id(iteration, kind, start + i)
                records += chunk
                parts.append(stats)
                spent += int(stats.get("output_tokens", 0))
            sent.append(len(records) - before)
            begin = end
        merged = merge_produce_stats(parts, len(records))
        merged["token_cap"] = token_caps[-1][1]
        merged["unsent"] = len(prompts) - len(records)
        merged["sent_per_segment"] = sent
        return records, merged

    def _token_cap(self, iteration: int, kind: str, n_probe: int) -> int | None:
        """The run's teacher output tokens a stage may reach (``budget.teacher_tokens``), or None.

        The tokens are spread as the samples are: the stage may spend up to its cumulative share
        of ``budget.samples`` (every earlier stage's samples and its own), so tokens a stage leaves
        unspent carry over to the next one.
        """
        total = self.cfg.budget.teacher_tokens
        if total is None:
            return None
        samples = sum(self._requested(j) for j in range(iteration)) + self._requested(iteration)
        if kind == "train":
            samples -= n_probe
        return math.ceil(total * samples / self.cfg.budget.samples)

    def _checkpoint(self) -> Path | None:
        ckpt = self.state.get("checkpoint")
        return self.run_dir / ckpt if ckpt else None

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
        """All accepted training and probe records committed so far (not rejects, not LLKD's pool).

        Without a real evaluation set, a seeded share of them is the synthetic test split
        (:meth:`synthetic_test_records`) and is left out here: no training or recipe choice sees it.
        """
        parts = [self.run_dir / p for p in self.state["parts"] if Path(p).name.startswith(TRAINING_PARTS)]
        records = store.read_parts(parts)
        if self.eval_records:
            return records
        return [r for r in records if not self._is_test(r)]

    def synthetic_test_records(self) -> list[dict[str, Any]]:
        """Without a real evaluation set: the held-out synthetic test split (else empty)."""
        if self.eval_records:
            return []
        parts = [self.run_dir / p for p in self.state["parts"] if Path(p).name.startswith(TRAINING_PARTS)]
        return [r for r in store.read_parts(parts) if self._is_test(r)]

    def _is_test(self, record: dict[str, Any]) -> bool:
        return in_share(str(record.get("id", "")), self.cfg.seed, self.cfg.student.val_share, salt="test")

    def _split(self, records: list[dict[str, Any]], fresh: bool, continued: bool
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        # Only a fresh student may have its split topped up (a continued one trained on the next
        # hashes up), and a student that goes on training never trains on the hashed records, on
        # which it validates once there are enough of them.
        return synthetic_split(records, self.cfg.student.val_share, self.cfg.seed, top_up=fresh, keep_out=continued)

    def _new_student(self) -> Student:
        # The run seed, as the Ray train stage passes it, so a run's students match on both runtimes.
        return build_student(self.task, self.cfg.student, self.student_path, seed=self.cfg.seed)

    def _evaluate(self, student: Student, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        records = self.eval_records if records is None else records
        return self.runtime.evaluate(student, self._checkpoint(), records)

    def _holdout(self, probes: list[dict[str, Any]]) -> dict[str, Any]:
        """Without a real evaluation set: the student's metrics on the fresh probes (``holdout_*``).

        The probes of an iteration are written after its training stage, so the student has not
        seen them: a synthetic hold-out, labelled by the label the teacher was asked for.
        """
        if self.eval_records or self.student is None or not probes:
            return {}
        ev = self._evaluate(self.student, probes)
        return {f"holdout_{k}": v for k, v in ev.items() if isinstance(v, int | float)}

    def _emit(self, stage: str, iteration: int, info: dict[str, Any]) -> None:
        self.on_event(stage, {"iteration": iteration, "iterations": self.cfg.strategy.iterations, **info})
        self.tracker.log_metrics(stage_metrics(stage, info), step=iteration)

    def _requested(self, iteration: int) -> int:
        per = self.cfg.per_iteration_samples()
        if iteration == self.cfg.strategy.iterations - 1:
            return self.cfg.budget.samples - per * (self.cfg.strategy.iterations - 1)
        return per

    def _budget_left(self) -> bool:
        cap = self.cfg.budget.max_teacher_tokens
        return cap is None or self.state["teacher_tokens"] < cap

    # ---- the stages of an iteration -------------------------------------------------------

    def generate_stage(self, iteration: int, n_probe: int, ctx: StrategyContext) -> dict[str, Any]:
        """The teacher writes the iteration's training samples (and LLKD's labels); they are stored."""
        m = self._iter_metrics(iteration)
        n = self._requested(iteration) - n_probe if self._budget_left() else 0
        prompts = self.strategy.train_prompts(ctx, n)
        if self._one_pass(n_probe):
            # The probes' prompts are drawn as the probe stage would draw them (its context and
            # seeded stream) and written now, in the same teacher pass; they wait, unscored and
            # not yet training data, for the probe stage (``pending_probes``).
            probe_ctx = self._ctx(iteration, "probe")
            probes = self.strategy.probe_prompts(probe_ctx, n_probe)
            caps = self._token_cap(iteration, "train", n_probe), self._token_cap(iteration, "probe", n_probe)
            (acc, rej, stats), (p_acc, p_rej, p_stats) = self._generate_pass(
                prompts, probes, iteration, None if caps[0] is None else caps)
            self._write_pending_probes(iteration, p_acc, p_rej, p_stats)
        else:
            acc, rej, stats = self._generate_records(prompts, iteration, "train",
                                                     self._token_cap(iteration, "train", n_probe))
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
        return stats

    def _one_pass(self, n_probe: int) -> bool:
        """Whether this iteration's probes are written in the generate stage's teacher pass."""
        return n_probe > 0 and self.strategy.uses_probes and self.strategy.probes_before_training

    def _write_pending_probes(
        self, iteration: int, accepted: list[dict[str, Any]], rejected: list[dict[str, Any]], stats: dict[str, Any]
    ) -> None:
        """Keep the probes written in the generate stage's pass until the probe stage scores them.

        They are committed with the generate stage (a resumed run never asks the teacher for them
        again) but under a name that is not training data (:data:`~gold_ray.run.store.PENDING_PROBES`):
        the training stage between must not see them, they are its fresh hold-out (:meth:`_holdout`).
        """
        path = store.part_path(self.run_dir, store.PENDING_PROBES, iteration)
        store.write_part(path, self.task, accepted + rejected)
        # The path is derived from the iteration, never read from the state file.
        self.state["pending_probes"] = {"iteration": iteration, "stats": stats}

    def _pending_probes(self, iteration: int) -> tuple[list, list, dict] | None:
        """The probes the generate stage's pass wrote for this iteration, or None (two passes)."""
        pending = self.state.get("pending_probes")
        if not pending or pending["iteration"] != iteration:
            return None
        # Committed with the probe stage: from then on the probes are the ``probe`` part.
        self.state["pending_probes"] = None
        records = store.read_parts([store.part_path(self.run_dir, store.PENDING_PROBES, iteration)])
        accepted = [r for r in records if r["reject_reason"] is None]
        rejected = [r for r in records if r["reject_reason"] is not None]
        return accepted, rejected, copy.deepcopy(pending["stats"])

    def _score_pending(self, accepted: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Score the pending probes with the student trained since they were written."""
        if self.student is None or not accepted:
            return
        t0 = time.perf_counter()
        for rec, value in zip(accepted, self.runtime.score(self.student, self._checkpoint(), accepted), strict=True):
            rec["score"] = float(value)
        stats["score_seconds"] = round(time.perf_counter() - t0, 3)
        scores = np.array([r["score"] for r in accepted], dtype=float)
        stats["scored"] = int(np.isfinite(scores).sum())  # as the two-pass path counts its scored probes
        if np.isfinite(scores).any():
            stats["scores"] = score_quantiles(scores)

    def train_stage(self, iteration: int, n_probe: int, ctx: StrategyContext) -> dict[str, Any]:
        """The student trains on what it may see so far, is checkpointed and evaluated.

        A seeded share of the records is the synthetic validation split: the student trains until
        its accuracy there stops improving (within the recipe's step floor and epoch cap), and its
        training loss against chance (ln K) says whether it learned enough for its energy to rank
        the next probes.
        """
        t0 = time.perf_counter()
        fresh = self.student is None or not self.strategy.continue_student
        if fresh:
            self.student = self._new_student()
        ctx.student = self.student
        available = self.training_records()
        mask = self.strategy.train_mask(ctx, available)
        records = [r for r, keep in zip(available, mask, strict=True) if keep]
        train, val = self._split(records, fresh, continued=self.strategy.continue_student)
        fit = self.runtime.train(self.student, train, in_loop_recipe(self.cfg.student), val)
        ckpt = self.run_dir / "checkpoints" / f"it{iteration:03d}"
        self.student.save(ckpt)
        # The previous checkpoint goes once this stage's commit names the new one (_commit): a run
        # that dies before that commit resumes from the previous one.
        self.state["checkpoint"] = str(ckpt.relative_to(self.run_dir))
        ev = self._evaluate(self.student, self.iteration_eval_records)
        # ``seconds`` is the whole stage (fit, checkpoint, evaluation); the fit's own time
        # is kept as ``fit_seconds`` so stage timings add up.
        fit = {("fit_seconds" if k == "seconds" else k): v for k, v in fit.items()}
        learning = learning_check(self.task, fit, val)
        stats = {"records": len(train), "val_records": len(val), "available": len(available), **fit,
                 **learning, **ev, **ctx.stats, "seconds": round(time.perf_counter() - t0, 3)}
        if learning.get("near_chance"):
            logger.warning("iteration %d/%d: %s", iteration + 1, self.cfg.strategy.iterations, learning["warning"])
        self._iter_metrics(iteration)["train"] = stats
        return {k: v for k, v in stats.items() if k != "curve"}

    def probe_stage(self, iteration: int, n_probe: int, ctx: StrategyContext) -> dict[str, Any]:
        """The teacher writes probes (or wrote them in the generate stage's pass, see
        :meth:`_one_pass`); the student scores them (their spread tells if the score ranks)."""
        pending = self._pending_probes(iteration)
        if pending is not None:
            acc, rej, stats = pending
            self._score_pending(acc, stats)
        else:
            prompts = self.strategy.probe_prompts(ctx, n_probe)
            acc, rej, stats = self._generate_records(prompts, iteration, "probe",
                                                     self._token_cap(iteration, "probe", n_probe))
        stats.update(self._holdout(acc))
        stats.update(score_spread([r.get("score", math.nan) for r in acc]))
        self._write("probe", iteration, acc)
        self._write("rejects-probe", iteration, rej)
        self._iter_metrics(iteration)["probe"] = stats
        return stats

    def feedback_stage(self, iteration: int, n_probe: int, ctx: StrategyContext) -> dict[str, Any]:
        """The strategy picks the feedback pool of the next prompts."""
        # The probe stage's commit holds the probes; their pending copy has served.
        store.part_path(self.run_dir, store.PENDING_PROBES, iteration).unlink(missing_ok=True)
        probes = store.read_parts([store.part_path(self.run_dir, "probe", iteration)])
        fb = self.strategy.update_feedback(ctx, probes)
        self.state["feedback"] = fb
        probe_ids = {r["id"] for r in probes}
        new = sum(r["id"] in probe_ids for r in fb)
        m = self._iter_metrics(iteration)
        # A band chosen by a student still near chance is a random pick: say so where it is used
        # (unless the strategy held the band back for that reason).
        near_chance = ctx.student_near_chance and bool(probes) and not ctx.stats.get("band_held")
        m["feedback"] = {"size": len(fb), "ids": [r["id"] for r in fb], "new": new, "near_chance": near_chance,
                         **ctx.stats}
        return {"size": len(fb), "near_chance": near_chance, **ctx.stats}

    def run_iteration(self, iteration: int, done: str | None) -> None:
        """Run the stages of one iteration that come after ``done`` (the last committed stage)."""
        start = STAGES.index(done) + 1 if done else 0
        n_probe = self._n_probe(iteration)
        for stage in STAGES[start:]:
            self.runtime.progress = self._stage_progress(stage, iteration)
            fault_point("stage.start", iteration=iteration, stage=stage)
            ctx = self._ctx(iteration, stage)
            stats = self.stages[stage](iteration, n_probe, ctx)
            self.state["strategy_state"] = ctx.memory
            self.runtime.progress = no_progress
            self._commit(iteration, stage)
            self._emit(stage, iteration, stats)

    def _stage_progress(self, stage: str, iteration: int) -> StageProgress:
        """The counter the runtime reports the running stage's counts to (``progress`` events)."""
        head = {"stage": stage, "iteration": iteration, "iterations": self.cfg.strategy.iterations}
        return StageProgress(lambda info: self.on_event("progress", {**head, **info}))

    def _n_probe(self, iteration: int) -> int:
        # Probes come out of the same budget as training samples, so that strategies with and
        # without probes spend the same teacher calls (probes are training data too).
        requested = self._requested(iteration)
        if self.strategy.uses_probes and requested > 1:
            return max(1, round(requested * self.cfg.strategy.probe_fraction))
        return 0

    def _emit_plan(self) -> None:
        n = self.cfg.strategy.iterations
        samples = [[self._requested(it) - self._n_probe(it), self._n_probe(it)] for it in range(n)]
        self.on_event("plan", {"iterations": n, "samples": samples})

    def _restore_student(self) -> None:
        ckpt = self._checkpoint()
        if ckpt is None or self.student is not None:
            return
        if not ckpt.exists():
            # A fresh student in its place would quietly give another run than the one resumed.
            raise store.StateFileError(
                f"{self.run_dir / store.STATE_FILE}: checkpoint {self.state['checkpoint']!r} is missing, so the "
                "run's student cannot continue; start the run again with --overwrite")
        self.student = load_student(ckpt, self.task)

    # ---- the whole run --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or resume) the whole distillation, tracked in MLflow when tracking is on.

        The run's MLflow run is opened (or reopened) here for both runtimes, with the config as
        params whenever the MLflow run is new (also when a run that died before its first commit
        is resumed); a failure marks it FAILED.

        Returns:
            The run metrics, with ``mlflow`` (tracking URI and run id) when tracking is on.
        """
        if self.state.get("finished"):
            # A run that died after committing its end may lack what follows the commit; all of it
            # is safe to write again.
            store.atomic_write_json(self.run_dir / "metrics.json", self.metrics())
            self._finished_files(report=not (self.run_dir / "report.html").exists())
            return self.metrics()
        self.tracker = build_tracker(self.cfg, self.run_dir) if self.cfg.tracking.enabled else NullTracker()
        try:
            known = self.state.get("mlflow_run_id")
            run_id = self.tracker.start(f"{self.cfg.strategy.name}-{self.task.name}-seed{self.cfg.seed}",
                                        resume_run_id=known)
            if run_id and run_id != known:
                self.tracker.log_params(self.cfg)
                # A fork starts with iteration 0's teacher pass committed: its new MLflow run gets
                # what that stage (and any other committed before this MLflow run) would have logged.
                for m in self.state["iterations"]:
                    for stage in STAGES:
                        if stage in m:
                            self.tracker.log_metrics(stage_metrics(stage, m[stage]), step=m["iteration"])
                self.state["mlflow_run_id"] = run_id
                # Kept now, not at the first stage's commit: a driver that dies before that commit
                # must come back to this MLflow run, not open a second one without params. The
                # state in memory is still the committed one, so committing it adds only the id.
                store.commit_state(self.run_dir, self.state)
            self.runtime.run.tracking = self.tracker.parent_info()
            self.runtime.start()
            metrics = self._run_stages()
            self.tracker.finish(metrics, self.run_dir)
        except BaseException:
            if self.tracker.run_id:
                self.tracker.end("FAILED")
            raise
        finally:
            self.runtime.close()
        return metrics

    def _run_stages(self) -> dict[str, Any]:
        self._emit_plan()
        self._restore_student()
        it, done = self.state["iteration"], self.state["stage"]
        if done == STAGES[-1]:
            it, done = it + 1, None
        while it < self.cfg.strategy.iterations:
            self.run_iteration(it, done)
            it, done = it + 1, None
        self.runtime.progress = self._stage_progress("final", self.cfg.strategy.iterations)
        try:
            self.state["final"] = self.final_stage()
        finally:
            self.runtime.progress = no_progress
        self.state["finished"] = True
        self._commit(self.cfg.strategy.iterations - 1, STAGES[-1])
        self._finished_files(report=True)
        return self.metrics()

    def _finished_files(self, report: bool) -> None:
        """What a finished run holds beside its committed state and metrics: no checkpoints, the
        dataset card and (when ``report``) the report."""
        # Checkpoints only serve a resume; the finished run's student is in student/.
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        card = store.dataset_card(self.task, self.metrics(), self.state["parts"])
        store.atomic_write_bytes(self.run_dir / "dataset_card.md", card.encode("utf-8"))
        if report:
            self._write_report()

    def _write_report(self) -> None:
        # A report that fails to render must not fail a finished run: `gold-ray report` rebuilds it.
        try:
            from gold_ray.reporting.report import write_report

            write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - logged; the run's outputs are already committed
            logger.warning("could not write %s: %s", self.run_dir / "report.html", err)

    def final_stage(self) -> dict[str, Any]:
        """Train the final student on all kept data, evaluate it and save it under ``student/``.

        With a synthetic validation split of at least :data:`~gold_ray.student.training.MIN_VAL_RECORDS`
        records and no recipe pinned in the config, every candidate of :func:`final_recipes` is
        trained (to the last epoch of its step floor's budget) and the best
        on that split is kept (:func:`choose_recipe`, which keeps the strategy's own loss unless
        another beats it by more than the split's noise).
        """
        t0 = time.perf_counter()
        ctx = self._ctx(self.cfg.strategy.iterations, "train")
        records = self.training_records()
        if self.cfg.strategy.noise_filter_top > 0 and self.student is not None:
            scores = self.runtime.score(self.student, self._checkpoint(), records)
            for rec, s in zip(records, scores, strict=True):
                rec["score"] = float(s)
        keep = self.strategy.keep_for_training(ctx, records)
        kept = [r for r, k in zip(records, keep, strict=True) if k]
        own = self.strategy.final_loss(ctx)
        fresh = self.cfg.student.final_fresh or self.student is None
        train, val = self._split(kept, fresh, continued=False)
        candidates = final_recipes(self.cfg.student, own, selectable=bool(val))
        trials = []
        for recipe in candidates:
            student = self._new_student() if fresh else load_student(self._checkpoint(), self.task)
            fit = self.runtime.train(student, train, recipe, val)
            trials.append((recipe, student, fit))
        n_classes = len(self.task.label_names) if self.task.is_classification else None
        chosen = choose_recipe([(r, f) for r, _, f in trials], own_loss=own[0], n_val=len(val), n_classes=n_classes)
        recipe, student, fit = trials[chosen]
        out = self.run_dir / "student"
        student.save(out)
        self.student = student
        ev = self._evaluate(student)
        test = self.synthetic_test_records()
        synthetic = {}
        if not ev and test:
            synthetic = {f"synthetic_{k}": v for k, v in self._evaluate(student, test).items()}
        final = {
            "records": len(train),
            "val_records": len(val),
            "dropped_by_noise_filter": len(records) - len(kept),
            # Of the records the stage starts from (before the noise filter): what the strategy had the teacher write.
            "diversity": records_diversity(records, self.task.field_names),
            "loss": recipe.loss,
            "recipe": recipe.name,
            "recipes": [{"recipe": r.name, **{k: v for k, v in f.items() if k != "curve"}} for r, _, f in trials],
            "eval_source": self.eval_source,
            "seconds": round(time.perf_counter() - t0, 3),
            "fit": fit,
            **learning_check(self.task, fit, val),
            **ev,
            **synthetic,
        }
        if self.eval_note:
            final["eval_note"] = self.eval_note
        final["baselines"] = self.baselines(test)
        info = {k: v for k, v in final.items() if k not in ("fit", "recipes", "baselines")}
        self._emit("final", self.cfg.strategy.iterations,
                   {**info, "train_loss": fit.get("loss"), **baseline_metrics(final["baselines"])})
        return final

    def baselines(self, synthetic_test: list[dict[str, Any]]) -> dict[str, Any]:
        """The references the final student is shown beside (:mod:`gold_ray.run.baselines`).

        On the student's own evaluation examples: the real evaluation set, else the synthetic test
        split (``on`` says which). The teacher row goes through the runtime's teacher
        (:meth:`Runtime.answer`) and is cached; a failure there is recorded, never fatal, since the
        run's student is already saved.

        Returns:
            ``on``, ``n``, ``majority`` (classification) and ``teacher_fewshot`` (``accuracy``, ``n``,
            ``cached``, ...; ``{"error": ...}`` when it failed), or ``teacher_fewshot_note`` when off.
        """
        from gold_ray.run import baselines as refs
        from gold_ray.student.evaluation import FEWSHOT_PARAMS

        records = self.eval_records or synthetic_test
        out: dict[str, Any] = {"on": "eval set" if self.eval_records else "synthetic hold-out", "n": len(records)}
        majority = refs.majority_class(self.task, records)
        if majority:
            out["majority"] = majority
        b = self.cfg.baselines
        if not b.teacher_fewshot:
            out["teacher_fewshot_note"] = "off (baselines.teacher_fewshot=false)"
        elif not records:
            out["teacher_fewshot_note"] = "no evaluation examples"
        else:
            try:
                out["teacher_fewshot"] = refs.teacher_fewshot(
                    self.cfg, self.task, refs.fewshot_records(records, b.teacher_fewshot_limit), self.prompt_style,
                    lambda prompts: self.runtime.answer(prompts, FEWSHOT_PARAMS),
                    teacher_path=self.runtime.run.teacher_path)
            except Exception as err:  # noqa: BLE001 - a reference row must not fail a finished run
                logger.warning("the teacher as a few-shot classifier failed: %s", err)
                out["teacher_fewshot"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        return out


def baseline_metrics(baselines: dict[str, Any]) -> dict[str, float]:
    """The reference rows as flat numbers (``baseline_majority``, ``baseline_teacher_fewshot``), for
    the final event and MLflow."""
    out = {}
    if (baselines.get("majority") or {}).get("accuracy") is not None:
        out["baseline_majority"] = float(baselines["majority"]["accuracy"])
    teacher = baselines.get("teacher_fewshot") or {}
    for name in ("accuracy", "numeric_match", "exact_match"):
        if isinstance(teacher.get(name), int | float):
            out["baseline_teacher_fewshot"] = float(teacher[name])
            break
    return out


PASS_SHARED = ("seconds", "output_tokens", "prompt_tokens", "tokens_per_s", "samples_per_s")
"""Produce statistics of a whole teacher pass that :func:`split_pass_stats` divides between its kinds."""


def stage_metrics(stage: str, info: dict[str, Any]) -> dict[str, Any]:
    """A stage's numbers as MLflow metric names (``train.loss``, nested ones as ``final.diversity.distinct_2``);
    the tracker keeps the numeric ones."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out.update(stage_metrics(f"{stage}.{key}", value))
        else:
            out[f"{stage}.{key}"] = value
    return out


def split_pass_stats(stats: dict[str, Any], counts: list[int], tokens: list[int]) -> list[dict[str, Any]]:
    """One teacher pass's produce statistics divided between the kinds of prompts it carried.

    Each side gets its own output tokens (``tokens``, summed from its records), the pass's
    seconds in proportion to them (generation time goes with the tokens written; by prompt count
    when nothing was written) and prompt tokens in proportion to its prompts; rates are
    recomputed. Other counters (retries, streaming) stay with the first side. Every side says
    ``teacher_pass: shared``.
    """
    seconds = float(stats.get("seconds") or 0)
    total_tokens, total_count = sum(tokens), sum(counts)
    prompt_tokens = int(stats.get("prompt_tokens") or 0)
    out = []
    for i, (n, t) in enumerate(zip(counts, tokens, strict=True)):
        side = {k: v for k, v in stats.items() if k not in PASS_SHARED} if i == 0 else {}
        share = t / total_tokens if total_tokens else (n / total_count if total_count else 0.0)
        secs = seconds * share
        side.update(
            teacher_pass="shared", output_tokens=t, seconds=round(secs, 3),
            prompt_tokens=round(prompt_tokens * n / total_count) if total_count else 0,
            tokens_per_s=round(t / secs, 2) if secs > 0 else None,
            samples_per_s=round(n / secs, 3) if secs > 0 and n else None,
        )
        out.append(side)
    return out


def _with_uids(prompts: list[Prompt], iteration: int, kind: str) -> list[Prompt]:
    """``prompts`` with ``meta["uid"]``: their kind and position in the stage (engines may salt with it)."""
    return [dataclasses.replace(p, meta={**p.meta, "uid": f"it{iteration}-{kind}-{i}"}) for i, p in enumerate(prompts)]


def merge_produce_stats(parts: list[dict[str, Any]], sent: int) -> dict[str, Any]:
    """One stage's produce statistics from its chunks: counts and seconds add up, rates are recomputed."""
    merged: dict[str, Any] = {}
    for stats in parts:
        for k, v in stats.items():
            if isinstance(v, bool):
                merged[k] = bool(merged.get(k)) or v
            elif v is None:
                merged.setdefault(k, None)
            elif isinstance(v, int | float) and k not in ("tokens_per_s", "samples_per_s"):
                merged[k] = merged.get(k, 0) + v
            else:
                merged.setdefault(k, v)
    seconds = float(merged.get("seconds") or 0)
    tokens = int(merged.get("output_tokens") or 0)
    merged["output_tokens"] = tokens
    merged["tokens_per_s"] = round(tokens / seconds, 2) if seconds > 0 else None
    merged["samples_per_s"] = round(sent / seconds, 3) if seconds > 0 and sent else None
    return merged


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
    """Run a whole distillation in this process (no Ray), tracked in MLflow as a Ray run is.

    Args:
        cfg: The run config.
        resume: Continue the run committed in ``cfg.output.dir``.
        on_event: Progress callback.
        engine: A ready teacher engine (tests); built from ``cfg.teacher`` when None.

    Returns:
        The run metrics, with ``mlflow`` (tracking URI and run id) when tracking is on.
    """
    return Distiller(cfg, engine=engine, resume=resume, on_event=on_event).run()
