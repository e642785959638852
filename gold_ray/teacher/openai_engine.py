"""The ``openai`` teacher engine: any OpenAI-compatible HTTP endpoint (``gold-ray serve``, vLLM's server, a hosted API)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

from gold_ray.errors import InputError
from gold_ray.teacher.engines import (
    truncate_at_stop,
)
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

log = logging.getLogger(__name__)

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
