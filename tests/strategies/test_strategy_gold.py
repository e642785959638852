"""GOLD's feedback band (gold_ray/strategies/gold.py)."""

import numpy as np

from gold_ray.config import load_config
from gold_ray.run.tasks import load_task
from gold_ray.strategies import StrategyContext, build_strategy


def _ctx(records, memory=None, *overrides):
    return StrategyContext(task=load_task("sst2"), config=load_config(None, ["strategy.name=gold", *overrides]),
                           prompt_style="chat", rng=np.random.default_rng(0), iteration=0,
                           records=lambda: records, memory={} if memory is None else memory)


def _probe(i, chars, score):
    return {"id": f"p{i}", "iteration": 0, "kind": "probe", "text": "x" * chars, "label": "positive",
            "score": score}


# Ten probes; the longer, the higher the energy, as GOLD's feedback drifted on CoLA.
PROBES = [_probe(i, 20 + 10 * i, float(i)) for i in range(10)]
FIRST_PASS = [_probe(100 + i, 20 + 5 * i, 0.0) for i in range(11)]  # 20 to 70 characters


def test_the_band_is_the_energy_percentiles_of_every_probe_by_default():
    chosen = build_strategy("gold").update_feedback(_ctx(FIRST_PASS), PROBES)
    assert [r["id"] for r in chosen] == ["p5", "p6", "p7"]  # ranks floor(0.5 * 10) .. floor(0.8 * 10) - 1


def test_a_length_quantile_takes_the_band_over_probes_as_short_as_the_first_pass():
    memory = {}
    ctx = _ctx(FIRST_PASS, memory, "strategy.band_length_quantile=0.9")
    chosen = build_strategy("gold").update_feedback(ctx, PROBES)
    # The cap: the 0.9 quantile of 20, 25, ..., 70 characters is 65; probes of 20 to 60 characters
    # (p0 to p4) are eligible, and the band over those five is ranks 2 and 3.
    assert memory["band_length_cap"] == 65.0
    assert [r["id"] for r in chosen] == ["p2", "p3"]
    assert ctx.stats == {"band_length_cap": 65.0, "band_probes_within_cap": 5}
    # Later iterations (more and longer records) keep the first pass's cap, as a resumed run does.
    later = _ctx([*FIRST_PASS, *[{**r, "iteration": 1, "text": "x" * 500} for r in FIRST_PASS]], memory,
                 "strategy.band_length_quantile=0.9")
    assert [r["id"] for r in build_strategy("gold").update_feedback(later, PROBES)] == ["p2", "p3"]


def test_without_accepted_samples_there_is_no_cap():
    memory = {}
    chosen = build_strategy("gold").update_feedback(_ctx([], memory, "strategy.band_length_quantile=0.9"), PROBES)
    assert memory["band_length_cap"] is None
    assert [r["id"] for r in chosen] == ["p5", "p6", "p7"]


def test_a_student_near_chance_adds_no_band_when_held():
    pool = [_probe(200, 30, 0.0)]
    held = _ctx(FIRST_PASS, None, "strategy.hold_band_near_chance=true")
    held.feedback, held.student_near_chance = list(pool), True
    assert build_strategy("gold").update_feedback(held, PROBES) == pool
    assert held.stats == {"band_held": True}
    # A student that learned adds its band as usual, and without the setting a student near
    # chance does too.
    learned = _ctx(FIRST_PASS, None, "strategy.hold_band_near_chance=true")
    learned.feedback = list(pool)
    assert [r["id"] for r in build_strategy("gold").update_feedback(learned, PROBES)] == ["p200", "p5", "p6", "p7"]
    default = _ctx(FIRST_PASS)
    default.feedback, default.student_near_chance = list(pool), True
    assert [r["id"] for r in build_strategy("gold").update_feedback(default, PROBES)] == ["p200", "p5", "p6", "p7"]
    assert "band_held" not in default.stats
