"""The driver's event batches: what the poll loop passes on to the display; what a restarted driver resumes."""

import subprocess
import sys

from actors.driver import newest_progress, resume_after_restart
from gold_ray.config import RunConfig


def _count(stage: str, done: int, iteration: int = 0, unit: str = "steps") -> tuple[str, dict]:
    return ("progress", {"stage": stage, "iteration": iteration, "unit": unit, "done": done, "total": 10})


def test_a_batch_keeps_only_the_newest_count_of_each_running_stage():
    batch = [_count("train", 0), _count("train", 4), _count("train", 9), ("train", {"loss": 0.1}),
             _count("probe", 1, unit="scored"), _count("probe", 3, unit="scored"), _count("probe", 2, unit="samples")]
    kept = newest_progress(batch)
    assert kept == [_count("train", 9), ("train", {"loss": 0.1}), _count("probe", 3, unit="scored"),
                    _count("probe", 2, unit="samples")]


def test_counts_of_another_iteration_and_other_events_are_never_dropped():
    batch = [_count("train", 5, iteration=0), _count("train", 1, iteration=1), ("log", {"message": "m"}),
             ("log", {"message": "m"}), _count("train", 2, iteration=1)]
    assert newest_progress(batch) == batch
    assert newest_progress([]) == []


def test_a_restarted_driver_replaces_an_old_run_until_its_own_run_was_prepared(tmp_path):
    old_run = tmp_path / "run"
    old_run.mkdir()  # an earlier run lives there
    overwrite = RunConfig(output={"dir": str(old_run), "overwrite": True})
    # The dead driver never reached its plan: the old run is still there and must still be replaced.
    assert resume_after_restart(overwrite, resume=False, prepared=False) is False
    assert resume_after_restart(overwrite, resume=False, prepared=True) is True
    # Without --overwrite, whatever the dead driver wrote is this run's own.
    plain = RunConfig(output={"dir": str(old_run)})
    assert resume_after_restart(plain, resume=False, prepared=False) is True
    assert resume_after_restart(RunConfig(output={"dir": str(tmp_path / "none")}), resume=False, prepared=False) is False
    assert resume_after_restart(overwrite, resume=True, prepared=False) is True


def test_the_process_that_launches_a_run_on_ray_loads_no_torch():
    # `gold-ray distill` imports the driver module before it starts Ray; the loop (and torch, about
    # 1.7 CPU-seconds and 230 MB) is needed only inside the driver actor.
    code = "import sys, gold_ray.cli, actors.driver; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported"
