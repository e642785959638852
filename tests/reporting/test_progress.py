"""Progress views: ETAs from stage durations, the live rich view, plain lines, JSON lines, and the CLI flags."""

import io
import json
import math
import sys
from pathlib import Path

import pytest

from gold_ray.reporting.progress import (
    ITERATION_STAGES,
    PLAIN_PROGRESS_EVERY_S,
    JsonReporter,
    LiveReporter,
    PlainReporter,
    ProgressTracker,
    format_line,
    format_seconds,
    progress,
    resolve_mode,
    scoring_rate,
)
from gold_ray.run.loop import STAGES
from gold_ray.run.runtime import StageProgress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


GEN = {"requested": 10, "accepted": 8, "rejected": 2, "rejected_by_reason": {"duplicate": 1, "too_short": 1},
       "tokens_per_s": 55.2, "seconds": 9.0}
TRAIN = {"records": 8, "loss": 0.69, "accuracy": 0.55, "seconds": 3.0}
PROBE = {"requested": 4, "accepted": 4, "rejected": 0, "rejected_by_reason": {}, "scores": {"p50": 1.0},
         "score_seconds": 0.5, "tokens_per_s": 40.0, "seconds": 3.0, "holdout_accuracy": 0.5}
FEEDBACK = {"size": 2}


def feed(reporter, clock, iteration, iterations=2, step=10.0):
    for stage, info in zip(ITERATION_STAGES, (GEN, TRAIN, PROBE, FEEDBACK), strict=True):
        clock.now += step
        reporter(stage, {"iteration": iteration, "iterations": iterations, **info})


def test_stage_names_match_the_loop():
    assert ITERATION_STAGES == STAGES


def test_eta_projects_stage_times_and_growing_training():
    clock = Clock()
    t = ProgressTracker(iterations=3, final_ratio=3.0, clock=clock)
    assert t.eta_run() is None  # nothing measured yet
    clock.now += 10
    t.update("generate", {"iteration": 0, "iterations": 3, **GEN})
    # The first event's time includes start-up; its own "seconds" (9) is used instead.
    assert t.durations["generate"][0] == 9.0
    assert t.eta_iteration() is None  # train, probe and feedback not measured yet
    for stage, info in (("train", TRAIN), ("probe", PROBE), ("feedback", FEEDBACK)):
        clock.now += 10
        t.update(stage, {"iteration": 0, "iterations": 3, **info})
    assert t.current == (1, "generate")
    # Next iteration: generate 9 + train 10 * 2 (trains on twice the data) + probe 10 + feedback 10.
    assert t.eta_iteration() == pytest.approx(49.0)
    # Run: that, iteration 3 (9 + 30 + 10 + 10), and the final stage: 10 per unit * 3 iterations * ratio 3.
    assert t.eta_run() == pytest.approx(49.0 + 59.0 + 90.0)
    clock.now += 4  # the running stage's elapsed time counts against its estimate
    assert t.eta_iteration() == pytest.approx(45.0)
    assert t.finished_stages == 4 and t.total_stages == 13


def test_tracker_after_the_last_iteration_and_final():
    clock = Clock()
    t = ProgressTracker(iterations=1, clock=clock)
    for stage, info in zip(ITERATION_STAGES, (GEN, TRAIN, PROBE, FEEDBACK), strict=True):
        clock.now += 5
        t.update(stage, {"iteration": 0, "iterations": 1, **info})
    assert t.current == (1, "final")
    assert t.eta_iteration() == t.eta_run() == pytest.approx(5.0)  # final: 5 per unit * 1 * ratio 1
    clock.now += 7
    t.update("final", {"iteration": 1, "iterations": 1, "records": 8, "train_loss": 0.6})
    assert t.done and t.eta_run() == 0.0 and t.finished_stages == t.total_stages == 5


def test_scoring_rate_in_process_and_on_ray():
    assert scoring_rate(PROBE) == pytest.approx(4 / 0.5)  # in process: scored after generation
    assert scoring_rate({"scored": 30, "seconds": 10.0}) == pytest.approx(3.0)  # Ray: streamed with generation
    assert scoring_rate({"accepted": 3, "seconds": 1.0}) is None  # nothing scored


def test_format_seconds():
    assert format_seconds(None) == "?" and format_seconds(math.nan) == "?"
    assert format_seconds(65) == "1:05" and format_seconds(3725) == "1:02:05"


def test_plain_view_one_line_per_stage_with_reasons_and_eta():
    clock, buf = Clock(), io.StringIO()
    reporter = PlainReporter(buf, ProgressTracker(iterations=2, clock=clock))
    feed(reporter, clock, 0)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4
    assert "iteration 1/2 generate" in lines[0] and "reasons={'duplicate': 1, 'too_short': 1}" in lines[0]
    assert "loss=0.69" in lines[1] and "accuracy=0.55" in lines[1]
    assert "holdout_accuracy=0.5" in lines[2] and "scored_per_s=8.0" in lines[2]
    assert "eta_run=" in lines[3] and "eta_run=?" not in lines[3]
    # The feedback line ends iteration 1: no ETA of iteration 2 on it.
    assert "eta_iteration=" in lines[0] and "eta_iteration=" not in lines[3]
    assert "run gold-s1" in format_line("train", {"run": "run gold-s1", "iteration": 0, "iterations": 2})
    # ln K beside a CE loss, not beside an SCE one (a different scale).
    assert "chance_loss=1.0986" in format_line("final", {"loss": "ce", "train_loss": 0.9, "chance_loss": 1.0986})
    assert "chance_loss" not in format_line("final", {"loss": "sce", "train_loss": 3.76, "chance_loss": 1.0986})


def test_json_view_is_json_only_and_moves_other_stdout_to_stderr(capsys):
    clock = Clock()
    real_stdout = sys.stdout
    with progress("json", stream=real_stdout) as reporter:
        assert isinstance(reporter, JsonReporter)
        reporter.tracker.clock = clock
        reporter.message("start", "starting", run_dir="runs/x")
        print("a library print")
        feed(reporter, clock, 0)
        reporter("train", {"iteration": 1, "iterations": 2, "loss": float("nan")})
        reporter.message("done", "finished", final={"accuracy": 0.7})
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["event"] for r in rows] == ["start", *ITERATION_STAGES, "train", "done"]
    assert rows[1]["rejected_by_reason"] == {"duplicate": 1, "too_short": 1} and rows[1]["iteration"] == 0
    assert rows[5]["loss"] is None  # NaN is not JSON
    assert rows[4]["eta_run_s"] is not None and "time" in rows[4]
    # The feedback record ends iteration 1, as its plain line does: no ETA of iteration 2.
    assert "eta_iteration_s" in rows[1] and "eta_iteration_s" not in rows[4]
    assert rows[-1]["final"] == {"accuracy": 0.7}
    assert "a library print" in err and "a library print" not in out


def test_modes_resolve_by_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_mode("auto", Tty()) == "live"
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("quiet") == "quiet"
    with pytest.raises(ValueError, match="progress mode 'loud'"):
        resolve_mode("loud")


def test_quiet_view_prints_only_the_result():
    buf = io.StringIO()
    with progress("quiet", stream=buf) as reporter:
        reporter.message("start", "starting")
        reporter("generate", {"iteration": 0, "iterations": 1, **GEN})
        reporter.message("done", "run directory: x")
    assert buf.getvalue() == "run directory: x\n"


def test_live_view_shows_rows_running_stage_and_etas():
    from rich.console import Console

    clock, buf = Clock(), io.StringIO()
    reporter = LiveReporter(buf, ProgressTracker(iterations=2, clock=clock), title="sst2 · gold")
    reporter.console = Console(file=buf, width=80, force_terminal=False, color_system=None)
    feed(reporter, clock, 0)
    clock.now += 3
    reporter("generate", {"iteration": 1, "iterations": 2, **GEN})
    reporter.console.print(reporter.render())
    text = buf.getvalue()
    assert "sst2 · gold" in text and "…" not in text, "the view must fit 80 columns"
    row1 = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    assert row1.split() == ["1", "8/10", "4/4", "2", "55.2", "8.0", "0.690", "0.550", "2", "0:39"]
    assert "rejected by reason: duplicate 2, too_short 2" in text  # both iterations so far
    assert "iteration 2/2 · train 0:00 · ETA iteration 0:40, run 1:00 · elapsed 0:43" in text
    clock.now += 5
    reporter("train", {"iteration": 1, "iterations": 2, "records": 16, "loss": 0.5})
    reporter("probe", {"iteration": 1, "iterations": 2, **PROBE})
    reporter.console.print(reporter.render())
    text = buf.getvalue()
    assert "iteration 2/2 · feedback" in text
    row2 = next(line for line in text.splitlines()[::-1] if line.strip().startswith("2 "))
    assert "0.500*" in row2 and "accuracy on a synthetic hold-out" in text


def test_both_views_say_whether_a_band_near_chance_was_picked_at_random_or_held():
    from rich.console import Console

    picked = format_line("feedback", {"iteration": 0, "iterations": 2, "size": 2, "near_chance": True})
    held = format_line("feedback", {"iteration": 0, "iterations": 2, "size": 0, "band_held": True})
    assert "random pick" in picked and "no band added" not in picked
    assert "no band added" in held and "random pick" not in held
    clock, buf = Clock(), io.StringIO()
    reporter = LiveReporter(buf, ProgressTracker(iterations=2, clock=clock))
    reporter.console = Console(file=buf, width=120, force_terminal=False, color_system=None)
    for it, feedback in ((0, {"size": 2}), (1, {"size": 2, "band_held": True})):
        for stage, info in zip(ITERATION_STAGES, (GEN, {**TRAIN, "near_chance": True}, PROBE, feedback), strict=True):
            reporter(stage, {"iteration": it, "iterations": 2, **info})
    reporter.console.print(reporter.render())
    text = buf.getvalue()
    assert "near chance after iteration(s) [1]: its feedback band is a random pick" in text
    assert "near chance after iteration(s) [2]: no band was added" in text


def test_live_view_opens_and_closes_on_a_terminal_stream():
    buf = io.StringIO()
    with progress("live", stream=buf, iterations=1) as reporter:
        reporter("generate", {"iteration": 0, "iterations": 1, **GEN})
        reporter.message("start", "a message above the view")
        reporter.message("done", "the result, below the view")
    out = buf.getvalue()
    assert "a message above the view" in out and "8/10" in out
    assert out.rstrip().endswith("the result, below the view")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from gold_ray.testing import save_tiny_chat_lm, save_tiny_classifier

    return (save_tiny_chat_lm(tmp_path_factory.mktemp("teacher")),
            save_tiny_classifier(tmp_path_factory.mktemp("student")))


def test_cli_distill_json_logs_and_quiet(tmp_path, tiny_models, monkeypatch, capsys):
    """``gold-ray distill --local --json-logs`` / ``--quiet``; the teacher's answers come from the fake engine."""
    import gold_ray.teacher.engines
    from gold_ray.cli import main
    from gold_ray.testing import FakeTeacherEngine

    monkeypatch.setattr(gold_ray.teacher.engines, "build_engine", lambda *a, **k: FakeTeacherEngine())
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"sample {i}", "label": ["negative", "positive"][i % 2]}) + "\n"
                                 for i in range(6)))
    teacher, student = tiny_models
    args = ["distill", "tiny", "--local", "--set", f"teacher.model={teacher}", "--set", f"student.model={student}",
            "--set", "budget.samples=12", "--set", f"task.eval_path={eval_file}", "--set", "tracking.enabled=false",
            "--set", "student.final_epochs=1"]
    assert main([*args, "--output", str(tmp_path / "a"), "--json-logs"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    events = [r["event"] for r in rows]
    assert [e for e in events if e != "progress"] == ["start", "plan", *ITERATION_STAGES, *ITERATION_STAGES, "final",
                                                       "done"]
    counts = [r for r in rows if r["event"] == "progress"]
    assert {(r["stage"], r["unit"]) for r in counts} >= {("generate", "samples"), ("train", "steps"),
                                                         ("final", "steps")}
    assert all({"done", "total", "eta_stage_s", "eta_run_s"} <= r.keys() for r in counts)
    rows = [r for r in rows if r["event"] not in ("progress", "plan")]
    assert rows[-1]["report"] == str(tmp_path / "a" / "report.html")
    assert rows[-2]["train_loss"] is not None and "accuracy" in rows[-2]

    assert main([*args, "--output", str(tmp_path / "b"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gold-ray: done. run directory: {tmp_path / 'b'}") and "iteration" not in out
    assert (tmp_path / "b" / "report.html").is_file()

    with pytest.raises(SystemExit):
        main([*args, "--quiet", "--json-logs"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_stage_progress_sends_the_first_count_at_once_then_one_a_second():
    clock, sent = Clock(), []
    counter = StageProgress(sent.append, clock=clock)
    counter("samples", 0, 40, rejected=0)
    for done in range(1, 41):
        clock.now += 0.25
        counter("samples", done, 40, rejected=done // 10)
    # 10 seconds of counting: the first at once, then one a second.
    assert [s["done"] for s in sent] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert sent[0]["rate_per_s"] is None and sent[0]["remaining_s"] is None
    assert sent[5] == {"unit": "samples", "done": 20, "total": 40, "rejected": 2, "rate_per_s": 4.0,
                       "remaining_s": 5.0}
    clock.now += 0.5
    counter("steps", 0, 60, phase="ce")  # a new count in the same stage: its own rate, still bounded
    clock.now += 0.5
    counter("steps", 10, 60, phase="ce")
    assert sent[-1]["unit"] == "steps" and sent[-1]["rate_per_s"] == 20.0 and sent[-1]["remaining_s"] == 2.5


def test_eta_from_measured_rates_during_the_first_stages():
    clock = Clock()
    tracker = ProgressTracker(iterations=2, clock=clock)
    assert tracker.eta_run() is None and tracker.eta_stage() is None
    tracker.set_plan({"iterations": 2, "samples": [[6, 4], [6, 4]]})
    clock.now += 3.0
    tracker.progress({"stage": "generate", "iteration": 0, "iterations": 2, "unit": "samples", "done": 3, "total": 6,
                      "rate_per_s": 1.0, "remaining_s": 3.0})
    # The stage's own ETA at once; the run's waits for a training rate.
    assert tracker.eta_stage() == 3.0 and tracker.eta_run() is None
    clock.now += 3.0
    tracker.update("generate", {"iteration": 0, "iterations": 2, "seconds": 6.0})
    clock.now += 1.0
    tracker.progress({"stage": "train", "iteration": 0, "iterations": 2, "unit": "steps", "done": 10, "total": 60,
                      "rate_per_s": 10.0, "remaining_s": 5.0})
    # Inside the first training: its rest (5 s), the probes at the teacher's rate (4 x 1 s), the
    # feedback (quick), the second iteration (6 + 12 + 4 s: its training trains on twice the data) and
    # the final stage (the training per iteration unit, 6 s, x 2 iterations x the final ratio 1).
    assert tracker.eta_iteration() == pytest.approx(5 + 4)
    assert tracker.eta_run() == pytest.approx(5 + 4 + 6 + 12 + 4 + 12)
    # Once the stage ends its measured time takes over from the projection.
    clock.now += 5.0
    tracker.update("train", {"iteration": 0, "iterations": 2})
    assert tracker.live is None and tracker.eta_stage() is None


def test_plain_view_prints_a_progress_line_within_a_long_stage_only(capsys):
    clock = Clock()
    reporter = PlainReporter(sys.stdout, ProgressTracker(iterations=1, clock=clock))
    info = {"stage": "generate", "iteration": 0, "iterations": 1, "unit": "samples", "done": 5, "total": 50,
            "rejected": 1, "rate_per_s": 0.5, "remaining_s": 90.0}
    reporter("progress", info)
    clock.now += PLAIN_PROGRESS_EVERY_S
    reporter("progress", {**info, "done": 20})
    reporter("progress", {**info, "done": 21})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "iteration 1/1 generate ... 20/50 samples, 1 rejected" in lines[0]
    assert "eta_stage=1:30" in lines[0]


def test_a_log_event_is_shown_as_a_warning_line(capsys):
    reporter = PlainReporter(sys.stdout, ProgressTracker(iterations=1))
    reporter("log", {"level": "WARNING", "logger": "gold_ray.run.loop", "message": "iteration 0: near chance"})
    assert capsys.readouterr().out == "gold-ray: warning: iteration 0: near chance\n"


def _base_model_without_head(folder, tmp_path):
    """A tiny encoder saved without a classification head: loading it as a classifier makes
    transformers print its LOAD REPORT (classifier MISSING), as the real embedded student does."""
    import shutil

    from transformers import AutoModel

    from gold_ray.testing import save_tiny_classifier

    src = Path(save_tiny_classifier(tmp_path / "with-head"))
    AutoModel.from_pretrained(src).save_pretrained(folder)
    for name in src.iterdir():
        if "token" in name.name or name.name == "vocab.txt":
            shutil.copy(name, folder / name.name)
    return folder


def test_a_local_run_prints_its_own_lines_and_keeps_library_output_in_its_log(tmp_path, tiny_models, monkeypatch,
                                                                              capfd):
    import gold_ray.teacher.engines
    from gold_ray.cli import main
    from gold_ray.reporting.logs import LIBRARY_LOG, VERBOSE_ENV
    from gold_ray.testing import FakeTeacherEngine

    monkeypatch.setattr(gold_ray.teacher.engines, "build_engine", lambda *a, **k: FakeTeacherEngine())
    monkeypatch.setenv(VERBOSE_ENV, "0")  # and restored after --verbose sets it
    student = _base_model_without_head(tmp_path / "base", tmp_path)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"sample {i}", "label": ["negative", "positive"][i % 2]}) + "\n"
                                 for i in range(6)))
    args = ["distill", "tiny", "--local", "--set", f"teacher.model={tiny_models[0]}", "--set", f"student.model={student}",
            "--set", "budget.samples=12", "--set", f"task.eval_path={eval_file}", "--set", "student.final_epochs=1"]
    capfd.readouterr()
    assert main([*args, "--output", str(tmp_path / "quiet")]) == 0
    out, err = capfd.readouterr()
    for noise in ("Loading weights", "LOAD REPORT", "mlflow.store"):
        assert noise not in out and noise not in err
    assert "gold-ray: done." in out
    log = (tmp_path / "quiet" / LIBRARY_LOG).read_text()
    assert "LOAD REPORT" in log and "MISSING" in log

    assert main([*args, "--output", str(tmp_path / "verbose"), "--verbose"]) == 0
    out, err = capfd.readouterr()
    # The libraries print as they would without gold-ray (MLflow's set-up of the new store, here).
    assert "mlflow.store" in out + err
    assert not (tmp_path / "verbose" / LIBRARY_LOG).exists()
