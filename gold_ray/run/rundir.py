"""Reading a run directory after the fact: its config, its task and its student.

A run's ``task.name`` may be a path relative to where the run was started, so the loop keeps a
copy of the task spec in the run directory (``task.yaml``); readers use it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gold_ray.errors import UserError
from gold_ray.run import store
from gold_ray.run.tasks import TaskFileError, TaskSpec, load_task


class RunReadError(UserError, ValueError):
    """A folder that is not a readable gold-ray run directory (the message names the file)."""


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``) as a dict.

    Raises:
        RunReadError: no such folder, no ``config.yaml``, or one that is not YAML.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunReadError(f"{root}: no such run directory")
    path = root / store.CONFIG_FILE
    if not path.is_file():
        raise RunReadError(f"{root}: not a gold-ray run directory (no {store.CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RunReadError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RunReadError(f"{path}: expected a mapping")
    return data


def run_task(run_dir: str | Path, config: dict[str, Any] | None = None) -> TaskSpec:
    """The run's task: its ``task.yaml`` copy, else the config's ``task.name``.

    Raises:
        RunReadError: neither loads (the message says why).
    """
    root = Path(run_dir)
    copy = root / store.TASK_FILE
    if copy.is_file():
        try:
            return load_task(copy)
        except TaskFileError as err:
            raise RunReadError(str(err)) from err
    config = config if config is not None else run_config(root)
    name = (config.get("task") or {}).get("name")
    if not name:
        raise RunReadError(f"{root}: no {store.TASK_FILE}, and {store.CONFIG_FILE} names no task.name")
    try:
        return load_task(name)
    except TaskFileError as err:
        raise RunReadError(f"{root}: no {store.TASK_FILE}, and the config's task cannot be loaded: {err}") from err


def student_dir(run_dir: str | Path) -> Path:
    """The final student's folder (``RUN_DIR/student``).

    Raises:
        RunReadError: the run has no final student yet.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunReadError(f"{root}: no such run directory")
    path = root / "student"
    if not (path / "config.json").is_file():
        raise RunReadError(f"{run_dir}: no final student in {path} (the run has not finished)")
    return path
