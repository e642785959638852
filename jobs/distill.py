"""The Ray job entrypoint of a distillation.

Usage (what ``gold-ray submit``, a KubeRay ``RayJob`` or ``ray job submit`` runs)::

    python -m jobs.distill --config CONFIG [--set key=value ...] [--resume] [--overwrite]

CONFIG is a YAML path, a shipped config name (``demo``, ``tiny``) or ``env:NAME``: the YAML text
held in environment variable NAME (``gold-ray submit`` ships a config that lives outside the
uploaded working dir that way, and when the job runs in a container image with no working dir).
A relative path that does not exist in the current folder is looked up under ``$GOLD_RAY_HOME``
(the cluster image sets it to its copy of the project), so manifests can say
``cluster/configs/gpu.yaml`` whatever the job's working folder is.

A resubmitted job resumes by itself: when ``output.dir`` already holds a committed ``state.json``
of the same run (same strategy, seed, task, teacher and student), ``--resume`` is implied. So a
job whose driver crashed is recovered by submitting the same command again.

Exit status: 0 on success; 2 for a config, task, model or run-directory problem (one line on
stderr that names the key or path); 1 with a traceback for anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from gold_ray import store
from gold_ray.cli import config_path, print_event
from gold_ray.config import ConfigError, RunConfig, load_config
from gold_ray.loop import identity_changes
from gold_ray.tasks import TaskFileError

CONFIG_TEXT_ENV = "GOLD_RAY_CONFIG_YAML"
"""Environment variable that carries a submitted config's YAML text (``--config env:...``)."""

CONFIG_NAME_ENV = "GOLD_RAY_CONFIG_NAME"
"""File name of the config carried in :data:`CONFIG_TEXT_ENV`, so errors name the user's file."""

HOME_ENV = "GOLD_RAY_HOME"
"""Folder of a project copy (set in the cluster image) that relative config paths fall back to."""

ENV_PREFIX = "env:"


def resolve_config_ref(ref: str) -> Path:
    """The config file a ``--config`` reference names.

    Args:
        ref: A path, a shipped config name, or ``env:NAME`` (YAML text in environment variable NAME,
            written to a private temporary file named after ``$GOLD_RAY_CONFIG_NAME``).

    Returns:
        A path for :func:`~gold_ray.config.load_config` (which reports a missing file).

    Raises:
        ConfigError: ``env:NAME`` with NAME unset or empty.
    """
    if ref.startswith(ENV_PREFIX):
        name = ref[len(ENV_PREFIX):]
        text = os.environ.get(name)
        if not text:
            raise ConfigError(f"--config {ref}: environment variable {name} is not set or empty")
        folder = Path(tempfile.mkdtemp(prefix="gold-ray-config-"))
        path = folder / Path(os.environ.get(CONFIG_NAME_ENV) or "config.yaml").name
        path.write_text(text, encoding="utf-8")
        return path
    path = config_path(ref) or Path(ref)
    home = os.environ.get(HOME_ENV)
    if not path.is_absolute() and not path.exists() and home and (Path(home) / path).is_file():
        return Path(home) / path
    return path


def committed_run_matches(cfg: RunConfig) -> bool:
    """Whether ``cfg.output.dir`` holds a committed state of this same run, so it can be resumed.

    Returns:
        False for a fresh folder, a folder of a different run (the loop then refuses it), or when
        ``output.overwrite`` asks to replace what is there.
    """
    if cfg.output.overwrite:
        return False
    run_dir = Path(cfg.output.dir)
    state = store.load_state(run_dir)
    if state is None or state.get("strategy") != cfg.strategy.name or state.get("seed") != cfg.seed:
        return False
    return not identity_changes(run_dir, cfg)


def connect_ray() -> str:
    """Connect to Ray: the job's cluster, ``$RAY_ADDRESS``, or else a new local one.

    Returns:
        The GCS address connected to.
    """
    import ray

    if not ray.is_initialized():
        # Inside a Ray job the supervisor sets RAY_ADDRESS (and the job's runtime_env, which
        # init picks up so workers get the uploaded working dir); "auto" reads it.
        in_job = bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        if in_job:
            ray.init(address="auto")
        else:
            ray.init()
    return ray.get_runtime_context().gcs_address


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jobs.distill``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="config YAML, a shipped config name (demo, tiny) or env:NAME (YAML text in $NAME)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set budget.samples=64 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir (implied when it holds this same run)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different run in output.dir")
    return parser


def _run_errors() -> tuple[type[BaseException], ...]:
    # Imported on demand: the loop pulls in torch, which a config error should not wait for.
    # A failed import must not hide the error being handled, so it only narrows the list.
    errors: list[type[BaseException]] = [FileNotFoundError]
    try:
        from gold_ray.loop import RunDirError, TooManyRejectsError
        from gold_ray.models import ModelResolutionError
    except ImportError:
        return tuple(errors)
    return (RunDirError, TooManyRejectsError, ModelResolutionError, *errors)


def _report(cfg: RunConfig, metrics: dict[str, Any]) -> None:
    out = Path(cfg.output.dir).resolve()
    print(f"gold-ray job: done. run directory: {out}")
    print(f"  student (HF format): {out / 'student'}")
    print(f"  data (Parquet):      {out / 'data'}")
    print(f"  metrics:             {out / 'metrics.json'}")
    mlflow = metrics.get("mlflow") or {}
    if mlflow.get("run_id"):
        print(f"  MLflow run:          {mlflow['run_id']} at {mlflow.get('tracking_uri')}")
    elif cfg.tracking.enabled:
        print("  MLflow run:          (the driver reported none)")
    for key in ("accuracy", "macro_f1", "exact_match", "numeric_match"):
        value = (metrics.get("final") or {}).get(key)
        if isinstance(value, int | float):
            print(f"  final {key}: {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Load the config, connect to Ray and run the distillation; see the module docstring.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    overrides = list(args.set or [])
    if args.overwrite:
        overrides.append("output.overwrite=true")
    try:
        cfg = load_config(resolve_config_ref(args.config), overrides)
        resume = args.resume or committed_run_matches(cfg)
        address = connect_ray()
        out = Path(cfg.output.dir).resolve()
        print(f"gold-ray job: task {cfg.task.name}, strategy {cfg.strategy.name}, teacher {cfg.teacher.model} "
              f"({cfg.teacher.engine}) -> {out} on Ray at {address}", flush=True)
        if resume:
            state = store.load_state(Path(cfg.output.dir)) or {}
            print(f"gold-ray job: resuming the committed run in {out} (iteration {state.get('iteration')}, "
                  f"last stage {state.get('stage')}, finished {state.get('finished', False)})", flush=True)
        from actors.driver import run_on_ray

        metrics = run_on_ray(cfg, resume=resume, on_event=print_event)
    except (ConfigError, TaskFileError) as err:
        print(f"gold-ray job: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # An error raised in a Ray actor arrives as a RayTaskError that is also an instance of
        # the original class; print the original's message, not the remote traceback.
        if isinstance(err, _run_errors()):
            print(f"gold-ray job: error: {getattr(err, 'cause', None) or err}", file=sys.stderr)
            return 2
        raise
    _report(cfg, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
