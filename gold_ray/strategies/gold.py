"""GOLD (Gholami et al., NAACL 2024 Findings): OOD-guided feedback from the student's energy.

Each iteration the teacher also writes probe samples, asked to be significantly different from
the demonstrations. The student (trained on all data so far) scores them with its energy
E(x) = -T logsumexp(f(x)/T); the probes whose energy rank falls in the band [lo, hi) (0.5 to 0.8,
as the authors' code) become the feedback shown in the next prompts: less familiar than the centre
of the distribution, but short of the top band, which is mostly noise.

Clean reading versus the authors' code (methods.md 2.10), default first:

- The band is taken over each iteration's probe set of any size (the code: exactly 2 of 8).
- Probes are training data too, as in the code.
- Each iteration's band is appended to the feedback pool, which keeps the ``feedback_pool_size``
  most recent examples (the code keeps only the last band).
- The optional noise filter ``strategy.noise_filter_top`` drops the highest-energy share of
  training data; off by default, as in the code (its ``--bot50`` filter did something else).
- ``strategy.band_length_quantile`` (off by default; neither the paper nor the code has it) takes
  the band over probes no longer than a quantile of iteration 0's samples, against the feedback's
  drift to long samples on short-text tasks (``benchmarks/quality/results/findings.md``).
- ``strategy.hold_band_near_chance`` (off by default; not in the paper or the code) adds no band
  in an iteration whose student is near chance on its synthetic validation split: its energy
  ranks at random, and feedback it picks still moves what the teacher writes.
- Text-to-text energy averages over real target tokens (``energy_mode=masked``);
  ``code_faithful`` includes padding as the code does.
- The final student trains with SCE (``student.final_loss=auto``), alpha 0.1 and beta 1 by default:
  chosen on SST-2's ``seed.jsonl``, not on a test set (``benchmarks/quality/recipe.py``);
  ``student.final_loss=ce`` switches it off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gold_ray.strategies.base import Strategy, StrategyContext
from gold_ray.student.ood import band_indices, noise_filter_mask


def text_chars(record: dict[str, Any], fields: list[str]) -> int:
    """Characters in ``record``'s input ``fields`` (what the teacher is shown of a demonstration);
    a missing or null field counts as empty."""
    return sum(len(str(record.get(f) or "")) for f in fields)


class GoldStrategy(Strategy):
    """GOLD: probes scored by energy, the percentile band fed back as demonstrations."""

    name = "gold"
    uses_probes = True
    # Probe prompts depend on the previous iteration's feedback only: one teacher pass per iteration.
    probes_before_training = True
    # The noise-robust final loss of the paper; alpha 0.1 was chosen on seed.jsonl (see StudentConfig).
    default_final_loss = "sce"

    def update_feedback(self, ctx: StrategyContext, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Probes in the energy band [band_lo, band_hi), appended to the pool (newest kept).

        With ``band_length_quantile`` the band is taken over the probes no longer than that
        quantile of iteration 0's training samples (fixed at iteration 0 and kept in the
        strategy's memory, so a resumed run uses the same cap). With ``hold_band_near_chance`` an
        iteration whose student is near chance adds nothing (stats ``band_held``).
        """
        cfg = ctx.config.strategy
        if not probes:
            return ctx.feedback
        if cfg.hold_band_near_chance and ctx.student_near_chance:
            ctx.stats["band_held"] = True
            return ctx.feedback
        eligible = probes
        cap = self._length_cap(ctx, cfg.band_length_quantile) if cfg.band_length_quantile > 0 else None
        if cap is not None:
            eligible = [r for r in probes if text_chars(r, ctx.task.field_names) <= cap]
            ctx.stats["band_length_cap"] = cap
            ctx.stats["band_probes_within_cap"] = len(eligible)
        scores = np.array([r.get("score", np.nan) for r in eligible], dtype=float)
        chosen = [eligible[int(i)] for i in band_indices(scores, cfg.band_lo, cfg.band_hi)]
        return (ctx.feedback + chosen)[-cfg.feedback_pool_size:]

    @staticmethod
    def _length_cap(ctx: StrategyContext, quantile: float) -> float | None:
        if "band_length_cap" not in ctx.memory:
            first = [text_chars(r, ctx.task.field_names) for r in ctx.records() if r.get("iteration", 0) == 0]
            # Without accepted samples nothing anchors the length: no cap (None).
            ctx.memory["band_length_cap"] = float(np.quantile(first, quantile)) if first else None
        return ctx.memory["band_length_cap"]

    def keep_for_training(self, ctx: StrategyContext, records: list[dict[str, Any]]) -> list[bool]:
        """All records, or all but the top ``noise_filter_top`` share by score when it is set."""
        top = ctx.config.strategy.noise_filter_top
        if top <= 0 or not records:
            return [True] * len(records)
        scores = np.array([r.get("score", np.nan) for r in records], dtype=float)
        if not np.isfinite(scores).any():
            return [True] * len(records)
        return [bool(k) for k in noise_filter_mask(scores, top)]
