"""The student beside its references: the paired statistics, the compare table's rows, the cached
teacher row, and a finished run's last lines, report and metrics naming the three figures."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from gold_ray.config import ConfigError, load_config
from gold_ray.entry import summary_text
from gold_ray.run import baselines
from gold_ray.run.compare import (
    choose_reference,
    paired_difference,
    paired_to_reference,
    render_markdown,
    t_quantile_975,
)
from gold_ray.run.loop import Distiller
from gold_ray.run.store import read_parts
from gold_ray.run.tasks import load_task
from gold_ray.student.evaluation import engine_answers
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier, tiny_run_config

SST2 = load_task("sst2")


# ---- the paired statistics -------------------------------------------------------------------


def test_t_quantiles_match_the_table_and_the_expansion():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    # Beyond the table: t(0.975, 40) = 2.0211, t(0.975, 120) = 1.9799.
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_a_consistent_lead_is_ahead_even_where_the_seeds_move_both():
    # Seeds move both strategies by 10 points; the gap within each seed is 2 to 4 points.
    ref = {"0": 0.60, "1": 0.70, "2": 0.80}
    gold = {"0": 0.62, "1": 0.73, "2": 0.84}
    d = paired_difference(gold, ref)
    diffs = [0.02, 0.03, 0.04]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert d["n"] == 3 and d["pairs"] == ["0", "1", "2"]
    assert d["mean"] == pytest.approx(0.03) and d["low"] == pytest.approx(0.03 - half)
    assert d["high"] == pytest.approx(0.03 + half) and d["verdict"] == "ahead"
    assert paired_difference(ref, gold)["verdict"] == "behind"


def test_a_difference_that_changes_sign_is_seed_noise_and_one_seed_has_no_interval():
    d = paired_difference({"0": 0.70, "1": 0.66, "2": 0.71}, {"0": 0.68, "1": 0.69, "2": 0.70})
    assert d["low"] < 0 < d["high"] and d["verdict"] == "within seed noise"
    one = paired_difference({"0": 0.8, "1": 0.9}, {"0": 0.7, "5": 0.1})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1)
    assert one["low"] is None and one["verdict"] == "one pair: no interval"
    # A seed without a value on either side is not a pair.
    none = paired_difference({"0": None, "1": float("nan")}, {"0": 0.5, "1": 0.5})
    assert none["n"] == 0 and none["verdict"] == "no pairs"


def test_reference_defaults_to_zerogen_and_must_be_compared():
    assert choose_reference(["gold", "zerogen"]) == "zerogen"
    assert choose_reference(["gold", "progen"]) == "gold"
    assert choose_reference(["gold", "zerogen"], "gold") == "gold"
    with pytest.raises(ConfigError, match="--reference: 's3' is not among"):
        choose_reference(["gold", "zerogen"], "s3")


def test_compare_table_rows_show_spread_pairs_tokens_and_both_references():
    strategies = {
        "gold": {"mean": 0.75, "std": 0.01, "seeds": 3, "per_seed": {"0": 0.74, "1": 0.75, "2": 0.76},
                 "teacher_tokens_mean": 40600.0, "teacher_prompt_tokens_mean": 512000.0, "final_records_mean": 900.0,
                 "distinct_2_mean": 0.55, "nearest_overlap_mean": 0.081},
        "zerogen": {"mean": 0.72, "std": 0.01, "seeds": 3, "per_seed": {"0": 0.71, "1": 0.72, "2": 0.73},
                    "teacher_tokens_mean": 30300.0, "teacher_prompt_tokens_mean": None, "final_records_mean": 950.0},
    }
    table = {"task": "sst2", "metric": "accuracy", "teacher": "t", "student": "s",
             "budget": {"samples": 1000, "max_teacher_tokens": None, "teacher_tokens": None, "iterations": 4},
             "seeds": [0, 1, 2], "eval_n": 872, "strategies": strategies, "reference": "zerogen",
             "paired": paired_to_reference(strategies, "zerogen"),
             "majority": {"label": "positive", "accuracy": 0.5092, "n": 872},
             "teacher_fewshot": {"accuracy": 0.693, "n": 872, "prompt_style": "chat", "demos": 8}, "notes": []}
    md = render_markdown(table)
    assert "| gold | 3 | 0.7500 ± 0.0100 | 0.7400, 0.7500, 0.7600 | +3.0 points [+3.0, +3.0], 3 pairs: ahead " \
           "| 40600 | 512000 | 900 | 0.550 / 0.081 |" in md
    # A strategy whose runs predate the diversity measure shows none.
    assert "| zerogen | 3 | 0.7200 ± 0.0100 |" in md and "| reference | 30300 | – | 950 | – |" in md
    assert "| majority class (positive) | – | 0.5092 |" in md
    assert "| teacher few-shot (chat, 8 demos) | – | 0.6930 |" in md
    assert "`gold` is ahead of `zerogen`" in md
    assert "budget.teacher_tokens" in md  # 30.3 k against 40.6 k output tokens: the way to hold them equal
    assert "FAILED" not in md
    table["majority"]["accuracy"] = 0.73  # above zerogen's mean, below gold's
    md = render_markdown(table)
    assert "- FAILED: `zerogen`'s mean 0.7200 is not above the majority class (positive) (0.7300)" in md
    assert "FAILED: `gold`" not in md
    table["majority"]["accuracy"] = 0.5092

    strategies["gold"]["per_seed"] = {"0": 0.74}
    strategies["gold"].update(seeds=1, std=0.0, mean=0.74)
    table["paired"] = paired_to_reference(strategies, "zerogen")
    md = render_markdown(table)
    assert "| 0.7400 (one seed) |" in md
    line = next(x for x in md.splitlines() if x.startswith("- `gold` against `zerogen`"))
    assert line.endswith("from one seed, which gives no interval, so no verdict: run more seeds (--seeds 3).")
    assert line.count("pair") == 0, line  # said once, not "1 pair: one pair: no interval; one seed ..."


def test_majority_class_is_the_most_frequent_label():
    records = [{"text": "x", "label": "negative"}] * 3 + [{"text": "y", "label": "positive"}] * 5
    assert baselines.majority_class(SST2, records) == {"label": "positive", "accuracy": 5 / 8, "n": 8}
    assert baselines.majority_class(SST2, []) is None
    # A tie goes to the label first in the task's order, and the row says it is one.
    tie = baselines.majority_class(SST2, records[:6])  # 3 and 3
    assert tie == {"label": SST2.label_names[0], "accuracy": 0.5, "n": 6, "tied": [SST2.label_names[1]]}
    assert baselines.majority_name(tie) == f"majority class ({SST2.label_names[0]}, tied with {SST2.label_names[1]})"
    final = {"accuracy": 0.4, "baselines": {"majority": tie}}
    assert f"the {baselines.majority_name(tie)} (0.5000)" in baselines.reference_verdict(final)
    assert baselines.majority_class(load_task("svamp"), [{"question": "q", "answer": "1"}]) is None


# ---- the cached teacher row ------------------------------------------------------------------


class CountingEngine(FakeTeacherEngine):
    """The fake teacher, counting the prompts it scores."""

    def __init__(self):
        super().__init__()
        self.scored = 0

    def option_logprobs(self, prompts, options):
        self.scored += len(prompts)
        return super().option_logprobs(prompts, options)


def _records(n=12):
    return [{"text": f"sample {i} reads as {'positive' if i % 3 else 'negative'}",
             "label": "positive" if i % 3 else "negative"} for i in range(n)]


def test_the_teacher_row_is_computed_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv(baselines.BASELINE_CACHE_ENV, str(tmp_path / "cache"))
    cfg = load_config(None, ["teacher.model=fake"])
    engine = CountingEngine()
    first = baselines.teacher_fewshot(cfg, SST2, _records(), "chat", engine_answers(engine))
    assert engine.scored == 12 and first["cached"] is False
    assert first["accuracy"] == 1.0 and first["n"] == 12 and first["prompt_style"] == "chat"
    assert len(list((tmp_path / "cache").glob("teacher-fewshot-*.json"))) == 1

    again = baselines.teacher_fewshot(cfg, SST2, _records(), "chat", engine_answers(engine))
    assert engine.scored == 12, "a cached row must not call the engine"
    assert again["cached"] is True and again["accuracy"] == first["accuracy"] and again["key"] == first["key"]

    # Other examples, another prompt style or another teacher are other rows.
    baselines.teacher_fewshot(cfg, SST2, _records(8), "chat", engine_answers(engine))
    baselines.teacher_fewshot(cfg, SST2, _records(), "continuation", engine_answers(engine))
    other = load_config(None, ["teacher.model=another"])
    baselines.teacher_fewshot(other, SST2, _records(), "chat", engine_answers(engine))
    assert engine.scored == 12 + 8 + 12 + 12
    assert len(list((tmp_path / "cache").glob("teacher-fewshot-*.json"))) == 4


def test_the_limit_draws_a_seeded_subset():
    records = _records(30)
    picked = baselines.fewshot_records(records, 10)
    assert len(picked) == 10 and picked == baselines.fewshot_records(records, 10)
    assert baselines.fewshot_records(records, None) == records


def _final(accuracy, teacher=0.6, majority=0.5, n=1000, val_accuracy=None, val_majority=None):
    final = {"accuracy": accuracy, "recipe": "ce", "val_majority": val_majority,
             "recipes": [{"recipe": "ce", "val_accuracy": val_accuracy}],
             "baselines": {"on": "eval set", "n": n, "majority": {"label": "no", "accuracy": majority, "n": n},
                           "teacher_fewshot": {"accuracy": teacher, "n": n}}}
    return final


def test_the_verdict_says_a_sure_lead_a_lead_within_noise_and_a_failure():
    assert baselines.reference_verdict({"accuracy": 0.8}) is None, "no references, no verdict"
    sure = baselines.reference_verdict(_final(0.70))
    assert sure.startswith("The final student's accuracy 0.7000 is above") and "+10.0 points over the teacher" in sure
    assert "standard error" not in sure
    # 0.62 on 1,000 examples: a standard error of 1.5 points, so 2 points over the teacher is not sure.
    close = baselines.reference_verdict(_final(0.62))
    assert "+2.0 points over the teacher" in close and "within two standard errors (1.5 points each)" in close
    # The majority class is the higher reference on a skewed set: the margin is taken over it.
    assert "over the majority class (no)" in baselines.reference_verdict(_final(0.80, teacher=0.4, majority=0.7))


def test_a_failed_student_is_told_whether_it_fit_the_teachers_samples():
    fitted = baselines.reference_verdict(_final(0.49, teacher=0.47, majority=0.53, val_accuracy=0.79, val_majority=0.5))
    assert fitted.startswith("FAILED:") and "the majority class (no) (0.5300)" in fitted
    assert "the teacher as a few-shot classifier" not in fitted, "the teacher row was beaten: not named"
    assert "fits the teacher's samples (0.7900" in fitted and "teacher.model" in fitted
    unfit = baselines.reference_verdict(_final(0.45, val_accuracy=0.52, val_majority=0.5))
    assert "not above the teacher as a few-shot classifier (0.6000) and the majority class" in unfit
    assert "did not learn even the teacher's samples" in unfit and "budget.samples" in unfit


# ---- a finished run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tracked in-process GOLD run on the tiny student and the fake teacher, with a real eval file."""
    root = tmp_path_factory.mktemp("refs")
    mp = pytest.MonkeyPatch()
    mp.setenv(baselines.BASELINE_CACHE_ENV, str(root / "cache"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    eval_file = root / "eval.jsonl"
    # 14 negative, 6 positive: a majority class of 0.7, each text naming its label for the fake teacher.
    rows = [{"text": f"a sample {i} that reads as {lab}", "label": lab}
            for i, lab in enumerate(["negative"] * 14 + ["positive"] * 6)]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = save_tiny_classifier(root / "student")
    cfg = tiny_run_config(root / "run", student, f"task.eval_path={eval_file}", "budget.samples=12",
                          "strategy.probe_fraction=0.5", "tracking.enabled=true",
                          "baselines.teacher_fewshot_limit=15")
    engine = CountingEngine()
    metrics = Distiller(cfg, engine=engine).run()
    yield {"root": root, "cfg": cfg, "metrics": metrics, "engine": engine, "student": student,
           "eval_file": eval_file}
    mp.undo()


def test_last_lines_put_the_student_beside_teacher_and_majority(tiny_run):
    metrics = tiny_run["metrics"]
    text = summary_text(metrics, tiny_run["root"] / "run", tracking=True)
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if "on the evaluation set, 20 examples" in line)
    student, teacher, majority = lines[head + 1:head + 4]
    assert student.split()[:2] == ["final", "student"] and f"{metrics['final']['accuracy']:.4f}" in student
    # The fake teacher picks the label its prompt names: right on all 15 examples it was asked.
    assert "teacher as few-shot classifier" in teacher and "1.0000" in teacher and "(15 examples, chat" in teacher
    assert "majority class (negative)" in majority and "0.7000" in majority
    # A teacher right on every example cannot be beaten: the last line says the student failed.
    assert lines[head + 4].strip().startswith("FAILED:") and "the teacher as a few-shot classifier (1.0000)" in lines[head + 4]


def test_metrics_report_and_mlflow_record_the_references(tiny_run):
    final = tiny_run["metrics"]["final"]
    refs = final["baselines"]
    assert refs["on"] == "eval set" and refs["n"] == 20
    assert refs["majority"] == {"label": "negative", "accuracy": 0.7, "n": 20}
    teacher = refs["teacher_fewshot"]
    assert teacher["accuracy"] == 1.0 and teacher["n"] == 15 and teacher["cached"] is False
    # The row went through the runtime's teacher: the run's engine scored 15 prompts for it.
    assert tiny_run["engine"].scored >= 15
    saved = json.loads((tiny_run["root"] / "run" / "metrics.json").read_text())
    assert saved["final"]["baselines"]["majority"]["accuracy"] == 0.7

    report = (tiny_run["root"] / "run" / "report.html").read_text()
    assert "Student beside its teacher" in report and "majority class (negative)" in report
    assert "teacher as few-shot classifier" in report and "the real evaluation set" in report
    assert "<strong>FAILED: the final student" in report

    from mlflow.tracking import MlflowClient

    mlflow = tiny_run["metrics"]["mlflow"]
    logged = MlflowClient(tracking_uri=mlflow["tracking_uri"]).get_run(mlflow["run_id"]).data.metrics
    assert logged["final.baseline_majority"] == pytest.approx(0.7)
    assert logged["final.baseline_teacher_fewshot"] == pytest.approx(1.0)


def test_token_budget_stops_generating_and_the_hold_out_is_marked(tiny_run, tmp_path, monkeypatch, hf_offline):
    """``budget.teacher_tokens`` holds output tokens, not samples; without a real eval set (no data
    folder, ``datasets`` offline: SST-2 is not fetched) the references are computed on the synthetic
    hold-out and said to be."""
    monkeypatch.setenv(baselines.BASELINE_CACHE_ENV, str(tmp_path / "cache"))
    # The fake teacher writes about 11 tokens a sample: 200 tokens buy about 18 of the 80 samples.
    cfg = tiny_run_config(tmp_path / "run", tiny_run["student"], "budget.samples=80", "budget.teacher_tokens=200",
                          "teacher.batch_size=4", "strategy.probe_fraction=0.5", "student.val_share=0.3")
    metrics = Distiller(cfg, engine=FakeTeacherEngine()).run()
    spent = metrics["teacher_tokens"]
    sent = sum(m["generate"]["requested"] + m["probe"]["requested"] for m in metrics["iterations"])
    # At most one chunk of 4 samples over the budget, and far from the 80 samples' worth.
    assert 200 <= spent <= 200 + 4 * 15 and sent < 40
    assert metrics["iterations"][0]["generate"]["unsent"] > 0
    # The training prompts stop at their share: every iteration still writes probes for its band.
    assert all(m["probe"]["requested"] > 0 and m["feedback"]["size"] > 0 for m in metrics["iterations"])
    ids = [r["id"] for r in read_parts(sorted((tmp_path / "run" / "data").glob("*.parquet")))]
    assert len(ids) == len(set(ids)), "chunks must not reuse record ids"

    refs = metrics["final"]["baselines"]
    assert refs["on"] == "synthetic hold-out" and refs["n"] > 0
    text = summary_text(metrics, tmp_path / "run")
    assert "on a synthetic hold-out (no real evaluation set" in text and "majority class" in text
