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
        assert math.isnan(row["score"]) == isinstance(row["reject_reason"], str)
    assert len({row["scored_by"] for row in out}) == 2


# --- the run's warm pool --------------------------------------------------------------------------

# Accepted rows carry "" as the pipeline's rows do: Ray Data hands a block whose reasons are all
# None to a scorer as float32 NaN, which scorable_rows reads as a reason and leaves unscored.
SCORABLE = [dict(ROWS[i % 3], text=f"{ROWS[i % 3]['text']} ({i})" if ROWS[i % 3]["text"] else "", i=i,
                 reject_reason=ROWS[i % 3]["reject_reason"] or "") for i in range(10)]


@pytest.fixture(scope="module")
def two_students(tmp_path_factory, sst2, tiny_student):
    """Two classifier students of one architecture whose heads differ (seeds 1 and 2), saved."""
    from gold_ray.student.model import ClassifierStudent

    out = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"student-seed{seed}")
        student = ClassifierStudent(sst2, tiny_student, device="cpu", seed=seed)
        student.save(folder)
        out.append((student, str(folder)))
    return out


def _scored(pool, ray, rows=SCORABLE):
    """The rows scored by ``pool``, in input order."""
    out = pool.score_dataset(ray.data.from_items(rows, override_num_blocks=3)).take_all()
    return sorted(out, key=lambda r: r["i"])


def _expected(student, rows=SCORABLE):
    """What ``student`` scores in this process (NaN where the pool leaves rows unscored)."""
    expected = np.full(len(rows), np.nan)
    keep = [i for i, r in enumerate(rows) if not r["reject_reason"]]
    expected[keep] = student.ood_scores([rows[i] for i in keep])
    return expected


@pytest.mark.ray
def test_one_warm_actor_scores_successive_students_with_their_own_weights(ray_cluster, sst2, two_students):
    from actors.scoring import ScorerPool

    (a, a_dir), (b, b_dir) = two_students
    assert not np.allclose(_expected(a)[[0, 2]], _expected(b)[[0, 2]]), "the two students must score apart"
    with ScorerPool(make_cfg(resources={"scorer_batch_size": 3}), sst2) as pool:
        assert pool.set_student(a_dir) == 1
        first = _scored(pool, ray_cluster)
        assert pool.set_student(a_dir) == 1, "the same checkpoint is not published again"
        assert pool.set_student(b_dir) == 2
        second = _scored(pool, ray_cluster)
        assert pool.set_student(a) == 3, "a student object is published as it is"
        third = _scored(pool, ray_cluster)
        [actor] = pool.actors
        held = ray_cluster.get(actor.describe.remote())

    for out, student in ((first, a), (second, b), (third, a)):
        np.testing.assert_allclose([r["score"] for r in out], _expected(student), rtol=1e-5)
    # One process did all of it: new weights, not new actors.
    assert len({r["scored_by"] for r in first + second + third}) == 1
    assert held == {"identity": first[0]["scored_by"], "version": 3}
    assert pool.actors == []


@pytest.mark.ray
def test_score_dataset_with_a_pool_scores_on_its_warm_actors(ray_cluster, sst2, two_students):
    from actors.scoring import ScorerPool

    (a, a_dir), (b, b_dir) = two_students
    cfg = make_cfg(resources={"scorer_max_actors": 2, "scorer_batch_size": 2})
    pool = ScorerPool(cfg, sst2)
    try:
        runs = [score_dataset(ray_cluster.data.from_items(SCORABLE, override_num_blocks=5), cfg, d, sst2, pool=pool)
                .take_all() for d in (a_dir, b_dir)]
        actors = {ray_cluster.get(x.describe.remote())["identity"] for x in pool.actors}
    finally:
        pool.close()
    for out, student in zip(runs, (a, b), strict=True):
        out.sort(key=lambda r: r["i"])
        np.testing.assert_allclose([r["score"] for r in out], _expected(student), rtol=1e-5)
        assert {r["scored_by"] for r in out} <= actors and len(actors) == 2


@pytest.mark.ray
def test_a_warm_scorer_evaluates_each_student_with_its_own_weights(ray_cluster, sst2, two_students):
    from actors.scoring import ScorerPool
    from gold_ray.student.evaluation import evaluate_student

    (a, a_dir), (b, _) = two_students
    labelled = [{"text": t, "label": lab} for t, lab in (("a fine film", "positive"), ("dull and long", "negative"),
                                                        ("superb acting", "positive"), ("a weak plot", "negative"))]
    with ScorerPool(make_cfg(), sst2) as pool:
        pool.set_student(a_dir)
        scored = _scored(pool, ray_cluster)
        got = [pool.evaluate(student, labelled) for student in (b, a)]
        [actor] = pool.actors
        held = ray_cluster.get(actor.describe.remote())
    want = [evaluate_student(student, sst2, labelled) for student in (b, a)]
    assert want[0] != want[1], "the two students must predict apart"
    assert got == want
    assert held["identity"] == scored[0]["scored_by"]  # the scoring actor evaluated too: nothing started


@pytest.mark.ray
@pytest.mark.parametrize("score", ["energy", "nll"])
def test_a_few_records_are_scored_in_one_call_as_the_student_scores_them(ray_cluster, sst2, two_students, score):
    from actors.scoring import ScorerPool

    (a, a_dir), _ = two_students
    records = [{"text": r["text"], "label": r["label"]} for r in SCORABLE if not r["reject_reason"]]
    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in records]
    with ScorerPool(make_cfg(strategy={"score": score}), sst2) as pool:
        got = [pool.score_records(a_dir, rows) for rows in (records, flipped)]
    for rows, scores in zip((records, flipped), got, strict=True):
        np.testing.assert_allclose(scores, a.ood_scores(rows, score=score), rtol=1e-5)
    # The label travels with the inputs: the NLL of a record depends on it, the energy does not.
    assert np.allclose(got[0], got[1]) == (score == "energy")


def test_a_pool_without_a_student_refuses_to_score(sst2):
    from actors.scoring import ScorerPool

    with pytest.raises(RuntimeError, match="before set_student"):
        ScorerPool(make_cfg(), sst2).score_dataset(None)


def test_a_student_keeps_its_architecture_key_through_save_and_load(tmp_path, sst2, tiny_student):
    from actors.scoring import architecture_key
    from gold_ray.run.tasks import load_task
    from gold_ray.student.model import ClassifierStudent, load_student

    fresh = ClassifierStudent(sst2, tiny_student, device="cpu", seed=3)
    key = architecture_key(fresh)
    # A never-saved student's config names its base model's class; saving rewrites that in memory.
    before = fresh.model.config.architectures
    fresh.save(tmp_path / "s")
    assert fresh.model.config.architectures != before, "saving no longer rewrites the config: test moot"
    assert architecture_key(fresh) == key
    assert architecture_key(load_student(tmp_path / "s", sst2, device="cpu")) == key
    # Another label set is another head: its weights cannot load into this skeleton.
    assert architecture_key(ClassifierStudent(load_task("ag_news"), tiny_student, device="cpu", seed=3)) != key
