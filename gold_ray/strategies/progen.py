"""ProGen (Ye et al., Findings of EMNLP 2022): in-context feedback chosen by influence.

Each round the student is trained from its pretrained weights on the synthetic data so far, minus
a synthetic validation split; the training examples are then ranked by their influence on the
validation loss, and the most helpful ones of each label become the in-context examples of the
next round's prompts (methods.md 4.3-4.4). No real data is used; no extra teacher calls are made,
so ProGen spends exactly the generation budget of every other strategy.

Choices where the specification is silent, inferred, or where this differs from the code:

- Influence: the **last-layer approximation** (:mod:`gold_ray.student.influence`): gradients and the exact
  Hessian of the student's output layer only, ``(H + damping I)^-1`` by conjugate gradients, instead
  of full-network gradients with LiSSA. The validation objective is RCE, as in the code.
- Synthetic validation set: a fixed ``progen_val_fraction`` of the synthetic records, chosen by a
  seeded hash of each record's id (so it grows with the data and is stable on resume), instead of
  one 1,000-example split taken once 2,000 exist. It is held out of the in-loop training only:
  the final student trains on all synthetic data, validation split included (it is synthetic,
  and every strategy's final student sees all it paid for).
- Influence-based feedback from the first round on (the code waits for 10,000 examples and feeds
  back random examples before that); at most ``progen_max_candidates`` records are scored.
- The pool holds up to ``feedback_pool_size / K`` examples per label, only helpful ones (negative
  influence), as the code; a prompt shows ``feedback_per_prompt`` of its label's pool with
  probability ``progen_feedback_ratio``, after the task's seed demos (the code's prompts are
  zero-shot otherwise; the seed demos stay because the embedded teacher needs them, as ZeroGen).
- Feedback examples keep their labels in the prompt (the code's ``keep_mapping=True``), rendered
  like every other demo.
- Classification tasks only (influence is taken over class logits).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from gold_ray.config import ConfigError, RunConfig
from gold_ray.run.tasks import TaskSpec
from gold_ray.strategies.base import Strategy, StrategyContext
from gold_ray.student.influence import influence_scores, output_layer_features


def in_validation_split(record_id: str, seed: int, fraction: float) -> bool:
    """Whether a record belongs to ProGen's synthetic validation split (a seeded hash of its id)."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ProGenStrategy(Strategy):
    """ProGen: fresh student per round; most helpful examples by influence fed back per label."""

    name = "progen"
    continue_student = False

    def prepare(self, task: TaskSpec, cfg: RunConfig, eval_file: Any) -> dict[str, Any]:
        """Checks the task type; ProGen reads no extra files."""
        if not task.is_classification:
            raise ConfigError(f"strategy.name: progen needs a classification task; task {task.name!r} is {task.type}")
        return {}

    def _is_val(self, ctx: StrategyContext, record: dict[str, Any]) -> bool:
        return in_validation_split(str(record["id"]), ctx.config.seed, ctx.config.strategy.progen_val_fraction)

    def train_mask(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """Everything but the synthetic validation split."""
        return [not self._is_val(ctx, r) for r in records]

    def demos_for_prompt(self, ctx: StrategyContext, label: str | None) -> list[dict[str, Any]]:
        """Seed demos, then (with probability ``progen_feedback_ratio``) pool examples of ``label``."""
        cfg = ctx.config.strategy
        demos = self.seed_demos_for(ctx, label)
        same = [r for r in ctx.feedback if r.get("label") == label]
        if same and cfg.feedback_per_prompt and ctx.rng.random() < cfg.progen_feedback_ratio:
            k = min(cfg.feedback_per_prompt, len(same))
            demos += [same[int(i)] for i in ctx.rng.choice(len(same), size=k, replace=False)]
        return demos

    def update_feedback(self, ctx: StrategyContext, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The most helpful training records of each label, by influence on the validation split."""
        cfg = ctx.config.strategy
        if ctx.student is None:
            return ctx.feedback
        records = ctx.records()
        val = [r for r in records if self._is_val(ctx, r)]
        train = [r for r in records if not self._is_val(ctx, r)]
        ctx.stats.update({"validation": len(val), "candidates": 0})
        if not val or len(train) < 2:
            return ctx.feedback
        if len(train) > cfg.progen_max_candidates:
            keep = np.sort(ctx.rng.choice(len(train), size=cfg.progen_max_candidates, replace=False))
            train = [train[int(i)] for i in keep]
        infl = self.influence(ctx, train, val)
        n = len(train)
        per_label = max(1, cfg.feedback_pool_size // len(ctx.task.label_names))
        pool: list[dict[str, Any]] = []
        for name in ctx.task.label_names:
            idx = [i for i, r in enumerate(train) if r["label"] == name and infl[i] < 0]
            idx.sort(key=lambda i: infl[i])
            pool += [{**train[i], "influence": float(infl[i])} for i in idx[:per_label]]
        ctx.stats.update({"candidates": n, "helpful": int((infl < 0).sum())})
        return pool

    def influence(self, ctx: StrategyContext, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> np.ndarray:
        """Influence of each ``train`` record on the RCE loss of ``val`` under ``ctx.student``
        (negative = helpful; see :func:`gold_ray.student.influence.influence_scores`)."""
        label_id = {name: i for i, name in enumerate(ctx.task.label_names)}
        feats, weight, bias = output_layer_features(ctx.student, train + val)
        n = len(train)
        return influence_scores(
            feats[:n], [label_id[r["label"]] for r in train], weight, bias,
            feats[n:], [label_id[r["label"]] for r in val], damping=ctx.config.strategy.progen_damping,
        )
