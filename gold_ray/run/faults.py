"""Fault points: where tests may inject a failure, without production code carrying test switches.

Production code calls :func:`fault_point` at the places a failure is worth testing (a training
step, a scoring batch, a stage commit). Unless ``$GOLD_RAY_FAULT_HOOK`` names a hook
(``module:function``), the call does nothing. The test suite sets it, in its own process and in
every Ray worker, to its one hook (``tests/faults/hooks.py``), which reads the faults a test
planned and raises or kills the process when one matches.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

HOOK_ENV = "GOLD_RAY_FAULT_HOOK"
"""Environment variable naming the fault hook as ``module:function``; unset in production."""

_hooks: dict[str, Callable[[str, dict[str, Any]], None]] = {}


def fault_point(name: str, **context: Any) -> None:
    """Give the test hook, when one is set, the chance to fail here.

    Args:
        name: The point, e.g. ``train.step``.
        **context: What the hook may match on (rank, epoch, step …).
    """
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    hook = _hooks.get(spec)
    if hook is None:
        module, _, function = spec.partition(":")
        hook = _hooks[spec] = getattr(importlib.import_module(module), function)
    hook(name, context)
