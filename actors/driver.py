"""The driver actor: runs the distillation loop on Ray and owns the run state.

:class:`DistillationDriver` is a named Ray actor that runs :class:`gold_ray.loop.Distiller` with
the Ray pieces behind its hooks:

- generation, parsing and probe scoring stream through :func:`actors.pipeline.generate_iteration`
  (the teacher's Serve deployment, a ``ray.data.llm`` processor, the energy-scorer actor pool);
- training runs as Ray Train jobs (:func:`actors.training.make_ray_train_fn`);
- the MLflow parent run belongs to the driver (:mod:`gold_ray.tracking`).

The loop commits its state to the run directory after every stage, so when the driver dies,
:func:`run_on_ray` starts a new driver that resumes after the last committed stage (and a
resubmitted job does the same through ``--resume``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray

from gold_ray.config import RunConfig
from gold_ray.loop import Distiller, EventFn
from gold_ray.models import resolve_model
from gold_ray.store import STATE_FILE, read_parts
from gold_ray.tasks import load_task
from gold_ray.tracking import build_tracker

logger = logging.getLogger(__name__)

FORWARDED_ENV = ("GOLD_RAY_DATA", "GOLD_RAY_CACHE", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "PYTHONPATH",
                 "RAY_DATA_DISABLE_PROGRESS_BARS")
"""Environment variables a locally started Ray passes on to its workers (the last one: ``gold-ray distill``
sets it while its own progress view is on the terminal, so Ray Data's bars do not scroll under it)."""


def driver_name(cfg: RunConfig) -> str:
    """The driver actor's name: one driver per run directory."""
    digest = hashlib.sha1(str(Path(cfg.output.dir).resolve()).encode()).hexdigest()[:10]
    return f"gold-ray-driver-{digest}"


@ray.remote(num_cpus=0, max_concurrency=4)
class DistillationDriver:
    """A named actor that runs one distillation (see the module docstring).

    Args:
        cfg_data: ``RunConfig.model_dump()`` of the run.
        resume: Continue the run committed in ``cfg.output.dir``.
        engine_factory: Builds the teacher engine inside each Serve replica (tests pass a
            factory of a test engine); None builds the configured engine.
    """

    def __init__(self, cfg_data: dict[str, Any], resume: bool, engine_factory: Any = None):
        self.cfg = RunConfig.model_validate(cfg_data)
        self.resume = resume
        self.engine_factory = engine_factory
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.app_name = f"teacher-{driver_name(self.cfg)[-10:]}"

    def _event(self, stage: str, info: dict[str, Any]) -> None:
        self.events.append((stage, info))

    def events_since(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        """Progress events after the first ``n`` (the caller polls these for its display)."""
        return self.events[n:]

    def pid(self) -> int:
        """The actor's process id (fault tests kill it)."""
        return os.getpid()

    def run(self) -> dict[str, Any]:
        """Start the teacher, run the loop, stop the teacher; returns the run metrics."""
        from ray import serve

        from actors.pipeline import generate_iteration
        from actors.teacher import ConfigEngineFactory, start_teacher
        from actors.training import make_ray_train_fn

        cfg = self.cfg
        task = load_task(cfg.task.name)
        run_dir = Path(cfg.output.dir).resolve()
        student_path = resolve_model(cfg.student.model)
        factory = self.engine_factory
        if factory is None:
            teacher_path = None if cfg.teacher.engine == "openai" else resolve_model(cfg.teacher.model)
            factory = ConfigEngineFactory(cfg.teacher, cfg.seed, model_path=teacher_path)
        tracker = build_tracker(cfg, run_dir) if cfg.tracking.enabled else None

        def produce(prompts, iteration, kind, checkpoint, dedup):
            tmp = run_dir / "tmp" / f"{kind}-it{iteration:03d}.parquet"
            stats = generate_iteration(
                prompts, cfg, task, self.app_name, checkpoint, tmp, iteration=iteration, dedup=dedup
            )
            records = read_parts([tmp])
            tmp.unlink(missing_ok=True)
            keep = ("output_tokens", "seconds", "tokens_per_s", "samples_per_s", "scored", "scorer_actors",
                    "retried", "streamed")
            return records, {k: stats.get(k) for k in keep}

        distiller = None
        try:
            distiller = Distiller(
                cfg,
                produce=produce,
                train=None,  # set below, once the MLflow parent run exists
                resume=self.resume,
                on_event=self._event,
                tracker=None,
            )
            if tracker is not None:
                run_id = tracker.start(f"{cfg.strategy.name}-{task.name}-seed{cfg.seed}",
                                       resume_run_id=distiller.state.get("mlflow_run_id"))
                distiller.state["mlflow_run_id"] = run_id
                if not self.resume:
                    tracker.log_params(cfg)
                distiller.tracker = tracker
            parent = {"tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id} if tracker else None
            distiller._train = make_ray_train_fn(
                cfg, cfg.task.name, student_path, run_dir / "ray_train", mlflow_parent=parent
            )
            start_teacher(cfg, factory, name=self.app_name)
            metrics = distiller.run()
            # Scratch space of the Ray stages; only an interrupted run needs it (to resume).
            for scratch in ("tmp", "ray_train"):
                shutil.rmtree(run_dir / scratch, ignore_errors=True)
            if tracker is not None:
                tracker.finish(metrics, run_dir, step=cfg.strategy.iterations)
            return metrics
        except BaseException:
            if tracker is not None and tracker.run_id:
                tracker.end("FAILED")
            raise
        finally:
            try:
                serve.delete(self.app_name)
            except Exception:  # noqa: BLE001 - best-effort cleanup; the run's result matters more
                logger.warning("could not delete Serve app %s", self.app_name)


def ensure_ray(cfg: RunConfig | None = None) -> None:
    """Connect to ``$RAY_ADDRESS`` when set, otherwise start (or reuse) a local Ray.

    A local Ray gets ``resources.local_ray_cpus`` logical CPUs (default: the cores, at least 4).
    """
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        cpus = cfg.resources.local_ray_cpus if cfg is not None else None
        cpus = cpus or max(4, os.cpu_count() or 1)
        # No dashboard; and should one be turned on, it listens on loopback only, like Serve.
        ray.init(num_cpus=cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env})


def run_on_ray(
    cfg: RunConfig,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    engine_factory: Any = None,
    max_driver_restarts: int = 2,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Run a distillation on Ray through the driver actor; returns the run metrics.

    When the driver actor dies (its node fails, or it is killed), a new one resumes the run from
    its last committed stage, up to ``max_driver_restarts`` times.
    """
    ensure_ray(cfg)
    on_event = on_event or (lambda stage, info: None)
    attempt = 0
    while True:
        driver = DistillationDriver.options(name=driver_name(cfg)).remote(
            cfg.model_dump(mode="json"), resume, engine_factory
        )
        result = driver.run.remote()
        seen = 0
        try:
            while True:
                ready, _ = ray.wait([result], timeout=poll_s)
                for stage, info in ray.get(driver.events_since.remote(seen)):
                    seen += 1
                    on_event(stage, info)
                if ready:
                    metrics = ray.get(result)
                    break
        except ray.exceptions.RayActorError:
            attempt += 1
            committed = (Path(cfg.output.dir) / STATE_FILE).is_file()
            if attempt > max_driver_restarts:
                raise
            logger.warning("driver actor died; resuming the run (restart %d of %d)", attempt, max_driver_restarts)
            resume = resume or committed or Path(cfg.output.dir).exists()
            time.sleep(poll_s)
            continue
        finally:
            ray.kill(driver, no_restart=True) if _alive(driver) else None
        return metrics


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means there is nothing left to kill
        return False
