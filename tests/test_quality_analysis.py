"""The quality benchmark's analysis scripts on a finished tiny run: the final-recipe sweep
(benchmarks/quality/recipe.py: recipes retrained on a run's own data, chosen on a validation file, never
on the test set) and the per-iteration diagnostics (benchmarks/quality/diagnose.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from gold_ray.config import load_config
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.student.evaluation import evaluate_student, load_eval_records
from gold_ray.student.model import load_student
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


def _script(name, results, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"quality_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", results)
    return module


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    return _script("recipe", tmp_path / "results", monkeypatch)


@pytest.fixture
def diagnose(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir(exist_ok=True)
    return _script("diagnose", tmp_path / "results", monkeypatch)


@pytest.fixture
def bands(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir(exist_ok=True)
    return _script("bands", tmp_path / "results", monkeypatch)


def _run_config(run_dir, eval_file, student_dir, *extra):
    return load_config(None, [
        "task.name=sst2", f"task.eval_path={eval_file}", f"student.model={student_dir}", "teacher.model=fake",
        "budget.samples=24", "strategy.iterations=2", "strategy.probe_fraction=0.5", "student.final_epochs=1",
        "student.batch_size=8", f"output.dir={run_dir}", "tracking.enabled=false", *extra])


@pytest.fixture
def finished_run(tmp_path):
    """A finished GOLD run on the fake engine and a tiny student: (run folder, eval file, validation file)."""
    rows = [{"text": f"a sample {i} that reads as {'positive' if i % 2 else 'negative'}",
             "label": "positive" if i % 2 else "negative"} for i in range(24)]
    eval_file, val_file = tmp_path / "eval.jsonl", tmp_path / "val.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    val_file.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    student_dir = save_tiny_classifier(tmp_path / "student")
    run_dir = tmp_path / "runs" / "sst2-gold-s0-n24"
    Distiller(_run_config(run_dir, eval_file, student_dir), engine=FakeTeacherEngine()).run()
    return run_dir, eval_file, val_file


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
    # A sweep asked for a run it has not measured yet chooses nothing.
    assert recipe.choose(rows, ["ce-e3", "sce-a1-b1-e3"], ["gold-s0", "zerogen-s0", "gold-s1"])["chosen"] is None
    # A tie goes to the earlier recipe of the list.
    tie = [row("gold-s0", "gold", "a", 0.5, 0.1), row("gold-s0", "gold", "b", 0.5, 0.9)]
    assert recipe.choose(tie, ["a", "b"])["chosen"] == "a"


@pytest.mark.slow
def test_sweep_scores_the_run_own_student_retrains_the_rest_and_resumes(recipe, finished_run, tmp_path, monkeypatch):
    run_dir, eval_file, val_file = finished_run
    argv = ["--task", "sst2", "--runs", "gold-s0", "--samples", "24", "--runs-dir", str(tmp_path / "runs"),
            "--val", str(val_file), "--recipes", "sce-a0.1-b1-e1,ce-e1"]

    assert recipe.main(argv) == 0
    report = json.loads((tmp_path / "results" / "sst2-recipes-n24.json").read_text())
    own, ce = report["rows"]  # the run trained GOLD's own final recipe (auto: SCE, alpha 0.1)
    task = load_task("sst2")
    saved = load_student(run_dir / "student", task)
    assert not own["retrained"] and ce["retrained"]
    assert own["val_accuracy"] == evaluate_student(saved, task, load_eval_records(task, val_file))["accuracy"]
    assert own["test_accuracy"] == evaluate_student(saved, task, load_eval_records(task, eval_file))["accuracy"]
    best = max(report["rows"], key=lambda r: (r["val_accuracy"], r["recipe"] == "sce-a0.1-b1-e1"))
    assert report["chosen"] == best["recipe"] and report["validation"] == str(val_file)
    assert f"**{best['recipe']}**" in (tmp_path / "results" / "sst2-recipes-n24.md").read_text()

    # Finished pairs are never retrained: a second invocation only re-reads the file.
    monkeypatch.setattr("gold_ray.student.model.build_student", lambda *a, **k: pytest.fail("retrained a finished pair"))
    assert recipe.main(argv) == 0
    assert json.loads((tmp_path / "results" / "sst2-recipes-n24.json").read_text())["rows"] == report["rows"]
    with pytest.raises(SystemExit):
        recipe.main([*argv[:-1], "adam-e3"])

    # A --tag variant's folder is named as run.py names it; its rows are grouped as STRATEGY@TAG.
    shutil.copytree(run_dir, run_dir.with_name("sst2-gold-s0-n24-v2"))
    assert recipe.main([*argv[:3], "gold-s0@v2", *argv[4:-1], "sce-a0.1-b1-e1"]) == 0
    report = json.loads((tmp_path / "results" / "sst2-recipes-n24.json").read_text())
    assert report["rows"][-1]["run"] == "gold-s0@v2" and report["rows"][-1]["val_accuracy"] == own["val_accuracy"]
    assert set(report["per_strategy"]) == {"gold", "gold@v2"}

    # --name keeps an experiment's rows and choice in a file of its own; the sweep's file is untouched.
    sweep = (tmp_path / "results" / "sst2-recipes-n24.json").read_text()
    assert recipe.main([*argv[:3], "gold-s0@v2", *argv[4:-1], "sce-a0.1-b1-e1", "--name", "v2-check"]) == 0
    assert (tmp_path / "results" / "sst2-recipes-n24.json").read_text() == sweep
    apart = json.loads((tmp_path / "results" / "sst2-v2-check-n24.json").read_text())
    assert [(r["run"], r["recipe"]) for r in apart["rows"]] == [("gold-s0@v2", "sce-a0.1-b1-e1")]
    with pytest.raises(SystemExit):
        recipe.main([*argv, "--name", "../x"])


@pytest.mark.slow
def test_diagnostics_report_each_iteration_from_the_run_files(diagnose, finished_run, tmp_path):
    run_dir, eval_file, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert diagnose.main(["--task", "sst2", "--samples", "24", "--runs-dir", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "results" / "sst2-diagnostics-n24.json").read_text())
    assert report["chance_loss"] == pytest.approx(0.6931, abs=1e-4)
    evaluated = [json.loads(line) for line in eval_file.read_text().splitlines()]
    assert report["eval_mean_chars"] == pytest.approx(sum(len(r["text"]) for r in evaluated) / len(evaluated), abs=0.05)
    assert [(r["run"], r["iteration"]) for r in report["rows"]] == [("sst2-gold-s0-n24", 0), ("sst2-gold-s0-n24", 1)]
    first, it0 = report["rows"][0], metrics["iterations"][0]
    assert first["train_loss"] == it0["train"]["loss"]
    assert first["probe_score_spread"] == pytest.approx(it0["probe"]["scores"]["p90"] - it0["probe"]["scores"]["p10"])
    train = read_parts([run_dir / "data" / "train-it000.parquet"])
    assert first["train_chars"] == pytest.approx(sum(len(r["text"]) for r in train) / len(train), abs=0.05)
    assert first["feedback_size"] == len(it0["feedback"]["ids"]) and first["feedback_chars"] is not None
    assert "| sst2-gold-s0-n24 | 0 |" in (tmp_path / "results" / "sst2-diagnostics-n24.md").read_text()
    # The finished run's final student, from its metrics and accepted samples.
    [final], done = report["finals"], metrics["final"]
    assert (final["run"], final["accuracy"], final["recall"]) == ("sst2-gold-s0-n24", done["accuracy"],
                                                                   done["per_label_accuracy"])
    assert final["majority"] == done["baselines"]["majority"]["accuracy"]
    accepted = read_parts(sorted((run_dir / "data").glob("train-*.parquet")) + sorted((run_dir / "data").glob("probe-*.parquet")))
    positive = sum(r["label"] == "positive" for r in accepted) / len(accepted)
    assert final["train_label_shares"]["positive"] == pytest.approx(positive, abs=1e-3)
    assert "## The final students" in (tmp_path / "results" / "sst2-diagnostics-n24.md").read_text()
    with pytest.raises(SystemExit):  # nothing to diagnose is an error, not an empty report
        diagnose.main(["--task", "ag_news", "--samples", "24", "--runs-dir", str(tmp_path / "runs")])
    # The benchmark's own tasks are named as run.py names them, not by their file's path.
    with pytest.raises(SystemExit, match="2"):
        diagnose.main(["--task", "math_ops", "--samples", "24", "--runs-dir", str(tmp_path / "runs")])


@pytest.mark.slow
def test_bands_judges_both_runs_with_one_student_and_splits_probes_as_the_band_does(bands, finished_run, tmp_path):
    run_dir, eval_file, _ = finished_run
    twin = run_dir.with_name("sst2-gold-s0-n24-randband")
    Distiller(_run_config(twin, eval_file, tmp_path / "student", "strategy.score=random",
                          f"output.fork_from={run_dir}"), engine=FakeTeacherEngine()).run()
    # The judge should have other samples; for the mechanics a copy of the energy run will do.
    judge_dir = shutil.copytree(run_dir, tmp_path / "runs" / "judge")
    assert bands.main([str(run_dir), str(twin), "--judge", str(run_dir)]) == 2  # a judge must be a third run
    assert bands.main([str(twin), str(run_dir), "--judge", str(judge_dir)]) == 2  # energy first, random second
    assert bands.main([str(run_dir), str(twin), "--judge", str(judge_dir), "--out", "pair"]) == 0
    result = json.loads((tmp_path / "results" / "bands-pair.json").read_text())
    energy, random = result["rows"]["energy"], result["rows"]["random"]
    assert [r["iteration"] for r in energy] == [r["iteration"] for r in random] == [0, 1]

    # The judge's disagreement is its prediction against each sample's label.
    task = load_task("sst2")
    judge = load_student(judge_dir / "student", task)
    train = read_parts([run_dir / "data" / "train-it001.parquet"])
    wrong = [p != r["label"] for p, r in zip(judge.predict(train), train, strict=True)]
    assert energy[1]["train_disagree"] == round(sum(wrong) / len(wrong), 3)
    assert energy[0]["train_disagree"] == random[0]["train_disagree"]  # the fork shares iteration 0

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row, it in zip(energy, metrics["iterations"], strict=True):
        # The energy band's share is the strategy's own pick of that iteration, and the three
        # rank ranges hold every scored probe once.
        assert row["probes_band"] == row["picked"] == it["feedback"]["new"] > 0
        assert row["disagree_band"] == row["picked_disagree"]
        assert row["probes_below"] + row["probes_band"] + row["probes_above"] == it["probe"]["scored"]
    assert "disagree_band" not in random[0]
    assert result["summary"]["picked_disagree"]["random"] is not None
    assert "| iteration | accuracy |" in (tmp_path / "results" / "bands-pair.md").read_text()
