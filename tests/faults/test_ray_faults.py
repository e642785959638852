"""Faults of a Ray cluster: a scorer actor and a Ray Train worker killed mid-work.

Each fault is injected at a point the test controls (a gate file holds the work there), so the
kill lands inside the stage and not merely near it. The run then completes, with every sample
present exactly once. Covered elsewhere: a teacher replica that dies mid-request
(tests/actors/test_pipeline.py::test_a_replica_crash_mid_iteration_is_retried), the driver actor
killed twice (tests/actors/test_mlflow_server.py), the ``gold-ray``
process killed (tests/actors/test_process_kill.py) and a job whose driver is killed
(tests/jobs/test_submit.py::test_a_job_whose_driver_is_killed_resumes_when_resubmitted_and_succeeds_with_its_outputs).
"""

from __future__ import annotations

import functools
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from gold_ray.config import RunConfig
from gold_ray.run.tasks import load_task
from gold_ray.student.model import ClassifierStudent, build_student, load_student
from tests.raykit import free_port, gated_row, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SST2 = load_task("sst2")


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    """Serve on a free loopback port (a no-op, with a warning, if this session started it already)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


# --- a scorer actor killed mid-stream -----------------------------------------------------------


def test_a_scorer_actor_killed_mid_stream_is_replaced_and_no_row_is_lost_or_doubled(ray_cluster, tiny_student,
                                                                                  tmp_path):
    from actors.scoring import score_dataset

    ray = ray_cluster
    ckpt = tmp_path / "ckpt"
    ClassifierStudent(SST2, tiny_student, device="cpu").save(ckpt)
    cfg = RunConfig.model_validate({"resources": {"scorer_min_actors": 1, "scorer_max_actors": 1,
                                                  "scorer_num_cpus": 0.25, "scorer_batch_size": 2}})
    rows = [{"i": i, "text": f"a film about the number {i}, {'warm' if i % 2 else 'dull'} and long",
             "label": "positive" if i % 2 else "negative", "reject_reason": "empty" if i % 5 == 4 else None}
            for i in range(24)]
    gate = tmp_path / "gate"
    ds = ray.data.from_items(rows, override_num_blocks=12).map(
        functools.partial(gated_row, gate=str(gate), first_free=8), num_cpus=0.1)

    out, killed = [], []
    try:
        for row in score_dataset(ds, cfg, str(ckpt), SST2).iter_rows():
            out.append(row)
            if not killed and math.isfinite(row["score"]):
                pid = int(row["scored_by"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)  # the scorer process dies, as on a lost node or OOM
                killed.append(pid)
                assert wait_until(lambda gone=Path(f"/proc/{pid}"): not gone.exists(), 30)
                gate.touch()  # only now may the rows from 8 on reach a scorer
    finally:
        # Should the test fail before, tasks still held at the gate would starve the session's
        # later Ray tests (a replica of CI hung so): release them.
        gate.touch()

    assert killed
    assert sorted(r["i"] for r in out) == list(range(24)), "every row exactly once"
    for r in out:
        assert math.isnan(r["score"]) == isinstance(r["reject_reason"], str), r
    late = {r["scored_by"] for r in out if r["i"] >= 8}
    assert late and all(not s.endswith(f":{killed[0]}") for s in late), (
        f"a replacement scorer did the rest (killed pid {killed[0]}; rows from 8 on scored by {sorted(late)})")


# --- a Ray Train worker killed mid-epoch ---------------------------------------------------------


def test_a_ray_train_worker_killed_mid_epoch_restarts_and_ends_on_the_unbroken_weights(ray_cluster, tmp_path,
                                                                                        tiny_student_no_dropout):
    """At the default checkpoint interval (one per 30 s) a seconds-long training writes none before its
    end: the replaced worker starts over. ``test_ray_training`` resumes from an epoch's checkpoint."""
    from actors.training import train_student_on_ray
    from gold_ray.student.training import Recipe
    from tests.faults.hooks import plan_fault

    model_dir = tiny_student_no_dropout  # dropout off: comparable across runtimes
    cfg = RunConfig.model_validate({"seed": 3, "student": {"model": model_dir, "batch_size": 8, "max_length": 16,
                                                           "lr": 1e-3},
                                    "resources": {"train_workers": 1, "train_cpus_per_worker": 0.5}})
    records = [{"text": f"the {t} was {w}", "label": "positive" if w in ("good", "fine") else "negative"}
               for w in ("good", "fine", "bad", "dull") for t in ("plot", "acting", "music", "ending")]

    marker = tmp_path / "killed"
    plan_fault("train.step", marker, action="kill", rank=0, epoch=1, batch=1)
    metrics = train_student_on_ray(None, model_dir, "sst2", records, cfg=cfg,
                                   recipe=Recipe(lr=cfg.student.lr, epochs=2, max_epochs=2),
                                   out_dir=str(tmp_path / "out"), storage_path=str(tmp_path / "storage"),
                                   name="killed")
    assert marker.exists(), "the worker was killed one step into epoch 2"
    assert metrics["resumed_from_epoch"] == 0 and metrics["epochs"] == 2 and metrics["steps"] == 4

    # Started over from the same seed: the weights of an unbroken run.
    unbroken = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    before = {k: v.clone() for k, v in unbroken.model.state_dict().items()}
    unbroken.fit(records, 2, seed=cfg.seed)
    got = load_student(tmp_path / "out", SST2).model.state_dict()
    want = unbroken.model.state_dict()
    assert _max_diff(got, want) < 1e-5 and _max_diff(before, want) > 1e-3


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- bad input on Ray: refused in the driver actor, reported as one line ---------------------------


def test_bad_input_on_ray_is_one_clear_line_and_loses_nothing(ray_cluster, serve_port, tiny_student, eval_file,
                                                             tmp_path, capsys):
    from gold_ray.cli import main
    from tests.faults.faultkit import tree_digest

    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "state.json").write_text('{"parts": [], "stage": "generate", "iteration": 0, "finished": false, '
                                        '"feedback": [], "dedup": [], "iterations": []}')
    before = tree_digest(run_dir)
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "a fine film", "label": "positive"}\n{"text": oops}\n')
    args = [a for item in run_config_overrides(run_dir, tiny_student, bad, serve_port) for a in ("--set", item)]
    code = main(["distill", "tiny", "--quiet", "--overwrite", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bad}:2: not valid JSON" in err and "Traceback" not in err and "RayTaskError" not in err
    assert tree_digest(run_dir) == before


def run_config_overrides(run_dir: Path, student: str, eval_path: Path, port: int) -> list[str]:
    from tests.faults.faultkit import run_overrides

    return run_overrides(run_dir, student, eval_path, f"teacher.serve.port={port}", "teacher.serve.num_cpus=0.25")
