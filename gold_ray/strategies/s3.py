"""S3, "Synthesis Step by Step" (Wang et al., Findings of EMNLP 2023): extrapolate the student's errors.

The first round synthesises data with label-conditioned prompts. After every round the student,
trained from its pretrained weights on all synthetic data so far, predicts a small **real**
labelled validation set; each example it gets wrong is shown to the teacher, which is asked for
new samples of the same label like it (methods.md 5.3). Those extrapolation prompts take a share
(``s3_error_share``) of the next round's prompts, so S3 spends the same teacher calls as every
other strategy.

The validation set is ``task.val_path`` (default: the task's ``seed_path``, e.g. ``seed.jsonl``
drawn from the benchmark's train split), resolved against ``$GOLD_RAY_DATA``. It is never the
evaluation file: that is refused with a :class:`~gold_ray.config.ConfigError`. The student never
trains on it; only the teacher sees the misclassified examples, as demos.

Choices where the specification is silent or unverified:

- No rationale step: the paper's seed round first asks the LLM for reasons behind each label and
  conditions on sampled reasons; here the task's style hints play that role, as for the other
  strategies (the embedded 135M teacher cannot write usable rationale lists).
- The extrapolation prompt is the ordinary request for a sample of the error's gold label, with
  the misclassified example as the last demonstration and the request to be similar to it but not
  a copy (the paper's "Write a positive movie review similar to: <x>"). Copies are rejected by the
  parser's echo check and the deduplicator. Pair tasks get a new pair, not a new hypothesis for the
  same premise (the paper's NLI variant).
- Errors are spread round-robin over the extrapolation prompts (the paper: one sample per error);
  ``s3_error_share`` 0.5 keeps half of each later round label-conditioned, since a 64-example
  validation set yields only a few errors to spread a round's prompts over (1.0 is the paper's
  errors-only rounds).
- Text-to-text tasks count an answer wrong when it does not match (numerically for number answers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gold_ray.config import ConfigError, RunConfig
from gold_ray.run.tasks import TaskSpec
from gold_ray.strategies.base import Strategy, StrategyContext, resolve_strategy_input
from gold_ray.student.evaluation import exact_match, load_eval_records, numeric_match
from gold_ray.teacher.prompts import render_train_prompt
from gold_ray.types import Prompt

EXTRAPOLATE_STYLE = "similar to the previous one but not a copy"
"""Request added to an extrapolation prompt, after the misclassified example shown as a demo."""


def is_correct(task: TaskSpec, prediction: str, gold: str) -> bool:
    """Whether one prediction matches its gold label or answer."""
    if task.is_classification:
        return prediction == gold
    if task.answer_type == "number":
        return numeric_match([prediction], [gold]) == 1.0
    return exact_match([prediction], [gold]) == 1.0


class S3Strategy(Strategy):
    """S3: fresh student per round; its errors on a real validation set are extrapolated by the teacher."""

    name = "s3"
    continue_student = False

    def prepare(self, task: TaskSpec, cfg: RunConfig, eval_file: Any) -> dict[str, Any]:
        """Load the real validation set (``task.val_path``, default the task's seed file).

        Raises:
            ConfigError: no validation file is named, it is missing or malformed, or it is the
                evaluation file.
        """
        path = resolve_strategy_input(cfg, task, "val_path", eval_file, "S3's validation set")
        if path is None:
            raise ConfigError(
                f"task.val_path: S3 needs a small real labelled validation set (JSONL); task {task.name!r} "
                "names no seed_path to default to"
            )
        try:
            records = load_eval_records(task, path)
        except ValueError as err:
            raise ConfigError(f"task.val_path: {err}") from None
        return {"validation": [{**r, "id": f"val-{i:05d}"} for i, r in enumerate(records)],
                "validation_path": str(path)}

    def update_feedback(self, ctx: StrategyContext, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The validation examples the student gets wrong (with their gold labels)."""
        val = ctx.extra.get("validation") or []
        if ctx.student is None or not val:
            return []
        predictions = ctx.student.predict(val)
        key = ctx.task.target_key
        errors = [r for r, p in zip(val, predictions, strict=True) if not is_correct(ctx.task, p, str(r[key]))]
        ctx.stats.update({"val_accuracy": 1.0 - len(errors) / len(val), "errors": len(errors)})
        return errors

    def train_prompts(self, ctx: StrategyContext, n: int) -> list[Prompt]:
        """Extrapolation prompts for the errors (``s3_error_share`` of ``n``), then ordinary ones."""
        cfg = ctx.config.strategy
        errors = ctx.feedback
        n_err = min(n, round(n * cfg.s3_error_share)) if errors else 0
        prompts: list[Prompt] = []
        order = ctx.rng.permutation(len(errors)) if errors else []
        for j in range(n_err):
            error = errors[int(order[j % len(errors)])]
            label = error.get("label") if ctx.task.is_classification else None
            demos = self._seed_demos(ctx, label)[: max(0, cfg.demos_per_prompt - 1)] + [error]
            prompt = render_train_prompt(ctx.task, label, demos, style=EXTRAPOLATE_STYLE,
                                         prompt_style=ctx.prompt_style, max_demo_chars=cfg.max_demo_chars)
            prompts.append(dataclasses.replace(prompt, meta={**prompt.meta, "extrapolates": error["id"]}))
        # The ordinary prompts show no errors: those are what the extrapolation prompts are for.
        prompts += self._prompts(dataclasses.replace(ctx, feedback=[]), n - n_err, probe=False)
        return prompts

    def _seed_demos(self, ctx: StrategyContext, label: str | None) -> list[dict[str, Any]]:
        seeds = [ctx.task.seed_demos[int(i)] for i in ctx.rng.permutation(len(ctx.task.seed_demos))]
        if label is not None:
            seeds.sort(key=lambda d: d.get("label") != label)
        return seeds
