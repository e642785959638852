"""Interrupted Parquet writes and interrupted runs: nothing half-written is read, nothing is lost.

A failing writer stands in for a full disk; a subprocess killed (SIGKILL) in the middle of a part
write stands in for a driver that dies inside a stage. Either way the committed state lists only
complete parts, and a resumed run ends with the same accepted, rejected and feedback samples as
an uninterrupted one, every sample present exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gold_ray.run import store
from gold_ray.run.loop import Distiller
from gold_ray.run.tasks import load_task
from tests.faults.faultkit import SometimesGarbageEngine, committed_records, run_config, run_summary

SST2 = load_task("sst2")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _record(i: int) -> dict:
    return {"id": f"it000-train-{i:05d}", "iteration": 0, "kind": "train", "text": f"sample {i}",
            "label": "positive", "raw_text": f"sample {i}", "score": 0.5, "output_tokens": 3}


def half_then_disk_full(table, where) -> None:
    """A writer that gets half the file onto disk, then fails like a full disk."""
    pq.write_table(table, where)
    data = Path(where).read_bytes()
    Path(where).write_bytes(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def test_a_failing_writer_leaves_no_part_and_keeps_the_old_one(tmp_path):
    data = tmp_path / "data"
    fresh = data / "train-it001.parquet"
    with pytest.raises(OSError, match="No space left"):
        store.write_part(fresh, SST2, [_record(i) for i in range(20)], writer=half_then_disk_full)
    assert not fresh.exists()
    assert list(data.iterdir()) == []  # the half-written temporary file is gone too

    old = data / "train-it000.parquet"
    store.write_part(old, SST2, [_record(0)])
    before = old.read_bytes()
    with pytest.raises(OSError):
        store.write_part(old, SST2, [_record(i) for i in range(20)], writer=half_then_disk_full)
    assert old.read_bytes() == before  # a failed rewrite never damages the committed part
    assert [r["id"] for r in store.read_parts([old])] == ["it000-train-00000"]
    assert sorted(p.name for p in data.iterdir()) == ["train-it000.parquet"]


def test_the_state_never_lists_a_missing_part(tmp_path):
    store.write_part(store.part_path(tmp_path, "train", 0), SST2, [_record(0)])
    good = {"iteration": 0, "stage": "generate", "finished": False, "feedback": [], "dedup": [], "iterations": [],
            "parts": ["data/train-it000.parquet"]}
    store.commit_state(tmp_path, good)
    with pytest.raises(RuntimeError, match="train-it001"):
        store.commit_state(tmp_path, {**good, "stage": "train", "parts": [*good["parts"], "data/train-it001.parquet"]})
    assert store.load_state(tmp_path) == good


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_student, eval_file):
    """An uninterrupted run with the deterministic, sometimes-garbage engine."""
    out = tmp_path_factory.mktemp("reference") / "run"
    metrics = Distiller(run_config(out, tiny_student, eval_file), engine=SometimesGarbageEngine()).run()
    assert sum(v for k, v in metrics["totals"].items() if k.startswith("rejected_")) > 0
    return metrics


def _assert_resumed_like_reference(run_dir: Path, resumed: dict, reference: dict) -> None:
    assert run_summary(resumed) == run_summary(reference)
    records = committed_records(run_dir)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a committed sample is repeated"
    requested = sum(g + p for g, p in run_summary(reference)["requested"])
    assert len(ids) == requested, "every requested sample is stored once, accepted or rejected"


def test_a_part_write_failing_inside_a_stage_loses_nothing(tmp_path, monkeypatch, tiny_student, eval_file,
                                                           reference):
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, tiny_student, eval_file)
    real_write = store.write_part

    def fail_on_probe_rejects_of_it1(path, task, records, writer=pq.write_table):
        # The probe part of iteration 1 is already written when its rejects part fails.
        if path.name == "rejects-probe-it001.parquet":
            writer = half_then_disk_full
        return real_write(path, task, records, writer=writer)

    monkeypatch.setattr(store, "write_part", fail_on_probe_rejects_of_it1)
    with pytest.raises(OSError, match="No space left"):
        Distiller(cfg, engine=SometimesGarbageEngine()).run()
    monkeypatch.setattr(store, "write_part", real_write)

    state = store.load_state(run_dir)
    assert (state["iteration"], state["stage"]) == (1, "train")
    assert all((run_dir / p).is_file() for p in state["parts"])
    assert "data/probe-it001.parquet" not in state["parts"]  # written, but its stage never committed
    assert not list((run_dir / "data").glob(".*"))

    resumed = Distiller(cfg, engine=SometimesGarbageEngine(), resume=True).run()
    _assert_resumed_like_reference(run_dir, resumed, reference)


KILLER = """
import os, signal, sys
from pathlib import Path
import pyarrow.parquet as pq
from tests.faults.faultkit import SometimesGarbageEngine, run_config
from gold_ray.run import store
from gold_ray.run.loop import Distiller

real_write = store.write_part

def half_then_killed(table, where):
    pq.write_table(table, where)
    data = Path(where).read_bytes()
    Path(where).write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

def write_part(path, task, records, writer=pq.write_table):
    if path.name == "train-it001.parquet":
        writer = half_then_killed
    return real_write(path, task, records, writer=writer)

store.write_part = write_part
Distiller(run_config(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])), engine=SometimesGarbageEngine()).run()
"""


@pytest.mark.slow
def test_a_process_killed_mid_write_resumes_exactly(tmp_path, tiny_student, eval_file, reference):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run_dir), tiny_student, str(eval_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    # Killed inside the generate stage of iteration 1: a half-written file is on disk, hidden.
    leftovers = list((run_dir / "data").glob(".train-it001.parquet.*"))
    assert leftovers and all(p.stat().st_size > 0 for p in leftovers)
    assert [p.name for p in (run_dir / "data").glob("train-*.parquet")] == ["train-it000.parquet"]
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["iteration"], state["stage"]) == (0, "feedback")
    for part in state["parts"]:
        pq.read_table(run_dir / part)  # every listed part is complete Parquet

    cfg = run_config(run_dir, tiny_student, eval_file)
    resumed = Distiller(cfg, engine=SometimesGarbageEngine(), resume=True).run()
    _assert_resumed_like_reference(run_dir, resumed, reference)
    assert not list((run_dir / "data").glob(".*")), "the resumed run clears the dead run's temporary files"
