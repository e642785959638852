"""``gold-ray compare`` without ``--local``: every run goes through the driver actor on Ray.

One strategy and one seed only (a run on Ray costs minutes on 2 cores); the table, resume and
several strategies are covered in process by ``tests/run/test_compare.py``.
"""

import functools
import json

import pytest

from actors.driver import run_on_ray
from gold_ray.config import load_config
from gold_ray.run.compare import compare
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

pytestmark = pytest.mark.ray


def test_compare_on_ray_nests_driver_runs_under_one_parent(ray_cluster, serve_port, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    student = save_tiny_classifier(tmp_path / "student")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"film number {i} was {w}", "label": lab}) + "\n"
                                 for i, (w, lab) in enumerate([("great", "positive"), ("dull", "negative")] * 4)))
    base = load_config(None, [
        "task.name=sst2", f"task.eval_path={eval_file}", f"student.model={student}", "teacher.model=fake",
        "teacher.prompt_style=chat", "budget.samples=8", "strategy.iterations=1", "strategy.probe_fraction=0.5",
        "student.final_epochs=1", "student.batch_size=8", "teacher.serve.num_cpus=0.25",
        f"teacher.serve.port={serve_port}", "resources.scorer_num_cpus=0.25", "resources.train_cpus_per_worker=0.5",
    ])
    runner = functools.partial(run_on_ray, engine_factory=functools.partial(FakeTeacherEngine, task=load_task("sst2")))
    out = tmp_path / "cmp"
    table = compare(base, ["zerogen"], [0], out, runner=runner, teacher_engine=FakeTeacherEngine())

    assert [(r["strategy"], r["status"]) for r in table["runs"]] == [("zerogen", "new")]
    assert json.loads((out / "runs" / "zerogen-s0" / "state.json").read_text())["finished"]
    assert (out / "compare.png").stat().st_size > 0 and table["teacher_fewshot"]["n"] == 8

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=table["mlflow"]["tracking_uri"])
    parent_id = table["mlflow"]["parent_run_id"]
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    by_parent = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    children = by_parent[parent_id]
    assert [r.info.run_name for r in children] == ["zerogen-sst2-seed0"]
    assert all(r.info.status == "FINISHED" and "final.accuracy" in r.data.metrics for r in children)
    # Ray Train's rank 0 logs under each driver run, one level further down.
    assert all(by_parent.get(r.info.run_id) for r in children)
