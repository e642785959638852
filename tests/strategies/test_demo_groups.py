"""Prompts grouped by demo set (``teacher.prompts_per_demo_set``, issue 18 item 3)."""

from collections import Counter

import numpy as np
import pytest

from gold_ray.config import load_config
from gold_ray.run.tasks import load_task
from gold_ray.strategies import build_strategy
from gold_ray.strategies.base import StrategyContext, balanced_labels, demo_groups
from gold_ray.teacher.prompts import draw_style, render_train_prompt


def prompts(per_set: int, n: int, style: str = "chat", name: str = "gold", probe: bool = False):
    cfg = load_config(None, ["task.name=sst2", f"teacher.prompts_per_demo_set={per_set}"])
    ctx = StrategyContext(task=load_task("sst2"), config=cfg, prompt_style=style, rng=np.random.default_rng(3),
                          iteration=0)
    strategy = build_strategy(name)
    return strategy.probe_prompts(ctx, n) if probe else strategy.train_prompts(ctx, n)


def shared_text(p):
    """A prompt's text before its own request (chat: every message but the last)."""
    return repr(p.messages[:-1]) if p.messages is not None else p.text.rsplit("\n", 1)[0]


@pytest.mark.parametrize("style", ["chat", "continuation"])
@pytest.mark.parametrize("probe", [False, True])
def test_a_group_shares_its_demo_prefix_and_groups_differ(style, probe):
    ps = prompts(4, 16, style, probe=probe)
    assert Counter(p.label for p in ps) == Counter({"positive": 8, "negative": 8}), "label balance kept"
    groups = [ps[i : i + 4] for i in range(0, 16, 4)]
    for group in groups:
        assert len({p.meta["prefix_key"] for p in group}) == 1
        assert len({shared_text(p) for p in group}) == 1, "a group's prompts share everything before the request"
        assert len({p.label for p in group}) == 1 and len({tuple(p.meta["demo_ids"]) for p in group}) == 1
    assert len({g[0].meta["prefix_key"] for g in groups}) == len(groups), "every group draws its own demos"
    assert len({shared_text(g[0]) for g in groups}) == len(groups)


def test_by_default_every_prompt_draws_its_own_demos_as_before_groups_existed():
    cfg = load_config(None, ["task.name=sst2"])
    task = load_task("sst2")
    ctx = StrategyContext(task=task, config=cfg, prompt_style="chat", rng=np.random.default_rng(3), iteration=0)
    strategy = build_strategy("gold")
    # The draw order of the per-prompt loop: labels, then per prompt its demos and its style.
    want = [render_train_prompt(task, label, strategy.demos_for_prompt(ctx, label), style=draw_style(task, ctx.rng),
                                prompt_style="chat", max_demo_chars=cfg.strategy.max_demo_chars)
            for label in balanced_labels(task, 16, ctx.rng)]
    assert prompts(1, 16) == want


def test_groups_keep_each_label_count():
    labels = ["a", "b", "a", "a", "b", "a", "c"]
    assert demo_groups(labels, 3) == [("a", 3), ("a", 1), ("b", 2), ("c", 1)]
    assert demo_groups([None] * 5, 2) == [(None, 2), (None, 2), (None, 1)]


def test_the_group_size_must_be_positive():
    from gold_ray.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="prompts_per_demo_set"):
        load_config(None, ["teacher.prompts_per_demo_set=0"])
