"""The OpenAI engine against a real local endpoint that answers 429, 500, times out or sends junk.

Requests are retried with growing backoff (and ``Retry-After`` respected), a bounded number of
times; a run whose endpoint stays broken stops with a message that names the endpoint. The
engine's unit tests (tests/teacher/test_engines.py) cover single retries, client errors and refused
connections.
"""

from __future__ import annotations

import pytest

from gold_ray.cli import main
from gold_ray.teacher.openai_engine import OpenAIEngine
from gold_ray.types import Prompt, SamplingParams
from tests.faults.faultkit import run_overrides, scripted_endpoint

PLANTED_KEY = "sk-fault-test-PLANTED-0000"


def _chat() -> Prompt:
    return Prompt(kind="train", label="positive", messages=({"role": "user", "content": "Write a review."},))


def test_backoff_grows_and_retry_after_is_honoured():
    with scripted_endpoint() as srv:
        srv.script = [("status", 429, {"Retry-After": "1"}), ("status", 500), ("status", 503)]
        engine = OpenAIEngine(srv.base_url, "m", max_retries=3, backoff_s=0.05, timeout_s=5)
        [gen] = engine.generate([_chat()], SamplingParams())
    assert gen.error is None and gen.text.startswith("A calm")
    t = [s["t"] for s in srv.seen]
    assert len(t) == 4
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert gaps[0] >= 1.0, "Retry-After: 1 was not waited for"
    assert gaps[1] >= 0.1 and gaps[2] >= 0.2, f"backoff must double: {gaps}"


def test_429_500_and_timeouts_are_retried_a_bounded_number_of_times():
    with scripted_endpoint(default=("status", 500)) as srv:
        srv.script = [("status", 429), ("sleep", 1.5)]
        engine = OpenAIEngine(srv.base_url, "m", max_retries=3, backoff_s=0.01, timeout_s=0.3)
        [gen] = engine.generate([_chat()], SamplingParams())
    assert len(srv.seen) == 4  # one try and three retries, no more
    assert gen.text == ""
    assert gen.error.startswith(f"openai engine: POST {srv.base_url}/chat/completions failed after 4 attempt(s)")
    assert "HTTP 500" in gen.error


@pytest.mark.parametrize("broken", [("status", 500), ("raw", b"<html>502 Bad Gateway</html>")],
                         ids=["HTTP 500", "not JSON"])
def test_a_run_against_a_broken_endpoint_stops_naming_it(tmp_path, capsys, monkeypatch, tiny_student,
                                                         eval_file, broken):
    monkeypatch.setenv("GOLD_RAY_FAULT_KEY", PLANTED_KEY)
    out = tmp_path / "run"
    with scripted_endpoint(default=broken) as srv:
        args = run_overrides(out, tiny_student, eval_file, "teacher.engine=openai", f"teacher.base_url={srv.base_url}",
                             "teacher.api_key_env=GOLD_RAY_FAULT_KEY", "teacher.max_retries=1",
                             "teacher.request_timeout_s=5")
        code = main(["distill", "--local", "--quiet", "--output", str(out),
                     *[a for item in args for a in ("--set", item)], "tiny"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"POST {srv.base_url}/chat/completions" in err
    assert "budget.max_reject_share" in err and "'error'" in err
    # 32 samples, 2 iterations, half of each iteration on probes; GOLD sends iteration 0's 8 training
    # prompts and 8 probes in one teacher pass, and the stage stops there.
    first_pass = 8 + 8
    assert len(srv.seen) == first_pass * 2, "each request tried twice (max_retries=1), then given up"
    assert all(s["body"].get("model") == "fake" and s["auth"] == f"Bearer {PLANTED_KEY}" for s in srv.seen)
    # The key went to the endpoint only: not into the error, the logs or any file of the run.
    assert PLANTED_KEY not in err
    for f in out.rglob("*"):
        assert not f.is_file() or PLANTED_KEY.encode() not in f.read_bytes(), f
