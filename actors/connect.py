"""Connecting to Ray, for ``gold-ray`` commands and for the Ray job entrypoint alike.

Three cases, in this order:

- inside a Ray job (``ray job submit``, ``gold-ray submit``, a KubeRay ``RayJob``): join the job's
  cluster and keep the job's ``runtime_env`` (its uploaded working dir and forwarded variables);
- ``$RAY_ADDRESS`` set: join that cluster, forwarding :data:`~gold_ray.entry.FORWARDED_ENV`;
- otherwise: start a local Ray (no dashboard), forwarding the same variables; its processes die
  with this one, however it ends (:mod:`actors.reaper`).

Unless ``--verbose`` (:func:`gold_ray.reporting.logs.is_verbose`), the workers' output stays in
Ray's session logs instead of being forwarded to this process (``log_to_driver=False``), and the
workers get :func:`gold_ray.reporting.logs.worker_env` (no progress bars). Every worker also gets
:func:`gold_ray.entry.ray_train_env` (how often Ray Train's controller polls its workers).
"""

from __future__ import annotations

import os

import ray

from gold_ray.config import RunConfig
from gold_ray.entry import FORWARDED_ENV, ray_train_env
from gold_ray.reporting.logs import is_verbose, worker_env

_WATCHDOGS: list = []
"""The watchdog of the local Ray this process started (kept referenced for the process's life)."""

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a job's entrypoint process (it holds the job's runtime_env)."""


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job."""
    return JOB_CONFIG_ENV in os.environ


def ensure_ray(cfg: RunConfig | None = None) -> None:
    """Connect to Ray unless this process already is (see the module docstring for which Ray).

    A local Ray gets ``resources.local_ray_cpus`` logical CPUs (default: the cores, at least 4).
    """
    if ray.is_initialized():
        return
    if in_ray_job():
        # ray.init merges a runtime_env given here with the job's and refuses the same variable
        # in both, and the job's already carries what gold-ray submit forwarded: add nothing.
        ray.init(address="auto", log_to_driver=is_verbose())
        return
    env = {**ray_train_env(), **worker_env(), **{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=is_verbose())
    else:
        cpus = cfg.resources.local_ray_cpus if cfg is not None else None
        cpus = cpus or max(4, os.cpu_count() or 1)
        # address="local": a Ray of this run's own even when another runs on this machine (a
        # `ray start --head`, another run), which a plain ray.init() would join instead.
        # No dashboard; and should one be turned on, it listens on loopback only, like Serve.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=is_verbose())
        # Its agents and some workers would outlive a `kill -9` of this process (actors.reaper).
        from actors.reaper import watch

        _WATCHDOGS.append(watch())


def connect_ray(cfg: RunConfig | None = None) -> str:
    """Connect as :func:`ensure_ray` does and return the GCS address connected to (for logs)."""
    ensure_ray(cfg)
    return ray.get_runtime_context().gcs_address
