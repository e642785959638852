"""The driver actor runs the loop on Ray and matches the in-process loop.

A driver killed inside a stage and resumed: tests/faults/test_ray_faults.py.
"""

import functools
import json
import sqlite3

import pytest

from actors.driver import run_on_ray
from gold_ray.run import baselines
from gold_ray.run.loop import Distiller
from gold_ray.run.tasks import load_task
from gold_ray.student.evaluation import engine_answers, load_eval_records
from gold_ray.testing import FakeTeacherEngine, tiny_run_config

pytestmark = pytest.mark.ray


@pytest.fixture
def cfg_for(eval_file, serve_port):
    # Serve keeps the HTTP options of its first start in a cluster: use the session's port.
    def make(out, student, *extra):
        return _cfg(out, student, eval_file, f"teacher.serve.port={serve_port}", *extra)
    return make


def _cfg(out, student, eval_file, *extra):
    # Tracked: the driver's MLflow run is under test here too.
    return tiny_run_config(out, student, f"task.eval_path={eval_file}", "teacher.prompt_style=chat",
                           "budget.samples=16", "strategy.probe_fraction=0.5", "teacher.serve.num_cpus=0.25",
                           "resources.scorer_num_cpus=0.25", "resources.train_cpus_per_worker=0.5",
                           "tracking.enabled=true", *extra)


def fake_factory():
    return functools.partial(FakeTeacherEngine, task=load_task("sst2"))


def test_ray_run_matches_the_in_process_loop(ray_cluster, tmp_path, tiny_student, cfg_for, eval_file):
    # No in-loop training: both runtimes then score probes with the same deterministic student,
    # so counts and feedback must agree exactly.
    extra = ["student.epochs_per_iteration=0"]
    ref = Distiller(cfg_for(tmp_path / "local", tiny_student, "tracking.enabled=false", *extra),
                    engine=FakeTeacherEngine(task=load_task("sst2"))).run()
    events = []
    # Another limit than the in-process run's: the teacher row is not in the cache, so the Serve teacher answers it.
    ray_cfg = cfg_for(tmp_path / "ray", tiny_student, "baselines.teacher_fewshot_limit=7", *extra)
    got = run_on_ray(ray_cfg, engine_factory=fake_factory(), on_event=lambda stage, info: events.append(stage))

    assert got["totals"]["accepted"] == ref["totals"]["accepted"]
    assert [m["feedback"]["ids"] for m in got["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert events.count("probe") == 2 and events[-1] == "final"

    run = tmp_path / "ray"
    assert (run / "student" / "config.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["final"]["records"] > 0
    with sqlite3.connect(run / "mlflow.db") as db:
        (status,) = db.execute("select status from runs where run_uuid = ?", (got["mlflow"]["run_id"],)).fetchone()
        names = {r[0] for r in db.execute("select distinct key from metrics")}
    assert status == "FINISHED"
    assert {"generate.accepted", "probe.accepted"} <= names

    # The student beside its references, the teacher row through the run's Serve deployment
    # (RayRuntime.answer): the same answers as the engine gives in this process.
    refs, task = got["final"]["baselines"], load_task("sst2")
    assert refs["majority"] == ref["final"]["baselines"]["majority"] and refs["majority"]["n"] == 12
    teacher = refs["teacher_fewshot"]
    assert teacher["cached"] is False and teacher["n"] == 7
    here = baselines.teacher_fewshot(ray_cfg, task, baselines.fewshot_records(load_eval_records(task, eval_file), 7),
                                     "chat", engine_answers(FakeTeacherEngine(task=task)), use_cache=False)
    assert teacher["accuracy"] == here["accuracy"] and teacher["key"] == here["key"]
