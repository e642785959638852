"""Teacher calls of one prompt prefix land on one Serve replica (issue 18 item 3)."""

import json

import pytest

from actors.routing import affinity, call_prefix_key
from actors.teacher import build_teacher_app, prompt_to_dict
from tests.raykit import PidEngine, chat_prompts, make_cfg, running_replicas, wait_until


def test_a_call_is_keyed_by_the_prefix_most_of_its_prompts_share():
    def prompt(key):
        return json.dumps({"meta": {"prefix_key": key} if key else {}})

    assert call_prefix_key([prompt("b"), prompt("a"), prompt("a"), prompt(None)]) == "a"
    assert call_prefix_key([prompt(None)]) is None
    # Rendezvous weights: each key has one winner, and the winners differ across keys.
    winners = {max(("r1", "r2"), key=lambda r, k=k: affinity(k, r)) for k in map(str, range(32))}
    assert winners == {"r1", "r2"}


@pytest.mark.ray
@pytest.mark.slow
def test_calls_with_the_same_prefix_key_land_on_one_replica(serve_apps):
    cfg = make_cfg(teacher={"serve": {"min_replicas": 2, "max_replicas": 2}})
    handle = serve_apps(build_teacher_app(cfg, PidEngine), "routing-teacher")
    assert wait_until(lambda: running_replicas("routing-teacher") == 2, timeout_s=120)
    requests = [{"prompt": prompt_to_dict(p)} for p in chat_prompts(2)]

    def replica(key):
        return handle.generate_batch.remote(requests, prefix_key=key).result()[0]["teacher_text"]

    seen = {key: {replica(key) for _ in range(4)} for key in (f"demo-set-{i}" for i in range(16))}
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    # The keys spread over both replicas (16 keys all on one: a chance of 2 in 65536).
    assert len(set().union(*seen.values())) == 2
