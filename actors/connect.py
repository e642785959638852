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

import math
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


def held_cpus(cfg: RunConfig) -> float:
    """The CPUs a run books at once on Ray: the teacher's replicas at their most, the warm scorers,
    the kept training workers and the teacher caller of a generate stage."""
    from actors.pipeline import CALLER_NUM_CPUS

    serve, res = cfg.teacher.serve, cfg.resources
    return (serve.max_replicas * serve.num_cpus + res.scorer_max_actors * res.scorer_num_cpus
            + res.train_workers * res.train_cpus_per_worker + CALLER_NUM_CPUS)


def local_ray_cpus(cfg: RunConfig | None) -> int:
    """Logical CPUs of a Ray started for ``cfg``: ``resources.local_ray_cpus`` when set, else enough
    for :func:`held_cpus` and at least the machine's cores, and 4.

    Logical CPUs are Ray's bookkeeping, not cores: the actors a run keeps share the machine's cores
    and rarely compute at the same time (the scorers and the trainers wait while the teacher
    writes), but each must be placed, or the run waits for ever.
    """
    if cfg is not None and cfg.resources.local_ray_cpus:
        return cfg.resources.local_ray_cpus
    need = math.ceil(held_cpus(cfg)) if cfg is not None else 0
    return max(4, os.cpu_count() or 1, need)


def on_this_node() -> ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy:
    """Pin an actor to the node of the calling process.

    For the actors a run cannot lose (the driver actor, the training order book): a zero-CPU actor
    otherwise goes wherever Ray's default policy sends it, a worker node included, and dies with
    that node. Pinned, it shares the fate of the process that started it, which notices its loss
    (:func:`actors.driver.run_on_ray` starts a new driver). A run is started from the CLI's machine,
    or by a Ray job's entrypoint, which runs on the head node unless the job asks for entrypoint
    resources. Not ``soft``: a soft affinity sent the first such actor of a fresh cluster to
    another node (Ray 2.60, ``ray.cluster_utils.Cluster`` on this machine).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def ensure_ray(cfg: RunConfig | None = None) -> None:
    """Connect to Ray unless this process already is (see the module docstring for which Ray).

    A local Ray gets :func:`local_ray_cpus` logical CPUs.
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
        cpus = local_ray_cpus(cfg)
        # address="local": a Ray of this run's own even when another runs on this machine (a
        # `ray start --head`, another run), which a plain ray.init() would join instead.
        # No dashboard; and should one be turned on, it listens on loopback only, like Serve.
        # The raylet prints a warning to this process's stdout, whatever log_to_driver says, once a node
        # holds 4x its "maximum startup concurrency" worker processes; Ray takes that as min(cores,
        # CPUs), 2 on a 2-core machine, where a run keeps 10 to 12 workers (its fractional-CPU actors
        # and Ray's own) by design. Counted in the logical CPUs it books, the run is within bounds.
        # No idle workers prestarted for this process: Ray starts one per logical CPU, each importing
        # Ray while the run's own actors start on the same cores, and a run's actors start their own
        # workers anyway. Off, iteration 0 of a small demo on 2 cores ended 5 s sooner on average
        # (0.5 to 8 s, 3 interleaved pairs, benchmarks/perf/README.md).
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=is_verbose(),
                 _system_config={"worker_maximum_startup_concurrency": cpus, "prestart_worker_first_driver": False})
        # Its agents and some workers would outlive a `kill -9` of this process (actors.reaper).
        from actors.reaper import watch

        _WATCHDOGS.append(watch())


def connect_ray(cfg: RunConfig | None = None) -> str:
    """Connect as :func:`ensure_ray` does and return the GCS address connected to (for logs)."""
    ensure_ray(cfg)
    return ray.get_runtime_context().gcs_address
