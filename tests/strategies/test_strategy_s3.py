"""S3: the student's errors on a small real validation set, extrapolated by the teacher; never the test set."""

import json

import pytest

from gold_ray.config import ConfigError, load_config
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.strategies.s3 import EXTRAPOLATE_STYLE
from gold_ray.testing import FakeTeacherEngine, RecordingEngine, tiny_run_config
from tests.faults.faultkit import write_data_dir

SST2 = load_task("sst2")


@pytest.fixture
def data_dir(tmp_path):
    """A data folder like ``$GOLD_RAY_DATA``: sst2/test.jsonl (evaluation) and sst2/seed.jsonl."""
    return write_data_dir(tmp_path / "data", pairs=5, verb="is")


def cfg_for(tmp_path, tiny_student, data_dir, *extra):
    return tiny_run_config(tmp_path / "run", tiny_student, f"task.data_dir={data_dir}", "strategy.name=s3",
                           "budget.samples=40", "strategy.s3_error_share=0.5", *extra)


def test_s3_extrapolates_the_students_validation_errors(tmp_path, tiny_student, data_dir):
    engine = RecordingEngine(task=SST2)
    metrics = Distiller(cfg_for(tmp_path, tiny_student, data_dir), engine=engine).run()
    its = metrics["iterations"]
    val = [json.loads(line) for line in (data_dir / "sst2" / "seed.jsonl").read_text().splitlines()]

    fb = its[0]["feedback"]
    # The default validation set is the task's seed file; errors are its misclassified examples.
    assert fb["errors"] == len(fb["ids"]) > 0 and fb["val_accuracy"] == pytest.approx(1 - fb["errors"] / len(val))
    errors = {val[int(i.split("-")[1])]["text"]: val[int(i.split("-")[1])]["label"] for i in fb["ids"]}

    # Same budget: 20 prompts per iteration, half of iteration 1's extrapolate an error of the same label.
    assert len(engine.prompts) == 40
    later = [p for p in engine.prompts if p.meta["uid"].startswith("it1-")]
    extrapolating = [p for p in later if p.meta.get("extrapolates")]
    assert len(extrapolating) == 10
    for p in extrapolating:
        body = [m["content"] for m in p.messages]
        shown = [t for t in errors if t in body]
        assert len(shown) == 1 and errors[shown[0]] == p.label
        assert EXTRAPOLATE_STYLE in body[-1]
    assert not any(t in m["content"] for p in later if not p.meta.get("extrapolates") for m in p.messages
                   for t in errors), "ordinary prompts show no errors"
    assert not any(t in m["content"] for p in engine.prompts[:20] for m in p.messages for t in errors)

    # The real validation texts are never training data.
    trained = {r["text"] for r in read_parts(sorted((tmp_path / "run" / "data").glob("train-*.parquet")))}
    assert not trained & {r["text"] for r in val}


def test_s3_refuses_the_evaluation_file_as_validation_set(tmp_path, tiny_student, data_dir):
    cfg = cfg_for(tmp_path, tiny_student, data_dir, "task.val_path=sst2/test.jsonl")
    with pytest.raises(ConfigError, match=r"task\.val_path: .*is the evaluation \(test\) file"):
        Distiller(cfg, engine=FakeTeacherEngine())
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"
    # Also when the evaluation file was set by path and the validation set is the same file.
    cfg = cfg_for(tmp_path, tiny_student, data_dir, f"task.eval_path={data_dir / 'sst2' / 'seed.jsonl'}")
    with pytest.raises(ConfigError, match=r"task\.val_path \(default: the task's seed_path\)"):
        Distiller(cfg, engine=FakeTeacherEngine())


def test_s3_names_the_field_of_a_missing_or_broken_validation_file(tmp_path, tiny_student, data_dir):
    with pytest.raises(ConfigError, match=r"task\.val_path: S3's validation set .*does not exist"):
        Distiller(cfg_for(tmp_path, tiny_student, data_dir, "task.val_path=nope.jsonl"), engine=FakeTeacherEngine())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "x", "label": "maybe"}\n')
    with pytest.raises(ConfigError, match=r"task\.val_path: .*bad\.jsonl:2: label 'maybe'"):
        Distiller(cfg_for(tmp_path, tiny_student, data_dir, f"task.val_path={bad}"), engine=FakeTeacherEngine())


def test_s3_share_setting_is_checked():
    with pytest.raises(ConfigError, match="s3_error_share"):
        load_config(None, ["strategy.s3_error_share=1.5"])
