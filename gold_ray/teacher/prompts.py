"""Render one teacher request (:class:`~gold_ray.types.Prompt`) from a task, a label and demos.

Two prompt styles, chosen by :func:`choose_prompt_style`:

- ``chat`` (instruct teachers): a short system message, then every demonstration as an
  *earlier chat turn* (the user asks for a sample of label L, the assistant answers with the
  demo), then the real request. Measured with SmolLM2-135M-Instruct, this layout kept the
  teacher on task where one block of demos inside a single user message made it drift.
- ``continuation`` (base teachers such as Gemma 3 270M): a header, the demos as labelled
  lines, then an open line that the model completes.

Output layout, which the parser relies on (it parses ``prompt.prefill + generated_text``):

- single-field tasks, chat: the answer is the bare text; ``prefill`` is ``""``.
- single-field tasks, continuation: the text ends with ``{Noun} ({label}): "``; ``prefill``
  is ``'"'`` and generation stops at the closing quote or a newline (stop strings are not
  part of the generated text). Double quotes inside demos are turned into single quotes so
  the demos show that a ``"`` ends the sample.
- multi-field tasks (pairs, text-to-text), both styles: one ``Display: value`` line per
  field, in the task's field order, the target last (``Problem: ...`` then ``Answer: 19``).
  Values are never quoted. In chat mode ``prefill`` is ``""``; in continuation mode the text
  ends with the first field's ``Display:`` and ``prefill`` is that same ``Display:``, and
  generation stops at a blank line or at the first field's tag on a new line.
- classify prompts end right where the answer starts: ``prefill`` is ``"Label:"``
  (``"{target_display}:"`` for text-to-text tasks). In continuation mode it is already the
  end of ``text``. In chat mode engines must start the assistant turn with it: render the
  messages with the generation prompt, then append ``prefill`` (see ``gold_ray.teacher.engines``).
  Options scored with ``option_logprobs`` are label words; engines join them to the prefill
  with one space.

Every demo value inserted into a prompt goes through :func:`sanitize_demo_text`, because
feedback demos are teacher output: a planted sample must not be able to close the chat
template or inject a system turn.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from gold_ray.run.tasks import TaskSpec
from gold_ray.types import Prompt, PromptKind

PromptStyle = Literal["chat", "continuation"]

PROMPT_STYLES: tuple[str, ...] = ("chat", "continuation")

LABEL_LEAD = "Label"
"""The tag a classify prompt's answer starts with (``Label: positive``)."""

PROBE_REQUEST = "Make it significantly different from the examples above: pick another topic or domain."
"""GOLD's probe request (methods.md 2.6), added to probe prompts only."""

ELLIPSIS = "..."

# Chat-template control tokens of the common families, plus any <|...|> token (ChatML, Llama 3,
# Phi, GPT) and the full-width-bar variant some tokenizers use (<｜...｜>).
_SPECIAL_TOKEN_RE = re.compile(
    r"<\s*[|\uff5c][^<>\n]{0,64}?[|\uff5c]\s*>"
    r"|<\s*/?\s*(?:s|bos|eos|pad|unk|mask|sep|cls|start_of_turn|end_of_turn|start_of_image|end_of_image"
    r"|im_start|im_end|endoftext)\s*>"
    r"|\[\s*/?\s*INST\s*\]"
    r"|<<\s*/?\s*SYS\s*>>",
    re.IGNORECASE,
)
_WHITESPACE_RE = re.compile(r"\s+")


def sanitize_demo_text(text: Any, max_chars: int) -> str:
    """Make one demo value safe and short enough to sit inside a prompt.

    Removes chat-template special tokens and lookalikes (``<|im_end|>``, ``<start_of_turn>``,
    ``<bos>``, ``</s>``, ``[INST]``, any ``<|...|>``), control and invisible format characters,
    collapses all whitespace (newlines included) to single spaces, and caps the length at a
    word boundary with an ellipsis.

    Args:
        text: The value; non-strings are converted with ``str`` (numeric answers).
        max_chars: Longest result allowed, ellipsis included.

    Returns:
        The cleaned text, at most ``max_chars`` characters long.
    """
    s = "" if text is None else str(text)
    # Invisible characters first, so "<|im\u200b_end|>" cannot hide a token from the regex.
    s = "".join(" " if _is_control(ch) else ch for ch in s)
    # Repeat: removing an inner token can join the pieces of an outer one ("<|im_<s>end|>").
    while True:
        cleaned = _SPECIAL_TOKEN_RE.sub(" ", s)
        if cleaned == s:
            break
        s = cleaned
    s = _WHITESPACE_RE.sub(" ", s).strip()
    return _cap(s, max_chars)


def _is_control(ch: str) -> bool:
    # Cc: control characters (tabs and newlines become spaces, then collapse); Cf: zero-width
    # and bidi format characters.
    return unicodedata.category(ch) in ("Cc", "Cf")


def _cap(s: str, max_chars: int) -> str:
    if max_chars <= 0:
        return ""
    if len(s) <= max_chars:
        return s
    if max_chars <= len(ELLIPSIS):
        return s[:max_chars]
    room = max_chars - len(ELLIPSIS)
    cut = s[: room + 1].rfind(" ")
    head = s[:cut] if cut > 0 else s[:room]
    return head.rstrip(" ,;:") + ELLIPSIS


def draw_style(task: TaskSpec, rng: np.random.Generator) -> str | None:
    """One of the task's style hints, drawn with ``rng``; None when the task has none.

    Args:
        task: The task.
        rng: Seeded generator owned by the caller, so a run's prompts are reproducible.

    Returns:
        A style hint such as ``"about the acting"``, or None.
    """
    if not task.style_hints:
        return None
    return task.style_hints[int(rng.integers(len(task.style_hints)))]


def choose_prompt_style(tokenizer_or_none: Any, configured: str) -> PromptStyle:
    """The prompt style to use for a teacher.

    Args:
        tokenizer_or_none: The teacher's tokenizer, or None when there is none at hand (a remote
            OpenAI-compatible endpoint).
        configured: ``chat``, ``continuation`` or ``auto``.

    Returns:
        ``configured`` when it names a style; for ``auto``: ``chat`` when the tokenizer has a
        chat template, ``continuation`` when it has none, and ``chat`` without a tokenizer
        (OpenAI-compatible endpoints are chat endpoints far more often than not).

    Raises:
        ValueError: ``configured`` is not one of the three values.
    """
    if configured in PROMPT_STYLES:
        return configured  # type: ignore[return-value]
    if configured != "auto":
        raise ValueError(f"prompt_style {configured!r}: expected 'auto', 'chat' or 'continuation'")
    if tokenizer_or_none is None:
        return "chat"
    return "chat" if getattr(tokenizer_or_none, "chat_template", None) else "continuation"


def render_train_prompt(task: TaskSpec, label: str | None, demos: list[dict], *, style: str | None,
                        prompt_style: PromptStyle, max_demo_chars: int = 300) -> Prompt:
    """A request for one training sample of ``label``.

    Args:
        task: The task.
        label: Label name asked for (None for text-to-text tasks, or an unconditioned sample).
        demos: Records (input fields and target key) shown as demonstrations, in order: the
            task's seed demos plus the strategy's feedback examples, chosen by the caller.
        style: Diversity hint (see :func:`draw_style`) or None.
        prompt_style: ``chat`` or ``continuation``.
        max_demo_chars: Length cap of each demo field value.

    Returns:
        A :class:`Prompt` of kind ``train``.

    Raises:
        ValueError: unknown label or prompt style, or a demo misses a field.
    """
    return _render_generation_prompt("train", task, label, demos, style, prompt_style, max_demo_chars)


def render_probe_prompt(task: TaskSpec, label: str | None, demos: list[dict], *, style: str | None,
                        prompt_style: PromptStyle, max_demo_chars: int = 300) -> Prompt:
    """Like :func:`render_train_prompt`, plus GOLD's request for a significantly different sample.

    Same arguments and errors as :func:`render_train_prompt`; returns a :class:`Prompt` of kind ``probe``.
    """
    return _render_generation_prompt("probe", task, label, demos, style, prompt_style, max_demo_chars)


def render_classify_prompt(
    task: TaskSpec,
    record: dict,
    demos: list[dict],
    *,
    prompt_style: PromptStyle,
    max_demo_chars: int = 300,
) -> Prompt:
    """A few-shot prompt asking the teacher to label ``record`` (the paper's "LLM" row).

    The prompt ends where the answer word starts: ``prefill`` is ``"Label:"`` (or
    ``"Answer:"``-like for text-to-text tasks), so a caller can score each label's verbalizer
    with ``engine.option_logprobs`` or generate a short answer (stop: newline).

    Args:
        task: The task.
        record: The sample to classify (its input fields; the target key is ignored).
        demos: Labelled records shown first, in order.
        prompt_style: ``chat`` or ``continuation``.
        max_demo_chars: Length cap of each field value.

    Returns:
        A :class:`Prompt` of kind ``classify`` with ``label=None``.

    Raises:
        ValueError: unknown prompt style, or a record or demo misses a field.
    """
    _check_style(prompt_style)
    lead = LABEL_LEAD if task.is_classification else task.target_display
    prefill = f"{lead}:"
    header = _label_glossary(task)
    if task.is_classification:
        instruction = f"Reply with the label only: {', '.join(lb.word for lb in task.labels)}."
    elif task.answer_type == "number":
        instruction = f"Reply with the {task.target_display.lower()} only, as a single number."
    else:
        instruction = f"Reply with the {task.target_display.lower()} only."
    question = _fields_block(task, record, max_demo_chars, with_target=False)
    shots = [(_fields_block(task, d, max_demo_chars, with_target=False), _answer_word(task, d, max_demo_chars))
             for d in demos]
    meta = _meta(task, prompt_style, demos, style=None)
    if prompt_style == "chat":
        role = "You are a careful annotator." if task.is_classification else "You answer carefully."
        system = f"{role} Task: {task.description}"
        if header:
            system += f"\n{header}"
        system += f"\n{instruction}"
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        for block, answer in shots:
            messages.append({"role": "user", "content": block})
            messages.append({"role": "assistant", "content": f"{lead}: {answer}"})
        messages.append({"role": "user", "content": question})
        return Prompt(kind="classify", label=None, messages=tuple(messages), prefill=prefill,
                      stop=("\n",), meta=meta)
    lines = [task.description]
    if header:
        lines.append(header)
    parts = ["\n".join(lines)]
    parts += [f"{block}\n{lead}: {answer}" for block, answer in shots]
    parts.append(f"{question}\n{prefill}")
    return Prompt(kind="classify", label=None, text="\n\n".join(parts), prefill=prefill, stop=("\n",), meta=meta)


# --- internals -------------------------------------------------------------------------------


def _check_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style {prompt_style!r}: expected 'chat' or 'continuation' (resolve 'auto' "
                         "with choose_prompt_style first)")


def _render_generation_prompt(
    kind: PromptKind,
    task: TaskSpec,
    label: str | None,
    demos: list[dict],
    style: str | None,
    prompt_style: str,
    max_chars: int,
) -> Prompt:
    _check_style(prompt_style)
    if label is not None and not task.is_classification:
        raise ValueError(f"task {task.name!r} is text_to_text and has no labels; got label {label!r}")
    word = _word(task, label)
    meta = _meta(task, prompt_style, demos, style)
    if prompt_style == "chat":
        return _chat_generation_prompt(kind, task, label, word, demos, style, max_chars, meta)
    return _continuation_generation_prompt(kind, task, label, word, demos, style, max_chars, meta)


def _chat_generation_prompt(kind: PromptKind, task: TaskSpec, label: str | None, word: str | None,
                            demos: list[dict], style: str | None, max_chars: int, meta: dict[str, Any]) -> Prompt:
    noun = task.sample_noun
    single = _single_field(task)
    system = f"You write one {noun} at a time for a dataset. The dataset trains a model on this task: {task.description}"
    if single:
        system += f"\nReply with only the {noun} text: no title, no quotes, no commentary."
    else:
        system += "\nReply with only the fields, one per line, each starting with its name. No commentary."
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for demo in demos:
        demo_word = _word(task, _require(task, demo, "label")) if task.is_classification else None
        messages.append({"role": "user", "content": _request_sentence(task, demo_word, None)})
        messages.append({"role": "assistant", "content": _answer_block(task, demo, max_chars, quote_safe=False)})
    final = [_request_sentence(task, word, style)]
    if label is not None:
        final.append(f"({word}: {task.label(label).description})")
    if kind == "probe":
        final.append(PROBE_REQUEST)
    request = " ".join(final)
    if task.output_format:
        sep = "\n" if "\n" in task.output_format else " "
        request += f"\nFormat:{sep}{task.output_format}"
    meta = {**meta, "prefix_key": prefix_key(json.dumps(messages, sort_keys=True))}
    messages.append({"role": "user", "content": request})
    stop = ("\n\n",) if single else ()
    return Prompt(kind=kind, label=label, messages=tuple(messages), prefill="", stop=stop, meta=meta)


def _continuation_generation_prompt(kind: PromptKind, task: TaskSpec, label: str | None, word: str | None,
                                    demos: list[dict], style: str | None, max_chars: int, meta: dict[str, Any]) -> Prompt:
    single = _single_field(task)
    header = [task.description]
    glossary = _label_glossary(task)
    if glossary:
        header.append(glossary)
    blocks = ["\n".join(header)]
    for demo in demos:
        demo_word = _word(task, _require(task, demo, "label")) if task.is_classification else None
        tag = _sample_tag(task, demo_word, None)
        if single:
            blocks.append(f'{tag} "{_answer_block(task, demo, max_chars, quote_safe=True)}"')
        else:
            blocks.append(f"{tag}\n{_answer_block(task, demo, max_chars, quote_safe=False)}")
    tag = _sample_tag(task, word, style)
    if single:
        prefill = '"'
        stop: tuple[str, ...] = ('"', "\n")
        open_block = f"{tag} {prefill}"
    else:
        prefill = f"{task.input_fields[0].display}:"
        stop = ("\n\n", f"\n{prefill}")
        open_block = f"{tag}\n{prefill}"
    if kind == "probe":
        open_block = f"The next {task.sample_noun} is significantly different from the ones above, " \
                     f"from another topic or domain.\n{open_block}"
    # Single-field demos are one line each, like a list; multi-field demos need blank lines between.
    joiner = "\n" if single else "\n\n"
    meta = {**meta, "prefix_key": prefix_key("\n\n".join([blocks[0], joiner.join(blocks[1:])]))}
    blocks.append(open_block)
    text = "\n\n".join([blocks[0], joiner.join(blocks[1:])])
    return Prompt(kind=kind, label=label, text=text, prefill=prefill, stop=stop, meta=meta)


def prefix_key(shared: str) -> str:
    """A short key of a prompt's shared part (instructions and demos, everything before the request
    of this one sample), kept as ``Prompt.meta["prefix_key"]``.

    Prompts with the same key begin with the same tokens: the ``hf`` engine runs that prefix once
    per batch and the Serve router sends calls of one key to one replica. Only the equality of keys
    means anything.
    """
    return hashlib.sha1(shared.encode("utf-8")).hexdigest()[:16]


def _single_field(task: TaskSpec) -> bool:
    return task.is_classification and len(task.input_fields) == 1


def _word(task: TaskSpec, label: str | None) -> str | None:
    if label is None or not task.is_classification:
        return None
    try:
        return task.label(label).word
    except KeyError as err:
        raise ValueError(str(err.args[0])) from err


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _request_sentence(task: TaskSpec, word: str | None, style: str | None) -> str:
    noun = task.sample_noun
    if word is None:
        sentence = f"Write {_article(noun)} {noun}"
    elif task.type == "classification":
        sentence = f"Write {_article(word)} {word} {noun}"
    else:
        # "Write an entailment premise and hypothesis pair" reads badly; name the label instead.
        sentence = f'Write {_article(noun)} {noun} with the label "{word}"'
    if style:
        sentence += f", {style}"
    return sentence + "."


def _sample_tag(task: TaskSpec, word: str | None, style: str | None) -> str:
    noun = task.sample_noun[:1].upper() + task.sample_noun[1:]
    inside = ", ".join(x for x in (word, style) if x)
    return f"{noun} ({inside}):" if inside else f"{noun}:"


def _label_glossary(task: TaskSpec) -> str:
    if not task.is_classification:
        return ""
    return "Labels: " + "; ".join(f"{lb.word} ({lb.description})" for lb in task.labels) + "."


def _require(task: TaskSpec, record: Mapping[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise ValueError(f"task {task.name!r}: record has no {key!r} field (has {sorted(record)})")
    return record[key]


def _answer_block(task: TaskSpec, record: Mapping[str, Any], max_chars: int, *, quote_safe: bool) -> str:
    if _single_field(task):
        text = sanitize_demo_text(_require(task, record, task.input_fields[0].name), max_chars)
        return text.replace('"', "'") if quote_safe else text
    return _fields_block(task, record, max_chars, with_target=not task.is_classification)


def _fields_block(task: TaskSpec, record: Mapping[str, Any], max_chars: int, *, with_target: bool) -> str:
    lines = [f"{f.display}: {sanitize_demo_text(_require(task, record, f.name), max_chars)}"
             for f in task.input_fields]
    if with_target:
        value = sanitize_demo_text(_require(task, record, task.target_key), max_chars)
        lines.append(f"{task.target_display}: {value}")
    return "\n".join(lines)


def _answer_word(task: TaskSpec, record: Mapping[str, Any], max_chars: int) -> str:
    if task.is_classification:
        word = _word(task, _require(task, record, "label"))
        return str(word)
    return sanitize_demo_text(_require(task, record, task.target_key), max_chars)


def _meta(task: TaskSpec, prompt_style: str, demos: list[dict], style: str | None) -> dict[str, Any]:
    return {
        "task": task.name,
        "prompt_style": prompt_style,
        "style": style,
        "n_demos": len(demos),
        "demo_ids": [d["id"] for d in demos if d.get("id") is not None],
    }
