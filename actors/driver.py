"""The driver actor: runs the distillation loop on Ray and owns the run state.

:class:`DistillationDriver` is a named Ray actor that runs :class:`gold_ray.run.loop.Distiller` with
:class:`actors.runtime.RayRuntime`: the teacher on Ray Serve, generation and probe scoring through
Ray Data and a scorer actor pool, training on Ray Train, evaluation as a Ray task. The loop itself,
its MLflow run included, is the same code as in process.

Events: the loop's own (``plan``, ``progress`` within a stage, one per committed stage) and
``log``: gold-ray's warnings in the driver actor, sent as events because a quiet run does not
forward the actor's output to the terminal (:mod:`gold_ray.reporting.logs`). The caller polls
them all through :meth:`DistillationDriver.events_since`, the one path to its display.

The loop commits its state to the run directory after every stage, so when the driver dies,
:func:`run_on_ray` starts a new driver that resumes after the last committed stage (and a
resubmitted job does the same through ``--resume``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from actors.connect import ensure_ray, on_this_node
from gold_ray.config import RunConfig
from gold_ray.reporting.logs import library_output

if TYPE_CHECKING:
    from gold_ray.run.loop import EventFn

logger = logging.getLogger(__name__)


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

    def _log_event(self, record: logging.LogRecord) -> None:
        self.events.append(("log", {"level": record.levelname, "logger": record.name, "message": record.getMessage()}))

    def events_since(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        """Progress events after the first ``n`` (the caller polls these for its display)."""
        return self.events[n:]

    def pid(self) -> int:
        """The actor's process id (fault tests kill it)."""
        return os.getpid()

    def run(self) -> dict[str, Any]:
        """Run the loop on the Ray runtime (teacher started and stopped by it); returns the run metrics."""
        # Imported here, not at the top: the process that launches a run (the CLI) imports this
        # module too, and the loop brings torch, which only the driver actor needs.
        from actors.runtime import RayRuntime
        from gold_ray.run.loop import Distiller

        runtime = RayRuntime(self.app_name, self.engine_factory)
        with library_output(self.cfg.output.dir), _forward_logs(self._log_event):
            return Distiller(self.cfg, runtime=runtime, resume=self.resume, on_event=self._event).run()


OWN_LOGGERS = ("gold_ray", "actors")
"""gold-ray's loggers: their warnings in the driver actor become ``log`` events."""


class _EventLogHandler(logging.Handler):
    def __init__(self, send: Any):
        super().__init__(logging.WARNING)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        self.send(record)


@contextlib.contextmanager
def _forward_logs(send: Any) -> Iterator[None]:
    """gold-ray's warnings go to ``send`` (and no longer to the actor's stderr) for the duration."""
    handler = _EventLogHandler(send)
    saved = []
    for name in OWN_LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.propagate))
        log.addHandler(handler)
        log.propagate = False
    try:
        yield
    finally:
        for log, propagate in saved:
            log.removeHandler(handler)
            log.propagate = propagate


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
    attempt, prepared = 0, False
    while True:
        driver = DistillationDriver.options(name=driver_name(cfg), scheduling_strategy=on_this_node()).remote(
            cfg.model_dump(mode="json"), resume, engine_factory
        )
        result = driver.run.remote()
        seen = 0
        try:
            while True:
                ready, _ = ray.wait([result], timeout=poll_s)
                events = ray.get(driver.events_since.remote(seen))
                seen += len(events)
                # The plan comes after the run directory is prepared (an old run replaced there).
                prepared = prepared or any(stage == "plan" for stage, _ in events)
                for stage, info in newest_progress(events):
                    on_event(stage, info)
                if ready:
                    metrics = ray.get(result)
                    break
        except ray.exceptions.RayActorError:
            attempt += 1
            if attempt > max_driver_restarts:
                raise
            logger.warning("driver actor died; resuming the run (restart %d of %d)", attempt, max_driver_restarts)
            resume = resume_after_restart(cfg, resume, prepared)
            time.sleep(poll_s)
            continue
        finally:
            ray.kill(driver, no_restart=True) if _alive(driver) else None
        return metrics


def resume_after_restart(cfg: RunConfig, resume: bool, prepared: bool) -> bool:
    """Whether the driver that replaces a dead one continues the run in ``cfg.output.dir``.

    Args:
        cfg: The run's config.
        resume: Whether the run was asked to resume.
        prepared: Whether the dead driver got as far as preparing the run directory (its ``plan``
            event came).

    Returns:
        True when asked to; with ``output.overwrite``, only once this run's own driver has
        replaced the old run there (before that, the next driver must replace it, not continue
        it); otherwise whenever the directory exists (the dead driver may have written it).
    """
    if resume:
        return True
    if cfg.output.overwrite:
        return prepared
    return Path(cfg.output.dir).exists()


def newest_progress(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``events`` without the ``progress`` events a later one in the same batch supersedes.

    A poll can bring many counts of one stage at once (all of them when the display waited on a
    busy machine); shown one by one they would print the oldest count as the newest, and rates
    measured over their arrival times would be wild. A count is superseded by the next event when
    that is a count of the same stage, iteration and unit.
    """
    def key(event: tuple[str, dict[str, Any]]) -> tuple | None:
        stage, info = event
        return (info.get("stage"), info.get("iteration"), info.get("unit")) if stage == "progress" else None

    return [e for i, e in enumerate(events)
            if key(e) is None or i + 1 == len(events) or key(events[i + 1]) != key(e)]


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means there is nothing left to kill
        return False
