"""Retries of teacher calls in the generation pipeline: bounded, with doubling backoff.

The retry loop (``actors.pipeline._collect``) is driven here by scripted pipeline runs, one per
attempt, so its bound and its backoff are checked without a cluster. The same loop against a
Serve replica that really dies mid-request is
tests/actors/test_pipeline.py::test_a_replica_crash_mid_iteration_is_retried.
"""

from __future__ import annotations

import pytest

from actors import pipeline
from gold_ray.run.tasks import load_task

SST2 = load_task("sst2")


def _row(i: int, failed: bool = False) -> dict:
    return {"prompt_index": i, "kind": "train", "requested_label": "positive", "style": "", "raw_text": "" if failed else f"text {i}",
            "output_tokens": 0 if failed else 3, "generated_at": 0.0, "teacher_failed": failed,
            "reject_reason": "error" if failed else "", "reject_detail": "replica died" if failed else "",
            "text": "" if failed else f"text {i}", "label": "positive"}


class _Run:
    """One pipeline run: yields its rows, a block each, then raises if told to (a replica dying mid-stream)."""

    def __init__(self, rows: list[dict], crash: str | None):
        self.rows, self.crash = rows, crash

    def iter_batches(self, *, batch_size, batch_format):
        assert (batch_size, batch_format) == (None, "pyarrow")  # whole blocks, as actors.pipeline.block_rows asks
        import pyarrow as pa

        for row in self.rows:
            yield pa.Table.from_pylist([row])
        if self.crash:
            raise RuntimeError(self.crash)


def test_failed_and_lost_requests_are_retried_with_doubling_backoff_then_given_up(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(pipeline.time, "sleep", sleeps.append)
    rows = [{"prompt_index": i, "kind": "train", "requested_label": "positive", "style": ""} for i in range(6)]
    asked: list[list[int]] = []

    def make_dataset(subset):
        idx = [r["prompt_index"] for r in subset]
        asked.append(idx)
        if len(asked) == 1:  # 0-2 answered, 3 failed, then the pipeline dies: 4 and 5 never come back
            return _Run([_row(0), _row(1), _row(2), _row(3, failed=True)], "ActorDiedError: replica gone")
        # every later attempt: prompt 3 keeps failing, the others come back
        return _Run([_row(i, failed=(i == 3)) for i in idx], None)

    results, stats = pipeline._collect(rows, make_dataset, SST2, max_retries=3, backoff_s=0.5)

    assert asked == [[0, 1, 2, 3, 4, 5], [3, 4, 5], [3], [3]]  # only what is missing goes again
    assert stats == {"attempts": 4, "retried": 5}
    assert sleeps == [0.5, 1.0, 2.0], "backoff doubles between attempts"
    assert sorted(results) == list(range(6)), "every prompt once"
    assert all(not results[i]["teacher_failed"] for i in (0, 1, 2, 4, 5))
    assert results[3]["reject_reason"] == "error" and results[3]["reject_detail"] == "replica died"


def test_a_pipeline_that_never_answers_ends_in_error_rows_naming_the_failure(monkeypatch):
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: None)
    rows = [{"prompt_index": i, "kind": "train", "requested_label": "negative", "style": ""} for i in range(3)]
    calls = []

    def make_dataset(subset):
        calls.append(len(subset))
        return _Run([], "ActorDiedError: the teacher replica died")

    results, stats = pipeline._collect(rows, make_dataset, SST2, max_retries=2, backoff_s=0.1)
    assert calls == [3, 3, 3] and stats["attempts"] == 3
    for i in range(3):
        assert results[i]["reject_reason"] == "error"
        assert "teacher pipeline failed: RuntimeError: ActorDiedError: the teacher replica died" in results[i]["reject_detail"]


@pytest.mark.parametrize("attempt", [1, 2, 5, 9])
def test_backoff_is_capped(monkeypatch, attempt):
    sleeps: list[float] = []
    monkeypatch.setattr(pipeline.time, "sleep", sleeps.append)
    rows = [{"prompt_index": 0, "kind": "train", "requested_label": "negative", "style": ""}]
    pipeline._collect(rows, lambda subset: _Run([], "down"), SST2, max_retries=attempt, backoff_s=4.0)
    assert len(sleeps) == attempt and max(sleeps) <= pipeline.MAX_BACKOFF_S
