"""report.html: written at the end of a run, self-contained, every plot present and not empty, untrusted
text escaped; ``gold-ray report`` rebuilds it and compares two runs; headless Chromium renders it."""

import base64
import dataclasses
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gold_ray.cli import main
from gold_ray.config import load_config
from gold_ray.reporting.report import (
    MAX_ENERGY_PANELS,
    RunData,
    energy_panels,
    label_counts,
    load_run,
    reject_counts,
    render_report,
    write_report,
)
from gold_ray.run.loop import Distiller
from gold_ray.run.rundir import RunReadError
from gold_ray.run.store import read_parts
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

HOSTILE = "A review number {n} that reads fine <script>alert({n})</script><img src=x onerror=alert({n})> & more"

TICKET_TASK = """\
name: tickets
type: classification
description: Decide which team should handle a customer support ticket.
sample_noun: support ticket
input_fields:
  - {name: text, display: Ticket, min_chars: 10, max_chars: 400}
labels:
  - {name: billing, description: "payments, invoices and refunds"}
  - {name: technical, description: "bugs, errors and outages"}
seed_demos:
  - {text: "I was charged twice for my March invoice.", label: billing}
  - {text: "The app crashes when I open settings.", label: technical}
  - {text: "Can I get a refund for the unused months?", label: billing}
"""


class HostileEngine(FakeTeacherEngine):
    """The fake engine, with every third answer carrying markup that must never reach the page as HTML."""

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        first = self.calls - len(out)
        return [dataclasses.replace(g, text=HOSTILE.format(n=first + i))
                if g.error is None and (first + i) % 3 == 0 else g for i, g in enumerate(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    student = save_tiny_classifier(root / "student")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"a sample {i} that reads as {lab}", "label": lab}) + "\n"
                                 for i, lab in enumerate(["negative", "positive"] * 10)))
    task_file = root / "tickets.yaml"
    task_file.write_text(TICKET_TASK)
    common = [f"student.model={student}", "teacher.model=fake", "budget.samples=24", "strategy.iterations=2",
              "strategy.probe_fraction=0.5", "student.final_epochs=1", "student.batch_size=8",
              "tracking.enabled=false"]
    cfg_a = load_config(None, [*common, "task.name=sst2", f"task.eval_path={eval_file}", f"output.dir={root / 'a'}"])
    metrics_a = Distiller(cfg_a, engine=HostileEngine(fail_every=7)).run()
    cfg_b = load_config(None, [*common, f"task.name={task_file}", f"output.dir={root / 'b'}", "strategy.band_lo=0.2"])
    metrics_b = Distiller(cfg_b, engine=FakeTeacherEngine(fail_every=5)).run()
    return {"root": root, "a": root / "a", "b": root / "b", "metrics_a": metrics_a, "metrics_b": metrics_b,
            "student": student}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img class="plot" alt="[^"]*" src="data:image/png;base64,([^"]+)"',
                                                     page)]


def assert_real_plot(png: bytes) -> None:
    from matplotlib.image import imread

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert colour_count(pixels) > 10, "a plot must not be a blank image"


def colour_count(pixels: np.ndarray) -> int:
    rgb = (pixels[..., :3] * 255).round().astype(np.int64)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


SECTIONS = ("Final student", "Accuracy per iteration", "Energy distributions per iteration",
            "Label balance and reject reasons", "Samples", "Throughput per stage", "Config")


def test_report_is_written_at_the_end_with_every_section_and_plot(runs):
    page = (runs["a"] / "report.html").read_text()
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    pngs = images(page)
    assert len(pngs) == 4  # accuracy, energy per iteration, label balance + rejects, throughput
    for png in pngs:
        assert_real_plot(png)
    assert "The student on the real evaluation set" in page
    table = page.split("<h2>Energy distributions")[0].split("probes scored/s</th>")[1]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows) == 2 and all(float(re.findall(r'<td class="num">([\d.]+)</td>', r)[-1]) > 0 for r in rows)
    assert f"{runs['metrics_a']['final']['accuracy']:.4f}" in page
    per_label = runs["metrics_a"]["final"]["per_label_accuracy"]
    assert "accuracy per label" in page and all(f"{label} {acc:.3f}" in page for label, acc in per_label.items())
    diversity = runs["metrics_a"]["final"]["diversity"]
    assert f"distinct word pairs {diversity['distinct_2']:.3f} · nearest-other overlap" in page


def test_report_is_self_contained(runs):
    page = (runs["a"] / "report.html").read_text()
    assert not re.search(r'\b(?:src|href)="(?!data:image/png;base64,)', page)
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page


def test_generated_text_is_escaped(runs):
    page = (runs["a"] / "report.html").read_text()
    stored = [r for r in read_parts(sorted((runs["a"] / "data").glob("*.parquet"))) if "<script>" in (r.get("text") or "")]
    assert stored, "the hostile answers must be in the data for this test to mean anything"
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(" in page and "&lt;img src=x onerror=alert(" in page
    assert len(re.findall(r"<img\b", page)) == 4  # only the plots


def test_samples_side_by_side_hold_feedback_and_rejects(runs):
    page = (runs["b"] / "report.html").read_text()
    for title in ("Accepted (training data)", "Feedback (fed back to the teacher)", "Rejected (with reason)"):
        assert title in page
    run = load_run(runs["b"])
    fb_ids = {i for ids in run.feedback_ids().values() for i in ids}
    assert fb_ids
    fed = [r for r in run.accepted() if r["id"] in fb_ids]
    samples = page.split("Feedback (fed back to the teacher)")[1].split("Rejected (with reason)")[0]
    assert any(r["text"][:40] in samples for r in fed)
    assert '<span class="tag">error</span>' in page  # the injected teacher failures, with their reason


def test_without_an_eval_set_the_fresh_probes_are_the_hold_out(runs):
    its_b = runs["metrics_b"]["iterations"]
    assert all(0.0 <= m["probe"]["holdout_accuracy"] <= 1.0 and m["probe"]["holdout_n"] == m["probe"]["accepted"]
               for m in its_b)
    assert all("holdout_accuracy" not in m["probe"] for m in runs["metrics_a"]["iterations"])
    page = (runs["b"] / "report.html").read_text()
    assert "No real evaluation set: per-iteration values are on a synthetic hold-out" in page
    assert "The student on the real evaluation set" not in page
    assert "gold-ray report: tickets" in page


def test_label_balance_and_reject_counts_match_the_metrics(runs):
    for key in ("a", "b"):
        run, totals = load_run(runs[key]), runs[f"metrics_{key}"]["totals"]
        assert sum(sum(v.values()) for v in label_counts(run).values()) == totals["accepted"]
        rejected = {k.removeprefix("rejected_"): v for k, v in totals.items() if k.startswith("rejected_")}
        assert {k: sum(v.values()) for k, v in reject_counts(run).items()} == rejected
    assert set().union(*label_counts(load_run(runs["b"])).values()) == {"billing", "technical"}


def test_cli_rebuilds_a_report_and_compares_two_runs(runs, capsys):
    (runs["a"] / "report.html").unlink()
    assert main(["report", str(runs["a"])]) == 0
    assert (runs["a"] / "report.html").is_file()
    assert f"report written to {runs['a'] / 'report.html'}" in capsys.readouterr().out

    out = runs["root"] / "a-vs-b.html"
    assert main(["report", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == 0
    page = out.read_text()
    assert str(runs["a"]) in page and str(runs["b"]) in page
    pngs = images(page)
    assert len(pngs) == 2  # accuracy and probe scores; labels, rejects and time per stage
    for png in pngs:
        assert_real_plot(png)
    diff = page.split("<h2>Config differences</h2>")[1]
    assert "task.name" in diff and "strategy.band_lo" in diff and "budget.samples" not in diff

    assert main(["report", str(runs["a"]), str(runs["b"])]) == 0
    assert (runs["a"] / "compare-b.html").is_file()


def test_report_of_a_stopped_run(tmp_path, runs):
    cfg = load_config(None, ["task.name=sst2", f"task.eval_path={runs['root'] / 'eval.jsonl'}",
                             f"student.model={runs['student']}", "teacher.model=fake", "budget.samples=24",
                             "strategy.iterations=2", "tracking.enabled=false", f"output.dir={tmp_path / 'run'}"])

    def stop(stage, info):
        if stage == "train" and info.get("iteration") == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Distiller(cfg, engine=FakeTeacherEngine(), on_event=stop).run()
    assert not (tmp_path / "run" / "report.html").exists()
    page = write_report(tmp_path / "run").read_text()
    assert "in progress or stopped: iteration 2, last committed stage train" in page
    assert "The run has not reached its final stage." in page
    assert len(images(page)) == 4


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(RunReadError, match="no config.yaml"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def synthetic_run(task_name: str, iterations: int, answers) -> RunData:
    """A run's data built in memory (no models): many iterations, scored probes, open-ended answers."""
    from gold_ray.run.tasks import load_task

    task = load_task(task_name)
    rng = np.random.default_rng(0)
    records, its = [], []
    for it in range(iterations):
        for i in range(20):
            kind = "probe" if i % 2 else "train"
            rec = {"id": f"it{it}-{kind}-{i}", "iteration": it, "kind": kind, "reject_reason": None,
                   "score": float(rng.normal()) if kind == "probe" else math.nan, task.target_key: answers(i),
                   **{f: f"question {it}-{i}" for f in task.field_names}}
            records.append(rec)
        its.append({"generate": {"requested": 10, "accepted": 10, "seconds": 1.0, "tokens_per_s": 5.0},
                    "train": {"loss": 1.0 / (it + 1), "exact_match": 0.1 * it, "seconds": 2.0},
                    "probe": {"requested": 10, "accepted": 10, "seconds": 1.0},
                    "feedback": {"size": 1, "ids": [f"it{it}-probe-1"]}})
    return RunData(Path("/nonexistent/run"), {"task": {"name": task_name}, "strategy": {"name": "gold"}},
                   "task:\n  name: x\n", {"iterations": its, "totals": {}, "final": {}}, None, task, records)


def test_open_ended_answers_and_many_iterations_stay_readable():
    run = synthetic_run("svamp", 12, answers=lambda i: str(i))  # 10 distinct answers per iteration
    counts = label_counts(run)
    values = set().union(*counts.values())
    assert "other" in values and len(values) == 9
    assert sum(sum(v.values()) for v in counts.values()) == 240
    panels = energy_panels(run, limit=MAX_ENERGY_PANELS)
    assert len(panels) == MAX_ENERGY_PANELS and panels[0][0] == 0 and panels[-1][0] == 11
    page = render_report(run)
    assert len(images(page)) == 4 and "student exact_match per iteration" in page


# ---- headless Chromium ---------------------------------------------------------------------

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it for CI)")


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.slow
@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path, runs):
    from matplotlib.image import imread

    url = (runs["b"] / "report.html").resolve().as_uri()
    dom = chromium(tmp_path, "--dump-dom", url).stdout
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom
    srcs = re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,([^"]+)"', dom)
    assert len(srcs) == 4
    for src in srcs:
        assert_real_plot(base64.b64decode(src))

    shot = tmp_path / "report.png"
    chromium(tmp_path, "--hide-scrollbars", "--window-size=1300,6000", f"--screenshot={shot}", url)
    pixels = imread(shot)
    assert colour_count(pixels) > 50, "the screenshot is blank"
    pixels = (pixels[..., :3] * 255).round().astype(int)
    # matplotlib's first colour (#1f77b4) only comes from the plots: they were decoded and painted.
    blue = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=-1) < 12).sum()
    assert blue > 2000
