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
import re
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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` and ``false`` (any case).

    PyYAML follows YAML 1.1, where ``yes``, ``no``, ``on`` and ``off`` are booleans too: a task
    whose labels are ``yes`` and ``no`` would get two booleans for label names.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


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
        return json.loads(text) if fmt == "json" else yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise invalid(err) from err
