"""The teacher alone as a Serve application, for a Serve config file or a KubeRay ``RayService``.

A Serve config (``serveConfigV2``) names an application builder by import path and passes it
``args``::

    applications:
      - name: teacher
        import_path: jobs.serve_app:app_from_args
        args: {config: cluster/configs/gpu.yaml, set: ["teacher.serve.max_replicas=8"]}

The builder loads the run config and returns :func:`actors.teacher.build_teacher_app`, whose
deployment takes its autoscaling, replica resources and engine from ``teacher`` in that config.
"""

from __future__ import annotations

from typing import Any

from gold_ray.config import ConfigError, load_config
from jobs.distill import resolve_config_ref


def app_from_args(args: dict[str, Any]) -> Any:
    """Build the teacher Serve application from Serve-config ``args``.

    Args:
        args: ``config`` (a config path, shipped name or ``env:NAME``; relative paths also resolve
            under ``$GOLD_RAY_HOME``) and optional ``set`` (a list of ``section.key=value``
            overrides, or one such string).

    Returns:
        The bound teacher application (``ray.serve.Application``).

    Raises:
        ConfigError: ``config`` missing, or the config does not load (the message names the key).
    """
    ref = args.get("config")
    if not ref:
        raise ConfigError("serve args: 'config' (a RunConfig path) is required")
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(resolve_config_ref(str(ref)), [str(o) for o in overrides])
    # Imported here: it imports Ray Serve, which only the Serve controller's process needs.
    from actors.teacher import build_teacher_app

    return build_teacher_app(cfg)
