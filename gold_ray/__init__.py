"""gold-ray: distil a large teacher LLM into a small student through OOD-guided generated data.

GOLD here is Gholami et al., NAACL 2024 Findings, "Generalized Knowledge Distillation via
Out-of-Distribution-Guided Language Data Generation" -- not TRL's ``GOLDTrainer``.
"""

from __future__ import annotations

from typing import Any

from gold_ray.config import RunConfig, load_config

__version__ = "0.1.0"


def distill(cfg: RunConfig, *, local: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run a distillation as ``gold-ray distill`` does and return its metrics.

    Args:
        cfg: The run config (``load_config(path, overrides)`` builds one).
        local: Run the reference loop in this process instead of on Ray.
        resume: Continue the run committed in ``cfg.output.dir``.
    """
    if local:
        from gold_ray.loop import distill_in_process

        return distill_in_process(cfg, resume=resume)
    # Imported lazily: the library itself never imports Ray.
    from actors.driver import run_on_ray

    return run_on_ray(cfg, resume=resume)


__all__ = ["RunConfig", "__version__", "distill", "load_config"]
