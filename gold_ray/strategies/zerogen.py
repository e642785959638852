"""ZeroGen (Ye et al., EMNLP 2022): label-conditioned generation with no feedback.

The teacher is asked for balanced label-conditioned samples; the student trains on all that
parse, with plain cross-entropy. The paper's prompts are zero-shot; here the task's seed
demonstrations go into the prompt as well (``strategy.demos_per_prompt=0`` restores zero-shot),
because the 135 M embedded teacher ignores the label without them (design.md).
"""

from __future__ import annotations

from gold_ray.strategies.base import Strategy


class ZeroGenStrategy(Strategy):
    """ZeroGen: no probes, no feedback, CE training."""

    name = "zerogen"
