"""Turn teacher text into task fields, or reject it with one of :data:`~gold_ray.types.REJECT_REASONS`.

The text parsed is ``prompt.prefill + generation.text``. Prefill text before the first field tag
is the prompt's, not the sample's (GOLD prefills "Sure! here is a novel sample for you. ...
Premise:"), so it is dropped; a prefill without any tag keeps only a trailing opening quote
(ZeroGen's ``... is: "``).

Fields are found by their ``display`` tag (``Review:``, ``Premise:``, ``Answer:``), case-insensitive,
at the start of a line or just after punctuation, tolerating markdown (``**Premise:**``,
``### Premise:``), numbering (``1. Premise:``), bullets and JSON-style quotes (``"Premise":``).
A value runs to the next tag. A single-input classification task needs no tag: without one the
whole text is the value.

Each value is cleaned: a value that starts with a double quote is cut at the closing quote, or
else at the first newline (ZeroGen's post-processing); otherwise it is cut at the first blank
line, or at a newline followed by a tag-like line (``Label: ...``) or assistant chatter. Wrapping
quotes and markdown are stripped and whitespace is collapsed. Curly quotes are straightened first.

Checks, in order (the first that fires names the reason):

1. ``too_long``: the raw text is over :data:`MAX_RAW_CHARS` (before any regex runs).
2. ``refusal``: control characters, lone surrogates or U+FFFD (binary junk).
3. ``empty``: no letter or digit anywhere.
4. ``refusal``: a value (or, when no tag is found, the whole text) matches one of
   :data:`CHATTER_PATTERNS`: refusals, "As an AI", "Sure! Here's a ...:", "I hope this helps",
   role-prompt echoes, "Note:", instruction echoes, JSON or code.
5. ``missing_field``: a field's tag is absent (detail names the fields).
6. ``empty``: a field's value is empty or punctuation only after cleaning.
7. ``refusal``: a value with almost no letters (< :data:`MIN_LETTER_SHARE` of its non-space
   characters), or a value of 24+ characters found verbatim in the prompt (echo);
   ``duplicate`` when it copies a seed demonstration of the task.
8. ``label_leak`` (classification tasks only): see :func:`label_leak`.
9. ``too_short`` / ``too_long``: an input field outside its ``min_chars``/``max_chars``.
10. ``missing_field``: for ``answer_type: number``, a target without a number.

The accepted ``fields`` hold the task's input fields and, for text-to-text tasks, the target
field; the label of a classification sample is the prompt's, not the parser's.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from gold_ray.run.tasks import TaskSpec
from gold_ray.types import REJECT_REASONS, Generation, Prompt

MAX_RAW_CHARS = 16_000
"""Longer raw texts are rejected as ``too_long`` before any parsing (no teacher writes that much
for one sample, and it bounds the regex work)."""

MIN_LETTER_SHARE = 0.5
"""A value whose letters are fewer than this share of its non-space characters is junk."""

ECHO_MIN_CHARS = 24
"""Normalised values at least this long that occur verbatim in the prompt are echoes."""

_I = re.IGNORECASE
_VERBS = r"(?:help|assist|fulfil+|comply|generate|create|write|provide|produce|do\s+that|complete|continue|answer|respond)"
_NOUNS = r"(?:review|sample|example|sentence|article|pair|premise|hypothesis|problem|question|data|text)"

CHATTER_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Refusals need an assistant verb: "I am sorry I paid for this film" is a fine negative review.
    (
        "refusal",
        re.compile(
            r"\A(?:I(?:'m|\s+am)\s+(?:so\s+|very\s+|really\s+)?sorry|sorry|I\s+apologi[sz]e|unfortunately)\b"
            rf"[^\n]{{0,80}}?\b(?:can(?:no|')?t|cannot|unable\s+to|not\s+able\s+to|won't|will\s+not)\s+{_VERBS}",
            _I,
        ),
    ),
    (
        "refusal",
        re.compile(
            rf"\AI\s*(?:can(?:no|')?t|cannot|won't|will\s+not|(?:'m|\s+am)\s+(?:unable|not\s+able))\s+(?:to\s+)?{_VERBS}",
            _I,
        ),
    ),
    ("refusal", re.compile(r"\bagainst\s+my\s+(?:guidelines|programming|polic(?:y|ies)|principles)\b", _I)),
    (
        "ai_disclaimer",
        re.compile(
            r"(?:\A|[.!?,]\s+)as\s+an?\s+(?:AI|artificial\s+intelligence|(?:large\s+)?language\s+model|"
            r"(?:AI\s+|virtual\s+)?assistant|chatbot)\b"
            # Mid-sentence only with a comma or "language model": "sold as an AI company" is news.
            r"|\bas\s+an?\s+(?:AI|artificial\s+intelligence)\s*,|\bas\s+an?\s+(?:AI\s+)?(?:large\s+)?language\s+model\b",
            _I,
        ),
    ),
    (
        "ai_disclaimer",
        re.compile(
            r"\bI(?:'m|\s+am)\s+(?:just\s+|only\s+)?an?\s+(?:AI|artificial\s+intelligence|(?:large\s+)?language\s+model|"
            r"(?:AI\s+|virtual\s+)assistant|chatbot)\b",
            _I,
        ),
    ),
    (
        "role_echo",
        re.compile(
            r"\byou(?:'re|\s+are)\s+an?\s+(?:AI|helpful|virtual)\b[^\n.]{0,20}?\bassistant\b|\byou\s+only\s+reply\s+once\b"
            r"|\bdo\s+not\s+pretend\s+to\s+be\b|\A(?:assistant|user|system|human)\s*:",
            _I,
        ),
    ),
    ("intro", re.compile(r"\ASure\s*!")),
    (
        "intro",
        re.compile(
            r"\A(?:sure|certainly|of\s+course|absolutely|okay|ok|alright|great\s+question)\s*[!,.:]\s*"
            r"(?:here|below|I|let\s+me|this\s+is|the\s+following)\b",
            _I,
        ),
    ),
    # "Here is a film that ..." is a review; "Here's a positive movie review:" is not.
    (
        "intro",
        re.compile(
            r"\A(?:here(?:'s|\s+is|\s+are)|below\s+(?:is|are)|the\s+following\s+is)\b[^\n.!?]{0,100}?"
            r"(?::|\b(?:review|sample|example|novel|premise|hypothesis|word\s+problem|article|version)\b)",
            _I,
        ),
    ),
    (
        "closing",
        re.compile(
            r"\bI\s+hope\s+(?:this|these|that)\s+(?:helps?|is\s+helpful|meets|fits|works\s+for\s+you|examples?)\b"
            r"|\blet\s+me\s+know\s+if\b|\bfeel\s+free\s+to\s+(?:ask|let\s+me|modify|adjust|change|use)\b"
            r"|\bis\s+there\s+anything\s+else\b",
            _I,
        ),
    ),
    ("note", re.compile(r"(?:\A|[\s(\[])\**(?:Note|NOTE|Disclaimer|Explanation)\**\s*:")),
    (
        "instruction_echo",
        re.compile(
            r"\A(?:please\s+)?(?:write|generate|create|give|produce|compose|provide)\s+(?:me\s+)?"
            rf"(?:a|an|one|two|some|the|another)\b[^\n]{{0,60}}?\b{_NOUNS}\b",
            _I,
        ),
    ),
    (
        "instruction_echo",
        re.compile(r"\b(?:think\s+step\s+by\s+step|significantly\s+different\s+from\s+the\s+above)\b", _I),
    ),
    ("code", re.compile(r"\A\s*[\[{]|```|\A\s*<[a-z/!?]")),
)
"""``(name, pattern)`` pairs that mark a value as assistant talk rather than a sample.

Patterns are searched in each cleaned value; most are anchored at its start (``\\A``) so that a
review can still say "I cannot believe how good this is". Extend the tuple to add a pattern.
"""

_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd\ufffe\uffff]")
_TRANSLATE = str.maketrans(
    {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
     "\u2018": "'", "\u2019": "'", "\u00a0": " ", "\u3000": " ", "\uff1a": ":"}
)  # fmt: skip
_SPECIAL_TOKEN = re.compile(
    r"<\|[^>\n]{0,40}\|>|</?s>|\[/?INST\]|<(?:end_of_turn|start_of_turn|eos|bos)>", _I
)
# Bullets, headings and list numbers ("1. ", "2) "); not "#1 film", "-5" or "2.5 stars".
_LEADING_MARKUP = re.compile(r"\A(?:[*_>\u2022]+|#+\s|-\s|\d{1,2}[.)]\s)[\s*_>\u2022]*")
_TAG_LIKE_LINE = re.compile(r"\A[\W_]{0,4}[A-Za-z][A-Za-z0-9 /&'()-]{0,30}[:=](?:\s|\Z)")
_WS = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[\W_]+")
_LABEL_TAG = re.compile(r"(?<![\w-])(?:labels?|sentiment|class|category|classification)\s*[:=]", _I)
_NUMBER = re.compile(
    r"(?<![\d.,])(-?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:\s*/\s*(\d{1,3}(?:,\d{3})+|\d+)(?![\d.]))?"
)


@dataclass(frozen=True)
class ParseResult:
    """The outcome of parsing one generation: task fields, or the reason for rejecting it.

    Attributes:
        fields: Input field values (and the target for text-to-text tasks) when accepted, else None.
        reason: One of :data:`~gold_ray.types.REJECT_REASONS` when rejected, else None.
        detail: Human-readable explanation of the rejection (which field, which pattern).
    """

    fields: dict[str, str] | None
    reason: str | None
    detail: str = ""

    def __post_init__(self) -> None:
        if (self.fields is None) == (self.reason is None):
            raise ValueError("a ParseResult has exactly one of fields or reason")
        if self.reason is not None and self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; expected one of {REJECT_REASONS}")

    @property
    def accepted(self) -> bool:
        """True when the generation was turned into fields."""
        return self.fields is not None


def _reject(reason: str, detail: str) -> ParseResult:
    return ParseResult(fields=None, reason=reason, detail=detail)


# --------------------------------------------------------------------------------------------
# Task-specific patterns (built once per TaskSpec object)


def _words_pattern(text: str) -> str:
    """A phrase as a regex, matching any run of spaces, underscores or hyphens between its words."""
    return r"[\s_-]*".join(re.escape(w) for w in re.split(r"[\s_]+", text.strip()) if w)


def _tag_pattern(display: str) -> str:
    return (
        r"(?:^|(?<=[.!?;,{\[(]))[ \t]*+"  # a line start, or just after punctuation
        # Bullets, headings, numbering; bounded, because "1." starts a new boundary and an
        # unbounded run would rescan the rest of the text from every boundary (quadratic).
        r"(?:(?:[-*>#\u2022]{1,6}+|\d{1,2}[.):])[ \t]*+){0,3}+"
        r"[\"'*_`]*+" + _words_pattern(display) + r"[\"'*_`]*+[ \t]*+:[ \t*_]*+"
    )


@dataclass(frozen=True)
class _TaskPatterns:
    fields: tuple[tuple[str, str], ...]  # (name, display) of every parsed field, target last
    tags: tuple[re.Pattern[str], ...]
    any_tag: re.Pattern[str]
    leak: re.Pattern[str] | None
    seed_values: frozenset[str]


_PATTERN_CACHE: dict[int, tuple[TaskSpec, _TaskPatterns]] = {}


def _label_leak_pattern(task: TaskSpec) -> re.Pattern[str] | None:
    if not task.is_classification:
        return None
    words: set[str] = set()
    for label in task.labels:
        words |= {label.name, label.word, label.name.replace("_", " ")}
    alt = "|".join(_words_pattern(w) for w in sorted(words, key=len, reverse=True) if w.strip())
    # Not "label" ("the shipping label" of a ticket about shipping is no leak); "(label: x)" is part one.
    noun_words = ["category", "sample"]
    # "business sentiment" is news, "positive sentiment" a leak: only opinion tasks count it.
    if re.search(r"\b(?:sentiment|opinion)", task.description, _I):
        noun_words.append("sentiment")
    last_noun = task.sample_noun.split()[-1:] if task.sample_noun.strip() else []
    nouns = "|".join(re.escape(n) for n in noun_words + last_noun)
    parts = (
        rf"[(\[]\s*(?:label\s*[:=]?\s*)?(?:{alt})\s*[)\]]",  # "(entailment)", "[positive]"
        rf"\b(?:{alt})\s+(?:[a-z]+\s+)?(?:{nouns})\b",  # "positive review", "negative movie review"
        rf"\A(?:{alt})\s*(?::|\s[-\u2013\u2014]\s)",  # "Positive: ..."
        rf"\b(?:this|the)\s+(?:{nouns})\s+is\s+(?:(?:clearly|very|definitely|overall)\s+)?(?:{alt})\b",
    )
    return re.compile("|".join(f"(?:{p})" for p in parts), _I)


def _task_patterns(task: TaskSpec) -> _TaskPatterns:
    cached = _PATTERN_CACHE.get(id(task))
    if cached is not None and cached[0] is task:
        return cached[1]
    fields = tuple((f.name, f.display) for f in task.input_fields)
    if not task.is_classification:
        fields += ((task.target_key, task.target_display),)
    tags = tuple(re.compile(_tag_pattern(display), _I | re.MULTILINE) for _, display in fields)
    any_tag = re.compile("|".join(f"(?:{t.pattern})" for t in tags), _I | re.MULTILINE)
    seeds = frozenset(
        _normalize(str(demo[name])) for demo in task.seed_demos for name in task.field_names if demo.get(name)
    )
    patterns = _TaskPatterns(fields, tags, any_tag, _label_leak_pattern(task), seeds)
    if len(_PATTERN_CACHE) > 64:
        _PATTERN_CACHE.clear()
    _PATTERN_CACHE[id(task)] = (task, patterns)
    return patterns


# --------------------------------------------------------------------------------------------
# Cleaning


def _normalize(text: str) -> str:
    """Lower-cased text with punctuation and whitespace runs turned into single spaces."""
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _chatter(value: str) -> str | None:
    """Name of the first chatter pattern found in ``value``, or None."""
    for name, pattern in CHATTER_PATTERNS:
        if pattern.search(value):
            return name
    return None


def _cut_lines(text: str) -> str:
    """The first line, plus following lines up to a blank, tag-like or chatter line."""
    lines = text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        stripped = line.strip()
        if not stripped or _TAG_LIKE_LINE.match(stripped) or _chatter(stripped):
            break
        kept.append(line)
    return " ".join(kept)


def _clean_value(text: str) -> str:
    """One field value, cut and stripped as described in the module docstring."""
    special = _SPECIAL_TOKEN.search(text)
    if special:
        text = text[: special.start()]
    text = _LEADING_MARKUP.sub("", text.strip())
    if text.startswith('"'):
        close = text.find('"', 1)
        # ZeroGen: cut at the first closing quote, else at the first newline.
        text = text[1:close] if close >= 0 else text[1:].split("\n", 1)[0]
    else:
        text = _cut_lines(text)
    text = text.strip().strip("*_").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return _WS.sub(" ", text).strip()


def _effective_text(patterns: _TaskPatterns, prefill: str, text: str) -> str:
    """The generation with the prompt's own part of the prefill (before its first tag) removed."""
    if not prefill:
        return text
    tag = patterns.any_tag.search(prefill)
    if tag:
        return prefill[tag.start() :] + text
    return '"' + text if prefill.rstrip().endswith('"') else text


def _extract(patterns: _TaskPatterns, text: str, single: bool) -> dict[str, str | None]:
    """Raw value of each field (None when its tag is absent); ``single``: untagged text is the value."""
    starts = sorted({m.start() for m in patterns.any_tag.finditer(text)})
    values: dict[str, str | None] = {}
    for (name, _), tag in zip(patterns.fields, patterns.tags, strict=True):
        m = tag.search(text)
        if m is None:
            values[name] = text if single else None
            continue
        end = next((s for s in starts if s >= m.end()), len(text))
        values[name] = text[m.end() : end]
    return values


def _letter_share(value: str) -> float:
    visible = [c for c in value if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0


def _prompt_text(prompt: Prompt) -> str:
    if prompt.messages is not None:
        return "\n".join(str(m.get("content", "")) for m in prompt.messages)
    return prompt.text or ""


def label_leak(task: TaskSpec, value: str) -> str | None:
    """Why ``value`` names a label as a label, or None. Classification tasks only.

    The exact rule (case-insensitive; a label "word" is its name, its name with ``_`` as spaces,
    or its verbalizer; words may be joined by spaces, ``_`` or ``-``):

    - a label tag anywhere: ``label:``, ``labels:``, ``sentiment:``, ``class:``, ``category:``,
      ``classification:`` (or with ``=``);
    - a label word alone in brackets: ``(entailment)``, ``[positive]``, ``(label: positive)``;
    - a label word followed, directly or after one word, by ``category``, ``sample``, the last
      word of the task's ``sample_noun`` (``review`` for SST-2) or, when the task's description
      mentions "sentiment" or "opinion", ``sentiment``: "a positive review", "negative movie
      review", "entailment sample", "positive sentiment". Plurals do not count ("despite positive
      reviews" is fine), nor ``label`` ("the shipping label" of a parcel);
    - the value starts with a label word and a colon or a spaced dash: "Negative: ...";
    - "this/the <noun> is [clearly|very|definitely|overall] <label word>": "the sentiment is negative".

    Ordinary use of a label word ("a positive surprise", "negative space", "business sentiment"
    in AG News) is not a leak.

    Args:
        task: The task (text-to-text tasks never leak).
        value: One cleaned input field value.

    Returns:
        A short description of the leak, or None.
    """
    leak = _task_patterns(task).leak
    if leak is None:
        return None
    m = _LABEL_TAG.search(value) or leak.search(value)
    return f"names a label: {m.group(0).strip()!r}" if m else None


def _number(value: str) -> str | None:
    """The answer number in ``value``, normalised ("1,200" -> "1200", "19.0" -> "19"), or None.

    Takes the first number, but after the last ``=`` when there is one ("48 - 29 = 19" -> "19").
    A simple fraction "3/4" becomes its decimal value rounded to 6 places.
    """
    if "=" in value:
        tail = value.rsplit("=", 1)[1]
        if _NUMBER.search(tail):
            value = tail
    m = _NUMBER.search(value)
    if m is None:
        return None
    sign, whole, frac, denom = m.groups()
    try:
        num = Decimal(sign + whole.replace(",", "") + ("." + frac if frac else ""))
        if denom is not None and not frac:
            d = Decimal(denom.replace(",", ""))
            if d != 0:
                num = (num / d).quantize(Decimal("0.000001"))
        if num == 0:
            return "0"
        text = format(num.normalize(), "f")
    except (InvalidOperation, ArithmeticError, ValueError):
        return None
    return text


# --------------------------------------------------------------------------------------------
# Public API


def parse_generation(task: TaskSpec, prompt: Prompt, text: str) -> ParseResult:
    """Parse one generation (``prompt.prefill + text``) into task fields or a reject reason.

    The rules are listed in the module docstring. Never raises on any ``text``: an unexpected
    internal failure is returned as reason ``error`` with the exception in ``detail``.

    Args:
        task: The task whose fields are parsed.
        prompt: The prompt that produced ``text`` (its prefill and instruction are used).
        text: The generated text, without the prompt or prefill.

    Returns:
        A :class:`ParseResult` with exactly one of ``fields`` or ``reason`` set.
    """
    try:
        return _parse(task, prompt, text)
    except Exception as err:  # noqa: BLE001 - a parser bug must not lose the row
        return _reject("error", f"parser failed: {type(err).__name__}: {err}"[:500])


def _parse(task: TaskSpec, prompt: Prompt, text: str) -> ParseResult:
    prefill = prompt.prefill or ""
    text = text if isinstance(text, str) else str(text)
    raw_len = len(prefill) + len(text)
    if raw_len > MAX_RAW_CHARS:
        return _reject("too_long", f"raw text has {raw_len} characters (cap {MAX_RAW_CHARS})")
    prefill, text = (
        s.replace("\r\n", "\n").replace("\r", "\n").translate(_TRANSLATE) for s in (prefill, text)
    )
    bad = _BAD_CHARS.search(prefill + text)
    if bad:
        return _reject("refusal", f"binary or control character {bad.group(0)!r}")

    patterns = _task_patterns(task)
    body = _effective_text(patterns, prefill, text)
    if not any(c.isalnum() for c in body):
        return _reject("empty", "no letters or digits")

    single = task.is_classification and len(task.input_fields) == 1
    raw = _extract(patterns, body, single)
    values = {name: _clean_value(v) for name, v in raw.items() if v is not None}

    for name, value in values.items():
        why = _chatter(value)
        if why:
            return _reject("refusal", f"{name}: assistant chatter ({why}): {value[:80]!r}")
    if not values:
        why = _chatter(_clean_value(body))
        if why:
            return _reject("refusal", f"assistant chatter ({why}): {body.strip()[:80]!r}")

    missing = [name for name, v in raw.items() if v is None]
    if missing:
        displays = dict(patterns.fields)
        return _reject("missing_field", "no tag for " + ", ".join(f"{n} ({displays[n]}:)" for n in missing))

    for name, value in values.items():
        if not any(c.isalnum() for c in value):
            return _reject("empty", f"{name}: empty after cleaning")

    for name, value in values.items():
        share = _letter_share(value)
        # A text-to-text answer may well be all digits ("7", "1969") whatever its answer_type.
        if share < MIN_LETTER_SHARE and name != task.target_key:
            return _reject("refusal", f"{name}: almost no letters ({share:.0%})")

    prompt_norm: str | None = None
    for name in task.field_names:
        norm = _normalize(values[name])
        if norm in patterns.seed_values:
            return _reject("duplicate", f"{name}: copies a seed demonstration")
        if len(norm) >= ECHO_MIN_CHARS:
            if prompt_norm is None:
                prompt_norm = _normalize(_prompt_text(prompt))
            if norm in prompt_norm:
                return _reject("refusal", f"{name}: echoes the prompt")

    fields = {f.name: values[f.name] for f in task.input_fields}
    for name, value in fields.items():
        why = label_leak(task, value)
        if why:
            return _reject("label_leak", f"{name}: {why}")

    for spec in task.input_fields:
        n = len(fields[spec.name])
        if n < spec.min_chars:
            return _reject("too_short", f"{spec.name}: {n} characters < min_chars {spec.min_chars}")
        if n > spec.max_chars:
            return _reject("too_long", f"{spec.name}: {n} characters > max_chars {spec.max_chars}")

    if not task.is_classification:
        target = values[task.target_key]
        if task.answer_type == "number":
            number = _number(target)
            if number is None:
                return _reject("missing_field", f"{task.target_key}: no number in {target[:40]!r}")
            target = number
        fields[task.target_key] = target
    return ParseResult(fields=fields, reason=None)


def normalized_hash(fields: dict[str, str]) -> str:
    """Hash of the fields' lower-cased, punctuation- and whitespace-normalised text.

    Two samples that differ only in case, punctuation or spacing get the same hash. Keys take
    part (sorted), so pass the same keys for samples that are compared: the input fields.

    Args:
        fields: Field name to text.

    Returns:
        A 32-character hex digest.
    """
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(fields):
        h.update(f"{key}\x1e{_normalize(str(fields[key]))}\x1f".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class Deduplicator:
    """Near-duplicate filter over :func:`normalized_hash` of accepted samples.

    Args:
        hashes: Hashes already admitted (from :meth:`state` of an earlier run, for resume).
    """

    def __init__(self, hashes: Iterable[str] = ()) -> None:
        self._hashes: set[str] = set(hashes)

    def seen(self, fields: dict[str, str]) -> bool:
        """True if a sample with the same normalised hash was admitted; otherwise admit this one.

        Args:
            fields: The sample's input fields.

        Returns:
            True for a duplicate (nothing recorded), False for a new sample (now recorded).
        """
        digest = normalized_hash(fields)
        if digest in self._hashes:
            return True
        self._hashes.add(digest)
        return False

    def state(self) -> list[str]:
        """The admitted hashes, sorted, to save for resume (``Deduplicator(state)`` restores it)."""
        return sorted(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)


def parse_batch(
    task: TaskSpec, prompts: list[Prompt], generations: list[Generation], dedup: Deduplicator
) -> list[ParseResult]:
    """Parse a batch of generations, in order, and filter duplicates of already accepted samples.

    A generation with ``error`` set is rejected as ``error`` with the error as detail. Accepted
    samples go through ``dedup`` on their input fields (so two problems that differ only in their
    answer are duplicates); the first of a batch wins.

    Args:
        task: The task.
        prompts: The prompts, one per generation.
        generations: The teacher's answers, in prompt order.
        dedup: The run's deduplicator; accepted samples are recorded in it.

    Returns:
        One :class:`ParseResult` per generation, in order.

    Raises:
        ValueError: ``prompts`` and ``generations`` differ in length.
    """
    if len(prompts) != len(generations):
        raise ValueError(f"{len(prompts)} prompts but {len(generations)} generations")
    results = []
    for prompt, gen in zip(prompts, generations, strict=True):
        if gen.error is not None:
            results.append(_reject("error", str(gen.error)[:2000] or "teacher error"))
            continue
        result = parse_generation(task, prompt, gen.text)
        if result.fields is not None and dedup.seen({k: result.fields[k] for k in task.field_names}):
            result = _reject("duplicate", "near-duplicate of an accepted sample")
        results.append(result)
    return results
