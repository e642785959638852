"""Teacher engines: the :class:`~gold_ray.types.TeacherEngine` seam over transformers, vLLM and
any OpenAI-compatible HTTP endpoint. This module holds what every backend shares and
:func:`build_engine`, which picks one; each backend has a file of its own (``hf_engine.py``,
``vllm_engine.py``, ``openai_engine.py``). No Ray here: the Serve deployment wraps these.

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

import logging
from collections.abc import Sequence
from typing import Any

from gold_ray.config import TeacherConfig
from gold_ray.devices import default_device
from gold_ray.errors import InputError
from gold_ray.types import Prompt, TeacherEngine

log = logging.getLogger(__name__)

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


def common_prefix_len(rows: list[list[int]]) -> int:
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


def error_text(engine: str, err: BaseException) -> str:
    return f"{engine} engine: {type(err).__name__}: {err}"[:2000]


# --- transformers -----------------------------------------------------------------------------



def auto_engine_name(device: str | None = None) -> str:
    """The engine ``teacher.engine=auto`` means here: ``vllm`` on a CUDA GPU with vLLM installed
    (continuous batching and paged attention; far ahead of ``hf`` there), else ``hf`` (on CPU the
    vLLM CPU build needs an environment of its own, see ``make test-vllm``)."""
    if (device or default_device()) != "cuda":
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
    # Imported here: each backend imports this module's helpers.
    from gold_ray.teacher.hf_engine import HFEngine
    from gold_ray.teacher.openai_engine import OpenAIEngine
    from gold_ray.teacher.vllm_engine import VLLMEngine

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
