"""Shared fixtures: one small local Ray cluster for every test marked ``ray``, the tiny models and a small
evaluation file; what the Ray tests share besides fixtures is in ``tests/raykit.py``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The top-level ``actors`` and ``jobs`` packages must import from the checkout, in this process and
# in every Ray worker, however pytest was started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Serve pushes autoscaling metrics every 10 s by default; 1 s keeps autoscaling tests short. Set
# before ray.serve is imported (it reads them once) and passed to the workers below.
FAST_SERVE_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
for _key, _value in FAST_SERVE_METRICS.items():
    os.environ.setdefault(_key, _value)

# The one fault-injection mechanism (gold_ray.run.faults): every process of the suite, Ray workers
# included, calls tests/faults/hooks.py at each fault point; a test plans its faults there.
# One plans folder per session: a second import of this module (as ``tests.conftest``) keeps it,
# or the test process would plan faults where the Ray workers never look.
_plans = os.environ.get("GOLD_RAY_FAULT_PLANS")
FAULT_HOOK = {
    "GOLD_RAY_FAULT_HOOK": "tests.faults.hooks:dispatch",
    "GOLD_RAY_FAULT_PLANS": _plans if _plans and os.path.isdir(_plans) else tempfile.mkdtemp(prefix="grfault"),
}
os.environ.update(FAULT_HOOK)
# The hook's module lives in this checkout: every subprocess of the suite (a CLI run from a temporary
# folder, a Ray job's driver) must be able to import it, whatever its working directory.
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(REPO_ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *_paths])

# Cached teacher rows (gold_ray.run.baselines) of this session's fake and tiny teachers: kept out of
# the user's cache, and never reused from an earlier session whose fake engines answered otherwise.
BASELINE_CACHE = {"GOLD_RAY_BASELINE_CACHE": tempfile.mkdtemp(prefix="grbase")}
os.environ.update(BASELINE_CACHE)


RUN_LAST = ("tests/actors/test_multinode.py",)
"""Test modules run after the others: the multi-node run once hung after losing a node while two
other processes kept both cores busy; last, it runs once the other part of ``make test`` ended."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the modules of :data:`RUN_LAST` to the end, keeping the order within each (so
    module-scoped fixtures are still set up once). Nothing is moved first: run first, beside the
    other part's busiest minutes, the Serve autoscaling test once missed its 60 s upscale bound."""
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] in RUN_LAST)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A tiny random BERT with the MiniLM vocabulary (:func:`gold_ray.testing.save_tiny_classifier`), saved once.

    Shared by the whole session: a test reads it (or copies it), never writes into it.
    """
    from gold_ray.testing import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-student"))


@pytest.fixture(scope="session")
def tiny_student_no_dropout(tmp_path_factory) -> str:
    """:func:`tiny_student` with dropout off (the same weights): training draws no random numbers.

    For tests that compare runs which split batches differently (DDP against one worker, a resumed
    Ray Train run against an unbroken one) or that need a trained student to be reproducible.
    """
    from gold_ray.testing import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-student-no-dropout"), dropout=0.0)


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    """A 12-row SST-2 style evaluation JSONL (:func:`tests.faults.faultkit.write_eval_file`), written once."""
    from tests.faults.faultkit import write_eval_file

    return write_eval_file(tmp_path_factory.mktemp("eval") / "eval.jsonl")


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """No data folder (``$GOLD_RAY_DATA`` unset) and ``datasets`` offline with an empty cache of its
    own: no evaluation set is fetched or reused."""
    import datasets

    from gold_ray.run.tasks import DATA_DIR_ENV

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory) -> str:
    """A tiny random Llama with a chat template (:func:`gold_ray.testing.save_tiny_chat_lm`), saved once."""
    from gold_ray.testing import save_tiny_chat_lm

    return save_tiny_chat_lm(tmp_path_factory.mktemp("tiny-chat-lm"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (4 logical CPUs, no dashboard).

    Four logical CPUs on a 2-core machine is deliberate oversubscription: actors ask for
    fractions of a CPU and mostly wait. Serve is shut down at the end of the session.

    Yields:
        The ``ray`` module, initialised.
    """
    import ray

    from gold_ray.entry import ray_train_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    owns = not ray.is_initialized()
    # Short path: Ray's unix sockets live under it and have a ~107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="grray")
    if owns:
        pythonpath = os.environ["PYTHONPATH"]  # the checkout first, set at import above
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
            runtime_env={
                "env_vars": {
                    "PYTHONPATH": pythonpath,
                    "TOKENIZERS_PARALLELISM": "false",
                    **FAST_SERVE_METRICS,
                    **ray_train_env(),
                    **FAULT_HOOK,
                    **BASELINE_CACHE,
                }
            },
        )
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if owns:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # Serve may never have started
            pass
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
