"""What the two entry points of a distillation share: ``gold-ray distill`` and ``python -m jobs.distill``.

- config references and overrides: :func:`config_path`, :func:`load_run_config`;
- the environment a Ray run forwards to its workers or job: :data:`FORWARDED_ENV`;
- what a finished run prints: :func:`summary_text` (and :func:`print_event` for job logs);
- how a failure becomes an exit status: :func:`exit_code` and :func:`report_failure`.

Bad user input (a :class:`~gold_ray.errors.UserError`) exits :data:`EXIT_USER_ERROR` with one
line naming the field; anything else is a bug and exits :data:`EXIT_INTERNAL_ERROR`, its full
traceback written to the run's ``logs/gold-ray.log`` (when a run directory is known) and, on
request, to stderr. The exit status is what a shell, CI, or Ray's job status sees.

Ray-free on purpose (the Ray side of connecting is :mod:`actors.connect`): ``gold-ray`` imports
this for every command, and a config error must be reported before Ray or torch is imported.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from gold_ray.config import RunConfig, load_config
from gold_ray.errors import UserError

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
"""Folder of the configs shipped in the package (``demo``, ``tiny``, ...)."""

RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
"""Ray Train settings for every Ray gold-ray starts or joins and every job it submits
(:func:`ray_train_env`). The controller polls its workers every 2 s by default, and a training's
start, each checkpoint and its end each wait for a poll: 20 one-step epochs of a tiny model took
16.7 s at 2 s and 13.2 s at 0.2 s (mean of four, on 2 cores)."""


def ray_train_env() -> dict[str, str]:
    """:data:`RAY_TRAIN_ENV`, each overridden by this process's own variable of the same name."""
    return {k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}


FORWARDED_ENV = (
    "GOLD_RAY_DATA",
    "GOLD_RAY_CACHE",
    "MLFLOW_TRACKING_URI",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_DATASETS_CACHE",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
    "GOLD_RAY_BASELINE_CACHE",
)
"""Environment variables a run on Ray passes on when they are set here.

Used twice: by :func:`actors.connect.ensure_ray` as the ``env_vars`` of the workers of the Ray it
starts or joins, and by ``gold-ray submit`` (:mod:`jobs.submit`) as the ``env_vars`` of a job.
Nothing else is forwarded (API keys included) unless named with ``gold-ray submit --env``.

- ``GOLD_RAY_DATA``: the folder of real evaluation data that relative task data paths join;
- ``GOLD_RAY_CACHE``: where converted embedded models are cached, so workers reuse one copy;
- ``MLFLOW_TRACKING_URI``: the MLflow server a run logs to instead of its run directory's SQLite;
- ``HF_HOME``, ``HF_DATASETS_CACHE``: where Hugging Face caches live here (models, the ``datasets``
  cache an ``eval.hf`` evaluation set is read from), so workers read the same caches;
- ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``: keep workers from reaching the Hugging Face Hub
  (models, datasets) when it is off here;
- ``RAY_DATA_DISABLE_PROGRESS_BARS``: ``gold-ray distill`` sets it while its live view owns the
  terminal, so Ray Data's bars do not scroll under it.
- ``GOLD_RAY_BASELINE_CACHE``: where cached teacher-as-classifier results live when not under
  ``GOLD_RAY_CACHE`` (:mod:`gold_ray.run.baselines`).
"""

EXIT_OK = 0
"""Exit status of a finished command."""

EXIT_INTERNAL_ERROR = 1
"""Exit status of an unexpected failure (a bug): anything that is not a :class:`UserError`."""

EXIT_USER_ERROR = 2
"""Exit status of bad user input (a :class:`UserError`); argparse uses 2 for bad arguments too."""

LOG_FILE = Path("logs") / "gold-ray.log"
"""Where, inside a run directory, the traceback of an internal error is appended."""


def config_path(ref: str | None) -> Path | None:
    """A config file path: a shipped config name (``demo``) or a path (a file there wins)."""
    if ref is None:
        return None
    shipped = SHIPPED_CONFIG_DIR / f"{ref}.yaml"
    if not Path(ref).exists() and shipped.is_file():
        return shipped
    return Path(ref)


def load_run_config(
    path: str | Path | None,
    overrides: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    output_dir: str | Path | None = None,
    fork_from: str | Path | None = None,
) -> RunConfig:
    """Load a run config with the command line's overrides applied.

    Args:
        path: The config file (see :func:`config_path`), or None for the defaults.
        overrides: ``section.key=value`` items (``--set``), in order.
        overwrite: ``--overwrite``: replace a different run in ``output.dir``.
        output_dir: ``--output``: the run directory, applied after ``overrides``.
        fork_from: ``--fork-from``: the run whose first teacher pass a new run starts from
            (``output.fork_from``), made absolute so the run's saved config finds it from anywhere.

    Raises:
        ConfigError: the file or an override is bad; the message names the key.
    """
    items = list(overrides or [])
    if overwrite:
        items.append("output.overwrite=true")
    if output_dir:
        items.append(f"output.dir={output_dir}")
    if fork_from:
        items.append(f"output.fork_from={Path(fork_from).expanduser().absolute()}")
    return load_config(path, items)


def print_event(stage: str, info: dict[str, Any]) -> None:
    """Print one line for a finished stage or a warning (the plain progress view, for job logs);
    the within-stage ``progress`` events and the ``plan`` are left out of a job's log."""
    from gold_ray.reporting.progress import STAGE_EVENTS, format_line

    if stage == "log":
        print(f"gold-ray job: {str(info.get('level', 'warning')).lower()}: {info.get('message', '')}", flush=True)
    elif stage in STAGE_EVENTS:
        print(format_line(stage, info), flush=True)


def summary_text(metrics: dict[str, Any], out: Path, *, prog: str = "gold-ray", tracking: bool = False) -> str:
    """What a finished run prints: where its outputs are, and its final scores.

    Args:
        metrics: The run metrics (``final`` scores, ``mlflow`` run when tracked).
        out: The run directory, as it should be shown.
        prog: The line prefix (``gold-ray``, or ``gold-ray job`` in a job's log).
        tracking: Whether MLflow tracking was on, so a missing MLflow run is said, not left out.
    """
    lines = [f"{prog}: done. run directory: {out}",
             f"  student (HF format): {out / 'student'}",
             f"  data (Parquet):      {out / 'data'}",
             f"  metrics:             {out / 'metrics.json'}"]
    if (out / "report.html").is_file():
        lines.append(f"  report:              {out / 'report.html'}")
    mlflow = metrics.get("mlflow") or {}
    if mlflow.get("run_id"):
        lines.append(f"  MLflow run:          {mlflow['run_id']} in {mlflow.get('tracking_uri')}")
    elif tracking:
        lines.append("  MLflow run:          (the driver reported none)")
    final = metrics.get("final") or {}
    for key in ("accuracy", "macro_f1", "exact_match", "numeric_match"):
        if isinstance(final.get(key), int | float):
            lines.append(f"  final {key}: {final[key]:.4f}")
    lines += reference_lines(final)
    return "\n".join(lines)


def reference_lines(final: dict[str, Any]) -> list[str]:
    """The final student beside the teacher as a few-shot classifier and the majority class, on the same
    examples (:func:`gold_ray.run.baselines.reference_rows`); empty when the run recorded none."""
    from gold_ray.run.baselines import reference_rows, reference_verdict, student_metric

    rows = reference_rows(final)
    if not rows:
        return []
    base = final.get("baselines") or {}
    metric = (student_metric(final) or ("accuracy", 0.0))[0]
    where = "the evaluation set" if base.get("on") == "eval set" else \
        "a synthetic hold-out (no real evaluation set: generated data, not comparable with real data)"
    lines = [f"  {metric} on {where}, {base.get('n')} examples:"]
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        shown = f"{value:.4f}" if isinstance(value, int | float) else "–"
        lines.append(f"    {name:<{width}}  {shown}  ({note})")
    verdict = reference_verdict(final)
    return [*lines, f"  {verdict}"] if verdict else lines


def _cause(err: BaseException) -> BaseException:
    # An error raised in a Ray task or actor arrives as a RayTaskError whose `cause` is the
    # original exception (and which is usually also an instance of the original's class).
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is bad user input (a :class:`UserError`, also when raised on Ray)."""
    return isinstance(err, UserError) or isinstance(_cause(err), UserError)


def exit_code(err: BaseException) -> int:
    """The exit status of a command that failed with ``err``: 2 for bad user input, else 1."""
    return EXIT_USER_ERROR if is_user_error(err) else EXIT_INTERNAL_ERROR


def write_traceback(err: BaseException, run_dir: str | Path, argv: Sequence[str] | None = None) -> Path:
    """Append ``err``'s full traceback to ``run_dir``'s log file (:data:`LOG_FILE`).

    Args:
        err: The exception.
        run_dir: The run directory (created if missing).
        argv: The command line, written above the traceback.

    Returns:
        The log file.

    Raises:
        OSError: the log cannot be written.
    """
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(argv if argv is not None else sys.argv)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} internal error in: {command}\n")
        fh.write("".join(traceback.format_exception(err)))
    return path


def report_failure(
    err: BaseException,
    *,
    prog: str = "gold-ray",
    run_dir: str | Path | None = None,
    debug: bool = False,
    argv: Sequence[str] | None = None,
    stream: TextIO | None = None,
) -> int:
    """Tell the user about a failed command and return its exit status (see :func:`exit_code`).

    Bad user input: one line, ``PROG: error: MESSAGE``. Anything else: ``PROG: internal error
    (this is a bug; please report it): TYPE: MESSAGE``, the traceback appended to the run's
    :data:`LOG_FILE` when ``run_dir`` is given, printed to ``stream`` with ``debug`` (or when
    the log cannot be written), and a line saying where it is.

    Args:
        err: The exception the command failed with.
        prog: The prefix of the lines (``gold-ray`` or ``gold-ray job``).
        run_dir: The run's directory once the config named it; None before.
        debug: Print the traceback of an internal error to ``stream`` too.
        argv: The command line, for the log (default ``sys.argv``).
        stream: Where the lines go (default stderr).

    Returns:
        :data:`EXIT_USER_ERROR` or :data:`EXIT_INTERNAL_ERROR`.
    """
    out = stream or sys.stderr
    cause = _cause(err)
    if is_user_error(err):
        # The message is the whole story; a remote (Ray) traceback would bury it.
        print(f"{prog}: error: {cause}", file=out)
        return EXIT_USER_ERROR
    print(f"{prog}: internal error (this is a bug; please report it): {type(cause).__name__}: {cause}", file=out)
    log = None
    if run_dir is not None:
        try:
            log = write_traceback(err, run_dir, argv)
        except OSError as log_err:
            print(f"{prog}: could not write the traceback to {Path(run_dir) / LOG_FILE}: {log_err}", file=out)
    if debug or (log is None and run_dir is not None):
        out.write("".join(traceback.format_exception(err)))
    if log is not None:
        print(f"{prog}: the full traceback is in {log}", file=out)
    elif not debug:
        print(f"{prog}: run it again with --debug to see the traceback", file=out)
    out.flush()
    return EXIT_INTERNAL_ERROR
