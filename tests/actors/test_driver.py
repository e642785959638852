"""The driver actor runs the loop on Ray and matches the in-process loop; its events reach the
progress view (here JSON lines) and the run ends with report.html.

One Ray run serves both checks (a run on Ray costs half a minute on 2 cores).
A driver killed inside a stage and resumed: tests/actors/test_mlflow_server.py.
"""

import functools
import io
import json
import sqlite3

import pytest

from actors.driver import run_on_ray
from gold_ray.reporting.progress import progress
from gold_ray.run import baselines
from gold_ray.run.loop import STAGES, Distiller
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


def test_ray_run_matches_the_in_process_loop_and_streams_its_progress(ray_cluster, tmp_path, tiny_student_no_dropout,
                                                                    cfg_for, eval_file):
    # In-loop training on a student without dropout: Ray Train ends on the in-process weights, so
    # probes are scored alike on both runtimes and counts and feedback must agree exactly.
    student = tiny_student_no_dropout
    ref = Distiller(cfg_for(tmp_path / "local", student, "tracking.enabled=false"),
                    engine=FakeTeacherEngine(task=load_task("sst2"))).run()
    # Another limit than the in-process run's: the teacher row is not in the cache, so the Serve teacher answers it.
    ray_cfg = cfg_for(tmp_path / "ray", student, "baselines.teacher_fewshot_limit=7")
    buf = io.StringIO()
    with progress("json", stream=buf, iterations=2) as reporter:
        got = run_on_ray(ray_cfg, engine_factory=fake_factory(), on_event=reporter, poll_s=0.2)

    assert got["totals"]["accepted"] == ref["totals"]["accepted"]
    assert [m["feedback"]["ids"] for m in got["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert [m["train"]["steps"] for m in got["iterations"]] == [m["train"]["steps"] for m in ref["iterations"]]

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

    # The progress view: every stage of both iterations, then the final one, in order.
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    counts = [r for r in rows if r["event"] == "progress"]
    rows = [r for r in rows if r["event"] not in ("plan", "progress", "log")]
    assert [r["event"] for r in rows] == [*STAGES, *STAGES, "final"]
    # Within-stage counts come through the same event path as the stages (bounded: the first of a
    # stage at once, then at most one a second), with the ETAs.
    first = {}
    for r in counts:
        first.setdefault((r["iteration"], r["stage"], r["unit"]), r)
    it0 = got["iterations"][0]
    # GOLD writes its training samples and probes in one teacher pass; the probe stage scores them.
    assert first[(0, "generate", "samples")]["total"] == it0["generate"]["requested"] + it0["probe"]["requested"]
    assert (0, "probe", "samples") not in first and first[(0, "probe", "scored")]["total"] == it0["probe"]["accepted"]
    assert first[(0, "train", "steps")]["total"] >= it0["train"]["steps"] > 0
    assert any(key[1:] == ("final", "steps") for key in first) and all("eta_stage_s" in r for r in counts)
    assert all(r["done"] <= r["total"] for r in counts)
    for key in first:  # a poll shows its newest count: the counts of a stage never go back
        done = [r["done"] for r in counts if (r["iteration"], r["stage"], r["unit"]) == key]
        assert done == sorted(done)
    gen, probe = rows[0], rows[2]
    assert gen["accepted"] == it0["generate"]["accepted"] > 0
    assert probe["scored"] == probe["accepted"] > 0  # scored by the student trained since they were written
    assert rows[-1]["records"] == got["final"]["records"] and rows[-1]["eta_run_s"] == 0.0

    page = (run / "report.html").read_text()
    assert "<h2>Energy distributions per iteration</h2>" in page
    assert page.count('src="data:image/png;base64,') >= 4
    assert (run / "task.yaml").is_file()
