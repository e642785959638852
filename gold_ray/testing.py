"""Test doubles. Nothing here is ever a default: tests and benchmarks name these explicitly."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine


class FakeTeacherEngine(TeacherEngine):
    """A deterministic engine for unit and Ray tests: no model, no randomness across runs.

    Each answer is a function of the prompt's label, the prompt kind, a hash of the prompt and a
    call counter, so repeated prompts give different but reproducible samples.

    Args:
        latency_s: Sleep this long per ``generate`` call (latency-bound plumbing benchmarks).
        fail_every: Return an error generation for every n-th prompt (0: never).
        script: Optional list of raw texts returned in turn instead of the built-in answers
            (garbage-input tests).
        task: When given, answers of multi-field tasks (pairs, text-to-text) come as tagged
            ``Display: value`` lines, as a real teacher is asked to write them.
    """

    name = "fake"

    def __init__(self, latency_s: float = 0.0, fail_every: int = 0, script: list[str] | None = None,
                 task=None):
        self.task = task
        self.latency_s = latency_s
        self.fail_every = fail_every
        self.script = list(script or [])
        self.calls = 0

    def _answer(self, prompt: Prompt) -> str:
        body = prompt.text if prompt.text is not None else "\n".join(m["content"] for m in prompt.messages or ())
        # A prompt's uid (set by the loop) makes answers independent of call order, so a resumed
        # run sees the same answers as an uninterrupted one.
        salt = prompt.meta.get("uid", self.calls)
        digest = hashlib.sha256(f"{body}|{salt}".encode()).hexdigest()[:10]
        label = prompt.label or "plain"
        words = {"probe": "unusual far-off", "train": "ordinary", "classify": ""}[prompt.kind]
        sentence = f"a {words} sample number {digest} that reads as {label.replace('_', ' ')} in tone."
        task = self.task
        if task is None or (task.is_classification and len(task.input_fields) == 1):
            return sentence
        lines = [f"{f.display}: {sentence} (part {i})" for i, f in enumerate(task.input_fields)]
        if not task.is_classification:
            lines.append(f"{task.target_display}: {int(digest[:4], 16) % 97}")
        return "\n".join(lines)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Deterministic answers, one per prompt."""
        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for prompt in prompts:
            self.calls += 1
            if self.fail_every and self.calls % self.fail_every == 0:
                out.append(Generation(text="", error="fake engine: injected failure"))
                continue
            text = self.script[(self.calls - 1) % len(self.script)] if self.script else self._answer(prompt)
            out.append(Generation(text=text, output_tokens=len(text.split())))
        return out

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """Prefers the option whose words appear in the prompt's last line; uniform otherwise."""
        rows = []
        for prompt in prompts:
            body = prompt.text if prompt.text is not None else (prompt.messages or ({"content": ""},))[-1]["content"]
            hits = [1.0 if opt.lower() in body.lower() else 0.0 for opt in options]
            z = math.log(sum(math.exp(h) for h in hits))
            rows.append([h - z for h in hits])
        return rows


def buffer_faults(times: int = 20) -> int:
    """Minor page faults of this process while it allocates, fills and frees a 64 MB tensor
    ``times`` times, as a model step does with its buffers (after one such tensor, which faults in
    whatever the allocator does)."""
    import resource

    import torch

    torch.ones(16 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def heap_facts(nbytes: int = 64 * 2**20) -> dict[str, int] | None:
    """What glibc does with a tensor of ``nbytes`` in this process: ``mapped``, the bytes it serves
    by ``mmap`` while the tensor is held, and ``kept``, the bytes free in its heap once it is freed.

    glibc's default maps a block this large fresh and unmaps it on free (``mapped`` >= ``nbytes``,
    ``kept`` small), so a step faults it in again every time; with :mod:`gold_ray.allocator`'s
    settings the heap serves it (``mapped`` 0, as the settings forbid mapping for every block) and
    keeps it once freed (``kept`` >= ``nbytes``). Unlike a page-fault count, neither depends on
    what the process's other threads allocate meanwhile. ``None`` where the C library is not
    glibc 2.33+ (``mallinfo2``).
    """
    import ctypes
    import ctypes.util
    import platform

    import torch

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc.mallinfo2.restype = _Mallinfo2
    held = torch.ones(nbytes // 4)
    mapped = int(libc.mallinfo2().hblkhd)
    del held
    return {"mapped": mapped, "kept": int(libc.mallinfo2().fordblks)}


class ProcessFactsEngine(FakeTeacherEngine):
    """A fake engine whose every answer is JSON about the process (and thread) that answers:
    ``threads`` (torch's) and ``heap`` (:func:`heap_facts`). A test sees what a Serve
    replica computes with."""

    def _answer(self, prompt: Prompt) -> str:
        import json

        import torch

        return json.dumps({"threads": torch.get_num_threads(), "heap": heap_facts()})


class RecordingEngine(FakeTeacherEngine):
    """The fake engine, remembering every prompt it was sent: what a test asserts the teacher was asked.

    Answers exactly as :class:`FakeTeacherEngine` does (same arguments); only keeps the prompts.

    Attributes:
        prompts: Every prompt passed to ``generate``, in order.
        scored: Every prompt passed to ``option_logprobs`` (the teacher as a classifier), in order.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompts: list[Prompt] = []
        self.scored: list[Prompt] = []

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Record ``prompts``, then answer as the fake engine."""
        self.prompts.extend(prompts)
        return super().generate(prompts, params)

    def option_logprobs(self, prompts: list[Prompt], options: list[str]) -> list[list[float]]:
        """Record ``prompts``, then score them as the fake engine."""
        self.scored.extend(prompts)
        return super().option_logprobs(prompts, options)


class LatencyBoundEngine(FakeTeacherEngine):
    """A teacher whose cost is pure waiting: every ``generate`` call sleeps, nothing computes.

    It stands in for an accelerator that takes the same time for a batch of any size (up to the
    batch cap), so a pipeline driving it is limited by latency and by how well it keeps every
    replica's batches full, never by CPU. The plumbing-scaling benchmark
    (``benchmarks/perf/scaling.py``) runs it behind 1 to 8 Serve replicas.

    Args:
        latency_s: Seconds each ``generate`` call sleeps, whatever the number of prompts.
        per_prompt_s: Extra seconds per prompt in the call (0: batch size is free).
        **kwargs: Passed to :class:`FakeTeacherEngine` (answers are its cheap hashed samples).
    """

    name = "latency"

    def __init__(self, latency_s: float = 0.5, per_prompt_s: float = 0.0, **kwargs):
        if latency_s < 0 or per_prompt_s < 0:
            raise ValueError(f"latency_s and per_prompt_s must be >= 0, got {latency_s}, {per_prompt_s}")
        super().__init__(latency_s=0.0, **kwargs)
        self.call_latency_s = latency_s
        self.per_prompt_s = per_prompt_s

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Sleep ``latency_s + per_prompt_s * len(prompts)``, then answer like the fake engine."""
        if prompts:
            time.sleep(self.call_latency_s + self.per_prompt_s * len(prompts))
        return super().generate(prompts, params)


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
"""A minimal chat template for tiny test teachers."""


def tiny_tokenizer_dir() -> str:
    """The embedded MiniLM tokenizer folder (a real WordPiece vocabulary, installed locally)."""
    from gold_ray.models import resolve_model

    return resolve_model("embedded:all-minilm-l6-v2")


def save_tiny_classifier(out_dir, seed: int = 0, dropout: float = 0.1) -> str:
    """Save a tiny random BERT (hidden 32, 2 layers) with the MiniLM tokenizer; returns the folder.

    The classification head is added by the student, so any label count works.

    Args:
        out_dir: Folder to write.
        seed: Torch seed for the random weights.
        dropout: Hidden and attention dropout; 0 makes training draw no random numbers, so runs
            that split batches differently (DDP against one worker) stay comparable.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def save_tiny_chat_lm(out_dir, seed: int = 0, head_dim: int = 16) -> str:
    """Save a tiny random Llama causal LM with a chat template; returns the folder.

    Args:
        out_dir: Folder to write.
        seed: Torch seed for the random weights.
        head_dim: Attention head size (hidden size 32 over 2 heads by default); vLLM's CPU
            attention takes 32 and up only.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def tiny_run_config(out_dir, student_dir, *overrides: str):
    """A :class:`~gold_ray.config.RunConfig` for a fake-teacher test run; ``overrides`` come last.

    SST-2 with the fake teacher (``teacher.model=fake``; the test passes the engine), the given
    tiny student, 2 iterations, one final epoch, batches of 8, no MLflow, written to ``out_dir``.
    The test adds its evaluation set (``task.eval_path`` or ``task.data_dir``), budget and strategy.
    """
    from gold_ray.config import load_config

    return load_config(None, [
        "task.name=sst2", f"student.model={student_dir}", "teacher.model=fake", "strategy.iterations=2",
        "student.final_epochs=1", "student.batch_size=8", f"output.dir={out_dir}", "tracking.enabled=false",
        *overrides,
    ])
