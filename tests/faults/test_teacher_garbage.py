"""A teacher that writes garbage: every broken answer becomes a reject with its reason, the run goes
on, and a teacher that writes almost nothing usable stops the run with a clear message."""

from __future__ import annotations

import pytest

from gold_ray.run import store
from gold_ray.run.loop import Distiller, TooManyRejectsError
from tests.faults.faultkit import GARBAGE_KINDS, SometimesGarbageEngine, committed_records, run_config

# What each kind of garbage must be rejected as.
EXPECTED_REASONS = {
    "empty": {"empty"},
    "binary": {"refusal"},  # "binary or control character"
    "huge": {"too_long"},
    "echo": {"refusal", "empty", "label_leak", "too_long"},
    "other_label": {"label_leak"},
    "json": {"refusal"},  # "assistant chatter (code)"
}


def _uid(record_id: str) -> str:
    """``it001-train-00003`` -> ``it1-train-3``, the uid the engine saw."""
    it, kind, index = record_id.split("-")
    return f"it{int(it[2:])}-{kind}-{int(index)}"


def test_garbage_becomes_rejects_with_reasons_and_the_run_goes_on(tmp_path, tiny_student, eval_file):
    engine = SometimesGarbageEngine(share=0.5)
    run_dir = tmp_path / "run"
    metrics = Distiller(run_config(run_dir, tiny_student, eval_file, "budget.samples=48"), engine=engine).run()

    records = committed_records(run_dir)
    assert len(records) == 48
    given = {r["id"]: engine.given[_uid(r["id"])] for r in records}
    assert set(given.values()) == {"good", *GARBAGE_KINDS}, "every kind of garbage was sent"
    for rec in records:
        kind = given[rec["id"]]
        if kind == "good":
            assert rec["reject_reason"] is None, rec
            continue
        assert rec["reject_reason"] in EXPECTED_REASONS[kind], (kind, rec["reject_reason"], rec["reject_detail"])
        assert rec["reject_detail"], "a reject says why"
        assert rec["text"] is None and rec["label"] is None  # never training data
    garbage = sum(k != "good" for k in given.values())
    assert sum(v for k, v in metrics["totals"].items() if k.startswith("rejected_")) == garbage
    assert metrics["final"]["records"] == 48 - garbage
    assert (run_dir / "student" / "config.json").is_file()


@pytest.mark.parametrize("samples", [32, 4], ids=["a full iteration", "a small iteration accepting nothing"])
def test_a_teacher_writing_only_garbage_stops_the_run_clearly(tmp_path, tiny_student, eval_file, samples):
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, tiny_student, eval_file, f"budget.samples={samples}")
    with pytest.raises(TooManyRejectsError) as info:
        Distiller(cfg, engine=SometimesGarbageEngine(share=1.0)).run()
    message = str(info.value)
    n = samples // 4  # train prompts of iteration 0: half the iteration, half of it probes
    assert f"iteration 0 (train): {n} of {n} samples rejected (100% > budget.max_reject_share=0.9)" in message
    assert "reasons: {" in message and "e.g. " in message
    part = store.part_path(run_dir, "rejects-train", 0)
    assert str(part) in message
    kept = store.read_parts([part])
    assert len(kept) == n and all(r["reject_reason"] and r["reject_detail"] for r in kept)
    assert store.load_state(run_dir) is None, "nothing was committed"
