"""``gold-ray compare`` without ``--local``: every run goes through the driver actor on Ray, and a
strategy chooses on Ray exactly what it chooses in process.

One strategy and one seed (a run on Ray costs half a minute on 2 cores): LLKD, the strategy with
a path of its own on Ray (the Serve teacher scores label words, ``option_logprobs``, to label the
texts it wrote). A strategy reaches the runtime only through the loop's stages
(``Runtime.produce``, ``train``, ``score``, ``evaluate``, ``answer``); ProGen and S3 use no stage
GOLD's Ray test (tests/actors/test_driver.py) does not, and are checked in process
(tests/strategies). The table, resume and several strategies are covered in process by
``tests/run/test_compare.py``.
"""

import functools
import json
import math

import pytest

from actors.driver import run_on_ray
from gold_ray.config import load_config
from gold_ray.run.compare import compare
from gold_ray.run.loop import distill_in_process
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier
from tests.faults.faultkit import write_data_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A ``$GOLD_RAY_DATA``-like folder: sst2/test.jsonl (evaluation) and sst2/seed.jsonl (LLKD's unlabelled texts)."""
    return write_data_dir(tmp_path_factory.mktemp("strategies") / "data", pairs=3)


def test_compare_on_ray_nests_driver_runs_under_one_parent_and_llkd_chooses_as_in_process(
        ray_cluster, serve_port, tmp_path, monkeypatch, data_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sst2 = load_task("sst2")
    student = save_tiny_classifier(tmp_path / "student")
    # No in-loop training: both runtimes then judge with the same deterministic student, so the
    # strategy's choices (labels, selection) must agree exactly.
    overrides = [
        "task.name=sst2", f"task.data_dir={data_dir}", f"student.model={student}", "teacher.model=fake",
        "teacher.prompt_style=chat", "budget.samples=16", "strategy.iterations=2", "student.epochs_per_iteration=0",
        "student.final_epochs=1", "student.batch_size=8", "teacher.serve.num_cpus=0.25",
        f"teacher.serve.port={serve_port}", "resources.scorer_num_cpus=0.25", "resources.train_cpus_per_worker=0.5",
    ]
    runner = functools.partial(run_on_ray, engine_factory=functools.partial(FakeTeacherEngine, task=sst2))
    out = tmp_path / "cmp"
    table = compare(load_config(None, overrides), ["llkd"], [0], out, runner=runner, teacher_engine=FakeTeacherEngine())
    local = tmp_path / "local"
    compare(load_config(None, [*overrides, "tracking.enabled=false"]), ["llkd"], [0], local,
            runner=functools.partial(distill_in_process, engine=FakeTeacherEngine(task=sst2)),
            teacher_engine=FakeTeacherEngine())

    assert [(r["strategy"], r["status"]) for r in table["runs"]] == [("llkd", "new")]
    assert json.loads((out / "runs" / "llkd-s0" / "state.json").read_text())["finished"]
    assert (out / "compare.png").stat().st_size > 0 and table["teacher_fewshot"]["n"] == 6

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=table["mlflow"]["tracking_uri"])
    parent_id = table["mlflow"]["parent_run_id"]
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    by_parent = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    children = by_parent[parent_id]
    assert [r.info.run_name for r in children] == ["llkd-sst2-seed0"]
    assert all(r.info.status == "FINISHED" and "final.accuracy" in r.data.metrics for r in children)
    # Ray Train's rank 0 logs under each driver run, one level further down.
    assert all(by_parent.get(r.info.run_id) for r in children)

    # LLKD on Ray chose what it chose in process.
    ray_run, local_run = out / "runs" / "llkd-s0", local / "runs" / "llkd-s0"
    got, ref = (json.loads((run / "metrics.json").read_text()) for run in (ray_run, local_run))
    assert got["totals"]["accepted"] == ref["totals"]["accepted"] > 0
    assert [m["feedback"]["ids"] for m in got["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert [m["train"]["records"] for m in got["iterations"]] == [m["train"]["records"] for m in ref["iterations"]]
    requested = [m["generate"]["requested"] for m in got["iterations"]]
    assert requested == [m["generate"]["requested"] for m in ref["iterations"]]
    # The same teacher budget; LLKD leaves a call unused when writing + labelling does not divide it.
    assert 14 <= sum(requested) <= 16
    assert got["final"]["records"] == ref["final"]["records"] > 0
    assert (ray_run / "student" / "config.json").is_file()

    # The Serve teacher answered classify prompts by scoring the label words: same labels and
    # confidences as in process, written texts kept apart from the training data.
    def labelled(run):
        return {r["text"]: (r["label"], r["confidence"], json.loads(r["option_logprobs"]))
                for r in read_parts(sorted((run / "data").glob("train-*.parquet")))}

    on_ray, in_process = labelled(ray_run), labelled(local_run)
    assert on_ray.keys() == in_process.keys()
    for text, (label, conf, scores) in on_ray.items():
        ref_label, ref_conf, ref_scores = in_process[text]
        assert label == ref_label and math.isclose(conf, ref_conf, rel_tol=1e-9) and 0.5 < conf <= 1
        assert scores == pytest.approx(ref_scores) and len(scores) == 2
    assert read_parts(sorted((ray_run / "data").glob("pool-*.parquet")))
    keys = [k for k in ref["iterations"][1]["train"] if k.startswith("llkd_")]
    # Counts exactly; means of the student's scores to float noise (a scorer on Ray and the loop in
    # process reduce in different thread splits: 0.9999801543434259 against ...406053 on one machine).
    assert keys and [got["iterations"][1]["train"][k] for k in keys] == pytest.approx(
        [ref["iterations"][1]["train"][k] for k in keys], rel=1e-9)
