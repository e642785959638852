"""``gold-ray compare`` in process: tiny random students, the deterministic fake teacher, a real
SQLite MLflow store and real Parquet parts.

The tests on a whole comparison share one (``done``, about a minute on 2 cores) and are slow-marked.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from gold_ray.cli import main
from gold_ray.config import ConfigError, load_config
from gold_ray.run.compare import (
    compare,
    distill_in_process,
    markdown_table,
    metric_stats,
    parse_seeds,
    parse_strategies,
)
from gold_ray.run.loop import RunDirError
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

STRATEGIES = ["gold", "zerogen"]
SEEDS = [0, 1]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    student = save_tiny_classifier(root / "student")
    eval_file = root / "eval.jsonl"
    rows = [{"text": f"a sample {i} that reads as {'positive' if i % 2 else 'negative'}",
             "label": "positive" if i % 2 else "negative"} for i in range(20)]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_config(None, [
        "task.name=sst2", f"task.eval_path={eval_file}", f"student.model={student}", "teacher.model=fake",
        "teacher.prompt_style=chat", "budget.samples=12", "strategy.iterations=2", "strategy.probe_fraction=0.5",
        "student.final_epochs=1", "student.batch_size=8", f"output.dir={root / 'unused'}",
    ])
    return {"root": root, "base": base, "out": root / "cmp"}


def fake_runner(calls=None, crash_in=None):
    """distill_in_process with the fake teacher; records run names; ``crash_in`` dies after that run's first stage."""

    def run(cfg, *, resume, on_event):
        name = f"{cfg.strategy.name}-s{cfg.seed}"
        if calls is not None:
            calls.append((name, resume))
        events = on_event
        if name == crash_in:
            def events(stage, info):
                on_event(stage, info)
                raise Crash(name)
        return distill_in_process(cfg, resume=resume, on_event=events, engine=FakeTeacherEngine(task=load_task("sst2")))

    return run


@pytest.fixture(scope="module")
def done(env):
    """A comparison interrupted inside its third run, then continued to the end."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = [], []
    with pytest.raises(Crash):
        compare(env["base"], STRATEGIES, SEEDS, env["out"], runner=fake_runner(first, crash_in="zerogen-s0"),
                teacher_engine=FakeTeacherEngine())
    table = compare(env["base"], STRATEGIES, SEEDS, env["out"], runner=fake_runner(second),
                    teacher_engine=FakeTeacherEngine())
    mp.undo()
    return {**env, "table": table, "first": first, "second": second}


@pytest.mark.slow
def test_table_has_every_strategy_and_seed_with_mean_and_std(done):
    table, out = done["table"], done["out"]
    assert sorted((r["strategy"], r["seed"]) for r in table["runs"]) == sorted(
        (s, seed) for s in STRATEGIES for seed in SEEDS)
    for strategy in STRATEGIES:
        accs = [json.loads((out / "runs" / f"{strategy}-s{seed}" / "metrics.json").read_text())["final"]["accuracy"]
                for seed in SEEDS]
        row = table["strategies"][strategy]
        assert row["seeds"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(accs))
        assert row["std"] == pytest.approx(float(np.std(accs, ddof=1)))
        assert row["per_seed"] == {str(s): a for s, a in zip(SEEDS, accs, strict=True)}
        distinct = [json.loads((out / "runs" / f"{strategy}-s{seed}" / "metrics.json").read_text())["final"]
                    ["diversity"]["distinct_2"] for seed in SEEDS]
        assert row["distinct_2_mean"] == pytest.approx(statistics.fmean(distinct))
    # Same budget for everyone: every run asked the teacher for exactly budget.samples samples.
    for row in table["runs"]:
        metrics = json.loads((out / "runs" / f"{row['strategy']}-s{row['seed']}" / "metrics.json").read_text())
        asked = sum(m["generate"]["requested"] + m.get("probe", {}).get("requested", 0) for m in metrics["iterations"])
        assert asked == 12 and len(row["per_iteration"]) == 2
    assert json.loads((out / "compare.json").read_text())["strategies"] == table["strategies"]
    md = (out / "compare.md").read_text()
    for strategy in STRATEGIES:
        s = table["strategies"][strategy]
        assert f"| {strategy} | 2 | {s['mean']:.4f} ± {s['std']:.4f} |" in md


@pytest.mark.slow
def test_gold_is_paired_with_zerogen_beside_both_reference_rows(done):
    table, out = done["table"], done["out"]
    assert table["reference"] == "zerogen" and list(table["paired"]) == ["gold"]
    gold, zerogen = table["strategies"]["gold"]["per_seed"], table["strategies"]["zerogen"]["per_seed"]
    pair = table["paired"]["gold"]
    assert pair["n"] == 2 and pair["mean"] == pytest.approx(statistics.fmean(gold[s] - zerogen[s] for s in gold))
    assert pair["verdict"] in ("ahead", "behind", "within seed noise")
    # Half the eval examples name each label: a majority class of 0.5 on the same 20 examples.
    assert table["majority"]["accuracy"] == 0.5 and table["majority"]["n"] == table["eval_n"] == 20
    md = (out / "compare.md").read_text()
    assert "| vs zerogen (paired) |" in md and "| majority class (negative, tied with positive) | – | 0.5000 |" in md
    # The teacher row was computed first; every run found it in the cache and reports it beside its student.
    for row in table["runs"]:
        final = json.loads((out / "runs" / f"{row['strategy']}-s{row['seed']}" / "metrics.json").read_text())["final"]
        assert final["baselines"]["teacher_fewshot"]["cached"] is True
        assert final["baselines"]["teacher_fewshot"]["accuracy"] == table["teacher_fewshot"]["accuracy"]


@pytest.mark.slow
def test_teacher_row_is_the_teacher_scored_on_the_eval_set(done):
    fewshot = done["table"]["teacher_fewshot"]
    # The fake teacher picks the label named in the question, which every eval text here names.
    assert fewshot["n"] == 20 and fewshot["accuracy"] == 1.0
    assert fewshot["prompt_style"] == "chat" and fewshot["demos"] == len(load_task("sst2").seed_demos)
    assert "| teacher few-shot (chat" in (done["out"] / "compare.md").read_text()


@pytest.mark.slow
def test_plot_and_scores_of_accepted_data(done):
    out, table = done["out"], done["table"]
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    from matplotlib.image import imread

    assert imread(out / "compare.png").shape[0] > 100
    for strategy in STRATEGIES:
        accepted = sum(r["accepted"] for r in table["runs"] if r["strategy"] == strategy)
        assert table["energy"][strategy]["n"] == accepted > 0
    assert table["notes"] == []


@pytest.mark.slow
def test_interrupted_comparison_resumes_and_skips_finished_runs(done):
    assert done["first"] == [("gold-s0", False), ("gold-s1", False), ("zerogen-s0", False)]
    assert done["second"] == [("zerogen-s0", True), ("zerogen-s1", False)]
    status = {f"{r['strategy']}-s{r['seed']}": r["status"] for r in done["table"]["runs"]}
    assert status == {"gold-s0": "skipped", "gold-s1": "skipped", "zerogen-s0": "resumed", "zerogen-s1": "new"}


@pytest.mark.slow
def test_mlflow_runs_nest_under_one_parent(done):
    from mlflow.tracking import MlflowClient

    uri = done["table"]["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{done['out'].resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    parent_id = done["table"]["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.info.run_name for r in children) == [f"{s}-sst2-seed{seed}" for s in STRATEGIES for seed in SEEDS]
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["gold_ray.run.compare"] == "true"
    # One parent only, also after the interrupted first attempt (the rerun reopened it).
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent_id]
    assert parent.data.metrics["gold.accuracy_mean"] == pytest.approx(done["table"]["strategies"]["gold"]["mean"])
    assert parent.data.params["compare.strategies"] == "gold,zerogen"
    assert {"compare.json", "compare.md", "compare.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    resumed = next(r for r in children if r.info.run_name == "zerogen-sst2-seed0")
    assert "final.accuracy" in resumed.data.metrics


@pytest.mark.slow
def test_cli_rerun_skips_everything(done, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_file = done["root"] / "base.yaml"
    cfg_file.write_text(done["base"].to_yaml())
    before = (done["out"] / "runs" / "gold-s0" / "state.json").read_bytes()
    rc = main(["compare", str(cfg_file), "--strategies", "gold,zerogen", "--seeds", "2", "--local",
               "--output", str(done["out"])])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(": skipped,") == 4 and "| gold | 2 |" in out and "MLflow parent run:" in out
    assert (done["out"] / "runs" / "gold-s0" / "state.json").read_bytes() == before


@pytest.mark.slow
def test_changed_settings_are_refused_before_any_run(done):
    table_before = (done["out"] / "compare.json").read_bytes()
    other = done["base"].model_copy(update={"budget": done["base"].budget.model_copy(update={"samples": 16})})
    with pytest.raises(RunDirError, match=r"budget\.samples: 12 -> 16"):
        compare(other, STRATEGIES, SEEDS, done["out"], runner=fake_runner(), with_teacher=False)
    assert (done["out"] / "compare.json").read_bytes() == table_before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=done["table"]["mlflow"]["tracking_uri"])
    assert client.get_run(done["table"]["mlflow"]["parent_run_id"]).info.status == "FINISHED"


def test_a_single_run_folder_is_not_a_comparison_folder(tmp_path, env):
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(RunDirError, match="single run"):
        compare(env["base"], STRATEGIES, SEEDS, tmp_path, runner=fake_runner())


def test_unknown_strategy_lists_the_registered_ones(capsys):
    from gold_ray.strategies import STRATEGIES as registered

    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'; available: " + ", ".join(registered)):
        parse_strategies("gold,nope")
    assert main(["compare", "tiny", "--strategies", "gold,nope", "--local"]) == 2
    assert "available: gold, zerogen" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="more than once"):
        parse_strategies("gold,gold")


def test_seeds_are_a_count_or_a_list():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds(2) == [0, 1]
    assert parse_seeds("0,1") == [0, 1]
    assert parse_seeds("5,") == [5]
    for bad in ("0", "a", "1,1", "-1,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_metric_stats_mean_and_sample_std():
    s = metric_stats([0.5, 0.7, 0.9, None])
    assert s["seeds"] == 3 and s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert (s["min"], s["max"]) == (0.5, 0.9)
    assert metric_stats([0.6])["std"] == 0.0
    assert metric_stats([None])["mean"] is None


def test_markdown_table_format():
    assert markdown_table(["a", "b"], [["x", 0.12345], [None, 3]]) == (
        "| a | b |\n| --- | --- |\n| x | 0.1235 |\n| – | 3 |\n")


def test_plot_helpers_draw_one_axes_each(tmp_path):
    from gold_ray.reporting.plots import new_figure, plot_metric_curves, plot_score_distributions, save_figure

    fig, (a, b) = new_figure(2)
    plot_metric_curves(a, {"gold": [[0.5, 0.6], [0.7, None]], "none": []}, reference=0.55)
    plot_score_distributions(b, {"gold": [1.0, 2.0, np.nan], "empty": []})
    assert [line.get_label() for line in a.get_lines()][0] == "gold (2 runs)"
    # Mean over the runs that have a value at each iteration.
    assert list(a.get_lines()[0].get_ydata()) == pytest.approx([0.6, 0.6])
    assert [t.get_text() for t in b.get_legend().get_texts()] == ["gold (n=2, median 1.50)"]
    save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")

