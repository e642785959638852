"""Run one GOLD distillation on the Ray cluster at ``$RAY_ADDRESS``, with the fake teacher, as its own driver.

Usage: ``python tests/actors/cluster_run.py CONFIG.json METRICS.json [--resume]``

The multi-node tests start a ``ray.cluster_utils.Cluster`` from the test process, which may
already be connected to the session's single-node Ray; a process connects to one cluster only, so
the run's driver is this separate process (as a user's ``gold-ray distill`` would be). The teacher
is the deterministic fake engine (``gold_ray.testing``), so a run here and an in-process run of
the same config write the same records.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str]) -> int:
    """Run the config in ``argv[0]`` on Ray and write its metrics to ``argv[1]``."""
    from actors.driver import run_on_ray
    from gold_ray.config import RunConfig
    from gold_ray.run.tasks import load_task
    from gold_ray.testing import FakeTeacherEngine

    cfg = RunConfig.model_validate(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    factory = functools.partial(FakeTeacherEngine, task=load_task(cfg.task.name))
    metrics = run_on_ray(cfg, resume="--resume" in argv[2:], engine_factory=factory)
    Path(argv[1]).write_text(json.dumps(metrics, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
