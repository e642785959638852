"""On Ray, the driver's events reach the progress view (here JSON lines) and the run ends with report.html."""

import functools
import io
import json

import pytest

from actors.driver import run_on_ray
from gold_ray.config import load_config
from gold_ray.reporting.progress import progress
from gold_ray.run.loop import STAGES
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier

pytestmark = pytest.mark.ray


def test_ray_run_streams_progress_and_writes_the_report(ray_cluster, serve_port, tmp_path):
    student = save_tiny_classifier(tmp_path / "student")
    out = tmp_path / "run"
    cfg = load_config(None, [
        "task.name=sst2", f"task.eval_path={tmp_path / 'eval.jsonl'}", f"student.model={student}",
        "teacher.model=fake", "teacher.prompt_style=chat", "budget.samples=12", "strategy.iterations=1",
        "strategy.probe_fraction=0.5", "student.final_epochs=1", "student.batch_size=8",
        "teacher.serve.num_cpus=0.25", f"teacher.serve.port={serve_port}", "resources.scorer_num_cpus=0.25",
        "resources.train_cpus_per_worker=0.5", "tracking.enabled=false", f"output.dir={out}",
    ])
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": f"review {i}", "label": lab}) + "\n"
                                                 for i, lab in enumerate(["positive", "negative"] * 3)))
    buf = io.StringIO()
    with progress("json", stream=buf, iterations=1) as reporter:
        metrics = run_on_ray(cfg, engine_factory=functools.partial(FakeTeacherEngine, task=load_task("sst2")),
                             on_event=reporter, poll_s=0.2)
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    # Within-stage counts come through the same event path as the stages (bounded: the first of a
    # stage at once, then at most one a second), with the ETAs.
    counts = [r for r in rows if r["event"] == "progress"]
    rows = [r for r in rows if r["event"] not in ("plan", "progress", "log")]
    assert [r["event"] for r in rows] == [*STAGES, "final"]
    first = {}
    for r in counts:
        first.setdefault((r["stage"], r["unit"]), r)
    it0 = metrics["iterations"][0]
    # GOLD writes its training samples and probes in one teacher pass; the probe stage scores them.
    assert first[("generate", "samples")]["total"] == it0["generate"]["requested"] + it0["probe"]["requested"]
    assert ("probe", "samples") not in first and first[("probe", "scored")]["total"] == it0["probe"]["accepted"]
    train = first[("train", "steps")]
    assert train["total"] >= metrics["iterations"][0]["train"]["steps"] > 0
    assert ("final", "steps") in first and all("eta_stage_s" in r for r in counts)
    assert all(r["done"] <= r["total"] for r in counts)
    for key in first:  # a poll shows its newest count: the counts of a stage never go back
        done = [r["done"] for r in counts if (r["stage"], r["unit"]) == key]
        assert done == sorted(done)
    gen, probe = rows[0], rows[2]
    assert gen["accepted"] == metrics["iterations"][0]["generate"]["accepted"] > 0
    assert probe["scored"] == probe["accepted"] > 0  # scored by the student trained since they were written
    assert rows[-1]["records"] == metrics["final"]["records"] and rows[-1]["eta_run_s"] == 0.0

    page = (out / "report.html").read_text()
    assert "<h2>Energy distributions per iteration</h2>" in page
    assert page.count('src="data:image/png;base64,') == 4
    assert (out / "task.yaml").is_file()
