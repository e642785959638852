"""How varied a run's generated texts are: distinct n-grams and how close each text is to its nearest other.

A generation strategy that shows the teacher fewer distinct demonstrations (``teacher.prompts_per_demo_set``)
or the same feedback examples again may make it write the same thing again in other words. These
numbers say whether it did, on a fixed-size random subsample, since distinct n-gram shares fall as
texts are added: compare runs at the same ``texts``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

SAMPLE_TEXTS = 1000
"""Texts :func:`text_diversity` draws (all of them when fewer): the pairwise measure is quadratic."""

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _bigrams(words: list[str]) -> set[tuple[str, str]]:
    return set(pairwise(words))


def text_diversity(texts: Sequence[str], sample: int = SAMPLE_TEXTS, seed: int = 0) -> dict[str, Any]:
    """Diversity of ``texts`` measured on a random subsample of ``sample`` of them.

    Args:
        texts: The generated texts (a record's input fields joined by spaces).
        sample: How many texts to draw without replacement (all when fewer).
        seed: Seed of the draw, so two calls on the same texts agree.

    Returns:
        ``texts`` (how many were measured), ``distinct_1`` and ``distinct_2`` (distinct words and
        word bigrams over all of them, lowercased, punctuation as words), ``nearest_overlap`` (the
        mean, over texts, of the largest bigram-set Jaccard similarity with any other text: 0 when
        no two texts share a bigram, 1 when every text has a copy) and ``near_copies`` (the share
        of texts whose nearest other shares at least half of their bigrams). Values are None when
        fewer than two texts have a bigram.
    """
    texts = [t for t in texts if t and t.strip()]
    if len(texts) > sample:
        picks = np.random.default_rng(seed).choice(len(texts), size=sample, replace=False)
        texts = [texts[int(i)] for i in sorted(picks)]
    words = [_words(t) for t in texts]
    unigrams = [w for ws in words for w in ws]
    pairs = [p for ws in words for p in pairwise(ws)]
    out: dict[str, Any] = {
        "texts": len(texts),
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else None,
        "distinct_2": len(set(pairs)) / len(pairs) if pairs else None,
        "nearest_overlap": None,
        "near_copies": None,
    }
    sets = [b for b in (_bigrams(ws) for ws in words) if b]
    if len(sets) < 2:
        return out
    nearest = np.zeros(len(sets))
    for i in range(len(sets)):
        a = sets[i]
        for j in range(i + 1, len(sets)):
            b = sets[j]
            shared = len(a & b)
            if shared:
                jaccard = shared / (len(a) + len(b) - shared)
                nearest[i] = max(nearest[i], jaccard)
                nearest[j] = max(nearest[j], jaccard)
    out["nearest_overlap"] = float(nearest.mean())
    out["near_copies"] = float((nearest >= 0.5).mean())
    return out


def record_text(record: dict[str, Any], fields: Sequence[str]) -> str:
    """A record's input fields joined by spaces (what :func:`text_diversity` measures)."""
    return " ".join(str(record.get(f) or "") for f in fields).strip()


def records_diversity(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    """:func:`text_diversity` of the records' input ``fields`` (a task's ``field_names``)."""
    return text_diversity([record_text(r, fields) for r in records])
