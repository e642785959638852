"""A Ray run tracked by a real MLflow tracking server (``mlflow server``: SQLite backend, local artifacts).

The run trains with 2 Ray Train workers, and its driver actor is killed before the first stage
commits (held at the ``stage.start`` fault point of iteration 0's generate stage, so the kill lands
there); :func:`actors.driver.run_on_ray` starts a new driver that resumes the run. Read back with
``MlflowClient`` over HTTP, the run is one MLflow run with its params, per-iteration metrics, the
Ray Train job (2 workers) as a child run and the student as a logged artifact folder.
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

from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier, tiny_run_config
from tests.faults.faultkit import committed_records, write_eval_file
from tests.faults.hooks import clear_plans, plan_fault

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, SQLite backend and a local artifact folder; yields its URL."""
    from tests.raykit import free_port, wait_until

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


def test_a_ray_run_on_a_tracking_server_is_one_mlflow_run_even_when_its_driver_dies_before_the_first_commit(
        ray_cluster, serve_port, mlflow_server, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from actors.driver import driver_name, run_on_ray

    student = save_tiny_classifier(tmp_path / "student")
    eval_file = write_eval_file(tmp_path / "eval.jsonl")
    run_dir = tmp_path / "run"
    experiment = f"gold-ray-{tmp_path.name}"
    cfg = tiny_run_config(
        run_dir, student, f"task.eval_path={eval_file}", "teacher.prompt_style=chat", "budget.samples=16",
        "strategy.probe_fraction=0.5", "student.epochs_per_iteration=0", "student.final_loss=sce",
        f"teacher.serve.port={serve_port}", "teacher.serve.num_cpus=0.25",
        "resources.scorer_num_cpus=0.25", "resources.scorer_min_actors=1", "resources.scorer_max_actors=1",
        "resources.train_workers=2", "resources.train_cpus_per_worker=0.5", "tracking.enabled=true",
        f"tracking.tracking_uri={mlflow_server}", f"tracking.experiment={experiment}")

    held, gate = tmp_path / "held.json", tmp_path / "gate"
    seen: dict = {}

    def kill_the_driver_while_held() -> None:
        from tests.raykit import wait_until

        if wait_until(held.exists, 600):
            state = json.loads((run_dir / "state.json").read_text())
            seen["state"] = (state["stage"], state["parts"], state.get("mlflow_run_id"))
            ray.kill(ray.get_actor(driver_name(cfg)), no_restart=True)
        gate.touch()

    plan_fault("stage.start", held, action="hold", gate=gate, iteration=0, stage="generate")
    watcher = threading.Thread(target=kill_the_driver_while_held, daemon=True)
    watcher.start()
    try:
        got = run_on_ray(cfg, engine_factory=functools.partial(FakeTeacherEngine, task=load_task("sst2")))
    finally:
        watcher.join(timeout=30)
        clear_plans()

    assert held.exists() and seen.get("state"), "the driver was held and killed inside iteration 0's generate stage"
    stage, parts, first_id = seen["state"]
    assert stage is None and parts == [], "killed before the first stage committed"

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
    # Per-iteration metrics, at steps 0 and 1; the final ones at step 2.
    for key in ("generate.accepted", "probe.accepted", "train.records"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert {m.step for m in client.get_metric_history(run.info.run_id, "final.records")} == {2}
    # The Ray Train job (the final student; no in-loop epochs, one pinned recipe, to keep the test
    # short) is a child run with its training curve.
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert len(children) == 1 and children[0].info.status == "FINISHED", [c.info.run_name for c in children]
    assert client.get_metric_history(children[0].info.run_id, "train.step_loss")
    # The student, logged through the server's artifact proxy.
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "student")}
    assert {"config.json", "model.safetensors"} <= logged, logged
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "student"}

    ids = [r["id"] for r in committed_records(run_dir)]
    assert len(ids) == len(set(ids)) == 16
