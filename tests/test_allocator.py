"""glibc keeps the memory a training step frees (gold_ray.allocator).

Checked in fresh processes from glibc's own account of its heap (``gold_ray.testing.heap_facts``:
a 64 MB tensor is served from the heap, not mapped, and stays there once freed), which no other
thread's allocations change. The page faults of glibc's default, the cost the settings avoid, are
asserted beside it. With the settings on, the fault count depends on what else allocates meanwhile
(7 to 8 of 20 buffers faulted in again in a fresh process, on 2 cores), so it is not bounded.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from gold_ray.allocator import KEEP_FREED_MEMORY_ENV

pytestmark = pytest.mark.slow  # fresh processes importing torch

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

# Print whether the settings took (None: not asked), gold_ray.testing.heap_facts() for a 64 MB tensor
# and gold_ray.testing.buffer_faults(): that tensor allocated, filled and freed 20 times, as a
# training step does with its gradients. Modes: "keep" (keep_freed_memory() first), "engine" (load
# an HFEngine from argv[2] first), anything else (glibc's default).
LOOP = """
import json, sys
from gold_ray.testing import buffer_faults, heap_facts
took = None
if sys.argv[1] == "keep":
    from gold_ray.allocator import keep_freed_memory
    took = keep_freed_memory()
elif sys.argv[1] == "engine":
    from gold_ray.teacher.hf_engine import HFEngine
    HFEngine(sys.argv[2], device="cpu")
print(json.dumps({"took": took, "heap": heap_facts(), "faults": buffer_faults()}))
"""
MB64 = 64 * 2**20
PAGES = MB64 // 4096


def _run(mode: str, env: dict[str, str] | None = None, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOOP, mode, *args], capture_output=True, text=True, check=True,
                         env=env)
    facts = json.loads(out.stdout.splitlines()[-1])
    if facts["heap"] is None:
        pytest.skip("glibc without mallinfo2 (before 2.33): its heap cannot be read")
    return facts


def assert_default(facts: dict) -> None:
    """glibc's default: the buffer is mapped fresh, given back on free and faulted in every time."""
    assert facts["heap"]["mapped"] >= MB64, facts
    assert facts["heap"]["kept"] < MB64, facts
    assert facts["faults"] >= 15 * PAGES, facts


def assert_kept(facts: dict) -> None:
    """The settings: the heap serves the buffer (nothing mapped) and keeps it once freed."""
    assert facts["heap"]["mapped"] < MB64, facts
    assert facts["heap"]["kept"] >= MB64, facts


@glibc_only
def test_kept_memory_is_reused_instead_of_faulted_in_again_every_time():
    kept = _run("keep")
    assert kept["took"] is True
    assert_kept(kept)
    assert_default(_run("default"))


@glibc_only
def test_the_environment_variables_do_what_the_call_does():
    assert_kept(_run("default", {**os.environ, **KEEP_FREED_MEMORY_ENV}))


@glibc_only
def test_a_loaded_teacher_engine_keeps_freed_memory(tmp_path):
    # The in-process teacher: the engine keeps the memory when it loads.
    from gold_ray.testing import save_tiny_chat_lm

    model = save_tiny_chat_lm(tmp_path / "lm")
    assert_default(_run("plain", None, model))
    assert_kept(_run("engine", None, model))
