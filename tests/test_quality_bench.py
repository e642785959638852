"""The quality benchmark's bookkeeping (benchmarks/quality/run.py): the teacher step's result file and
the summary, which counts only the largest budget per task and strategy."""

from __future__ import annotations

import functools
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

import gold_ray.run.compare
from gold_ray.testing import FakeTeacherEngine

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run.py"
MACHINE = {"platform": "Linux-test", "cpus": 2, "torch": "2.x", "python": "3.11"}


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "machine", lambda: MACHINE)
    (tmp_path / "results").mkdir()
    return module


def _result(bench, task, strategy, seed, budget, accuracy, wall_s=100.0):
    row = {"task": task, "strategy": strategy, "seed": seed, "budget": budget, "accuracy": accuracy,
           "wall_s": wall_s, "machine": MACHINE, "command": f"python benchmarks/quality/run.py --samples {budget}"}
    (bench.RESULTS / f"{task}-{strategy}-s{seed}-n{budget}.json").write_text(json.dumps(row))


def test_summary_takes_the_largest_budget_and_never_mixes_budgets(bench):
    _result(bench, "sst2", "gold", 0, 512, 0.70)
    _result(bench, "sst2", "gold", 0, 1000, 0.80, wall_s=3000.0)
    _result(bench, "sst2", "gold", 1, 1000, 0.84, wall_s=3100.0)
    _result(bench, "sst2", "zerogen", 0, 512, 0.71)  # only the small budget so far
    (bench.RESULTS / "sst2-teacher-fewshot.json").write_text(json.dumps(
        {"task": "sst2", "accuracy": 0.61, "n": 872, "teacher": "embedded:x", "prompt_style": "chat", "demos": 3,
         "wall_s": 50.0, "machine": MACHINE, "command": "python benchmarks/quality/run.py --teacher-fewshot"}))
    summary = bench.write_summary()

    gold = summary["tasks"]["sst2"]["gold"]
    assert gold == {"mean": pytest.approx(0.82), "std": pytest.approx(statistics.stdev([0.80, 0.84])),
                    "seeds": 2, "budget": 1000}
    assert summary["tasks"]["sst2"]["zerogen"] == {"mean": 0.71, "std": 0.0, "seeds": 1, "budget": 512}
    assert summary["teacher_fewshot"] == {"sst2": 0.61}
    assert json.loads((bench.RESULTS / "summary.json").read_text()) == summary
    md = (bench.RESULTS / "summary.md").read_text()
    # Rows written before the teacher and the final loss were recorded: the loss was then always CE.
    assert "| sst2 | gold | 1000 | 2 | 0.8200 |" in md and "| 3000, 3100 | not recorded | ce |" in md
    assert "Linux-test, 2 CPUs" in md and "`python benchmarks/quality/run.py --samples 1000`" in md
    assert "| sst2 | 0.8200 | 2 | +21.0 (met) |" in md  # 0.82 against the teacher row's 0.61
    assert bench._target_cell(-0.03, False, 0.05) == "-3.0 (8.0 short)"
    superseded = md.split("## Smaller budgets")[1]
    assert "| sst2 | gold | 512 | 1 | 0.7000 |" in superseded and "zerogen" not in superseded


def test_tagged_runs_are_variants_kept_apart_from_the_default_rows(bench):
    _result(bench, "sst2", "gold", 0, 1000, 0.80)
    row = {"task": "sst2", "strategy": "gold", "seed": 0, "budget": 1000, "accuracy": 0.74, "wall_s": 900.0,
           "tag": "gemma3", "teacher": "embedded:gemma3-270m", "final_loss": "sce", "machine": MACHINE, "command": "c"}
    (bench.RESULTS / "sst2-gold-s0-n1000-gemma3.json").write_text(json.dumps(row))
    summary = bench.write_summary()
    assert summary["tasks"]["sst2"] == {"gold": {"mean": 0.80, "std": 0.0, "seeds": 1, "budget": 1000}}
    assert summary["variants"]["sst2"] == {"gold@gemma3": {"mean": 0.74, "std": 0.0, "seeds": 1, "budget": 1000}}
    md = (bench.RESULTS / "summary.md").read_text()
    assert "| sst2 | gold@gemma3 | 1000 | 1 | 0.7400 |" in md and "| 900 | embedded:gemma3-270m | sce |" in md
    with pytest.raises(SystemExit):
        bench.main(["--tag", "../x", "--strategies", ""])


def test_teacher_fewshot_step_writes_its_file_once(bench, tmp_path, monkeypatch):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"sample {i} reads as {lab}", "label": lab}) + "\n"
                                 for i, lab in enumerate(["positive", "negative"] * 10)))
    real = gold_ray.run.compare.teacher_fewshot
    monkeypatch.setattr(gold_ray.run.compare, "teacher_fewshot", functools.partial(real, engine=FakeTeacherEngine()))
    sets = ["--set", f"task.eval_path={eval_file}", "--set", "task.eval_limit=8", "--set", "teacher.prompt_style=chat"]
    assert bench.main(["--task", "sst2", "--strategies", "", "--teacher-fewshot", *sets]) == 0
    path = bench.RESULTS / "sst2-teacher-fewshot.json"
    row = json.loads(path.read_text())
    assert row["n"] == 8 and row["eval_total"] == 20 and row["accuracy"] == 1.0
    assert "seeded random subset (seed 0) of 8 of 20" in row["subset"] and "--teacher-fewshot" in row["command"]
    assert json.loads((bench.RESULTS / "summary.json").read_text())["teacher_fewshot"] == {"sst2": 1.0}
    before = path.read_bytes()
    monkeypatch.setattr(gold_ray.run.compare, "teacher_fewshot", None)  # a second evaluation would fail
    assert bench.main(["--task", "sst2", "--strategies", "", "--teacher-fewshot", *sets]) == 0
    assert path.read_bytes() == before

    # Another teacher is a variant: its own file, kept out of the benchmark's teacher row.
    monkeypatch.setattr(gold_ray.run.compare, "teacher_fewshot", functools.partial(real, engine=FakeTeacherEngine()))
    assert bench.main(["--task", "sst2", "--strategies", "", "--teacher-fewshot", "--tag", "other", *sets]) == 0
    assert json.loads((bench.RESULTS / "sst2-other-teacher-fewshot.json").read_text())["tag"] == "other"
    summary = json.loads((bench.RESULTS / "summary.json").read_text())
    assert summary["teacher_fewshot"] == {"sst2": 1.0}
    assert summary["teacher_fewshot_variants"] == {"sst2": {"other": 1.0}}
    assert "| sst2 | other |" in (bench.RESULTS / "summary.md").read_text()


def test_unknown_strategy_is_refused_before_any_run(bench):
    with pytest.raises(ValueError, match="available: gold, zerogen"):
        bench.main(["--task", "sst2", "--strategies", "gold,bogus"])


def test_fork_starts_a_tagged_run_from_its_untagged_twin(bench, tmp_path, monkeypatch):
    import gold_ray.run.compare as compare

    with pytest.raises(SystemExit):
        bench.main(["--task", "sst2", "--strategies", "gold", "--fork"])  # no --tag: it would fork itself
    seen = []

    def fake_run(cfg, runner, **kwargs):
        seen.append(cfg)
        return {"final": {"accuracy": 0.5}, "iterations": [], "totals": {}, "teacher_tokens": 1,
                "forked_from": cfg.output.fork_from}, "new"

    monkeypatch.setattr(compare, "execute_run", fake_run)
    runs = tmp_path / "runs"
    bench.main(["--task", "sst2", "--strategies", "gold", "--seeds", "2", "--samples", "1000", "--tag", "randband",
                "--fork", "--runs-dir", str(runs), "--set", "strategy.score=random"])
    assert seen[0].output.fork_from == str(runs / "sst2-gold-s2-n1000")
    assert seen[0].output.dir == str(runs / "sst2-gold-s2-n1000-randband")
    row = json.loads((bench.RESULTS / "sst2-gold-s2-n1000-randband.json").read_text())
    assert row["forked_from"] == "sst2-gold-s2-n1000"


def test_a_chosen_recipe_is_summarised_per_strategy_beside_the_runs_own_rows(bench):
    _result(bench, "sst2", "gold", 0, 1000, 0.73)
    rows = [{"run": f"{s}-s{seed}", "strategy": s, "seed": seed, "recipe": recipe, "val_accuracy": 0.8,
             "test_accuracy": acc}
            for s, seed, recipe, acc in [("gold", 0, "ce-e3", 0.73), ("gold", 0, "sce-a0.1-b1-e3", 0.75),
                                         ("gold", 1, "sce-a0.1-b1-e3", 0.77), ("zerogen", 0, "sce-a0.1-b1-e3", 0.72)]]
    (bench.RESULTS / "sst2-recipes-n1000.json").write_text(json.dumps(
        {"task": "sst2", "samples": 1000, "validation": "sst2/seed.jsonl", "chosen": "sce-a0.1-b1-e3", "rows": rows}))
    (bench.RESULTS / "ag_news-recipes-n1000.json").write_text(json.dumps(
        {"task": "ag_news", "samples": 1000, "validation": "v", "chosen": None, "rows": []}))
    summary = bench.write_summary()
    # The runs' own rows are untouched; the chosen recipe is a section of its own.
    assert summary["tasks"]["sst2"] == {"gold": {"mean": 0.73, "std": 0.0, "seeds": 1, "budget": 1000}}
    assert summary["chosen_recipe"] == {"sst2": {
        "recipe": "sce-a0.1-b1-e3", "validation": "sst2/seed.jsonl", "budget": 1000,
        "strategies": {"gold": {"mean": pytest.approx(0.76), "std": pytest.approx(statistics.stdev([0.75, 0.77])),
                                "seeds": 2},
                       "zerogen": {"mean": 0.72, "std": 0.0, "seeds": 1}}}}
    assert "| sst2 | 1000 | sce-a0.1-b1-e3 | gold | 2 | 0.7600 |" in (bench.RESULTS / "summary.md").read_text()


def test_summary_has_the_majority_class_and_pooled_paired_differences(bench, tmp_path, monkeypatch):
    from gold_ray.run.baselines import majority_class
    from gold_ray.run.tasks import load_task
    from gold_ray.student.evaluation import load_eval_records, seeded_subset

    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    eval_file = tmp_path / "sst2-eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"t{i}", "label": "negative" if i < 7 else "positive"}) + "\n"
                                 for i in range(10)))
    sets = [f"task.eval_path={eval_file}", "task.eval_limit=4", "strategy.score=random"]

    def result(task, strategy, seed, accuracy, tag="", overrides=(), **extra):
        row = {"task": task, "strategy": strategy, "seed": seed, "budget": 1000, "accuracy": accuracy, "tag": tag,
               "wall_s": 1.0, "machine": MACHINE, "command": "c", "overrides": list(overrides), **extra}
        name = f"{task}-{strategy}-s{seed}-n1000" + (f"-{tag}" if tag else "")
        (bench.RESULTS / f"{name}.json").write_text(json.dumps(row))

    for seed, (gold, zerogen) in enumerate([(0.80, 0.78), (0.82, 0.79), (0.84, 0.80)]):
        # The first band's student, recorded by two of the three runs.
        first = {"first_band_student": {"accuracy": 0.70 + 0.05 * seed, "majority": 0.5, "records": 20}} if seed < 2 else {}
        result("sst2", "gold", seed, gold, overrides=sets, **first)
        result("sst2", "zerogen", seed, zerogen, overrides=sets)
    for seed, acc in enumerate([0.81, 0.80]):  # run on another machine than their GOLD pairs
        result("sst2", "gold", seed, acc, tag="randband", overrides=sets, machine={**MACHINE, "platform": "other"})
    # Seed 2's random band started from its GOLD pair's first teacher pass (run.py --fork).
    result("sst2", "gold", 2, 0.84, tag="randband", overrides=sets, forked_from="sst2-gold-s2-n1000")
    result("rte", "gold", 0, 0.60)  # a second task pools in; its evaluation file is not here
    result("rte", "zerogen", 0, 0.55)
    result("rte", "zerogen", 1, 0.50)  # no GOLD run of seed 1: not a pair
    # RTE's GOLD result predates the field: its run folder still has the metrics it is read from.
    rte_run = tmp_path / "runs" / "rte-gold-s0-n1000"
    rte_run.mkdir(parents=True)
    (rte_run / "metrics.json").write_text(json.dumps(
        {"iterations": [{"train": {"val_accuracy": 0.55, "val_majority": 0.5, "val_records": 12}}, {"train": {}}]}))
    summary = bench.write_summary(str(tmp_path / "runs"))
    assert json.loads((bench.RESULTS / "rte-gold-s0-n1000.json").read_text())["first_band_student"] == {
        "accuracy": 0.55, "majority": 0.5, "records": 12}
    assert "first_band_student" not in json.loads((bench.RESULTS / "rte-zerogen-s0-n1000.json").read_text())

    # The majority of the same seeded 4 of the 10 examples the runs were scored on.
    sst2 = load_task("sst2")
    expected = majority_class(sst2, seeded_subset(load_eval_records(sst2, eval_file), 4))
    assert summary["majority"]["sst2"] == expected and expected["n"] == 4
    assert "GOLD_RAY_DATA" in summary["majority"]["rte"]["error"]

    vs_zerogen = summary["paired"]["gold-zerogen"]
    diffs = [0.02, 0.03, 0.04, 0.05]
    half = 3.182 * statistics.stdev(diffs) / 2
    assert vs_zerogen["n"] == 4 and sorted(vs_zerogen["pairs"]) == ["rte/s0", "sst2/s0", "sst2/s1", "sst2/s2"]
    assert vs_zerogen["mean"] == pytest.approx(0.035) and vs_zerogen["low"] == pytest.approx(0.035 - half)
    assert vs_zerogen["verdict"] == "ahead"
    band = summary["paired"]["gold-gold@randband"]
    assert band["n"] == 3 and band["mean"] == pytest.approx(0.005 * 2 / 3) and band["verdict"] == "within seed noise"
    assert band["across_machines"] == ["sst2/s0", "sst2/s1"] and vs_zerogen["across_machines"] == []
    assert band["shared_first_pass"] == ["sst2/s2"] and vs_zerogen["shared_first_pass"] == []

    md = (bench.RESULTS / "summary.md").read_text()
    assert f"| sst2 | {expected['label']} | 4 | {expected['accuracy']:.4f} |" in md
    assert "| gold | zerogen | 4 | +3.50 |" in md and "| ahead |" in md
    assert "| gold | gold@randband | 3 | +0.33 |" in md and "| within seed noise | 2 of 3 | 1 of 3 |" in md

    # Against the targets: SST-2's GOLD mean 0.82 over a majority of 0.75 or 0.5 (the seeded 4 of 10).
    goals = summary["targets"]
    sst2_goal = goals["tasks"]["sst2"]
    assert sst2_goal["over_majority"] == pytest.approx(0.82 - expected["accuracy"])
    assert sst2_goal["majority_met"] == (0.82 - expected["accuracy"] >= 0.10)
    assert sst2_goal["over_teacher"] is None and sst2_goal["teacher_met"] is None  # no teacher row written
    assert goals["tasks"]["rte"]["over_majority"] is None  # its majority could not be computed
    assert goals["gold_over_zerogen"]["met"] is True  # +3.5 points, interval above 0
    # Before the first band: SST-2's students 0.70 and 0.75 over a synthetic majority of 0.5; RTE's 0.55.
    assert summary["first_band"]["sst2"]["runs"] == 2
    assert sst2_goal["first_band_over_majority"] == pytest.approx(0.225) and sst2_goal["first_band_met"] is True
    assert goals["tasks"]["rte"]["first_band_over_majority"] == pytest.approx(0.05)
    assert goals["tasks"]["rte"]["first_band_met"] is False
    assert "| +22.5 (met) (2, 40) |" in md and "| +5.0 (10.0 short) (1, 12) |" in md
    assert goals["energy_over_random_band"]["met"] is False  # its interval contains 0
    assert "## Against the targets" in md and "| energy band over random band (interval above 0) | +0.33 |" in md


def test_a_result_records_its_command_without_the_machines_runs_folder(bench):
    assert bench.recorded_command(["--task", "sst2", "--runs-dir", "/home/me/runs", "--tag", "main"]) == \
        "python benchmarks/quality/run.py --task sst2 --runs-dir $RUNS --tag main"
    assert bench.recorded_command(["--runs-dir=/srv/x", "--set", "a=b c"]) == \
        "python benchmarks/quality/run.py --runs-dir=$RUNS --set 'a=b c'"
    assert bench.recorded_command(["--runs-dir", "runs/quality", "--tag", "a$RUNS"]) == \
        "python benchmarks/quality/run.py --runs-dir runs/quality --tag 'a$RUNS'"


def test_results_without_diversity_get_it_from_their_run_folder(bench, tmp_path):
    from gold_ray.run.store import make_record, write_part
    from gold_ray.run.tasks import load_task, shipped_tasks

    _result(bench, "sst2", "gold", 0, 1000, 0.80)
    _result(bench, "sst2", "gold", 1, 1000, 0.82)  # its run folder is gone: stays without
    run = tmp_path / "runs" / "sst2-gold-s0-n1000"
    (run / "data").mkdir(parents=True)
    (run / "task.yaml").write_text(shipped_tasks()["sst2"].read_text())
    task = load_task(run / "task.yaml")
    texts = ["a fine film", "a fine film", "a dull film"]
    train = [make_record(task, iteration=0, kind="train", index=i, requested_label="positive", raw_text=t,
                         reject_reason=None, fields={"text": t}) for i, t in enumerate(texts)]
    write_part(run / "data" / "train-it000.parquet", task, train)
    write_part(run / "data" / "rejects-train-it000.parquet", task,
               [make_record(task, iteration=0, kind="train", index=9, requested_label="negative",
                            raw_text="a rejected film", reject_reason="too_short")])
    (run / "state.json").write_text(json.dumps({"parts": ["data/train-it000.parquet", "data/rejects-train-it000.parquet"]}))

    summary_md = (bench.write_summary(str(tmp_path / "runs")), (bench.RESULTS / "summary.md").read_text())[1]
    row = json.loads((bench.RESULTS / "sst2-gold-s0-n1000.json").read_text())
    # Accepted records only (not the reject): two copies share all their word pairs, the third none.
    assert row["diversity"]["texts"] == 3 and row["diversity"]["nearest_overlap"] == pytest.approx(2 / 3)
    assert "diversity" not in json.loads((bench.RESULTS / "sst2-gold-s1-n1000.json").read_text())
    assert f"| {4 / 6:.3f} / {2 / 3:.3f} (1) |" in summary_md  # 4 distinct word pairs of 6
