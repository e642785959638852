"""Tests of the teacher engines (gold_ray.teacher.engines and its backends) on a tiny random Llama built here and a local stdlib HTTP server."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gold_ray.config import TeacherConfig
from gold_ray.teacher import engines, hf_engine
from gold_ray.teacher.engines import (
    build_engine,
    option_token_ids,
    prompt_token_ids,
    render_prompt_text,
    truncate_at_stop,
    wants_bos,
)
from gold_ray.teacher.hf_engine import HFEngine
from gold_ray.teacher.openai_engine import OpenAIEngine
from gold_ray.teacher.vllm_engine import VLLM_INSTALL_HINT
from gold_ray.types import Prompt, SamplingParams

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Write a positive movie review about the acting.",
    "A great film with a warm heart and a fine cast.",
    "Premise: the museum opened. Hypothesis: it had visitors.",
    "Label: positive. Label: negative. Label: not entailment.",
]


def build_tiny_teacher(path) -> None:
    """A random 2-layer Llama and a byte-level BPE tokenizer with a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_teacher(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = HFEngine(model_dir, dtype="float32", batch_size=2, seed=0)
    yield eng
    eng.close()


def chat(content: str, prefill: str = "", stop: tuple[str, ...] = ("\n\n",)) -> Prompt:
    messages = ({"role": "system", "content": "You write reviews."}, {"role": "user", "content": content})
    return Prompt(kind="train", label="positive", messages=messages, prefill=prefill, stop=stop)


def cont(text: str, stop: tuple[str, ...] = ('"', "\n")) -> Prompt:
    return Prompt(kind="train", label="positive", text=text, prefill='"', stop=stop)


# Distinct lengths, deliberately not in length order, chat and continuation mixed.
MIXED = [
    cont('Movie review (positive): "A great film with a warm heart."\nMovie review (positive): "'),
    chat("Write a positive movie review."),
    cont('Movie review (negative): "'),
    chat("Write a positive movie review about the acting, with a fine cast and a warm heart.", prefill="Label:"),
    cont('Premise: the museum opened.\nMovie review (positive): "'),
]


def test_truncate_at_stop_cuts_at_the_earliest_stop():
    assert truncate_at_stop('good film" and more\nnext', ('"', "\n")) == "good film"
    assert truncate_at_stop("line one\nline two", ('"', "\n")) == "line one"
    assert truncate_at_stop("Premise: a\nHypothesis: b\n\nPremise: c", ("\n\n", "\nPremise:")) == (
        "Premise: a\nHypothesis: b"
    )
    assert truncate_at_stop("no stop here", ("\n\n", "")) == "no stop here"
    assert truncate_at_stop('"', ('"',)) == ""


def test_rendering_chat_and_continuation(engine):
    tok = engine.tokenizer
    p = chat("Write a review.", prefill="Label:")
    text = render_prompt_text(tok, p)
    assert text.endswith("<|im_start|>assistant\nLabel:")  # the assistant turn starts with the prefill
    assert text.count("<|im_start|>") == 3
    c = cont('Movie review (positive): "')
    ids = prompt_token_ids(tok, c)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS added once
    assert prompt_token_ids(tok, c, add_bos=False)[0] != tok.bos_token_id
    assert tok.bos_token_id not in prompt_token_ids(tok, p)  # the template decides for chat
    assert wants_bos(tok)
    no_template = type("T", (), {"chat_template": None})()
    with pytest.raises(ValueError, match="chat template"):
        render_prompt_text(no_template, p)


def test_generate_mixed_batch_keeps_count_and_order(engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    forward = engine.generate(MIXED, params)
    backward = engine.generate(MIXED[::-1], params)
    assert len(forward) == len(MIXED)
    assert all(g.error is None for g in forward)
    # Same prompts, same internal batches (sorted by stop and length), so reversing the input
    # must reverse the output exactly; a result left in sorted order would not.
    assert [g.text for g in backward] == [g.text for g in forward][::-1]
    for prompt, gen in zip(MIXED, forward, strict=True):
        assert not any(stop in gen.text for stop in prompt.stop)
        assert 0 <= gen.output_tokens <= 6


def test_greedy_is_deterministic_and_sampling_is_seeded_once(model_dir, engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert engine.generate(MIXED, greedy) == engine.generate(MIXED, greedy)
    sample = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8)
    prompts = [chat("Write a review.", stop=())] * 4
    a = HFEngine(model_dir, dtype="float32", batch_size=4, seed=3)
    first = a.generate(prompts, sample)
    second = a.generate(prompts, sample)
    b = HFEngine(model_dir, dtype="float32", batch_size=4, seed=3)
    assert b.generate(prompts, sample) == first  # same engine seed, same samples
    assert second != first  # not reseeded per request
    assert len({g.text for g in first}) > 1  # identical prompts in one batch still differ


def test_max_new_tokens_is_respected(engine):
    for n in (1, 3):
        gens = engine.generate([chat("Write a review.", stop=()), cont("Movie review:", stop=())],
                               SamplingParams(temperature=1.0, max_new_tokens=n))
        assert all(g.error is None and 0 < g.output_tokens <= n for g in gens)


def test_stop_strings_truncate_and_count_tokens(engine, monkeypatch):
    tok = engine.tokenizer
    reply = tok('good film" and more', add_special_tokens=False)["input_ids"]
    seen = {}

    def fake_decode(model, rows, **kwargs):
        seen.update(kwargs)
        return [list(reply) for _ in rows]

    monkeypatch.setattr(hf_engine, "decode_batch", fake_decode)
    [gen] = engine.generate([cont('Movie review (positive): "')], SamplingParams(max_new_tokens=16))
    assert gen.text == "good film"
    assert gen.output_tokens == len(reply)
    assert seen["stopped"](tok('good film"', add_special_tokens=False)["input_ids"])  # a stop ends the row
    assert not seen["stopped"](tok("good film", add_special_tokens=False)["input_ids"])
    assert seen["temperature"] == 1.0 and seen["top_k"] == 0 and seen["max_new_tokens"] == 16
    [plain] = engine.generate([chat("Write.", stop=())], SamplingParams(max_new_tokens=4))
    assert seen["stopped"] is None and plain.text == "good film\" and more"  # no stops: nothing cut


def test_failed_batch_becomes_error_rows(engine, monkeypatch):
    real = hf_engine.decode_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_engine, "decode_batch", flaky)
    prompts = [cont("Movie review " + "x" * k + ': "') for k in range(4)]  # one stop set, two batches of 2
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=3))
    failed = [g for g in gens if g.error is not None]
    assert len(gens) == 4 and len(failed) == 2
    assert all("boom" in g.error and g.text == "" for g in failed)
    # Sorted by length, the second batch holds the two longest prompts.
    assert [g.error is not None for g in gens] == [False, False, True, True]


def test_unrenderable_prompt_is_an_error_row_not_an_exception(model_dir, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    gens = engine.generate([chat("Write."), cont('Movie review: "')], SamplingParams(max_new_tokens=2))
    assert "chat template" in gens[0].error and gens[1].error is None


def test_option_logprobs_match_an_unbatched_reference(engine):
    prompts = [chat("Is it good?", prefill="Label:"), cont("Review: a great film.\nLabel:"), chat("Hm?")]
    options = ["positive", "negative", "not entailment"]
    rows = engine.option_logprobs(prompts, options)
    assert len(rows) == 3 and all(len(r) == 3 for r in rows)
    assert all(math.isfinite(v) and v < 0 for r in rows for v in r)
    tok = engine.tokenizer
    for i in (0, 1):
        rendered = render_prompt_text(tok, prompts[i])
        for j, option in enumerate(options):
            p_ids = prompt_token_ids(tok, prompts[i])
            o_ids = option_token_ids(tok, rendered, option)
            ids = torch.tensor([p_ids + o_ids], device=engine.device)
            with torch.no_grad():
                logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].float(), dim=-1)
            ref = sum(float(logp[len(p_ids) + k - 1, t]) for k, t in enumerate(o_ids))
            assert rows[i][j] == pytest.approx(ref, abs=1e-3)


def test_option_is_joined_with_one_space(engine):
    tok = engine.tokenizer
    joined = option_token_ids(tok, "Label:", "positive")
    assert tok.decode(joined) == " positive"
    assert tok.decode(option_token_ids(tok, "Label: ", "positive")) == "positive"


def test_build_engine(model_dir):
    eng = build_engine(TeacherConfig(engine="hf", dtype="float32", batch_size=5), model_dir, seed=1)
    assert isinstance(eng, HFEngine) and eng.batch_size == 5 and eng.dtype is torch.float32
    eng.close()
    assert eng.generate([cont('x "')], SamplingParams(max_new_tokens=2))[0].error  # closed: error row
    with pytest.raises(ValueError, match="base_url"):
        build_engine(TeacherConfig(engine="openai"), "m", seed=0)
    api = build_engine(TeacherConfig(engine="openai", base_url="http://127.0.0.1:9/v1/", max_retries=5,
                                     retry_backoff_s=0.25), "m", 0)
    assert isinstance(api, OpenAIEngine) and api.base_url == "http://127.0.0.1:9/v1" and api.max_retries == 5
    assert api.backoff_s == 0.25


def test_auto_engine_is_vllm_only_on_a_gpu_with_vllm(model_dir, monkeypatch):
    import sys
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    assert engines.auto_engine_name() == "hf"  # vLLM installed, no GPU
    assert engines.auto_engine_name("cuda") == "vllm"
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    assert engines.auto_engine_name("cuda") == "hf"
    eng = build_engine(TeacherConfig(dtype="float32"), model_dir, seed=0)  # the default is auto
    assert isinstance(eng, HFEngine)
    eng.close()


class FakeVLLM:
    """Stands in for the ``vllm`` module: records the KV cache setting each ``LLM`` starts with."""

    def __init__(self):
        self.started_with: list[str | None] = []
        outer = self

        class LLM:
            def __init__(self, **kwargs):
                outer.started_with.append(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))

            def get_tokenizer(self):
                return None

        self.LLM = LLM


def test_vllm_on_a_cpu_host_caps_its_kv_cache_unless_the_user_did(monkeypatch):
    import sys

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # setenv first records the variable's state before the test, so what the engine exports is undone.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    build_engine(TeacherConfig(engine="vllm", vllm_cpu_kv_cache_gib=2), "m", seed=0)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")
    build_engine(TeacherConfig(engine="vllm"), "m", seed=0)
    assert fake.started_with == ["2", "9"]
    # On a GPU host the variable is not vLLM's concern and is left unset.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    build_engine(TeacherConfig(engine="vllm"), "m", seed=0)
    assert fake.started_with[-1] is None


def test_vllm_engine_without_vllm_names_the_extras(model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"gold-ray\[gpu\]") as info:
        build_engine(TeacherConfig(engine="vllm"), model_dir, seed=0)
    assert str(info.value) == VLLM_INSTALL_HINT and "cpu-vllm" in str(info.value)


# --- OpenAI-compatible engine against a local server ------------------------------------------

API_KEY = "sk-test-PLANTED-secret-4711"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with srv.lock:
            srv.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = srv.script.pop(0) if srv.script else srv.default
        try:
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("ok",)
            if action[0] == "status":
                # A careless server that echoes the request's key in its error body.
                payload = {"error": {"message": f"busy; you sent {self.headers.get('Authorization')}"}}
                self._send(action[1], payload)
                return
            if "messages" in body:
                echo = body["messages"][-1]["content"]
                payload = {"choices": [{"message": {"role": "assistant", "content": f"echo:{echo}\n\nmore"}}]}
            else:
                payload = {"choices": [{"text": f"echo:{body['prompt'][-6:]}\" tail"}]}
            payload["usage"] = {"completion_tokens": 7}
            self._send(200, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.seen, srv.script, srv.default = [], [], ("ok",)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def api_engine(srv, **kw) -> OpenAIEngine:
    defaults = {"api_key_env": "GOLD_RAY_TEST_KEY", "timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01}
    return OpenAIEngine(srv.base_url, "tiny", **{**defaults, **kw})


def test_openai_retries_429_and_500_then_succeeds(server, monkeypatch):
    monkeypatch.setenv("GOLD_RAY_TEST_KEY", API_KEY)
    server.script = [("status", 429), ("status", 500)]
    [gen] = api_engine(server).generate([chat("hello", stop=("\n\n",))], SamplingParams(max_new_tokens=9))
    assert gen.error is None and gen.text == "echo:hello" and gen.output_tokens == 7
    assert len(server.seen) == 3 and all(s["path"] == "/v1/chat/completions" for s in server.seen)
    assert server.seen[-1]["auth"] == f"Bearer {API_KEY}"
    body = server.seen[-1]["body"]
    assert body["model"] == "tiny" and body["max_tokens"] == 9 and body["stop"] == ["\n\n"]
    assert "seed" not in body and "top_k" not in body


def test_openai_persistent_500_is_an_error_row_without_the_key(server, monkeypatch):
    monkeypatch.setenv("GOLD_RAY_TEST_KEY", API_KEY)
    server.default = ("status", 500)
    [gen] = api_engine(server, max_retries=2).generate([chat("hi")], SamplingParams())
    assert gen.text == "" and gen.error is not None
    assert f"{server.base_url}/chat/completions" in gen.error and "500" in gen.error
    assert "3 attempt" in gen.error and len(server.seen) == 3
    assert API_KEY not in gen.error and "PLANTED" not in gen.error


def test_openai_client_error_is_not_retried(server):
    server.default = ("status", 400)
    [gen] = api_engine(server).generate([chat("hi")], SamplingParams())
    assert "400" in gen.error and len(server.seen) == 1


def test_openai_timeout_is_retried_then_reported(server):
    server.default = ("sleep", 1.0)
    start = time.monotonic()
    [gen] = api_engine(server, timeout_s=0.2, max_retries=1).generate([chat("hi")], SamplingParams())
    assert "timeout" in gen.error and server.base_url in gen.error
    assert len(server.seen) == 2 and time.monotonic() - start < 3


def test_openai_connection_refused_is_an_error_row():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01, timeout_s=1)
    [gen] = eng.generate([cont('x "')], SamplingParams())
    assert "connection error" in gen.error and f"127.0.0.1:{port}/v1/completions" in gen.error


def test_openai_continuation_prefill_and_order(server):
    prompts = [cont(f'Movie review {i}: "') for i in range(6)] + [chat("last", prefill="Label:")]
    gens = api_engine(server, concurrency=4).generate(prompts, SamplingParams(top_k=10))
    # The server echoes the prompt's last 6 characters, then a quote: the stop string cuts there.
    assert [g.text for g in gens[:6]] == [f"echo:{p.text[-6:-1]}" for p in prompts[:6]]
    assert gens[6].text == "echo:Label:"  # the prefill went as a final assistant message
    paths = sorted(s["path"] for s in server.seen)
    assert paths.count("/v1/completions") == 6 and paths.count("/v1/chat/completions") == 1
    chat_body = next(s["body"] for s in server.seen if "messages" in s["body"])
    assert chat_body["messages"][-1] == {"role": "assistant", "content": "Label:"} and chat_body["top_k"] == 10
    rows = OpenAIEngine(server.base_url, "m").option_logprobs(prompts[:2], ["a", "b"])
    assert len(rows) == 2 and all(len(r) == 2 and all(math.isnan(v) for v in r) for r in rows)


def test_option_logprobs_with_a_shared_few_shot_prefix_match_the_reference(engine, monkeypatch):
    demos = " ".join(f"Example {k}: a film that was fine, label positive." for k in range(6))
    prompts = [chat(f"{demos} Now: {q}", prefill="Label:") for q in ("great", "a dull and long film", "ok")]
    options = ["positive", "not entailment"]
    calls = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("past_key_values") is not None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", spy)
    rows = engine.option_logprobs(prompts, options)
    monkeypatch.undo()
    assert any(calls), "the shared prefix must be run once and reused from its cache"
    tok = engine.tokenizer
    for i, prompt in enumerate(prompts):
        p_ids = prompt_token_ids(tok, prompt)
        for j, option in enumerate(options):
            o_ids = option_token_ids(tok, render_prompt_text(tok, prompt), option)
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([p_ids + o_ids], device=engine.device)).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            ref = sum(float(logp[len(p_ids) + k - 1, t]) for k, t in enumerate(o_ids))
            assert rows[i][j] == pytest.approx(ref, abs=1e-4)
