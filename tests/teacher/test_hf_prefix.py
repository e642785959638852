"""The ``hf`` engine runs the prefix a demo set's prompts share once (issue 18 item 3) and writes
what it writes without sharing."""

import numpy as np
import pytest

from gold_ray.config import load_config
from gold_ray.run.tasks import load_task
from gold_ray.strategies import build_strategy
from gold_ray.strategies.base import StrategyContext
from gold_ray.teacher.hf_engine import HFEngine
from gold_ray.types import SamplingParams


def grouped_prompts(per_set: int, n: int = 12, seed: int = 0, probe: bool = False):
    cfg = load_config(None, ["task.name=sst2", f"teacher.prompts_per_demo_set={per_set}"])
    ctx = StrategyContext(task=load_task("sst2"), config=cfg, prompt_style="chat", rng=np.random.default_rng(seed),
                          iteration=0)
    strategy = build_strategy("gold")
    return strategy.probe_prompts(ctx, n) if probe else strategy.train_prompts(ctx, n)


@pytest.fixture(scope="module")
def engines(tiny_chat_lm):
    return (HFEngine(tiny_chat_lm, dtype="float32", batch_size=8, device="cpu"),
            HFEngine(tiny_chat_lm, dtype="float32", batch_size=8, device="cpu", share_prefixes=False))


def test_shared_prefixes_give_the_same_greedy_answers_and_run_once(engines, monkeypatch):
    shared, plain = engines
    # Groups of 3 with batches of 8 (a group is not cut), plus probes whose groups differ again.
    prompts = grouped_prompts(3, 12) + grouped_prompts(3, 4, seed=1, probe=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    first_rows = []
    forward = shared.model.forward

    def spy(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            first_rows.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(shared.model, "forward", spy)
    got = shared.generate(prompts, params)
    monkeypatch.undo()
    want = plain.generate(prompts, params)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.output_tokens for g in got] == [g.output_tokens for g in want]
    assert [g.prompt_tokens for g in got] == [g.prompt_tokens for g in want]
    # Each batch's first pass ran one row per distinct demo-set prefix, not one per prompt.
    keys = [p.meta["prefix_key"] for p in prompts]
    assert sum(rows for rows, _ in first_rows) == len(set(keys)) < len(prompts)


def test_without_shared_demo_sets_nothing_is_prefilled(engines, monkeypatch):
    shared, _ = engines
    prompts = grouped_prompts(1, 6)
    calls = []
    forward = shared.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("past_key_values") is None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(shared.model, "forward", spy)
    shared.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=3))
    # One first pass over the whole batch (no prefix pass), then decode steps.
    assert calls.count(True) == 1
