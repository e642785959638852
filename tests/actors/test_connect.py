"""actors.connect: which Ray each entry point joins and what it forwards (ray.init's arguments), and a real
local start beside a Ray already running."""

from __future__ import annotations

import os

import pytest
import ray

from actors import connect
from gold_ray import entry


@pytest.fixture
def inits(monkeypatch):
    """The keyword arguments of every ``ray.init`` call (none reaches Ray); no Ray is running."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for name in (*entry.FORWARDED_ENV, "RAY_ADDRESS", connect.JOB_CONFIG_ENV, "PYTHONPATH"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_inside_a_ray_job_the_jobs_runtime_env_is_kept(inits, monkeypatch):
    # ray.init refuses a runtime_env that sets a variable the job's runtime_env sets too.
    monkeypatch.setenv(connect.JOB_CONFIG_ENV, '{"runtime_env": {"env_vars": {"GOLD_RAY_DATA": "/data"}}}')
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("GOLD_RAY_DATA", "/data")
    connect.ensure_ray()
    # Ray workers' output stays in Ray's logs unless --verbose.
    assert inits == [{"address": "auto", "log_to_driver": False}]


def test_a_cluster_named_by_ray_address_gets_the_forwarded_env(inits, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("GOLD_RAY_DATA", "/data")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", "/home/me/checkout")
    connect.ensure_ray()
    [kw] = inits
    assert kw["address"] == "10.0.0.1:6379" and kw["log_to_driver"] is False
    from gold_ray.reporting.logs import worker_env

    # The user's settings travel, the checkout's PYTHONPATH does not; the workers' quiet settings and
    # Ray Train's poll interval join them.
    assert kw["runtime_env"]["env_vars"] == {"GOLD_RAY_DATA": "/data", "HF_HUB_OFFLINE": "1",
                                             "TOKENIZERS_PARALLELISM": "false", **worker_env(),
                                             "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@pytest.mark.ray
def test_a_local_run_starts_its_own_ray_beside_one_already_running(ray_cluster, tmp_path):
    # A plain ray.init() joins a Ray found running on this machine (here the session's), and then
    # refuses the num_cpus a local run passes: the run died with an internal error.
    import subprocess
    import sys

    # The checkout is on PYTHONPATH (tests/conftest.py), so `actors` imports from any folder.
    # And it prestarts no idle workers (Ray's default starts one per logical CPU at once).
    code = """
import time, psutil
from actors.connect import connect_ray
print('GCS', connect_ray())
time.sleep(5)
workers = 0
for p in psutil.Process().children(recursive=True):
    try:
        cmd = p.cmdline()
    except psutil.Error:  # gone since it was listed
        continue
    # Nothing was submitted: any worker is a prestarted one, titled or still starting (the raylet's
    # own command line names the worker script too, in an option).
    workers += bool(cmd) and (cmd[0].startswith('ray::IDLE') or any(a.endswith('default_worker.py') for a in cmd[1:3]))
print('IDLE', workers)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [own] = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS ")]
    assert own != ray_cluster.get_runtime_context().gcs_address
    [idle] = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("IDLE ")]
    assert idle == 0


def test_a_local_ray_has_cpus_for_everything_a_run_keeps_at_once():
    from actors.connect import held_cpus, local_ray_cpus
    from gold_ray.config import RunConfig

    demo = RunConfig.model_validate({"teacher": {"serve": {"num_cpus": 2, "max_replicas": 2}},
                                     "resources": {"scorer_max_actors": 2, "scorer_num_cpus": 0.5,
                                                   "train_workers": 2, "train_cpus_per_worker": 1}})
    assert held_cpus(demo) == 2 * 2 + 2 * 0.5 + 2 * 1 + 0.25
    assert local_ray_cpus(demo) == 8  # every kept actor placed: none waits for another to end
    assert local_ray_cpus(RunConfig()) == max(4, os.cpu_count() or 1)
    assert local_ray_cpus(demo.model_copy(update={"resources": demo.resources.model_copy(
        update={"local_ray_cpus": 3})})) == 3  # the user's setting wins
