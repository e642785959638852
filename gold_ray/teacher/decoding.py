"""The ``hf`` engine's decode loop: sampled or greedy generation over a left-padded batch.

Why not ``model.generate``: measured on the embedded teacher (SmolLM2-135M, batch 64, 2-core CPU,
``benchmarks/perf/results/generation.md``), transformers' sampler sorted the whole 49k-token
vocabulary and drew an exponential per vocabulary entry at every step, about 0.2 s of a 0.5 s
step, and kept computing rows that had already ended until the longest row ended. This loop

- draws from the nucleus found among the top ``NUCLEUS_CANDIDATES`` tokens (an exact top-p:
  when a row's nucleus is wider the vocabulary is sorted), then one multinomial over those;
- drops finished rows from the batch and from the KV cache, so a batch costs what its rows
  generate, not ``rows x longest row``;
- stops a row at an end token or, for prompts with stop strings, as soon as its decoded text
  holds one.

The sampling distribution is transformers' (temperature, then top-k, then top-p keeping the
smallest set of tokens whose mass reaches ``top_p``); greedy decoding gives transformers' tokens
exactly (``tests/teacher/test_decoding.py`` checks both). Only the run's sampling parameters apply: extras
a model's ``generation_config`` may carry (repetition penalty, min length) are not used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

NUCLEUS_CANDIDATES = 4096
"""Most likely tokens a top-p nucleus is looked for among before the vocabulary is sorted whole.
On a 2-core CPU, ``topk(4096)`` of a 64 x 49k batch took 30 ms where a full sort took 263 ms."""


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` left-padded to the longest, so every row ends
    at the last position."""
    width = max(len(r) for r in rows)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
    return input_ids, mask


def start_batch(
    model: Any, rows: Sequence[Sequence[int]], pad_id: int, device: Any, prefix_lens: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``(input_ids, attention_mask, position_ids, cache)`` of a batch's first forward pass.

    Without ``prefix_lens`` (or all 0): the rows left-padded, no cache. With them, each row's first
    ``prefix_lens[i]`` tokens are its prefix: every distinct prefix runs once through the model
    (:func:`prefill_prefixes`), and what is left is the rows' suffixes, left-padded, whose mask
    and positions continue after the prefix, so a row attends to exactly its own tokens as without
    a prefix. Rows that share a prefix (the instructions and demonstrations of one demo set) pay
    for it once. Every row needs a prefix then (a row of padding only would attend to nothing)
    and at least one suffix token.
    """
    if not prefix_lens or not any(prefix_lens):
        input_ids, mask = left_padded(rows, pad_id, device)
        return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None
    if any(n < 1 or n >= len(r) for r, n in zip(rows, prefix_lens, strict=True)):
        raise ValueError("every row needs a prefix and a suffix of at least one token")
    cache, prefix_mask = prefill_prefixes(model, [r[:n] for r, n in zip(rows, prefix_lens, strict=True)],
                                          pad_id, device)
    input_ids, mask = left_padded([r[n:] for r, n in zip(rows, prefix_lens, strict=True)], pad_id, device)
    offset = torch.tensor(list(prefix_lens), device=device)[:, None]
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
    return input_ids, torch.cat([prefix_mask, mask], dim=1), positions, cache


def prefill_prefixes(model: Any, prefixes: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, torch.Tensor]:
    """The key/value cache and attention mask of ``prefixes``, one row per prefix, each distinct
    prefix run through the model once (a left-padded batch of them) and its cache repeated for
    every row that has it."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prefixes]
    input_ids, mask = left_padded([list(p) for p in distinct], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  logits_to_keep=1).past_key_values
    if index != list(range(len(distinct))):
        rows = torch.tensor(index, device=device)
        cache.batch_select_indices(rows)
        mask = mask[rows]
    return cache, mask


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token ids and their renormalised sampling probabilities, per row.

    Args:
        logits: ``[rows, vocab]`` next-token logits.
        temperature: > 0; logits are divided by it.
        top_p: Keep the smallest set of most likely tokens whose probability mass reaches it
            (1.0 keeps all).
        top_k: Keep at most this many most likely tokens first (0 keeps all).

    Returns:
        ``(ids, probs)``, both ``[rows, candidates]``: candidate token ids and probabilities
        summing to 1 per row (zero for tokens outside the nucleus).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    cut = 0 < top_k < vocab
    if top_p >= 1.0 and not cut:
        return torch.arange(vocab, device=probs.device).expand(probs.shape[0], vocab), probs
    vals, ids = probs.topk(top_k if cut else min(NUCLEUS_CANDIDATES, vocab), dim=-1)
    # transformers renormalises after a top-k cut, so the nucleus is measured within the cut.
    total = vals.sum(-1, keepdim=True) if cut else torch.ones_like(vals[:, :1])
    if not cut and top_p < 1.0 and vals.shape[-1] < vocab and bool((vals.sum(-1) < top_p).any()):
        # Some row's nucleus is wider than the candidates: sort the vocabulary (rare, and slow).
        vals, ids = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        before = vals.cumsum(-1) - vals
        vals = torch.where(before < top_p * total, vals, torch.zeros_like(vals))
    return ids, vals / vals.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """One sampled (``temperature > 0``) or greedy next token per row, shape ``[rows]``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    ids, probs = nucleus_probs(logits, temperature, top_p, top_k)
    return ids.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


def decode_batch(
    model: Any,
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    end_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    stopped: Callable[[list[int]], bool] | None = None,
    prefix_lens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each row of token ids.

    Args:
        model: A transformers causal LM (``model(input_ids, attention_mask, position_ids,
            past_key_values, use_cache, logits_to_keep)``).
        rows: Prompt token ids, one list per row (left-padded here).
        pad_id: Padding token id.
        end_ids: Tokens that end a row; they are not part of the returned ids.
        max_new_tokens: Cap on generated tokens per row.
        temperature: Sampling temperature; 0 is greedy.
        top_p: Nucleus mass (see :func:`nucleus_probs`).
        top_k: Top-k cut (0: none).
        stopped: Called with a row's generated ids after each new token when given; True ends
            the row there (stop strings).
        prefix_lens: Per row, leading tokens run as a prefix once per distinct prefix
            (:func:`start_batch`); None or all 0: no prefix pass.

    Returns:
        The generated ids per row, in input order, without the end token.
    """
    device = next(model.parameters()).device
    input_ids, mask, positions, cache = start_batch(model, rows, pad_id, device, prefix_lens)
    ends = torch.tensor(sorted(set(end_ids)), device=device)
    out: list[list[int]] = [[] for _ in rows]
    live = torch.arange(len(rows), device=device)  # input row of each batch row still generating
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new_tokens):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = result.past_key_values
        token = next_tokens(result.logits[:, -1, :], temperature, top_p, top_k)
        done = torch.isin(token, ends)
        for b, (row, tok, end) in enumerate(zip(live.tolist(), token.tolist(), done.tolist(), strict=True)):
            if not end:
                out[row].append(tok)
                if stopped is not None and stopped(out[row]):
                    done[b] = True
        keep = (~done).nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < live.numel():
            cache.batch_select_indices(keep)
            live, token, mask, step_pos = live[keep], token[keep], mask[keep], step_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
    return out
