"""``kill -9`` of the ``gold-ray distill`` process on Ray inside a stage, then ``--resume``.

The kill lands where the test says: the driver actor holds at the ``stage.start`` fault point of
iteration 0's train stage (``tests/faults/hooks.py``, action ``hold``) until the CLI process is
dead. Checked: every process of the killed run (the CLI's local Ray: GCS, raylet, agents, workers)
is gone within a short grace period, and the resumed run's records and feedback are those of an
uninterrupted run of the same config (the in-process loop with the same greedy teacher).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gold_ray.config import RunConfig
from gold_ray.run.loop import Distiller
from gold_ray.testing import save_tiny_chat_lm, save_tiny_classifier
from tests.faults.faultkit import committed_records, run_summary, write_eval_file
from tests.faults.hooks import clear_plans, plan_fault

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRACE_S = 30
"""How long a killed run's processes may outlive it (Ray's own reaper needs a second or two)."""


def cli_env() -> dict[str, str]:
    """This environment for a ``gold-ray`` subprocess: its own local Ray (no address), the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def config(root: Path, run_dir: Path) -> dict[str, Any]:
    """A 16-sample, one-iteration run of a tiny greedy chat teacher (same answer for the same prompt on any runtime)."""
    models = root / "models"
    if not (models / "teacher").is_dir():
        save_tiny_chat_lm(models / "teacher")
        save_tiny_classifier(models / "student")
        write_eval_file(models / "eval.jsonl")
    return {
        "seed": 0,
        "task": {"name": "sst2", "eval_path": str(models / "eval.jsonl")},
        "teacher": {"model": str(models / "teacher"), "engine": "hf", "prompt_style": "chat", "max_new_tokens": 12,
                    "temperature": 0.0, "batch_size": 8, "dtype": "float32", "max_retries": 0,
                    "serve": {"num_cpus": 0.25}},
        "student": {"model": str(models / "student"), "max_length": 32, "batch_size": 8, "final_epochs": 1,
                    "epochs_per_iteration": 0, "final_loss": "sce"},
        "strategy": {"name": "gold", "iterations": 1, "probe_fraction": 0.5},
        "budget": {"samples": 16, "max_reject_share": 1.0},
        "resources": {"scorer_min_actors": 1, "scorer_max_actors": 1, "scorer_num_cpus": 0.25,
                      "train_workers": 1, "train_cpus_per_worker": 0.5, "local_ray_cpus": 4},
        "tracking": {"enabled": False},
        "output": {"dir": str(run_dir)},
    }


def run_processes(root_pid: int) -> list[Any]:
    """The process and every descendant of ``root_pid`` (psutil processes, still comparable after death)."""
    import psutil

    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def alive(procs: list[Any]) -> list[str]:
    """``name (pid)`` of each of ``procs`` still running (a reused pid is another process: not counted)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != "zombie":
                out.append(f"{' '.join(p.cmdline()[:2])[:80]} ({p.pid})")
        except Exception:  # noqa: BLE001 - gone between the two calls
            pass
    return out


def test_kill_9_of_gold_ray_distill_inside_a_stage_leaves_no_process_and_resume_matches(tmp_path):
    from tests.raykit import wait_until

    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(tmp_path, run_dir), sort_keys=False))
    held, gate = tmp_path / "held.json", tmp_path / "gate"
    plan_fault("stage.start", held, action="hold", gate=gate, iteration=0, stage="train")
    log = (tmp_path / "first.log").open("w")
    try:
        # Its own session, as a terminal gives a command its own process group.
        cli = subprocess.Popen([str(BIN / "gold-ray"), "distill", str(cfg_file), "--quiet"], cwd=tmp_path,
                               env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_until(lambda: held.exists() or cli.poll() is not None, 600)
        assert held.exists(), (tmp_path / "first.log").read_text()[-4000:]
        procs = run_processes(cli.pid)
        state = json.loads((run_dir / "state.json").read_text())
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        gate.touch()
    finally:
        clear_plans()
        log.close()
    assert (state["iteration"], state["stage"]) == (0, "generate"), "killed inside iteration 0's train stage"
    assert len(procs) > 3, "the CLI had started its local Ray"
    wait_until(lambda: not alive(procs), GRACE_S, 0.5)
    left = alive(procs)
    for p in procs[1:]:  # whatever a failing check leaves must not outlive the test
        with contextlib.suppress(Exception):  # already gone
            p.kill()
    assert not left, f"processes of the killed run still alive after {GRACE_S} s: {left}"

    parts_before = {p: (run_dir / p).read_bytes() for p in state["parts"]}
    resumed = subprocess.run([str(BIN / "gold-ray"), "distill", str(cfg_file), "--quiet", "--resume"], cwd=tmp_path,
                             env=cli_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Ray's own start-up lines go to the run's log file, not to the terminal (gold_ray.reporting.logs),
    # and Ray Data's progress bars are off.
    printed = resumed.stdout + resumed.stderr
    assert "Started a local Ray instance" not in printed
    # Nor the raylet's warning about the number of worker processes (actors.connect.ensure_ray).
    for out in (printed, (tmp_path / "first.log").read_text()):
        assert "worker processes have been started" not in out, out
    assert not [line for line in printed.splitlines() if "Running Dataset" in line or "MapBatches(" in line], printed
    assert "Started a local Ray instance" in (run_dir / "logs" / "libraries.log").read_text()
    for part, data in parts_before.items():
        assert (run_dir / part).read_bytes() == data, f"{part} was rewritten"

    reference_dir = tmp_path / "reference"
    reference = Distiller(RunConfig.model_validate(config(tmp_path, reference_dir))).run()
    got = json.loads((run_dir / "metrics.json").read_text())
    assert run_summary(got) == run_summary(reference)
    keys = [(r["id"], r.get("text"), r.get("reject_reason")) for r in committed_records(run_dir)]
    assert sorted(keys) == sorted((r["id"], r.get("text"), r.get("reject_reason"))
                                  for r in committed_records(reference_dir))
    assert len({k[0] for k in keys}) == len(keys) == 16
