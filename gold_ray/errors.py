"""The user-error family: what a user fixes (their input), as opposed to a bug in gold-ray.

Every error raised *deliberately* for bad user input (a config key or value, a task file, a data
file, a model reference, a run directory, a command-line argument) is a :class:`UserError`. The
``gold-ray`` command and the Ray job entrypoint (:mod:`gold_ray.entry`) print its message alone
and exit 2; any other exception is a bug: exit 1, with its traceback kept.

The concrete errors live beside the code that raises them (``ConfigError`` in
:mod:`gold_ray.config`, ``TaskFileError`` in :mod:`gold_ray.run.tasks`, ...) and also derive from
the builtin they replaced (``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so callers
that catch the builtin keep working. This module imports nothing from gold_ray, so any module can
use it; :func:`parse_file` reads a JSON or YAML file the user named into one of these errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml


class UserError(Exception):
    """Bad user input; the message names the field, file or argument to fix (exit status 2)."""


class InputError(UserError, ValueError):
    """A bad value in user input that has no more specific error class (a data file line, a model).

    A ``ValueError`` too: it replaces plain ``ValueError`` raises, and ``except ValueError``
    callers must still catch it.
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (in the config, a task or on the command line) that does not exist.

    A ``FileNotFoundError`` too, for callers that catch that.
    """


def parse_file(path: Path, fmt: Literal["json", "yaml"], invalid: Callable[[Exception], UserError]) -> Any:
    """The JSON or YAML document in the UTF-8 file ``path``.

    Args:
        path: The file.
        fmt: ``json`` or ``yaml``.
        invalid: Builds the error to raise from the decoding or parsing error (its message names the file).

    Raises:
        UserError: ``invalid(err)``, chained to ``err``: the file is not UTF-8 or not valid ``fmt``.
    """
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise invalid(err) from err
