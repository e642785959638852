"""Predictions with a run's final student: ``gold-ray predict RUN_DIR "text"`` or ``--file in.jsonl``.

Each input is a record with the task's input fields (a bare text fills the task's only input
field). Each output is the input record with ``prediction`` (a label, or the generated answer of
a text-to-text student) and ``probabilities`` (label to probability for a classifier; null for a
text-to-text student) added, one JSON object per line.

Input files are checked completely before any prediction: a line that is not a JSON object, or
that lacks an input field, is reported with its file and line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gold_ray.errors import InputError
from gold_ray.run.rundir import run_task, student_dir
from gold_ray.run.tasks import TaskSpec
from gold_ray.student.evaluation import read_jsonl_numbered
from gold_ray.student.model import Student, load_student


def load_run_student(run_dir: str | os.PathLike[str], device: str | None = "cpu") -> tuple[Student, TaskSpec]:
    """The final student of a run and its task.

    Raises:
        RunReadError: not a run directory, or the run has no final student.
    """
    folder = student_dir(run_dir)
    task = run_task(run_dir)
    return load_student(folder, task, device=device), task


def text_record(task: TaskSpec, text: str) -> dict[str, str]:
    """A record for a bare text; only tasks with one input field take one.

    Raises:
        ValueError: the task has several input fields (they need ``--file``).
    """
    if len(task.field_names) != 1:
        raise InputError(f"task {task.name!r} has the input fields {', '.join(task.field_names)}: "
                         "pass them as JSON lines with --file")
    return {task.field_names[0]: text}


def read_inputs(path: str | os.PathLike[str], task: TaskSpec) -> list[dict[str, Any]]:
    """Every record of a JSONL input file, checked against the task's input fields.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad line; the message names the file and the line number.
    """
    out = []
    for lineno, rec in read_jsonl_numbered(path):
        for name in task.field_names:
            value = rec.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(f"{path}:{lineno}: missing input field {name!r} "
                                 f"(task {task.name!r} needs {', '.join(task.field_names)})")
            if not isinstance(value, str | int | float):
                raise InputError(f"{path}:{lineno}: field {name!r} must be a string, got {type(value).__name__}")
        out.append(rec)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(student: Student, task: TaskSpec, records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Predict in batches; yields each input record with ``prediction`` and ``probabilities``."""
    size = student.eval_batch_size
    for start in range(0, len(records), size):
        batch = [dict(r) for r in records[start : start + size]]
        inputs = [{f: str(r[f]) for f in task.field_names} for r in batch]
        labels = student.predict(inputs)
        probs: list[dict[str, float] | None] = [None] * len(batch)
        if task.is_classification and student.kind == "classifier":
            p = _softmax(np.asarray(student.logits(inputs), dtype=np.float64))
            probs = [{name: round(float(v), 6) for name, v in zip(task.label_names, row, strict=True)} for row in p]
        for rec, label, prob in zip(batch, labels, probs, strict=True):
            yield {**rec, "prediction": label, "probabilities": prob}


def predict_to_jsonl(student: Student, task: TaskSpec, records: Sequence[dict[str, Any]], out) -> int:
    """Write one JSON line per prediction to the text stream ``out``; returns the count."""
    n = 0
    for row in predict(student, task, records):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    out.flush()
    return n


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path) -> int:
    """Predict every line of ``input_path`` into ``output_path`` (JSONL); returns the count."""
    student, task = load_run_student(run_dir)
    records = read_inputs(input_path, task)
    with Path(output_path).open("w", encoding="utf-8") as fh:
        return predict_to_jsonl(student, task, records, fh)
