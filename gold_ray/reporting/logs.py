"""What a run prints: gold-ray's own lines; other libraries' output goes to the run's log file.

By default (:func:`library_output` with ``verbose=False``), for the duration of a run:

- progress bars of transformers ("Loading weights"), ``datasets``, the Hugging Face Hub, MLflow
  and Ray Data are off (their documented switches: ``transformers.utils.logging.disable_progress_bar``,
  ``datasets.disable_progress_bars``, ``HF_HUB_DISABLE_PROGRESS_BARS``,
  ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``, ``RAY_DATA_DISABLE_PROGRESS_BARS`` and
  ``DataContext.enable_progress_bars``);
- the log records of those libraries and of Ray (transformers' "LOAD REPORT" of a fresh
  classification head, MLflow's database set-up, Ray's start-up and Ray Train's warnings) and
  Python warnings go to ``RUN_DIR/logs/libraries.log`` instead of the terminal;
- a Ray run does not forward its workers' output to the terminal (``ray.init(log_to_driver=False)``,
  :mod:`actors.connect`): it stays in Ray's own session logs, and gold-ray's own warnings from
  the driver actor reach the terminal as ``log`` events (:mod:`actors.driver`); the raylet's
  warning about the number of worker processes, which Ray prints whatever ``log_to_driver``
  says, is not raised by a local Ray (its threshold is set there, :func:`actors.connect.ensure_ray`).

``verbose=True`` (``gold-ray distill --verbose``) leaves every library as it is, bars included.
The environment a Ray run gives its workers when quiet is :func:`worker_env`.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LIBRARY_LOG = Path("logs") / "libraries.log"
"""Where, inside a run directory, other libraries' log records go by default."""

VERBOSE_ENV = "GOLD_RAY_VERBOSE"
"""Set to ``1`` by ``--verbose``: read by the Ray side (connecting, the driver actor) in its own process."""

LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "mlflow", "alembic", "urllib3", "filelock",
                   "httpx", "torch", "py.warnings", "ray", "ray.data", "ray.train", "ray.serve", "ray.tune")
"""Loggers routed to :data:`LIBRARY_LOG` (their child loggers follow them)."""

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}
"""Variables that turn progress bars off, here (for the run's duration) and in Ray workers."""

WORKER_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error"}
"""Only for Ray workers, whose output gold-ray does not route: transformers reads it once, when first
used, so in this process it would outlast the run (here its records are routed instead)."""


def is_verbose() -> bool:
    """Whether ``--verbose`` asked for every library's output (:data:`VERBOSE_ENV`)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def worker_env() -> dict[str, str]:
    """The variables Ray workers get: :data:`QUIET_ENV` and :data:`WORKER_QUIET_ENV`, or :data:`VERBOSE_ENV` when verbose."""
    return {VERBOSE_ENV: "1"} if is_verbose() else {**QUIET_ENV, **WORKER_QUIET_ENV}


class RunLogHandler(logging.handlers.WatchedFileHandler):
    """Appends to a run's log file, created on the first record and reopened (folder included)
    when the file goes away: ``--overwrite`` removes the whole run directory after the run started."""

    def __init__(self, path: str | Path):
        super().__init__(str(path), mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def _open(self):  # noqa: ANN202 - logging's own signature
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """Drop a record that cannot be written (logging would print a traceback to stderr)."""


def _progress_bars_off() -> list:
    """Turn off the bars of libraries already imported (the variables cover later imports); returns undo steps."""
    undo = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            undo.append(tf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        if ctx.enable_progress_bars:
            ctx.enable_progress_bars = False
            undo.append(lambda: setattr(ctx, "enable_progress_bars", True))
    return undo


@contextlib.contextmanager
def library_output(run_dir: str | Path | None, *, verbose: bool | None = None) -> Iterator[Path | None]:
    """Route other libraries' output to ``RUN_DIR/logs/libraries.log`` for the duration (see the module docstring).

    Args:
        run_dir: The run directory; None drops the libraries' records instead of writing them.
        verbose: Leave every library as it is; default: :func:`is_verbose`.

    Yields:
        The log file (None when verbose or without a run directory).
    """
    if verbose is None:
        verbose = is_verbose()
    if verbose:
        yield None
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    if "transformers" not in sys.modules:
        # transformers adds its own stderr handler when first used: add it now, to replace it below.
        from transformers.utils import logging as tf_logging

        tf_logging.get_logger("transformers")
    if "mlflow" not in sys.modules:
        # MLflow sets up its loggers' handlers when imported (a run imports it to track): do it now.
        with contextlib.suppress(ImportError):
            import mlflow  # noqa: F401
    undo = _progress_bars_off()
    path = Path(run_dir) / LIBRARY_LOG if run_dir is not None else None
    handler: logging.Handler = RunLogHandler(path) if path is not None else logging.NullHandler()
    handler.setLevel(logging.INFO)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    captured = logging._warnings_showwarning is not None  # noqa: SLF001 - captureWarnings keeps no public state
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(captured)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()
        for step in reversed(undo):
            step()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
