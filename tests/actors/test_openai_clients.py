"""Real clients against the teacher deployment: the official ``openai`` package and ``curl``.

The SSE chunk format and the usage numbers are pure functions, tested here without Ray; the Ray
tests serve a tiny random HF teacher (the real ``hf`` engine) once for the module and prove the
wiring: chat and completions, streamed and not, through the clients people actually use.
"""

import contextlib
import functools
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from actors.teacher import (
    SSE_DONE,
    build_teacher_app,
    sse_body,
    sse_event,
    stream_chunks,
    usage_of,
)
from gold_ray.teacher.engines import prompt_token_ids
from gold_ray.teacher.hf_engine import HFEngine
from gold_ray.testing import FakeTeacherEngine
from gold_ray.types import Generation, Prompt, SamplingParams
from tests.raykit import make_cfg

CHAT = [{"role": "system", "content": "You write film reviews."}, {"role": "user", "content": "Write a review."}]
TEXT = "Once upon a time"
MAX_TOKENS = 5


def _parse_sse(body: str) -> list[dict | str]:
    """The ``data:`` payloads of an SSE body: JSON objects, and ``[DONE]`` as a string."""
    events = [e for e in body.split("\n\n") if e]
    out: list[dict | str] = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        data = event[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tiny_chat_lm) -> str:
    """The session's tiny random Llama with a chat template."""
    return tiny_chat_lm


# --- no cluster needed ----------------------------------------------------------------------------


def test_chat_stream_is_role_content_finish_then_done():
    chunks = stream_chunks("chat.completion", completion_id="chatcmpl-1", created=7, model="m",
                           text='say "hi"\nbye', finish_reason="length")
    events = _parse_sse("".join(sse_body(chunks)))
    assert events[-1] == "[DONE]" and sse_body(chunks)[-1] == SSE_DONE
    objs = events[:-1]
    assert all(o["object"] == "chat.completion.chunk" and o["id"] == "chatcmpl-1" and o["model"] == "m"
               for o in objs)
    deltas = [o["choices"][0]["delta"] for o in objs]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == 'say "hi"\nbye'
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None, None, "length"]
    assert deltas[-1] == {} and all("usage" not in o for o in objs)


def test_empty_chat_answer_has_no_content_chunk_and_usage_comes_last():
    usage = {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    chunks = stream_chunks("chat.completion", completion_id="c", created=1, model="m", text="",
                           finish_reason="stop", usage=usage)
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [{"role": "assistant", "content": ""}, {}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_completion_stream_is_text_then_finish():
    chunks = stream_chunks("text_completion", completion_id="cmpl-1", created=1, model="m", text=" there",
                           finish_reason="stop")
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        (" there", None), ("", "stop")]


def test_sse_event_is_one_data_line():
    event = sse_event({"text": "two\nlines", "word": "naïve"})
    assert event.endswith("\n\n") and event.count("\n") == 2
    assert _parse_sse(event) == [{"text": "two\nlines", "word": "naïve"}]


def test_usage_counts_prompt_and_completion():
    assert usage_of(Generation(text="x", output_tokens=4, prompt_tokens=11)) == {
        "prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    # An engine that does not count prompts reports 0, not a guess.
    assert usage_of(Generation(text="x", output_tokens=2))["prompt_tokens"] == 0


def test_hf_engine_counts_the_rendered_prompt(tiny_teacher):
    engine = HFEngine(tiny_teacher, dtype="float32", batch_size=4, device="cpu")
    prompts = [Prompt(kind="train", label=None, messages=tuple(CHAT), prefill="Review:"),
               Prompt(kind="train", label=None, text=TEXT)]
    gens = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=2))
    assert [g.error for g in gens] == [None, None]
    counts = [g.prompt_tokens for g in gens]
    assert counts == [len(prompt_token_ids(engine.tokenizer, p)) for p in prompts]
    assert counts[0] > counts[1] > 0  # the chat template and the prefill are counted too


# --- on the Ray cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_url(ray_cluster, serve_port, tiny_teacher):
    """The tiny HF teacher deployed once for the module (the configured ``hf`` engine); its ``/v1``."""
    from ray import serve

    cfg = make_cfg(teacher={"model": tiny_teacher, "engine": "hf", "dtype": "float32", "max_new_tokens": 8,
                            "serve": {"port": serve_port}})
    serve.run(build_teacher_app(cfg), name="openai-clients", route_prefix="/openai-clients", blocking=False)
    yield f"http://127.0.0.1:{serve_port}/openai-clients/v1"
    serve.delete("openai-clients")


@pytest.fixture(scope="module")
def client(teacher_url):
    """The official OpenAI client on the deployment (no retries: a failure must show at once)."""
    import openai  # a dev dependency

    return openai.OpenAI(base_url=teacher_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected_prompt_tokens(tiny_teacher):
    """Prompt token counts of :data:`CHAT` and :data:`TEXT`, by the engine's own rule."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    return {
        "chat": len(prompt_token_ids(tok, Prompt(kind="train", label=None, messages=tuple(CHAT)))),
        "text": len(prompt_token_ids(tok, Prompt(kind="train", label=None, text=TEXT))),
    }


@pytest.mark.ray
def test_openai_client_chat_streamed_and_not(client, expected_prompt_tokens):
    answer = client.chat.completions.create(model="teacher", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens == expected_prompt_tokens["chat"] > 0
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(client.chat.completions.create(model="teacher", messages=CHAT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    # Greedy decoding: the streamed answer is the unstreamed one.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == usage.prompt_tokens


@pytest.mark.ray
def test_openai_client_completion_streamed_and_not(client, expected_prompt_tokens):
    answer = client.completions.create(model="teacher", prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.object == "text_completion"
    assert answer.usage.prompt_tokens == expected_prompt_tokens["text"] > 0
    assert 0 < answer.usage.completion_tokens <= MAX_TOKENS

    chunks = list(client.completions.create(model="teacher", prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True))
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


@pytest.mark.ray
def test_readme_openai_snippet_runs(client, teacher_url):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from openai import" in b]
    assert code.count("http://127.0.0.1:8000/v1") == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:8000/v1", teacher_url), "README.md", "exec"), {})
    assert "prompt_tokens=" in out.getvalue() and "prompt_tokens=0" not in out.getvalue()


@pytest.mark.ray
def test_streamed_engine_failure_is_an_http_error(serve_apps, client):
    import openai

    serve_apps(build_teacher_app(make_cfg(), functools.partial(FakeTeacherEngine, fail_every=1)), "failing-stream",
               route_prefix="/failing-stream")
    failing = client.with_options(base_url=str(client.base_url).replace("/openai-clients/", "/failing-stream/"))
    with pytest.raises(openai.InternalServerError, match="injected failure"):
        list(failing.chat.completions.create(model="teacher", messages=CHAT, stream=True))


@pytest.mark.ray
def test_curl_gets_a_chat_completion_and_a_stream(teacher_url):
    if shutil.which("curl") is None:
        pytest.skip("curl is not on PATH")

    def curl(body: dict) -> str:
        done = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "-N", "--max-time", "120", f"{teacher_url}/chat/completions",
             "-H", "Content-Type: application/json", "-d", json.dumps(body)],
            capture_output=True, text=True, timeout=150, check=False,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout

    body = {"model": "teacher", "messages": CHAT, "max_tokens": MAX_TOKENS}
    answer = json.loads(curl(body))
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["prompt_tokens"] > 0

    events = _parse_sse(curl({**body, "stream": True}))
    assert events[-1] == "[DONE]"
    assert [e["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
