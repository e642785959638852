"""The teacher as a labeller: how ``classify`` prompts are answered and how their answers are read.

A strategy that needs the teacher's label for a text (LLKD) sends a ``classify`` prompt (see
:func:`gold_ray.teacher.prompts.render_classify_prompt`) through the same generation path as every other
prompt, with two entries in ``Prompt.meta``:

- ``record``: the input fields of the text to label (the answer's record takes them from here);
- ``options``: the label words, in the task's label order.

:func:`answer_prompts` is what every runtime calls to answer a batch (the in-process loop and the
Ray Serve teacher deployment alike): generation prompts go to ``engine.generate``; classify
prompts with options are answered by scoring each option with ``engine.option_logprobs`` (one
forward pass, no tokens generated), and the answer's text is the best option. Where the engine
cannot score (an OpenAI-compatible endpoint returns NaN rows), the prompt is generated greedily
instead and :func:`read_answer` finds the label word in the text; such answers have no confidence
(NaN).

:func:`read_answer` turns an answer into a record's fields plus the teacher's confidence: the
softmax of the option log-probabilities, taken at the chosen label (methods.md 6.2, option B:
the verbalizers' log-likelihoods renormalised over the classes).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np

from gold_ray.run.tasks import TaskSpec
from gold_ray.teacher.parsing import ParseResult
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

OPTIONS_KEY = "options"
"""``Prompt.meta`` key of the label words a classify prompt is scored over."""

RECORD_KEY = "record"
"""``Prompt.meta`` key of the input fields of the text a classify prompt asks about."""

FALLBACK_MAX_NEW_TOKENS = 16
"""Tokens generated for a classify prompt the engine could not score (a label is a few words)."""


def classify_options(prompt: Prompt) -> list[str] | None:
    """The label words a ``classify`` prompt is scored over, or None (not a scored classify prompt)."""
    if prompt.kind != "classify":
        return None
    options = prompt.meta.get(OPTIONS_KEY)
    if not options:
        return None
    return [str(o) for o in options]


def answer_prompts(engine: TeacherEngine, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
    """Answer a batch of prompts with ``engine``: generate, or score the options of classify prompts.

    Classify prompts that share one option list are scored in one ``option_logprobs`` call. An
    engine-wide scoring failure, or a row with no finite score, falls back to greedy generation
    of that prompt (at most :data:`FALLBACK_MAX_NEW_TOKENS` tokens). Every other prompt (a classify
    prompt without options too) is generated with ``params``.

    Args:
        engine: Any teacher engine.
        prompts: The prompts, any kinds.
        params: Sampling parameters of the generation prompts.

    Returns:
        One :class:`Generation` per prompt, in order; scored ones carry ``option_logprobs`` and
        have ``output_tokens == 0``.
    """
    out: list[Generation | None] = [None] * len(prompts)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        options = classify_options(p)
        if options is not None:
            groups.setdefault(tuple(options), []).append(i)
    for options, idx in groups.items():
        try:
            rows = engine.option_logprobs([prompts[i] for i in idx], list(options))
        except Exception:  # noqa: BLE001 - an engine that cannot score falls back to generating
            rows = [[math.nan] * len(options) for _ in idx]
        for i, row in zip(idx, rows, strict=True):
            scores = np.asarray(row, dtype=np.float64)
            if len(scores) == len(options) and np.isfinite(scores).any():
                best = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
                out[i] = Generation(text=options[best], output_tokens=0,
                                    option_logprobs=tuple(float(s) for s in scores))
    greedy = replace(params, temperature=0.0, max_new_tokens=min(params.max_new_tokens, FALLBACK_MAX_NEW_TOKENS))
    # Only a classify prompt that was to be scored falls back to a short greedy answer; a classify
    # prompt without options (the teacher row of a text-to-text task) is answered with ``params``.
    for kind_params, wanted in ((params, False), (greedy, True)):
        idx = [i for i, g in enumerate(out) if g is None and (classify_options(prompts[i]) is not None) == wanted]
        if idx:
            for i, gen in zip(idx, engine.generate([prompts[i] for i in idx], kind_params), strict=True):
                out[i] = gen
    return [g if g is not None else Generation(text="", error="internal: no answer") for g in out]


def label_in_text(task: TaskSpec, text: str) -> str | None:
    """The label whose word (or name) appears first in ``text``; longer words win ties."""
    low = " ".join(text.lower().split())
    best: tuple[int, int, str] | None = None
    for label in task.labels:
        for word in {label.word.lower(), label.name.lower()}:
            m = re.search(rf"(?<![\w/]){re.escape(word)}(?![\w/])", low)
            if m is not None:
                key = (m.start(), -len(word), label.name)
                best = key if best is None or key < best else best
    return best[2] if best else None


def softmax_confidence(option_logprobs: Any) -> tuple[int, float] | None:
    """The best option's index and its probability after a softmax over the finite scores."""
    if option_logprobs is None:
        return None
    scores = np.asarray(list(option_logprobs), dtype=np.float64)
    finite = np.isfinite(scores)
    if scores.size == 0 or not finite.any():
        return None
    z = np.where(finite, scores, -np.inf)
    best = int(np.argmax(z))
    probs = np.exp(z - z[best])
    return best, float(1.0 / probs.sum())


def read_answer(
    task: TaskSpec, prompt: Prompt, text: str, option_logprobs: Any = None
) -> tuple[ParseResult, float]:
    """The labelled record of one classify answer, and the teacher's confidence in its label.

    Args:
        task: A classification task.
        prompt: The classify prompt (its ``meta["record"]`` holds the text's input fields).
        text: The answer's text (the best option, or generated text).
        option_logprobs: The answer's option scores, in the order of ``meta["options"]``
            (which must name the task's labels in label order); None for generated answers.

    Returns:
        ``(result, confidence)``: accepted fields (input fields and ``label``) or a reject
        (``missing_field`` when the record or a label cannot be found), and the softmax
        probability of the label (NaN for generated answers).
    """
    record = prompt.meta.get(RECORD_KEY)
    if not isinstance(record, dict) or any(record.get(f) in (None, "") for f in task.field_names):
        return ParseResult(None, "missing_field", "classify prompt without the record to label"), math.nan
    fields = {f: str(record[f]) for f in task.field_names}
    scored = softmax_confidence(option_logprobs)
    options = classify_options(prompt) or []
    if scored is not None and len(options) == len(task.labels):
        best, confidence = scored
        return ParseResult({**fields, "label": task.label_names[best]}, None), confidence
    label = label_in_text(task, text or "")
    if label is None:
        return ParseResult(None, "missing_field", f"no label word in the answer {text[:80]!r}"), math.nan
    return ParseResult({**fields, "label": label}, None), math.nan
