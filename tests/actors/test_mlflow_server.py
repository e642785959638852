"""A Ray run tracked by a real MLflow tracking server (``mlflow server``: SQLite backend, local artifacts),
whose driver actor is killed twice.

The run trains with 2 Ray Train workers. Its driver actor is killed before the first stage commits
(held at the ``stage.start`` fault point of iteration 0's generate stage) and again inside iteration
1's generate stage (the teacher holds on that stage's first prompt); each time
:func:`actors.driver.run_on_ray` starts a new driver that resumes the run. The finished run has
the counts and feedback of an uninterrupted run (the in-process loop, same config), every sample
once, and read back with ``MlflowClient`` over HTTP it is one MLflow run with its params,
per-iteration metrics, the Ray Train job (2 workers) as a child run and the student as a logged
artifact folder. One run serves both checks: a run on Ray costs half a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gold_ray.run.loop import Distiller
from gold_ray.testing import save_tiny_classifier, tiny_run_config
from tests.faults.faultkit import committed_records, run_summary, write_eval_file
from tests.faults.hooks import clear_plans, plan_fault
from tests.raykit import HoldAtEngine, free_port, wait_until

KINDS = ("empty", "binary", "other_label", "json")
"""The teacher's garbage answers (a quarter of them), so that resumed stages also reject alike."""

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, SQLite backend and a local artifact folder; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", (root / "artifacts").as_uri()]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (root / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if server.poll() is not None:
            return True  # reported below
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        assert wait_until(healthy, 120, 0.5) and server.poll() is None, (root / "server.log").read_text()[-3000:]
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_ray_run_on_a_tracking_server_whose_driver_dies_twice_is_one_mlflow_run_with_an_unbroken_runs_counts(
        ray_cluster, serve_port, mlflow_server, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from actors.driver import driver_name, run_on_ray

    student = save_tiny_classifier(tmp_path / "student")
    eval_file = write_eval_file(tmp_path / "eval.jsonl")
    experiment = f"gold-ray-{tmp_path.name}"

    def cfg_for(run_dir, *extra):
        # No in-loop training: both runtimes score probes with the same student, so counts and
        # feedback must agree exactly; one pinned final recipe keeps the final stage short.
        return tiny_run_config(
            run_dir, student, f"task.eval_path={eval_file}", "teacher.prompt_style=chat", "budget.samples=16",
            "strategy.probe_fraction=0.5", "student.epochs_per_iteration=0", "student.final_loss=sce", *extra)

    unused = str(tmp_path / "unused")
    reference = Distiller(cfg_for(tmp_path / "reference"),
                          engine=HoldAtEngine("none", unused, unused, share=0.25, kinds=KINDS)).run()

    run_dir = tmp_path / "run"
    cfg = cfg_for(
        run_dir, f"teacher.serve.port={serve_port}", "teacher.serve.num_cpus=0.25",
        "resources.scorer_num_cpus=0.25", "resources.scorer_min_actors=1", "resources.scorer_max_actors=1",
        "resources.train_workers=2", "resources.train_cpus_per_worker=0.5", "tracking.enabled=true",
        f"tracking.tracking_uri={mlflow_server}", f"tracking.experiment={experiment}")
    held, gate = tmp_path / "held.json", tmp_path / "gate"
    holding, gate2 = tmp_path / "holding", tmp_path / "gate2"
    seen: dict = {}

    def kill_the_driver_when(marker: Path, key: str) -> None:
        if wait_until(marker.exists, 600):
            state = json.loads((run_dir / "state.json").read_text())
            seen[key] = (state["iteration"], state["stage"], state["parts"], state.get("mlflow_run_id"))
            ray.kill(ray.get_actor(driver_name(cfg)), no_restart=True)

    def kill_twice() -> None:
        try:
            kill_the_driver_when(held, "first")
        finally:
            gate.touch()
        try:
            kill_the_driver_when(holding, "second")
        finally:
            gate2.touch()

    plan_fault("stage.start", held, action="hold", gate=gate, iteration=0, stage="generate")
    factory = functools.partial(HoldAtEngine, "it1-train-0", str(holding), str(gate2), share=0.25, kinds=KINDS)
    watcher = threading.Thread(target=kill_twice, daemon=True)
    watcher.start()
    try:
        got = run_on_ray(cfg, engine_factory=factory)
    finally:
        gate.touch()
        gate2.touch()
        watcher.join(timeout=30)
        clear_plans()

    assert seen.get("first") and seen.get("second"), f"the driver was killed twice: {seen}"
    _, stage, parts, first_id = seen["first"]
    assert stage is None and parts == [], "first killed before the first stage committed"
    assert seen["second"][:2] == (0, "feedback"), "then killed inside iteration 1's generate stage"
    assert seen["second"][3] == first_id, "the second driver kept the first one's MLflow run"

    # Resumed twice, the run counts and feeds back what an uninterrupted run does, each sample once.
    assert run_summary(got) == run_summary(reference)
    ids = [r["id"] for r in committed_records(run_dir)]
    assert len(ids) == len(set(ids)) == 16
    assert (run_dir / "student" / "config.json").is_file()

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1, f"one MLflow run for the distillation, not one per driver: {[r.info.run_id for r in top]}"
    run = top[0]
    assert run.info.run_id == first_id == got["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    # Params: the config, flattened.
    assert run.data.params["seed"] == "0" and run.data.params["resources.train_workers"] == "2"
    assert run.data.params["strategy.name"] == "gold"
    # Per-iteration metrics, once at steps 0 and 1 (no stage logged twice across the drivers); the final ones at step 2.
    for key in ("generate.accepted", "probe.accepted", "train.records"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert {m.step for m in client.get_metric_history(run.info.run_id, "final.records")} == {2}
    # The Ray Train job (the final student; no in-loop epochs) is a child run with its training curve.
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert len(children) == 1 and children[0].info.status == "FINISHED", [c.info.run_name for c in children]
    assert client.get_metric_history(children[0].info.run_id, "train.step_loss")
    # The student, logged through the server's artifact proxy.
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "student")}
    assert {"config.json", "model.safetensors"} <= logged, logged
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "student"}
