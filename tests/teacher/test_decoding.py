"""gold_ray.teacher.decoding against transformers: greedy tokens, the sampling distribution, row dropping."""

from __future__ import annotations

import pytest
import torch

from gold_ray.teacher import decoding
from gold_ray.teacher.decoding import decode_batch, next_tokens, nucleus_probs

PAD, END = 0, 1
ROWS = [[5, 9, 13, 2], [7, 3], [11, 12, 13, 14, 15, 16], [4]]  # mixed lengths, left-padded inside


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=END, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
    """Gemma 3's layout (the other embedded teacher): a sliding-window layer beside a full one,
    with a window shorter than the sequences so the sliding cache is exercised."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                           pad_token_id=PAD, eos_token_id=END, bos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def reference_greedy(model, rows, n):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=PAD, eos_token_id=[END])
    result = []
    for row in out[:, width:].tolist():
        cut = row.index(END) if END in row else len(row)
        result.append(row[:cut])
    return result


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_greedy_tokens_equal_transformers_generate(build):
    model = build()
    with torch.inference_mode():
        ours = decode_batch(model, ROWS, pad_id=PAD, end_ids=[END], max_new_tokens=12, temperature=0.0)
    assert ours == reference_greedy(model, ROWS, 12)
    assert all(0 < len(o) <= 12 for o in ours)


def test_finished_rows_leave_the_batch(monkeypatch):
    model = tiny_llama()
    widths = []
    real_forward = model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    full = decode_batch(model, ROWS, pad_id=PAD, end_ids=[END], max_new_tokens=6, temperature=0.0)
    widths.clear()
    # Row 1 stops after 2 tokens, row 3 after 4: the batch shrinks and the rest is unchanged.
    cut = {1: 2, 3: 4}
    out = decode_batch(model, ROWS, pad_id=PAD, end_ids=[END], max_new_tokens=6, temperature=0.0,
                       stopped=lambda ids: False)
    assert out == full and widths == [4] * 6
    widths.clear()
    lengths = {i: len(r) for i, r in enumerate(full)}
    stops_at = {tuple(full[i][:n]) for i, n in cut.items() if lengths[i] >= n}
    out = decode_batch(model, ROWS, pad_id=PAD, end_ids=[END], max_new_tokens=6, temperature=0.0,
                       stopped=lambda ids: tuple(ids) in stops_at)
    assert out[1] == full[1][:2] and out[3] == full[3][:4]
    assert out[0] == full[0] and out[2] == full[2]  # the rows that stay are not disturbed
    assert widths == [4, 4, 3, 3, 2, 2]


def hf_filtered_probs(logits, temperature, top_p, top_k):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(warpers(None, logits.clone()), dim=-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.95, 0), (0.7, 0.9, 0), (1.0, 0.95, 10), (1.0, 1.0, 0)])
def test_nucleus_equals_transformers_warpers(temperature, top_p, top_k, monkeypatch):
    monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", 64)
    torch.manual_seed(1)
    vocab = 2000
    peaked = torch.randn(3, vocab) * 6  # nucleus of a few tokens
    flat = torch.randn(3, vocab) * 0.1  # nucleus wider than the candidates (below): the full-sort path
    for logits in (peaked, torch.cat([peaked, flat])):  # the candidate path, then the sorted one
        ids, probs = nucleus_probs(logits, temperature, top_p, top_k)
        assert ids.shape[1] == (vocab if top_k == 0 and (top_p == 1.0 or len(logits) == 6) else min(top_k or 64, 64))
        ours = torch.zeros_like(logits).scatter_(1, ids, probs)
        expected = hf_filtered_probs(logits, temperature, top_p, top_k)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_sampled_tokens_follow_the_nucleus(monkeypatch):
    monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", 16)
    torch.manual_seed(2)
    vocab = 500
    # Row 0's nucleus fits in 16 candidates, row 1's (flat) does not, so the vocabulary is sorted.
    logits = torch.stack([torch.randn(vocab) * 4, torch.randn(vocab) * 0.05])
    expected = hf_filtered_probs(logits, 1.0, 0.9, 0)
    # 3000 draws per row in one batched call: rows 0, 2, 4 ... are row 0's logits.
    tok = next_tokens(logits.repeat(3000, 1), 1.0, 0.9, 0).view(3000, 2)
    counts = torch.zeros(2, vocab)
    for row in range(2):
        counts[row].index_add_(0, tok[:, row], torch.ones(3000))
    assert bool(((counts > 0) <= (expected > 0)).all())  # never a token outside the nucleus
    freq = counts / counts.sum(-1, keepdim=True)
    top = expected[0].argmax()
    assert abs(float(freq[0, top] - expected[0, top])) < 0.04
    assert int((counts[1] > 0).sum()) > 200  # the wide row really draws from its wide nucleus


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    assert next_tokens(logits, 0.0, 0.9, 0).tolist() == [1, 0]
