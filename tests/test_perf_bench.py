"""The pure helpers of the performance benchmarks (benchmarks/perf) and their latency-bound test engine.

No timings are asserted: these check the arithmetic, the result layout and the engine's contract.
"""

from __future__ import annotations

import pytest

from gold_ray.testing import LatencyBoundEngine
from gold_ray.types import Prompt, SamplingParams


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(kind="train", label="positive", messages=({"role": "user", "content": f"review {i}"},),
                   meta={"uid": f"u{i}"}) for i in range(n)]


def test_latency_engine_sleeps_once_per_call_and_answers_every_prompt(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("gold_ray.testing.time.sleep", slept.append)
    engine = LatencyBoundEngine(latency_s=0.5, per_prompt_s=0.01)
    gens = engine.generate(_prompts(8), SamplingParams())
    assert slept == [pytest.approx(0.58)]
    assert len(gens) == 8 and all(g.error is None and g.text for g in gens)
    assert len({g.text for g in gens}) == 8  # distinct answers: the pipeline's dedup keeps them all
    assert engine.generate([], SamplingParams()) == [] and len(slept) == 1  # nothing to do, no wait


def test_latency_engine_rejects_negative_latency():
    with pytest.raises(ValueError, match="latency_s"):
        LatencyBoundEngine(latency_s=-1)
