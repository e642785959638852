"""The strategy interface's shared behaviour (gold_ray/strategies/base.py)."""

import numpy as np
import pytest

from gold_ray.config import load_config
from gold_ray.run.tasks import load_task
from gold_ray.strategies import STRATEGIES, StrategyContext, build_strategy


def _ctx(*overrides):
    return StrategyContext(task=load_task("sst2"), config=load_config(None, list(overrides)), prompt_style="chat",
                           rng=np.random.default_rng(0), iteration=0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_final_loss_is_the_strategy_own_unless_the_config_names_one(name):
    strategy = build_strategy(name)
    # auto: GOLD trains its final student with SCE (its paper's noise-robust loss), the others with CE.
    assert strategy.final_loss(_ctx()) == ("sce" if name == "gold" else "ce", 0.1, 1.0)
    assert strategy.final_loss(_ctx("student.final_loss=own")) == strategy.final_loss(_ctx())
    # A named loss applies to every strategy alike, with the configured SCE weights.
    assert strategy.final_loss(_ctx("student.final_loss=sce", "student.sce_alpha=0.5")) == ("sce", 0.5, 1.0)
    assert strategy.final_loss(_ctx("student.final_loss=ce"))[0] == "ce"
