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

Exit status (what Ray's job status sees), as for ``gold-ray distill`` (:mod:`gold_ray.entry`):
0 on success; 2 for bad input, a config, task, data, model or run-directory problem (one line on
stderr that names the key or path); 1 for an internal error (a bug): its traceback goes to stderr,
which is the job's log, and to ``logs/gold-ray.log`` in the run directory once the config named it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from gold_ray.config import ConfigError, RunConfig
from gold_ray.entry import config_path, load_run_config, print_event, report_failure, summary_text
from gold_ray.run import store
from gold_ray.run.loop import identity_changes

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


def main(argv: list[str] | None = None) -> int:
    """Load the config, connect to Ray and run the distillation; see the module docstring.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    run_dir: Path | None = None
    try:
        cfg = load_run_config(resolve_config_ref(args.config), args.set, overwrite=args.overwrite)
        run_dir = Path(cfg.output.dir)
        resume = args.resume or committed_run_matches(cfg)
        # Imported here: a config error is reported before Ray is imported (seconds).
        from actors.connect import connect_ray

        address = connect_ray(cfg)
        out = Path(cfg.output.dir).resolve()
        print(f"gold-ray job: task {cfg.task.name}, strategy {cfg.strategy.name}, teacher {cfg.teacher.model} "
              f"({cfg.teacher.engine}) -> {out} on Ray at {address}", flush=True)
        if resume:
            state = store.load_state(Path(cfg.output.dir)) or {}
            print(f"gold-ray job: resuming the committed run in {out} (iteration {state.get('iteration')}, "
                  f"last stage {state.get('stage')}, finished {state.get('finished', False)})", flush=True)
        from actors.driver import run_on_ray

        metrics = run_on_ray(cfg, resume=resume, on_event=print_event)
    except Exception as err:  # noqa: BLE001 - every failure becomes the job's exit status
        # debug: a job's stderr is its log, the one place a cluster user is sure to read.
        return report_failure(err, prog="gold-ray job", run_dir=run_dir, debug=True,
                              argv=["python -m jobs.distill", *(sys.argv[1:] if argv is None else argv)])
    print(summary_text(metrics, Path(cfg.output.dir).resolve(), prog="gold-ray job", tracking=cfg.tracking.enabled),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
