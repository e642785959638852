"""gold-ray: distil a large teacher LLM into a small student through OOD-guided generated data.

GOLD here is Gholami et al., NAACL 2024 Findings, "Generalized Knowledge Distillation via
Out-of-Distribution-Guided Language Data Generation" -- not TRL's ``GOLDTrainer``.
"""

from gold_ray.config import RunConfig, load_config

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "__version__"]
