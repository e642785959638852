"""Tests of gold_ray.reporting.tracking against a real SQLite MLflow store in tmp_path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gold_ray.config import RunConfig
from gold_ray.reporting import tracking as tracking_module
from gold_ray.reporting.tracking import (
    MlflowTracker,
    NullTracker,
    build_tracker,
    end_child_run,
    flatten_params,
    log_metric_rows,
    numeric_metrics,
    redact,
    resolve_tracking_uri,
    safe_params,
    start_child_run,
)

PLANTED = "sk-planted-123"


def _cfg(tmp_path, **tracking) -> RunConfig:
    return RunConfig.model_validate(
        {"output": {"dir": str(tmp_path / "run")}, "strategy": {"band_lo": 0.25}, "tracking": tracking}
    )


def test_flatten_params_dotted_keys_and_json_lists():
    flat = flatten_params({"a": {"b": 1, "c": {"d": None}}, "e": [1, "x"]})
    assert flat == {"a.b": "1", "a.c.d": "None", "e": '[1, "x"]'}


def test_safe_params_drop_values_holding_a_secret():
    env = {"OPENAI_API_KEY": PLANTED, "HF_TOKEN": "hf_abcdef", "HOME": "/home/x"}
    params = safe_params({"teacher": {"base_url": f"http://u:{PLANTED}@h", "api_key_env": "OPENAI_API_KEY"},
                          "home": "/home/x"}, environ=env)
    assert "teacher.base_url" not in params
    # The variable's name is not a secret; only its value is.
    assert params["teacher.api_key_env"] == "OPENAI_API_KEY"
    assert params["home"] == "/home/x"


def test_redact_replaces_secrets_in_nested_strings():
    out = redact({"k": [f"a{PLANTED}b", 3], PLANTED: "v"}, [PLANTED])
    assert out == {"k": ["a[redacted]b", 3], "[redacted]": "v"}


def test_numeric_metrics_skip_nan_and_non_numbers():
    got = numeric_metrics({"a": 1, "b": 2.5, "c": math.nan, "d": "x", "e": None, "f": True, "g:h": math.inf, "i/j": 0})
    assert got == {"a": 1.0, "b": 2.5, "i/j": 0.0}


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    assert resolve_tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking_uri(cfg, tmp_path) == "sqlite:///elsewhere.db"
    assert resolve_tracking_uri(_cfg(tmp_path, tracking_uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"


def test_build_tracker_disabled_is_null(tmp_path):
    tracker = build_tracker(_cfg(tmp_path, enabled=False), tmp_path)
    assert isinstance(tracker, NullTracker)
    assert tracker.start("x") is None and tracker.parent_info() is None
    tracker.log_params(_cfg(tmp_path))
    tracker.log_metrics({"a": 1}, step=0)
    tracker.end()
    assert not (tmp_path / "mlflow.db").exists()


def test_logging_without_start_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="start"):
        MlflowTracker(_cfg(tmp_path), tmp_path).log_metrics({"a": 1}, step=0)


def test_sqlite_run_params_metrics_artifacts_resume_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    # A config that would carry the key if it were ever copied into a value.
    cfg = _cfg(tmp_path, experiment="exp-test").model_copy(deep=True)
    cfg.teacher.base_url = f"http://proxy/{PLANTED}/v1"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = build_tracker(cfg, run_dir)
    assert isinstance(tracker, MlflowTracker)
    run_id = tracker.start("demo")
    tracker.log_params(cfg)
    tracker.log_metrics({"generate.accepted": 10, "generate.note": "x", "train.loss": math.nan}, step=0)
    tracker.log_metrics({"generate.accepted": 12}, step=1)
    art = tmp_path / "metrics.json"
    art.write_text('{"ok": 1}')
    tracker.log_artifact(art)
    tracker.log_dict({"config": cfg.model_dump(mode="json")}, "resolved.json")
    student = tmp_path / "student_dir"
    student.mkdir()
    (student / "config.json").write_text("{}")
    tracker.log_student_model(student)
    child = start_child_run(tracker.parent_info(), "train-it0")
    log_metric_rows(tracker.tracking_uri, child, [(0, {"train.loss": 0.7}), (1, {"train.loss": 0.5})])
    end_child_run(tracker.tracking_uri, child)
    tracker.end("FAILED")

    client = tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["strategy.band_lo"] == "0.25"
    assert run.data.params["teacher.api_key_env"] == "OPENAI_API_KEY"
    assert "teacher.base_url" not in run.data.params
    history = client.get_metric_history(run_id, "generate.accepted")
    assert [(m.step, m.value) for m in history] == [(0, 10.0), (1, 12.0)]
    assert "train.loss" not in run.data.metrics and "generate.note" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "resolved.json", "student"} <= names
    assert [a.path for a in client.list_artifacts(run_id, "student")] == ["student/config.json"]
    # Artifacts sit next to the database, not in the current directory.
    assert (run_dir / "mlartifacts").is_dir()
    assert PLANTED not in (run_dir / "mlartifacts" / run_id / "artifacts" / "resolved.json").read_text()
    crun = client.get_run(child)
    assert crun.data.tags["mlflow.parentRunId"] == run_id
    assert crun.info.experiment_id == run.info.experiment_id and crun.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(child, "train.loss")] == [0.7, 0.5]

    # Reopen on --resume: same run, earlier data kept, a changed param recorded as a tag.
    again = MlflowTracker(cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"band_hi": 0.9})}),
                          run_dir)
    assert again.start("demo", resume_run_id=run_id) == run_id
    again.log_params(again_cfg := cfg.model_copy(deep=True))
    again_cfg.strategy.band_hi = 0.9
    again.log_params(again_cfg)
    again.log_metrics({"generate.accepted": 14}, step=2)
    again.end()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.band_hi"] == "0.8"
    assert run.data.tags["changed.strategy.band_hi"] == "0.9"
    assert [m.step for m in client.get_metric_history(run_id, "generate.accepted")] == [0, 1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 2  # parent and child, no duplicate

    db = run_dir / "mlflow.db"
    assert db.is_file()
    assert PLANTED.encode() not in db.read_bytes()


def test_resume_of_unknown_run_starts_a_new_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(_cfg(tmp_path), tmp_path)
    run_id = tracker.start("x", resume_run_id="0" * 32)
    assert run_id != "0" * 32
    assert tracker.client.get_run(run_id).info.run_name == "x"


def test_parent_run_id_nests_the_run_and_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parent = MlflowTracker(_cfg(tmp_path), tmp_path)
    parent_id = parent.start("compare")
    child = MlflowTracker(_cfg(tmp_path, parent_run_id=parent_id), tmp_path)
    child_id = child.start("gold-sst2-seed0")
    assert parent.client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
    assert "mlflow.parentRunId" not in parent.client.get_run(parent_id).data.tags
    # Reopening keeps the run (and its parent tag) as it was.
    assert child.start("gold-sst2-seed0", resume_run_id=child_id) == child_id
    assert len(parent.client.search_runs([parent.client.get_run(parent_id).info.experiment_id])) == 2


def test_student_model_is_one_copy_on_disk_and_reads_back_through_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    student = run_dir / "student"
    (student / "sub").mkdir(parents=True)
    (student / "model.safetensors").write_bytes(b"weights" * 100)
    (student / "sub" / "tokenizer.json").write_text("{}")
    tracker = build_tracker(_cfg(tmp_path), run_dir)
    run_id = tracker.start("one-copy")
    tracker.log_student_model(student)
    logged = tracker.local_artifact_dir() / "student"
    assert logged.is_relative_to(run_dir / "mlartifacts")
    for name in ("model.safetensors", "sub/tokenizer.json"):
        assert (logged / name).stat().st_ino == (student / name).stat().st_ino  # the same file, not a copy
    # Logged again (a resumed finish): still one copy.
    tracker.log_student_model(student)
    assert (logged / "model.safetensors").stat().st_nlink == 2
    back = Path(tracker.client.download_artifacts(run_id, "student", str(tmp_path / "back")))
    assert (back / "model.safetensors").read_bytes() == b"weights" * 100
    assert (back / "sub" / "tokenizer.json").read_text() == "{}"


def test_student_model_is_copied_where_hard_links_fail(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    tracker = build_tracker(_cfg(tmp_path), tmp_path / "run")
    run_id = tracker.start("copied")

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tracking_module.os, "link", refuse)
    tracker.log_student_model(student)
    logged = tracker.local_artifact_dir() / "student" / "config.json"
    assert logged.read_text() == "{}" and logged.stat().st_ino != (student / "config.json").stat().st_ino
    assert [a.path for a in tracker.client.list_artifacts(run_id, "student")] == ["student/config.json"]
