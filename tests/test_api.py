"""The Python API: ``from gold_ray import distill, RunConfig`` does what ``gold-ray distill`` does."""

import json

import pytest

import gold_ray
import gold_ray.run.loop
import gold_ray.teacher.engines
from gold_ray import RunConfig, distill
from gold_ray.cli import main
from gold_ray.config import load_config
from gold_ray.run.loop import STAGE_EVENTS, STAGES
from gold_ray.testing import FakeTeacherEngine, save_tiny_chat_lm, save_tiny_classifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"film {i}", "label": ["negative", "positive"][i % 2]}) + "\n"
                                 for i in range(8)))
    overrides = [f"teacher.model={save_tiny_chat_lm(root / 'teacher')}",
                 f"student.model={save_tiny_classifier(root / 'student')}", "budget.samples=12",
                 f"task.eval_path={eval_file}", "tracking.enabled=false", "student.final_epochs=1"]
    return root, overrides


def comparable(metrics: dict) -> dict:
    """What must agree between two runs of the same config (timings differ)."""
    its = [{"accepted": m["generate"]["accepted"], "probe": m["probe"]["accepted"], "loss": m["train"]["loss"],
            "accuracy": m["train"]["accuracy"], "feedback": m["feedback"]["ids"]} for m in metrics["iterations"]]
    return {"iterations": its, "totals": metrics["totals"], "final": metrics["final"]["accuracy"]}


def test_api_runs_what_the_cli_runs(setup, monkeypatch, capsys):
    root, overrides = setup
    # The teacher's answers come from the fake engine (the models and everything else are real).
    monkeypatch.setattr(gold_ray.teacher.engines, "build_engine", lambda *a, **k: FakeTeacherEngine())
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["distill", "tiny", "--local", "--output", str(root / "cli"), *sets]) == 0
    cli_lines = capsys.readouterr().out.splitlines()

    cfg = RunConfig(**load_config(gold_ray.cli.config_path("tiny"), overrides).model_dump())
    cfg.output.dir = str(root / "api")
    events = []
    metrics = distill(cfg, local=True, progress="plain", on_event=lambda stage, info: events.append(stage))
    api_lines = capsys.readouterr().out.splitlines()

    assert [e for e in events if e in STAGE_EVENTS] == [*STAGES, *STAGES, "final"]
    assert events[0] == "plan" and "progress" in events
    assert comparable(metrics) == comparable(json.loads((root / "cli" / "metrics.json").read_text()))
    # The same progress lines (one per stage) as the command, and the same outputs.
    def stage_lines(lines: list[str]) -> list[str]:
        # Progress lines within a long stage (" ... ") come and go with the machine's speed.
        return [line for line in lines if (" iteration " in line or "final stage" in line) and " ... " not in line]

    assert len(stage_lines(api_lines)) == 9
    assert len(stage_lines(cli_lines)) == 9
    for name in ("report.html", "student/config.json", "dataset_card.md", "task.yaml"):
        assert (root / "api" / name).is_file() and (root / "cli" / name).is_file()


def test_a_config_name_with_overrides_resolves_like_the_cli(setup, monkeypatch):
    root, overrides = setup
    seen = {}

    def capture(cfg, *, resume, on_event):
        seen.update(cfg=cfg, resume=resume)
        return {"final": {}}

    monkeypatch.setattr(gold_ray.run.loop, "distill_in_process", capture)
    distill("tiny", overrides=[*overrides, "output.dir=runs/x"], local=True, resume=True, progress="quiet")
    expected = load_config(gold_ray.cli.config_path("tiny"), [*overrides, "output.dir=runs/x"])
    assert seen["cfg"] == expected and seen["resume"] is True
    with pytest.raises(ValueError, match="overrides apply to a config file or name"):
        distill(expected, overrides=["seed=1"], local=True)


@pytest.mark.slow  # two runs and an MLflow store: over ten seconds
def test_local_distill_is_an_mlflow_run_that_a_resume_continues(setup, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, overrides = setup
    monkeypatch.setattr(gold_ray.teacher.engines, "build_engine", lambda *a, **k: FakeTeacherEngine())
    tracked = [o for o in overrides if o != "tracking.enabled=false"]
    cfg = load_config(gold_ray.cli.config_path("tiny"), [*tracked, f"output.dir={root / 'tracked'}"])
    assert cfg.tracking.enabled

    def crash_in_second_iteration(stage, info):
        if stage == "generate" and info["iteration"] == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        distill(cfg, local=True, progress="quiet", on_event=crash_in_second_iteration)
    client = MlflowClient(tracking_uri=f"sqlite:///{(root / 'tracked').resolve()}/mlflow.db")
    [failed] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED" and failed.data.params["strategy.name"] == "gold"

    metrics = distill(cfg, local=True, resume=True, progress="quiet")
    assert metrics["mlflow"]["run_id"] == failed.info.run_id  # the resumed run continues its MLflow run
    run = client.get_run(failed.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["final.accuracy"] == pytest.approx(metrics["final"]["accuracy"])
    assert run.data.metrics["final.diversity.distinct_2"] == pytest.approx(metrics["final"]["diversity"]["distinct_2"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final.accuracy")] == [2]  # logged once
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in artifacts and any("student" in a for a in artifacts)


def test_public_names():
    assert {"distill", "RunConfig", "load_config"} <= set(gold_ray.__all__)


def test_readme_python_api_snippet(monkeypatch):
    """The README's Python API lines call distill with a valid config name and overrides, and a valid RunConfig."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "from gold_ray import" in b]
    calls = []

    def recording(cfg=None, **kwargs):
        calls.append((cfg, kwargs))
        return {"final": {"accuracy": 0.5}}

    monkeypatch.setattr(gold_ray, "distill", recording)
    exec(compile(code, "README.md", "exec"), {})
    assert len(calls) == 2
    (name, kw1), (cfg, kw2) = calls
    resolved = load_config(gold_ray.cli.config_path(name), kw1["overrides"])  # raises on a bad key
    assert resolved.task.name == "ag_news"
    assert isinstance(cfg, RunConfig) and kw2 == {"local": True}
