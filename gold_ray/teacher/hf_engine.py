"""The ``hf`` teacher engine: transformers on CPU or GPU, batched, with a prompt prefix shared by
several prompts of a batch run once (scoring: the batch's common prefix; generation: each demo set's)."""

from __future__ import annotations

import gc
import logging
import math
from collections import Counter
from typing import Any

import torch

from gold_ray.allocator import keep_freed_memory
from gold_ray.devices import default_device, resolve_dtype
from gold_ray.errors import InputError
from gold_ray.models import allow_remote_code
from gold_ray.teacher.decoding import decode_batch, start_batch
from gold_ray.teacher.engines import (
    common_prefix_len,
    error_text,
    option_token_ids,
    prompt_token_ids,
    render_prompt_text,
    truncate_at_stop,
)
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

log = logging.getLogger(__name__)

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
        share_prefixes: Run the prefix shared by the prompts of one demo set
            (``Prompt.meta["prefix_key"]``, see ``teacher.prompts_per_demo_set``) once per batch;
            off only to check that sharing changes nothing.
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
        share_prefixes: bool = True,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Every decode step frees what the next allocates (gold_ray.allocator); before the model
        # loads, so that a thread the engine is later called from shares the kept memory.
        keep_freed_memory()
        trust_remote_code = allow_remote_code(trust_remote_code, model_path, "teacher")
        torch.manual_seed(seed)
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.share_prefixes = share_prefixes
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
        length within a group, so batches carry little padding. Prompts of one demo set (the same
        ``meta["prefix_key"]``, more than one of them in the call) are kept together and a batch
        is not cut inside such a group where it fits in one, so its shared prefix runs once.
        """
        results: list[Generation | None] = [None] * len(prompts)
        encoded: list[tuple[int, list[int]]] = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append((i, prompt_token_ids(self.tokenizer, prompt, self.add_bos)))
            except Exception as err:  # one unrenderable prompt must not sink the call
                results[i] = Generation(text="", error=error_text(self.name, err))
        keys = self._group_keys(prompts)
        sizes = Counter(keys)
        encoded.sort(key=lambda item: (prompts[item[0]].stop, keys[item[0]], len(item[1])))
        batch: list[tuple[int, list[int]]] = []
        for item in encoded:
            i, last = item[0], batch[-1][0] if batch else None
            new_group = last is not None and (keys[i] != keys[last] or not keys[i])
            full = len(batch) == self.batch_size or (
                new_group and keys[i] and sizes[keys[i]] <= self.batch_size < len(batch) + sizes[keys[i]])
            if batch and (full or prompts[batch[0][0]].stop != prompts[i].stop):
                self._run_batch(batch, prompts, params, results)
                batch = []
            batch.append(item)
        if batch:
            self._run_batch(batch, prompts, params, results)
        return [g if g is not None else Generation(text="", error="hf engine: no result") for g in results]

    def _group_keys(self, prompts: list[Prompt]) -> list[str]:
        """Each prompt's demo-set key where it shares it with another prompt of the call, else ``""``."""
        if not self.share_prefixes:
            return [""] * len(prompts)
        keys = [str(p.meta.get("prefix_key") or "") for p in prompts]
        counts = Counter(keys)
        return [k if k and counts[k] > 1 else "" for k in keys]

    def _prefix_lens(self, rows: list[list[int]], keys: list[str], reserve: list[int]) -> list[int]:
        """Per row, how many leading tokens run as a shared prefix (0 for all: none).

        A group (rows of one key) shares the tokens common to all its rows, up to leaving each row
        ``reserve`` tokens, when that is at least :attr:`MIN_SHARED_PREFIX`. Once any group does,
        every other row runs its own prompt but ``reserve`` tokens as its prefix (the prefix pass
        needs one for every row); that costs what the plain pass would.
        """
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key:
                groups.setdefault(key, []).append(i)
        lens = [0] * len(rows)
        for idx in groups.values():
            if len(idx) < 2:
                continue
            shared = min(common_prefix_len([rows[i] for i in idx]), *(len(rows[i]) - reserve[i] for i in idx))
            if shared >= self.MIN_SHARED_PREFIX:
                for i in idx:
                    lens[i] = shared
        if not any(lens):
            return lens
        lens = [n or len(row) - r for n, row, r in zip(lens, rows, reserve, strict=True)]
        return lens if all(n >= 1 for n in lens) else [0] * len(rows)

    def _run_batch(
        self,
        batch: list[tuple[int, list[int]]],
        prompts: list[Prompt],
        params: SamplingParams,
        results: list[Generation | None],
    ) -> None:
        stops = prompts[batch[0][0]].stop
        rows = [ids for _, ids in batch]
        try:
            prefix_lens = self._prefix_lens(rows, self._group_keys([prompts[i] for i, _ in batch]), [1] * len(rows))
            outs = self._generate_batch(rows, stops, params, prefix_lens)
        except Exception as err:  # e.g. out of memory: keep the rows, mark them failed
            log.warning("hf engine: batch of %d failed: %s", len(batch), err)
            outs = [Generation(text="", error=error_text(self.name, err))] * len(batch)
        for (i, _), gen in zip(batch, outs, strict=True):
            results[i] = gen

    def _generate_batch(
        self, rows: list[list[int]], stops: tuple[str, ...], params: SamplingParams, prefix_lens: list[int] | None = None
    ) -> list[Generation]:
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
                prefix_lens=prefix_lens,
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
    """A prefix shared by a scoring batch, or by a demo set's prompts in a generation batch, runs
    once when it is at least this many tokens long."""

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
        # The longest token prefix common to the batch (one group) runs once and its key/value
        # cache serves every row; it stops before the first position whose logits are needed.
        prefix_lens = self._prefix_lens([ids for ids, _ in seqs], ["batch"] * len(seqs), need)
        keep = max(need)
        # Left padding puts every row's end at the end, so only the last `keep` positions need
        # logits (a 262k vocabulary times the whole sequence would not fit).
        extra: dict[str, Any] = {}
        with torch.inference_mode():
            input_ids, mask, positions, cache = start_batch(model, [ids for ids, _ in seqs], pad, self.device,
                                                            prefix_lens)
            if cache is not None:
                extra = {"past_key_values": cache}
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
