"""The Ray job entrypoint (jobs/distill.py) without Ray: config references, auto-resume, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gold_ray import entry
from gold_ray.config import ConfigError, load_config
from gold_ray.entry import SHIPPED_CONFIG_DIR
from gold_ray.errors import InputError
from gold_ray.run import store
from jobs import distill


def test_shipped_name_resolves_to_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert distill.resolve_config_ref("tiny") == SHIPPED_CONFIG_DIR / "tiny.yaml"


def test_relative_path_falls_back_to_gold_ray_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "cluster" / "configs").mkdir(parents=True)
    (home / "cluster" / "configs" / "x.yaml").write_text("seed: 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(distill.HOME_ENV, raising=False)
    assert distill.resolve_config_ref("cluster/configs/x.yaml") == Path("cluster/configs/x.yaml")
    monkeypatch.setenv(distill.HOME_ENV, str(home))
    assert load_config(distill.resolve_config_ref("cluster/configs/x.yaml")).seed == 3
    # A file in the current folder wins over the home copy.
    (tmp_path / "cluster" / "configs").mkdir(parents=True)
    (tmp_path / "cluster" / "configs" / "x.yaml").write_text("seed: 4\n")
    assert load_config(distill.resolve_config_ref("cluster/configs/x.yaml")).seed == 4


def test_env_reference_writes_the_text_under_the_users_file_name(monkeypatch):
    monkeypatch.setenv("GOLD_RAY_CONFIG_YAML", "budget: {samples: 7}\n")
    monkeypatch.setenv("GOLD_RAY_CONFIG_NAME", "mine.yaml")
    path = distill.resolve_config_ref("env:GOLD_RAY_CONFIG_YAML")
    assert path.name == "mine.yaml"
    assert load_config(path).budget.samples == 7


def test_env_reference_to_an_unset_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        distill.resolve_config_ref("env:NOPE_NOT_SET")


def committed_run(tmp_path: Path, **overrides):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}"])
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir()
    (run_dir / store.CONFIG_FILE).write_text(cfg.to_yaml())
    state = {"strategy": cfg.strategy.name, "seed": cfg.seed, "iteration": 0, "stage": "generate", "finished": False,
             "feedback": [], "dedup": [], "parts": [], "iterations": []}
    state.update(overrides)
    store.commit_state(run_dir, state)
    return cfg


def test_a_committed_state_of_the_same_run_is_resumed(tmp_path):
    cfg = committed_run(tmp_path)
    assert distill.committed_run_matches(cfg) is True


def test_fresh_folder_is_not_resumed(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}"])
    assert distill.committed_run_matches(cfg) is False


@pytest.mark.parametrize("change", ["seed=1", "strategy.name=zerogen", "teacher.model=/other/teacher",
                                    "task.name=ag_news", "output.overwrite=true"])
def test_another_run_or_an_overwrite_is_not_resumed(tmp_path, change):
    committed_run(tmp_path)
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", change])
    assert distill.committed_run_matches(cfg) is False


def test_main_reports_a_config_error_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: {samples: 8, bogus_key: 1}\n")
    assert distill.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "budget.bogus_key" in err and "bad.yaml" in err


def test_main_reports_a_bad_override(tmp_path, capsys):
    assert distill.main(["--config", "tiny", "--set", "budget.samples=lots"]) == 2
    assert "budget.samples" in capsys.readouterr().err


def test_module_runs_as_a_script_and_exits_non_zero_on_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: {nam: gold}\n")
    root = Path(distill.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "jobs.distill", "--config", str(bad)], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "strategy.nam" in result.stderr


@pytest.mark.parametrize(("err", "code"), [
    (InputError("task.eval_path: eval.jsonl:3: not valid JSON"), 2),
    (KeyError("stage"), 1),
    (ValueError("an internal check failed"), 1),  # a ValueError that is no user input is a bug
], ids=["user error", "KeyError", "internal ValueError"])
def test_main_maps_errors_as_gold_ray_does(tmp_path, monkeypatch, capsys, err, code):
    def broken(run_dir):
        raise err

    # Before Ray: the job checks for a committed run of the same config first.
    monkeypatch.setattr(store, "load_state", broken)
    assert distill.main(["--config", "tiny", "--set", f"output.dir={tmp_path / 'run'}"]) == code
    assert entry.exit_code(err) == code
    out = capsys.readouterr().err
    if code == 2:
        assert out == f"gold-ray job: error: {err}\n"
        assert not (tmp_path / "run").exists()
        return
    assert f"gold-ray job: internal error (this is a bug; please report it): {type(err).__name__}: {err}" in out
    # A job's stderr is its log: the traceback is there, and in the run directory's log.
    assert "Traceback (most recent call last)" in out and "in broken" in out
    log = tmp_path / "run" / "logs" / "gold-ray.log"
    assert "in broken" in log.read_text() and f"the full traceback is in {log}" in out


def test_main_reports_a_corrupt_state_file_as_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / store.STATE_FILE).write_text("{not json")
    assert distill.main(["--config", "tiny", "--set", f"output.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gold-ray job: error: {run / store.STATE_FILE}: not a gold-ray state file")
    assert "Traceback" not in err
