"""gold_ray.entry: what ``gold-ray distill`` and the Ray job entrypoint share, without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gold_ray import entry
from gold_ray.config import ConfigError
from gold_ray.errors import InputError, MissingFileError, UserError
from gold_ray.models import ModelResolutionError
from gold_ray.run.loop import RunDirError, TooManyRejectsError
from gold_ray.run.rundir import RunReadError
from gold_ray.run.store import StateFileError
from gold_ray.run.tasks import TaskFileError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_importing_jobs_submit_first_imports_neither_the_cli_nor_ray():
    # A fresh interpreter: jobs.submit used to import gold_ray.cli, which imports jobs.submit.
    code = ("import sys, jobs.submit, gold_ray.entry; "
            "print(sorted(m for m in ('gold_ray.cli', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_forwarded_env_has_one_home():
    homes = []
    for folder in ("gold_ray", "actors", "jobs"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                if any(isinstance(t, ast.Name) and t.id == "FORWARDED_ENV" for t in targets):
                    homes.append(path.relative_to(REPO_ROOT).as_posix())
    assert homes == ["gold_ray/entry.py"]
    assert "PYTHONPATH" not in entry.FORWARDED_ENV  # this machine's paths mean nothing on a cluster


@pytest.mark.parametrize("err", [
    ConfigError("budget.samplez: Extra inputs are not permitted"),
    TaskFileError("my_task.yaml: labels: a classification task needs at least two labels"),
    RunDirError("output.dir runs/x already holds a run"),
    TooManyRejectsError("iteration 0 rejected 90% of its samples"),
    ModelResolutionError("unknown embedded model 'embedded:nope'"),
    RunReadError("runs/x: no such run directory"),
    StateFileError("runs/x/state.json: not a gold-ray state file"),
    InputError("eval.jsonl:3: not valid JSON"),
    MissingFileError("eval.jsonl: no such file"),
], ids=lambda err: type(err).__name__)
def test_deliberate_input_errors_exit_2(err):
    assert isinstance(err, UserError)
    assert entry.exit_code(err) == entry.EXIT_USER_ERROR == 2


@pytest.mark.parametrize("err", [ValueError("bad shape"), KeyError("x"), RuntimeError("boom"),
                                 FileNotFoundError("part-0001.parquet"), AssertionError()],
                         ids=lambda err: type(err).__name__)
def test_any_other_exception_exits_1(err):
    assert entry.exit_code(err) == entry.EXIT_INTERNAL_ERROR == 1


class RemoteError(Exception):
    """Stands in for Ray's RayTaskError: the original exception is its ``cause``."""

    def __init__(self, cause: BaseException):
        super().__init__(f"remote traceback ...\n{cause!r}")
        self.cause = cause


def test_an_error_raised_on_ray_is_judged_and_shown_by_its_cause(capsys):
    assert entry.report_failure(RemoteError(ConfigError("seed: not an integer"))) == 2
    assert capsys.readouterr().err == "gold-ray: error: seed: not an integer\n"
    assert entry.report_failure(RemoteError(KeyError("label")), debug=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("gold-ray: internal error (this is a bug; please report it): KeyError: 'label'\n")
    assert "remote traceback" in err


def test_a_log_that_cannot_be_written_leaves_the_traceback_on_stderr(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    try:
        raise KeyError("x")
    except KeyError as err:
        assert entry.report_failure(err, run_dir=blocker) == 1
    err = capsys.readouterr().err
    assert "could not write the traceback" in err and "Traceback (most recent call last)" in err


def test_summary_names_every_output_and_a_missing_mlflow_run(tmp_path):
    (tmp_path / "report.html").write_text("<html></html>")
    metrics = {"final": {"accuracy": 0.75, "macro_f1": None}}
    text = entry.summary_text(metrics, tmp_path, prog="gold-ray job", tracking=True)
    lines = text.splitlines()
    assert lines[0] == f"gold-ray job: done. run directory: {tmp_path}"
    assert f"  report:              {tmp_path / 'report.html'}" in lines
    assert "  MLflow run:          (the driver reported none)" in lines
    assert lines[-1] == "  final accuracy: 0.7500"  # a score that is not a number is left out
    tracked = entry.summary_text({"mlflow": {"run_id": "abc", "tracking_uri": "sqlite:///m.db"}}, tmp_path)
    assert "  MLflow run:          abc in sqlite:///m.db" in tracked.splitlines()


def test_load_run_config_applies_overwrite_and_output_after_the_overrides(tmp_path):
    cfg = entry.load_run_config(entry.config_path("tiny"), ["output.dir=elsewhere", "seed=3"], overwrite=True,
                                output_dir=tmp_path / "run")
    assert (cfg.seed, cfg.output.overwrite, cfg.output.dir) == (3, True, str(tmp_path / "run"))
    assert entry.config_path("tiny") == entry.SHIPPED_CONFIG_DIR / "tiny.yaml"
