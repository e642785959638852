"""gold-ray: distil a large teacher LLM into a small student through OOD-guided generated data.

GOLD here is Gholami et al., NAACL 2024 Findings, "Generalized Knowledge Distillation via
Out-of-Distribution-Guided Language Data Generation" -- not TRL's ``GOLDTrainer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from gold_ray.config import RunConfig, load_config

__version__ = "0.1.0"


def distill(
    cfg: RunConfig | str | os.PathLike[str] | None = None,
    *,
    overrides: list[str] | None = None,
    local: bool = False,
    resume: bool = False,
    progress: str = "auto",
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a distillation as ``gold-ray distill`` does and return its metrics.

    Like the command, it shows progress (a live view on a terminal, one line per stage
    elsewhere, e.g. in a notebook) and leaves ``report.html``, the student and the data in
    ``cfg.output.dir``.

    Args:
        cfg: A :class:`RunConfig`, a config YAML path or a shipped config name (``demo``,
            ``tiny``); None uses the defaults.
        overrides: ``section.key=value`` overrides, as ``--set`` takes them (a path or name only).
        local: Run the reference loop in this process instead of on Ray.
        resume: Continue the run committed in ``cfg.output.dir``.
        progress: ``auto``, ``live``, ``plain``, ``json`` or ``quiet`` (see :mod:`gold_ray.reporting.progress`).
        on_event: Also called with ``(stage, info)`` after every stage.

    Returns:
        The run metrics (``metrics.json``): per iteration, totals and ``final``.
    """
    from gold_ray.reporting.progress import progress as open_progress
    from gold_ray.student.training import final_work_ratio

    if not isinstance(cfg, RunConfig):
        from gold_ray.entry import config_path

        cfg = load_config(config_path(str(cfg)) if cfg is not None else None, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config file or name; change a RunConfig with model_copy instead")
    s = cfg.student
    with open_progress(progress, iterations=cfg.strategy.iterations,
                       final_ratio=final_work_ratio(s)) as reporter:

        def events(stage: str, info: dict[str, Any]) -> None:
            reporter(stage, info)
            if on_event is not None:
                on_event(stage, info)

        if local:
            from gold_ray.run.loop import distill_in_process

            return distill_in_process(cfg, resume=resume, on_event=events)
        # Imported lazily: the library itself never imports Ray.
        from actors.driver import run_on_ray

        return run_on_ray(cfg, resume=resume, on_event=events)


__all__ = ["RunConfig", "__version__", "distill", "load_config"]
