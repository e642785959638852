"""The CUDA paths: the transformers teacher, the student and one whole run on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu tests/gpu``. Every
model is a tiny random one built here, so nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gold_ray import distill
from gold_ray.config import load_config
from gold_ray.run.tasks import load_task
from gold_ray.student.model import ClassifierStudent, load_student
from gold_ray.teacher.hf_engine import HFEngine
from gold_ray.testing import save_tiny_chat_lm, save_tiny_classifier
from gold_ray.types import Prompt, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REVIEWS = [
    ("a warm and funny film with a fine cast", "positive"),
    ("dull , slow and far too long", "negative"),
    ("the best picture of the year", "positive"),
    ("a mess of a plot and wooden acting", "negative"),
]


def prompts() -> list[Prompt]:
    """Chat and continuation prompts of different lengths (left padding must not leak)."""
    chat = [Prompt(kind="classify", label=None, prefill="Label:",
                   messages=({"role": "user", "content": f"Review: {text}\nIs it positive or negative?"},))
            for text, _ in REVIEWS]
    cont = [Prompt(kind="train", label="positive", text=f'Review (positive): "{text}"\nReview (positive): "',
                   stop=('"',)) for text, _ in REVIEWS[:2]]
    return chat + cont


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_tiny_chat_lm(tmp_path_factory.mktemp("teacher"))


def test_hf_engine_on_cuda_scores_and_decodes_like_cpu(teacher_dir):
    cpu = HFEngine(teacher_dir, dtype="float32", device="cpu", batch_size=3)
    gpu = HFEngine(teacher_dir, dtype="float32", device="cuda", batch_size=3)
    assert next(gpu.model.parameters()).is_cuda
    options = ["positive", "negative"]
    np.testing.assert_allclose(gpu.option_logprobs(prompts(), options), cpu.option_logprobs(prompts(), options),
                               atol=1e-4)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    assert [g.text for g in gpu.generate(prompts(), greedy)] == [g.text for g in cpu.generate(prompts(), greedy)]
    cpu.close()
    gpu.close()


def test_hf_engine_defaults_to_bf16_on_cuda_and_samples(teacher_dir):
    fp32 = HFEngine(teacher_dir, dtype="float32", device="cuda", batch_size=4)
    bf16 = HFEngine(teacher_dir, device="cuda", batch_size=4)
    assert bf16.dtype == torch.bfloat16
    options = ["positive", "negative"]
    # bf16 keeps 8 bits of mantissa: option scores agree to a few hundredths, not to 1e-4.
    np.testing.assert_allclose(bf16.option_logprobs(prompts(), options), fp32.option_logprobs(prompts(), options),
                               atol=0.1)
    rows = bf16.generate(prompts(), SamplingParams(temperature=1.0, max_new_tokens=16))
    assert len(rows) == len(prompts())
    assert all(r.error is None and 0 < r.output_tokens <= 16 for r in rows)
    fp32.close()
    bf16.close()


def test_student_trains_on_cuda_and_saves_for_cpu(tmp_path):
    task = load_task("sst2")
    base = save_tiny_classifier(tmp_path / "base", dropout=0.0)
    records = [{"text": text, "label": label} for text, label in REVIEWS] * 8
    student = ClassifierStudent(task, base, device="cuda", batch_size=8, lr=1e-3)
    assert next(student.model.parameters()).is_cuda
    first = student.fit(records, epochs=1, seed=0)["loss"]
    last = student.fit(records, epochs=20, seed=0)["loss"]
    assert last < first * 0.5, (first, last)
    assert student.predict(records[:4]) == [label for _, label in REVIEWS]
    energies = student.ood_scores(records[:4])
    assert energies.shape == (4,) and np.isfinite(energies).all()

    student.save(tmp_path / "trained")
    on_cpu = load_student(tmp_path / "trained", task, device="cpu")
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    np.testing.assert_allclose(on_cpu.logits(records[:4]), student.logits(records[:4]), atol=1e-4)


def test_a_whole_run_uses_the_gpu_and_its_student_loads_on_cpu(tmp_path, teacher_dir):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in REVIEWS))
    cfg = load_config(None, [
        "task.name=sst2", f"task.eval_path={eval_file}", f"teacher.model={teacher_dir}", "teacher.engine=hf",
        f"student.model={save_tiny_classifier(tmp_path / 'student')}", "budget.samples=24",
        "strategy.iterations=2", "strategy.probe_fraction=0.5", "teacher.max_new_tokens=16",
        "student.final_epochs=1", f"output.dir={tmp_path / 'run'}", "tracking.enabled=false",
    ])
    torch.cuda.reset_peak_memory_stats()
    metrics = distill(cfg, local=True, progress="quiet")
    assert torch.cuda.max_memory_allocated() > 0  # the teacher and the student ran on the GPU
    assert len(metrics["iterations"]) == 2
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0
    student = load_student(tmp_path / "run" / "student", load_task("sst2"), device="cpu")
    assert set(student.predict([{"text": t} for t, _ in REVIEWS])) <= {"positive", "negative"}
