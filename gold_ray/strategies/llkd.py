"""LLKD, "Learning with Less" (Li et al., 2024/25): the teacher labels unlabelled text; the student
learns from the samples the teacher is sure of and the student is unsure of.

Every iteration the teacher labels texts with ``classify`` prompts (:mod:`gold_ray.teacher.labelling`):
the few-shot prompt of the teacher-as-classifier row (all seed demos), answered by scoring each
label word. Its label is the best-scoring word, and its **confidence** the softmax of the label
words' log-probabilities at that word (methods.md 6.2, option B).

Small teachers score label words with a strong prior of their own (SmolLM2-135M labels 54 of AG
News' 64 ``seed.jsonl`` texts "Sports": 33 % right). So by default (``llkd_calibration=batch``) the
label probabilities are first divided by their mean over every text labelled so far, this
iteration's included, and renormalised: batch calibration (Zhou et al., ICLR 2024), which uses
no labels. On those 64 texts it lifts the teacher's labels to 72 % (SST-2: 64 %, unchanged); this
was measured on ``seed.jsonl``, never on a test set. Labels of earlier iterations are not revised.
The raw scores stay in the record's ``option_logprobs`` column. Before each in-loop training
round the current student gives each labelled text an **uncertainty**, its normalised entropy
``H(p) / log K``. A text is selected when its confidence reaches the teacher threshold of its label
and its uncertainty reaches the student threshold of its label; the student trains on the
selection, and the final (fresh) student on every text selected at least once.

The thresholds are class-wise and move with time (one step per iteration), FreeMatch-style as
methods.md 6.2 reconstructs them (the paper's formulas are unverified)::

    g_t    = m g_{t-1}    + (1 - m) mean(s)                 over all labelled texts
    c_t(y) = m c_{t-1}(y) + (1 - m) mean(s | label y)
    tau_t(y) = g_t * c_t(y) / max_y' c_t(y')

for each signal s (teacher confidence, student uncertainty), with momentum ``llkd_momentum`` and
the first iteration's statistics as the starting values. The thresholds are committed with each
stage, so a resumed run goes on with the same ones.

Where the texts come from, and the budget:

- The unlabelled pool is ``task.unlabeled_path`` (default: the task's ``seed_path``, i.e. the
  benchmark's ``seed.jsonl`` with its labels dropped), shuffled with the run seed and spread over
  the iterations; never the evaluation file (refused with a ConfigError).
- The benchmarks' pools hold 64 texts, far fewer than the budget, so the teacher also writes texts
  to label: label-conditioned prompts with the seed demos (as ZeroGen), whose requested label is
  dropped (the ``pool-itNNN`` parts keep them). Written texts are labelled in the same stage.
- Every teacher request counts against ``budget.samples``: a written text costs two (writing and
  labelling), a pool text one (an odd call left over is not spent, nor are the labelling calls of
  written texts the parser rejected). So LLKD trains on fewer, teacher-labelled samples than the
  generation strategies, for the same number of teacher calls. When the pool holds fewer texts than
  half the budget, ``prepare`` logs a warning with the number of texts the budget will label.

Runtime: answers come back through the same path in process and on Ray: the Serve teacher
deployment answers classify prompts with ``engine.option_logprobs`` and returns the scores with the
row. Engines that cannot score (OpenAI-compatible endpoints) generate the label word greedily
instead; such answers have no confidence (NaN), and the teacher threshold then lets them pass, so
selection rests on the student's uncertainty alone.

Not implemented: the paper's weighted loss (each selected sample weighs 1), and selection per
mini-batch (it runs once per iteration, over every text labelled so far). Classification tasks only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.config import ConfigError, RunConfig
from gold_ray.run.tasks import TaskSpec
from gold_ray.strategies.base import Strategy, StrategyContext, resolve_strategy_input
from gold_ray.student.evaluation import input_field_problems, lines_with_problems, read_jsonl_numbered
from gold_ray.student.influence import softmax
from gold_ray.teacher.labelling import OPTIONS_KEY, RECORD_KEY, softmax_confidence
from gold_ray.teacher.prompts import render_classify_prompt
from gold_ray.types import Prompt

logger = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-9
"""A value this close below its threshold still passes (texts with equal signals must all pass or fail
together, whatever the rounding of the mean they are compared with)."""


def load_unlabelled(task: TaskSpec, path: Path) -> list[dict[str, Any]]:
    """The input fields of each record of a JSONL file (labels and other keys are dropped).

    Raises:
        ConfigError: the file is malformed or records miss an input field (names the lines).
    """
    try:
        raw = read_jsonl_numbered(path)
    except ValueError as err:
        raise ConfigError(f"task.unlabeled_path: {err}") from None
    if problems := input_field_problems(task, raw):
        raise ConfigError("task.unlabeled_path: " + lines_with_problems(path, problems, f"task {task.name!r}"))
    return [{"id": f"pool-{lineno:05d}", **{f: str(rec[f]) for f in task.field_names}} for lineno, rec in raw]


def update_thresholds(
    memory: dict[str, Any], values: np.ndarray, labels: list[str], label_names: list[str], momentum: float
) -> dict[str, float]:
    """One time step of the class-wise adaptive threshold of one signal (see the module docstring).

    Args:
        memory: ``{"global": g, "class": {label: c}}`` of the previous step (updated in place;
            empty at the first step).
        values: The signal per labelled text (NaN: unknown, left out of the means).
        labels: The teacher's label per text.
        label_names: The task's labels.
        momentum: ``m``.

    Returns:
        The threshold per label (NaN where the signal was never observed).
    """
    vals = np.asarray(values, dtype=np.float64)
    known = np.isfinite(vals)
    if known.any():
        now = float(vals[known].mean())
        prev = memory.get("global")
        memory["global"] = now if prev is None else momentum * prev + (1 - momentum) * now
        classes = memory.setdefault("class", {})
        for name in label_names:
            sel = known & np.array([lab == name for lab in labels], dtype=bool)
            if sel.any():
                cur = float(vals[sel].mean())
                old = classes.get(name)
                classes[name] = cur if old is None else momentum * old + (1 - momentum) * cur
    g, classes = memory.get("global"), memory.get("class") or {}
    top = max(classes.values()) if classes else None
    return {name: (g * classes[name] / top if g is not None and name in classes and top else math.nan)
            for name in label_names}


def label_log_probs(record: dict[str, Any], k: int) -> np.ndarray | None:
    """The teacher's log-probability per label (renormalised over the labels), or None if unscored."""
    raw = record.get("option_logprobs")
    if not raw:
        return None
    scores = np.asarray(json.loads(raw), dtype=np.float64)
    if scores.shape != (k,) or not np.isfinite(scores).any():
        return None
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    return scores - np.logaddexp.reduce(scores)


def batch_calibrate(log_probs: list[np.ndarray]) -> np.ndarray:
    """Log of the mean label probability over a batch: the teacher's prior to divide by."""
    return np.log(np.mean(np.exp(np.stack(log_probs)), axis=0))


def normalised_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of each row's softmax divided by ``log K`` (0: certain, 1: uniform)."""
    p = softmax(logits)
    k = p.shape[1]
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    return h / math.log(k) if k > 1 else np.zeros(len(p))


class LLKDStrategy(Strategy):
    """LLKD: teacher-labelled texts selected by teacher confidence and student uncertainty."""

    name = "llkd"
    continue_student = True
    teacher_labels = True

    def prepare(self, task: TaskSpec, cfg: RunConfig, eval_file: Any) -> dict[str, Any]:
        """Load the unlabelled pool (``task.unlabeled_path``, default the task's seed file).

        Raises:
            ConfigError: the task has no labels, or the pool is missing, malformed or the
                evaluation file.
        """
        if not task.is_classification:
            raise ConfigError(f"strategy.name: llkd needs a classification task; task {task.name!r} is {task.type}")
        path = resolve_strategy_input(cfg, task, "unlabeled_path", eval_file, "LLKD's unlabelled pool")
        pool = load_unlabelled(task, path) if path is not None else []
        budget = cfg.budget.samples
        if len(pool) < budget // 2:
            # Each written text costs two teacher calls, so a small pool halves what the budget labels.
            labelled = len(pool) + (budget - len(pool)) // 2
            logger.warning(
                "llkd: the unlabelled pool (task.unlabeled_path, %s) holds %d texts for budget.samples=%d, so the "
                "teacher writes the rest and about %d texts get labelled; a pool of %d or more texts labels %d",
                path, len(pool), budget, labelled, budget, budget)
        order = np.random.default_rng([cfg.seed, 7]).permutation(len(pool))
        chunks = np.array_split(order, cfg.strategy.iterations)
        return {"pool": [[pool[int(i)] for i in chunk] for chunk in chunks],
                "pool_path": str(path) if path is not None else None}

    def _due(self, ctx: StrategyContext) -> list[dict[str, Any]]:
        chunks = ctx.extra.get("pool") or []
        return list(chunks[ctx.iteration]) if ctx.iteration < len(chunks) else []

    def train_prompts(self, ctx: StrategyContext, n: int) -> list[Prompt]:
        """Requests for texts to label: half of the calls the pool leaves (each also costs a label)."""
        n_write = max(0, (n - len(self._due(ctx))) // 2)
        return self._prompts(dataclasses.replace(ctx, feedback=[]), n_write, probe=False)

    def label_prompts(self, ctx: StrategyContext, written: list[dict[str, Any]], n: int) -> list[Prompt]:
        """One classify prompt per pool text due this iteration, then per accepted written text."""
        words = [label.word for label in ctx.task.labels]
        demos = list(ctx.task.seed_demos)
        prompts = []
        for rec in (self._due(ctx) + written)[:n]:
            fields = {f: rec[f] for f in ctx.task.field_names}
            p = render_classify_prompt(ctx.task, fields, demos, prompt_style=ctx.prompt_style,
                                       max_demo_chars=ctx.config.strategy.max_demo_chars)
            meta = {**p.meta, RECORD_KEY: fields, OPTIONS_KEY: words, "source_id": rec.get("id")}
            prompts.append(dataclasses.replace(p, meta=meta))
        return prompts

    def review_labels(self, ctx: StrategyContext, labelled: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batch calibration of the new labels (see the module docstring); ``none`` keeps them raw."""
        k = len(ctx.task.label_names)
        if ctx.config.strategy.llkd_calibration == "none":
            return labelled
        earlier = [label_log_probs(r, k) for r in ctx.records()]
        new = [label_log_probs(r, k) for r in labelled]
        seen = [x for x in earlier + new if x is not None]
        if not seen:
            return labelled
        prior = batch_calibrate(seen)
        out = []
        for rec, logp in zip(labelled, new, strict=True):
            scored = softmax_confidence(logp - prior) if logp is not None else None
            if scored is None:
                out.append(rec)
                continue
            best, confidence = scored
            out.append({**rec, "label": ctx.task.label_names[best], "confidence": confidence})
        ctx.stats["llkd_calibration_prior"] = [round(float(v), 4) for v in np.exp(prior)]
        return out

    def train_mask(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """Update the thresholds with the current student and select (see the module docstring)."""
        state = ctx.memory.setdefault("llkd", {"teacher": {}, "student": {}, "selected": []})
        if not records:
            return []
        names = ctx.task.label_names
        labels = [str(r["label"]) for r in records]
        conf = np.array([r.get("confidence", math.nan) for r in records], dtype=np.float64)
        conf = np.where(np.isfinite(conf), conf, np.nan)
        unc = normalised_entropy(ctx.student.logits(records))
        momentum = ctx.config.strategy.llkd_momentum
        tau_t = update_thresholds(state["teacher"], conf, labels, names, momentum)
        tau_s = update_thresholds(state["student"], unc, labels, names, momentum)
        mask = []
        for c, u, lab in zip(conf, unc, labels, strict=True):
            teacher_ok = not np.isfinite(c) or not np.isfinite(tau_t[lab]) or c >= tau_t[lab] - TIE_TOLERANCE
            mask.append(bool(teacher_ok and u >= tau_s[lab] - TIE_TOLERANCE))
        selected = set(state["selected"]) | {r["id"] for r, k in zip(records, mask, strict=True) if k}
        state["selected"] = sorted(selected)
        ctx.stats.update({
            "llkd_selected": int(sum(mask)),
            "llkd_selected_ever": len(selected),
            "llkd_labelled": len(records),
            "llkd_mean_confidence": float(np.nanmean(conf)) if np.isfinite(conf).any() else math.nan,
            "llkd_mean_uncertainty": float(unc.mean()),
            **{f"llkd_tau_teacher_{k}": v for k, v in tau_t.items()},
            **{f"llkd_tau_student_{k}": v for k, v in tau_s.items()},
        })
        return mask

    def keep_for_training(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """Every text selected in at least one iteration (all of them when none ever was)."""
        selected = set((ctx.memory.get("llkd") or {}).get("selected") or [])
        if not selected:
            return [True] * len(records)
        return [r["id"] in selected for r in records]
