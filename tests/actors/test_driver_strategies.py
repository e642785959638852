"""The strategies' choices do not depend on the runtime: LLKD through the Ray driver (Serve teacher,
Ray Data pipeline, Ray Train) chooses exactly what the in-process loop chooses.

A strategy reaches the runtime only through the loop's stages (``Runtime.produce``, ``train``,
``score``, ``evaluate``, ``answer``); ProGen and S3 use no stage GOLD's Ray test
(tests/actors/test_driver.py) does not, and are checked in process (tests/strategies). LLKD is
the one with a path of its own on Ray: the Serve teacher scores label words (``option_logprobs``)
to label the texts it wrote.
"""

import functools
import json
import math

import pytest

from actors.driver import run_on_ray
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, tiny_run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A ``$GOLD_RAY_DATA``-like folder: sst2/test.jsonl (evaluation) and sst2/seed.jsonl (LLKD's unlabelled texts)."""
    root = tmp_path_factory.mktemp("strategies-data")
    (root / "sst2").mkdir()
    rows = [{"text": f"real review number {i} reads as {lab} about the film", "label": lab}
            for i, lab in enumerate(["positive", "negative"] * 3)]
    (root / "sst2" / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sst2" / "test.jsonl").write_text("".join(json.dumps({**r, "text": "test " + r["text"]}) + "\n"
                                                      for r in rows))
    return root


def _cfg(out, student, data_dir, strategy, *extra):
    # No in-loop training: both runtimes then judge with the same deterministic student, so the
    # strategy's choices (labels, selection) must agree exactly.
    return tiny_run_config(out, student, f"task.data_dir={data_dir}", "teacher.prompt_style=chat",
                           f"strategy.name={strategy}", "budget.samples=16", "student.epochs_per_iteration=0",
                           "teacher.serve.num_cpus=0.25", "resources.scorer_num_cpus=0.25",
                           "resources.train_cpus_per_worker=0.5", *extra)


def test_llkd_on_ray_matches_the_in_process_loop(ray_cluster, tmp_path, tiny_student, data_dir, serve_port):
    sst2 = load_task("sst2")
    ref = Distiller(_cfg(tmp_path / "local", tiny_student, data_dir, "llkd"), engine=FakeTeacherEngine(task=sst2)).run()
    got = run_on_ray(_cfg(tmp_path / "ray", tiny_student, data_dir, "llkd", f"teacher.serve.port={serve_port}"),
                     engine_factory=functools.partial(FakeTeacherEngine, task=sst2))

    assert got["totals"]["accepted"] == ref["totals"]["accepted"] > 0
    assert [m["feedback"]["ids"] for m in got["iterations"]] == [m["feedback"]["ids"] for m in ref["iterations"]]
    assert [m["train"]["records"] for m in got["iterations"]] == [m["train"]["records"] for m in ref["iterations"]]
    requested = [m["generate"]["requested"] for m in got["iterations"]]
    assert requested == [m["generate"]["requested"] for m in ref["iterations"]]
    # The same teacher budget; LLKD leaves a call unused when writing + labelling does not divide it.
    assert 14 <= sum(requested) <= 16
    assert got["final"]["records"] == ref["final"]["records"] > 0
    assert (tmp_path / "ray" / "student" / "config.json").is_file()

    # The Serve teacher answered classify prompts by scoring the label words: same labels and
    # confidences as in process, written texts kept apart from the training data.
    def labelled(run):
        return {r["text"]: (r["label"], r["confidence"], json.loads(r["option_logprobs"]))
                for r in read_parts(sorted((run / "data").glob("train-*.parquet")))}

    on_ray = labelled(tmp_path / "ray")
    assert on_ray.keys() == labelled(tmp_path / "local").keys()
    for text, (label, conf, scores) in on_ray.items():
        ref_label, ref_conf, ref_scores = labelled(tmp_path / "local")[text]
        assert label == ref_label and math.isclose(conf, ref_conf, rel_tol=1e-9) and 0.5 < conf <= 1
        assert scores == pytest.approx(ref_scores) and len(scores) == 2
    assert read_parts(sorted((tmp_path / "ray" / "data").glob("pool-*.parquet")))
    keys = [k for k in ref["iterations"][1]["train"] if k.startswith("llkd_")]
    assert [got["iterations"][1]["train"][k] for k in keys] == [ref["iterations"][1]["train"][k] for k in keys]
