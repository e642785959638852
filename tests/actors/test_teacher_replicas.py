"""Teacher replicas come and go under a real engine: autoscaling under the pipeline's own load, and a
hung replica found by its health check and replaced while its batch is sent again.

Both deploy the real ``hf`` engine on the tiny random chat model (``gold_ray.testing``).
"""

import json
import os
import threading

import pytest

from actors.pipeline import generate_iteration
from actors.teacher import build_teacher_app
from gold_ray.run.store import read_parts
from tests.faults.hooks import plan_fault
from tests.raykit import chat_prompts, make_cfg, running_replicas, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _hf_cfg(model: str, **serve: object):
    return make_cfg(teacher={"model": model, "engine": "hf", "dtype": "float32", "max_new_tokens": 8,
                             "batch_size": 4, "max_retries": 2, "retry_backoff_s": 0.1, "serve": serve})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hung_replica_is_replaced_and_its_batch_sent_again(serve_apps, tiny_chat_lm, sst2, tmp_path):
    # Checks every second; an engine call over 4 s is hung (the tiny model answers a batch in well under 1 s).
    cfg = _hf_cfg(tiny_chat_lm, health_check_period_s=1.0, health_check_timeout_s=5.0, hang_timeout_s=4.0)
    serve_apps(build_teacher_app(cfg), "hung-teacher")
    held, gate = tmp_path / "held.json", tmp_path / "gate"
    # The first batch's engine call blocks (it neither returns nor fails) until the test ends.
    plan = plan_fault("teacher.engine", held, action="hold", gate=gate, kind="batch")
    out = tmp_path / "part.parquet"
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(stats=generate_iteration(chat_prompts(8), cfg, sst2, "hung-teacher", None, out)),
        daemon=True,
    )
    try:
        worker.start()
        # Without the health check the stage waits for the blocked call: a bound, not a timing.
        worker.join(timeout=240)
        assert not worker.is_alive(), "the stage never finished: the hung replica was not replaced"
    finally:
        gate.touch()
        plan.unlink(missing_ok=True)

    pid = json.loads(held.read_text())["pid"]
    assert wait_until(lambda: not _alive(pid), timeout_s=60), "the hung replica's process is still alive"
    stats = result["stats"]
    assert stats["attempts"] >= 2 and stats["retried"] >= 4
    records = read_parts([out])
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records})
    assert len(records) == 8
    assert not [r for r in records if r["reject_reason"] == "error"]


@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_autoscaling_follows_the_pipelines_load(serve_apps, tiny_chat_lm, sst2, tmp_path):
    cfg = _hf_cfg(tiny_chat_lm, min_replicas=1, max_replicas=2, target_ongoing_requests=1)
    fast = {"upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "look_back_period_s": 1.0}
    serve_apps(build_teacher_app(cfg, autoscaling_overrides=fast), "autoscale-teacher")
    assert running_replicas("autoscale-teacher") == 1
    stop = threading.Event()
    runs: list[dict] = []

    def load() -> None:
        # The pipeline keeps BATCHES_IN_FLIGHT_PER_REPLICA batches per possible replica in flight.
        i = 0
        while not stop.is_set():
            runs.append(generate_iteration(chat_prompts(48), cfg, sst2, "autoscale-teacher", None,
                                           tmp_path / f"part-{i}.parquet"))
            i += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        assert wait_until(lambda: running_replicas("autoscale-teacher") == 2, timeout_s=60), (
            "no second replica within 60 s of the burst"
        )
    finally:
        stop.set()
        worker.join(timeout=300)
    assert runs and all(r["rejected_by_reason"].get("error", 0) == 0 for r in runs)
    assert wait_until(lambda: running_replicas("autoscale-teacher") == 1, timeout_s=60), (
        "the second replica was not dropped within 60 s of idling"
    )
