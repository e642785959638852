"""Fixtures of the fault tests: a tiny student and a small evaluation file, made once per session."""

from __future__ import annotations

import pytest
from faultkit import write_eval_file


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A tiny random BERT with the MiniLM vocabulary (the student of every fault run)."""
    from gold_ray.testing import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("fault-student"))


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory):
    """A 12-line SST-2 style evaluation JSONL."""
    return write_eval_file(tmp_path_factory.mktemp("fault-eval") / "eval.jsonl")
