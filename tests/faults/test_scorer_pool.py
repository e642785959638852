"""Faults of the run's warm scorer pool (:class:`actors.scoring.ScorerPool`): an actor killed between
two calls or in the middle of one comes back by itself and scores with the current weights, not the
ones it started with; an actor gone for good leaves its batches to the others.

Each test scores with student B after the actors started from student A, so an actor that came
back without fetching the current weights would score as A.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from actors.scoring import ScorerPool
from gold_ray.run.tasks import load_task
from gold_ray.student.model import ClassifierStudent
from tests.faults.hooks import clear_plans, plan_fault
from tests.raykit import make_cfg, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SST2 = load_task("sst2")
ROWS = [{"i": i, "text": f"a film about the number {i}, {'warm' if i % 2 else 'dull'} and long",
         "label": "positive" if i % 2 else "negative", "reject_reason": "empty" if i % 5 == 4 else ""}
        for i in range(12)]


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_student):
    """Students A and B (one architecture, heads from seeds 1 and 2), saved, with B's expected scores."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        folder = tmp_path_factory.mktemp(f"student-{name}")
        student = ClassifierStudent(SST2, tiny_student, device="cpu", seed=seed)
        student.save(folder)
        expected = np.full(len(ROWS), np.nan)
        keep = [i for i, r in enumerate(ROWS) if not r["reject_reason"]]
        expected[keep] = student.ood_scores([ROWS[i] for i in keep])
        out[name] = (str(folder), expected)
    assert not np.allclose(out["a"][1][[0, 1]], out["b"][1][[0, 1]])
    return out


def _score(pool, ray):
    out = pool.score_dataset(ray.data.from_items(ROWS, override_num_blocks=4)).take_all()
    return sorted(out, key=lambda r: r["i"])


def _pid(row) -> int:
    return int(row["scored_by"].rsplit(":", 1)[1])


def _check(out, expected):
    assert [r["i"] for r in out] == list(range(len(ROWS))), "every row exactly once"
    np.testing.assert_allclose([r["score"] for r in out], expected, rtol=1e-5)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_scorer_killed_between_calls_comes_back_with_the_current_weights(ray_cluster, students, how):
    ray = ray_cluster
    cfg = make_cfg(resources={"scorer_batch_size": 3})
    with ScorerPool(cfg, SST2) as pool:
        pool.set_student(students["a"][0])
        pool.set_student(students["b"][0])
        before = _score(pool, ray)
        _check(before, students["b"][1])
        [actor] = pool.actors
        pid = _pid(before[0])
        if how == "ray.kill":
            ray.kill(actor, no_restart=False)
        else:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30)
        after = _score(pool, ray)
        assert pool.actors == [actor], "the pool kept its actor; Ray restarted it"
    _check(after, students["b"][1])
    assert {_pid(r) for r in after} != {pid}, "a new process scored"


def test_a_scorer_killed_inside_a_call_is_restarted_and_the_call_resent(ray_cluster, students, tmp_path):
    ray = ray_cluster
    marker = tmp_path / "killed"
    with ScorerPool(make_cfg(resources={"scorer_batch_size": 3}), SST2) as pool:
        pool.set_student(students["a"][0])
        first = _score(pool, ray)
        pool.set_student(students["b"][0])
        # The next batch kills its scorer process (SIGKILL, as on an out-of-memory kill) once.
        plan_fault("score.batch", marker, action="kill")
        try:
            out = _score(pool, ray)
        finally:
            clear_plans()
    assert marker.exists(), "the fault fired"
    _check(first, students["a"][1])
    _check(out, students["b"][1])
    assert _pid(first[0]) not in {_pid(r) for r in out}, "the restarted process scored every batch"


def test_a_scorer_gone_for_good_leaves_its_batches_to_the_others(ray_cluster, students):
    ray = ray_cluster
    with ScorerPool(make_cfg(resources={"scorer_max_actors": 2, "scorer_batch_size": 2}), SST2) as pool:
        pool.set_student(students["a"][0])
        pool.set_student(students["b"][0])
        _score(pool, ray)
        dead, alive = pool.actors
        survivor = ray.get(alive.describe.remote())["identity"]
        ray.kill(dead, no_restart=True)
        out = _score(pool, ray)
    _check(out, students["b"][1])
    assert {r["scored_by"] for r in out} == {survivor}
