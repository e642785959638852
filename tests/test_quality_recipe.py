"""The final-recipe sweep (benchmarks/quality/recipe.py): recipes retrained on a finished run's own data,
chosen on a validation file, never on the test set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gold_ray.config import load_config
from gold_ray.evaluation import evaluate_student, load_eval_records
from gold_ray.loop import Distiller
from gold_ray.student import load_student
from gold_ray.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "recipe.py"


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return module


def test_recipe_names_parse_and_bad_ones_are_refused(recipe):
    assert recipe.parse_recipe("ce-e3") == {"name": "ce-e3", "loss": "ce", "alpha": 1.0, "beta": 1.0, "epochs": 3}
    assert recipe.parse_recipe("sce-a0.1-b1-e6") == {"name": "sce-a0.1-b1-e6", "loss": "sce", "alpha": 0.1,
                                                     "beta": 1.0, "epochs": 6}
    with pytest.raises(ValueError, match="sce-a1-e3"):
        recipe.parse_recipe("sce-a1-e3")


def test_choice_looks_at_validation_only_and_needs_every_run(recipe):
    def row(run, strategy, name, val, test):
        return {"run": run, "strategy": strategy, "recipe": name, "val_accuracy": val, "test_accuracy": test}

    rows = [row("gold-s0", "gold", "ce-e3", 0.70, 0.90), row("zerogen-s0", "zerogen", "ce-e3", 0.70, 0.90),
            row("gold-s0", "gold", "sce-a1-b1-e3", 0.80, 0.60), row("zerogen-s0", "zerogen", "sce-a1-b1-e3", 0.74, 0.60),
            row("gold-s0", "gold", "ce-e6", 0.99, 0.99)]  # best of all, but not measured on every run yet
    out = recipe.choose(rows, ["ce-e3", "sce-a1-b1-e3", "ce-e6"])
    assert out["chosen"] == "sce-a1-b1-e3"  # higher mean validation, although its test accuracy is lower
    assert out["per_recipe"]["sce-a1-b1-e3"] == {"val": pytest.approx(0.77), "test": pytest.approx(0.60), "runs": 2}
    assert out["per_strategy"]["zerogen"]["sce-a1-b1-e3"]["val"] == pytest.approx(0.74)
    # A tie goes to the earlier recipe of the list.
    tie = [row("gold-s0", "gold", "a", 0.5, 0.1), row("gold-s0", "gold", "b", 0.5, 0.9)]
    assert recipe.choose(tie, ["a", "b"])["chosen"] == "a"


def test_sweep_scores_the_run_own_student_retrains_the_rest_and_resumes(recipe, tmp_path, monkeypatch):
    rows = [{"text": f"a sample {i} that reads as {'positive' if i % 2 else 'negative'}",
             "label": "positive" if i % 2 else "negative"} for i in range(24)]
    eval_file, val_file = tmp_path / "eval.jsonl", tmp_path / "val.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    val_file.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    student_dir = save_tiny_classifier(tmp_path / "student")
    run_dir = tmp_path / "runs" / "sst2-gold-s0-n24"
    cfg = load_config(None, [
        "task.name=sst2", f"task.eval_path={eval_file}", f"student.model={student_dir}", "teacher.model=fake",
        "budget.samples=24", "strategy.iterations=2", "strategy.probe_fraction=0.5", "student.final_epochs=1",
        "student.batch_size=8", f"output.dir={run_dir}", "tracking.enabled=false"])
    Distiller(cfg, engine=FakeTeacherEngine()).run()
    argv = ["--task", "sst2", "--runs", "gold-s0", "--samples", "24", "--runs-dir", str(tmp_path / "runs"),
            "--val", str(val_file), "--recipes", "ce-e1,sce-a1-b1-e1"]

    assert recipe.main(argv) == 0
    report = json.loads((tmp_path / "results" / "sst2-recipes-n24.json").read_text())
    own, sce = report["rows"]
    task = load_task("sst2")
    saved = load_student(run_dir / "student", task)
    assert not own["retrained"] and sce["retrained"]
    assert own["val_accuracy"] == evaluate_student(saved, task, load_eval_records(task, val_file))["accuracy"]
    assert own["test_accuracy"] == evaluate_student(saved, task, load_eval_records(task, eval_file))["accuracy"]
    best = max(report["rows"], key=lambda r: (r["val_accuracy"], r["recipe"] == "ce-e1"))
    assert report["chosen"] == best["recipe"] and report["validation"] == str(val_file)
    assert f"**{best['recipe']}**" in (tmp_path / "results" / "sst2-recipes-n24.md").read_text()

    # Finished pairs are never retrained: a second invocation only re-reads the file.
    monkeypatch.setattr("gold_ray.student.build_student", lambda *a, **k: pytest.fail("retrained a finished pair"))
    assert recipe.main(argv) == 0
    assert json.loads((tmp_path / "results" / "sst2-recipes-n24.json").read_text())["rows"] == report["rows"]
    with pytest.raises(SystemExit):
        recipe.main([*argv[:-1], "adam-e3"])
