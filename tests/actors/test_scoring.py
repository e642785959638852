"""Energy scoring: the class UDF on its own, and as a Ray Data actor pool."""

import math

import numpy as np
import pytest

from actors.scoring import EnergyScorer, scorable_rows, score_dataset
from tests.raykit import make_cfg

ROWS = [
    {"text": "A warm and funny film with a great cast.", "label": "positive", "reject_reason": None},
    {"text": "", "label": "negative", "reject_reason": "empty"},
    {"text": "Dull, slow and far too long for its thin story.", "label": "negative", "reject_reason": None},
    {"text": "The review was cut off", "label": "negative", "reject_reason": "too_short"},
    {"text": None, "label": "positive", "reject_reason": None},  # accepted but without its field
]


def _batch(rows):
    return {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}


def test_scorable_rows_skip_rejects_and_missing_fields(sst2):
    assert scorable_rows(_batch(ROWS), sst2) == [0, 2]
    no_reasons = {"text": np.array(["fine text here", float("nan")], dtype=object)}
    assert scorable_rows(no_reasons, sst2) == [0]


def test_scorer_matches_the_student_and_leaves_rejects_nan(student_ckpt, sst2):
    from gold_ray.student.model import load_student

    scorer = EnergyScorer(student_ckpt, "sst2", score="energy", temperature=2.0)
    out = scorer(_batch(ROWS))
    scores = out["score"]
    assert scores.dtype == np.float64 and len(scores) == len(ROWS)
    assert [math.isnan(s) for s in scores] == [False, True, False, True, True]

    student = load_student(student_ckpt, sst2)
    expected = student.ood_scores([ROWS[0], ROWS[2]], score="energy", temperature=2.0)
    np.testing.assert_allclose(scores[[0, 2]], expected, rtol=1e-5)
    # Energy with T=2 differs from T=1: the temperature really reaches the student.
    assert not np.allclose(student.ood_scores([ROWS[0]], temperature=1.0), expected[:1])
    assert len(set(out["scored_by"])) == 1 and np.all(out["scored_at"] > 0)


@pytest.mark.ray
def test_score_dataset_runs_a_pool_of_scorers(ray_cluster, student_ckpt, sst2):
    ray = ray_cluster
    cfg = make_cfg(resources={"scorer_min_actors": 2, "scorer_max_actors": 2, "scorer_batch_size": 2})
    rows = [
        dict(ROWS[i % 3], text=f"{ROWS[i % 3]['text']} ({i})" if ROWS[i % 3]["text"] else "")
        for i in range(24)
    ]
    ctx = ray.data.DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    # Start both actors before any batch is handed out, so the work is spread over the pool.
    ctx.wait_for_min_actors_s = 120
    try:
        out = score_dataset(
            ray.data.from_items(rows, override_num_blocks=12), cfg, student_ckpt, sst2
        ).take_all()
    finally:
        ctx.wait_for_min_actors_s = saved
    assert len(out) == 24
    for row in out:
        assert math.isnan(row["score"]) == (row["reject_reason"] is not None)
    assert len({row["scored_by"] for row in out}) == 2
