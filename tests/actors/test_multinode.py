"""GOLD on a multi-node Ray cluster: placement by custom resources, and a node lost inside a stage.

The cluster is Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``): one raylet per
"node", all on this machine, sharing nothing but ``output.dir`` (a folder every node sees, as a
shared file system would be). The head takes the driver, Serve's controller and the Ray Data
callers; the teacher replica asks for ``{"teacher": 1}``, the scorer actors for ``{"scorer": 1}``
and each of the 2 Ray Train workers for ``{"trainer": 1}``, so each kind can only land on the
nodes that advertise it. Where the work ran is recorded by the test fault hook
(``tests/faults/hooks.py``, action ``record``) with the node ids Ray reports.

The run's driver is a separate process (``cluster_run.py``): this process may already be connected
to the session's single-node Ray, and a process joins one cluster only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gold_ray.run.loop import Distiller
from gold_ray.run.tasks import load_task
from gold_ray.testing import FakeTeacherEngine, save_tiny_classifier, tiny_run_config
from tests.faults.faultkit import committed_records, run_summary, write_eval_file
from tests.faults.hooks import clear_plans, plan_fault, read_records
from tests.raykit import free_port, kill_marked, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("cluster_run.py")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A 5-node cluster: head (2 CPUs), teacher (1 CPU), two scorer nodes (1 CPU each), trainer (2 CPUs).

    Yields:
        ``{"cluster": Cluster, "nodes": {role: Node}, "ids": {node_id: role}}``.
    """
    from ray.cluster_utils import Cluster

    # Raylets and their workers inherit this environment: the workers must import the checkout
    # (actors/, the test fault hook) and must not phone home.
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="grmn")  # short: Ray's socket paths have a length limit
    small = {"object_store_memory": 80 * MiB}
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "temp_dir": temp_dir, **small})
    try:
        nodes = {"head": c.head_node}
        for role, cpus, resources in (("teacher", 1, {"teacher": 1}), ("scorer-a", 1, {"scorer": 1}),
                                      ("scorer-b", 1, {"scorer": 1}), ("trainer", 2, {"trainer": 2})):
            nodes[role] = c.add_node(num_cpus=cpus, resources=resources, **small)
        c.wait_for_nodes()
        yield {"cluster": c, "nodes": nodes, "ids": {n.node_id: role for role, n in nodes.items()}}
    finally:
        c.shutdown()
        kill_marked(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny student and a 12-line evaluation file."""
    root = tmp_path_factory.mktemp("multinode")
    return {"student": Path(save_tiny_classifier(root / "student")), "eval": write_eval_file(root / "eval.jsonl")}


def run_cfg(out: Path, tiny: dict[str, Path], *extra: str):
    """The multi-node run: 16 samples in one iteration, no in-loop training (so probes are scored by
    the same student on every runtime, and records and feedback must match exactly), 2 DDP workers
    for the final student, each role pinned by its custom resource."""
    return tiny_run_config(
        out, tiny["student"], f"task.eval_path={tiny['eval']}", "teacher.prompt_style=chat", "budget.samples=16",
        "strategy.iterations=1", "strategy.probe_fraction=0.5", "student.epochs_per_iteration=0",
        "student.final_epochs=1", f"teacher.serve.port={free_port()}", "teacher.serve.num_cpus=0.25",
        "teacher.serve.resources={teacher: 1}",
        "resources.scorer_min_actors=1", "resources.scorer_max_actors=1", "resources.scorer_num_cpus=0.25",
        "resources.scorer_batch_size=2", "resources.scorer_resources={scorer: 1}", "resources.train_workers=2",
        "resources.train_cpus_per_worker=0.5", "resources.train_resources_per_worker={trainer: 1}", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny) -> dict[str, Any]:
    """The same run in one process: its metrics and committed records."""
    out = tmp_path_factory.mktemp("multinode-ref") / "run"
    metrics = Distiller(run_cfg(out, tiny), engine=FakeTeacherEngine(task=load_task("sst2"))).run()
    return {"metrics": metrics, "records": record_keys(out)}


def record_keys(run_dir: Path) -> list[tuple]:
    """What each committed record is: id, kind, label, text and reject reason, sorted by id."""
    return sorted((r["id"], r.get("kind"), r.get("label"), r.get("text"), r.get("reject_reason"))
                  for r in committed_records(run_dir))


def start_run(cfg, cluster: dict[str, Any], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start the run's driver process against the cluster; returns it and where its metrics go."""
    cfg_file, metrics = tmp_path / "cfg.json", tmp_path / "metrics.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
    env = {**os.environ, "RAY_ADDRESS": cluster["cluster"].address}
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(cfg_file), str(metrics)], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, metrics


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> None:
    """Wait for the driver process; fail with the tail of its log if it did not succeed."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    state = tmp_path / "run" / "state.json"  # where a run that did not finish stood
    where = state.read_text() if state.is_file() else "no state.json"
    assert code == 0, f"{where}\n" + (tmp_path / "driver.log").read_text()[-6000:]


def test_a_run_across_nodes_places_each_role_by_its_resource_and_survives_losing_a_scorer_node(
        cluster, tiny, reference, tmp_path):
    ids = cluster["ids"]
    where = {point: tmp_path / f"where-{point}.jsonl"
             for point in ("teacher.batch", "score.batch", "train.step", "stage.start")}
    held, gate = tmp_path / "held.json", tmp_path / "gate"
    try:
        for point, path in where.items():
            plan_fault(point, path, action="record")
        # The first scoring batch of iteration 0's probes holds until its node is gone.
        plan_fault("score.batch", held, action="hold", gate=gate)
        run_dir = tmp_path / "run"
        proc, metrics_file = start_run(run_cfg(run_dir, tiny), cluster, tmp_path)
        assert wait_until(lambda: held.exists() or proc.poll() is not None, 600)
        assert held.exists(), (tmp_path / "driver.log").read_text()[-6000:]
        hold = json.loads(held.read_text())
        lost = ids[hold["node_id"]]
        assert lost.startswith("scorer-"), hold
        state = json.loads((run_dir / "state.json").read_text())
        assert (state["iteration"], state["stage"]) == (0, "train"), "held inside iteration 0's probe stage"
        cluster["cluster"].remove_node(cluster["nodes"][lost], allow_graceful=False)
        gate.touch()
        finish(proc, tmp_path)
    finally:
        clear_plans()

    # Each role ran only on the nodes that advertise its resource.
    roles = {point: [ids.get(r["node_id"], r["node_id"]) for r in read_records(path)] for point, path in where.items()}
    assert roles["teacher.batch"] and set(roles["teacher.batch"]) == {"teacher"}, roles
    assert set(roles["score.batch"]) == {"scorer-a", "scorer-b"}, "scoring moved to the other scorer node"
    survivor = "scorer-b" if lost == "scorer-a" else "scorer-a"
    assert roles["score.batch"][-1] == survivor
    train = read_records(where["train.step"])
    assert {ids.get(r["node_id"]) for r in train} == {"trainer"}
    assert {r["context"]["rank"] for r in train} == {"0", "1"}, "both DDP workers trained"
    # The driver actor stays on the node of the process that started the run (actors.connect.on_this_node).
    assert set(roles["stage.start"]) == {"head"}, roles["stage.start"]

    # Nothing committed was lost or repeated, and the run is the single-node run.
    got = json.loads(metrics_file.read_text())
    assert run_summary(got) == run_summary(reference["metrics"])
    assert record_keys(run_dir) == reference["records"]
    record_ids = [r["id"] for r in committed_records(run_dir)]
    assert len(record_ids) == len(set(record_ids)) == 16
    assert (run_dir / "student" / "config.json").is_file()
