"""glibc keeps the memory a training step frees (gold_ray.allocator): counted in page faults."""

import os
import platform
import subprocess
import sys

import pytest

from gold_ray.allocator import KEEP_FREED_MEMORY_ENV

pytestmark = pytest.mark.slow  # fresh processes importing torch

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

# Print whether the settings took (None: not asked) and gold_ray.testing.buffer_faults(): a 64 MB
# tensor allocated, filled and freed 20 times, as a training step does with its gradients.
# Modes: "keep" (keep_freed_memory() first), "engine" (load an HFEngine from argv[2] first),
# anything else (glibc's default).
LOOP = """
import sys
from gold_ray.testing import buffer_faults
took = None
if sys.argv[1] == "keep":
    from gold_ray.allocator import keep_freed_memory
    took = keep_freed_memory()
elif sys.argv[1] == "engine":
    from gold_ray.teacher.hf_engine import HFEngine
    HFEngine(sys.argv[2], device="cpu")
print(took, buffer_faults())
"""
PAGES = 64 * 2**20 // 4096


def _faults(mode: str, env: dict[str, str] | None = None, *args: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode, *args], capture_output=True, text=True, check=True,
                         env=env)
    took, faults = out.stdout.split()
    return took, int(faults)


@glibc_only
def test_kept_memory_is_reused_instead_of_faulted_in_again_every_time():
    took, kept = _faults("keep")
    assert took == "True"
    _, default = _faults("default")
    assert default >= 15 * PAGES, "glibc's default returns the buffer every time"
    # Mostly reused (0 to 7 of the 20 seen faulted in again, on 2 cores).
    assert kept <= default // 2, "the kept buffer is reused"


@glibc_only
def test_the_environment_variables_do_what_the_call_does():
    _, kept = _faults("default", env={**os.environ, **KEEP_FREED_MEMORY_ENV})
    _, default = _faults("default")
    assert kept <= default // 2


@glibc_only
def test_a_loaded_teacher_engine_keeps_freed_memory(tmp_path):
    # The in-process teacher: the engine keeps the memory when it loads.
    from gold_ray.testing import save_tiny_chat_lm

    model = save_tiny_chat_lm(tmp_path / "lm")
    _, default = _faults("plain", None, model)
    assert default >= 15 * PAGES, "glibc's default returns the buffer every time"
    assert _faults("engine", None, model)[1] <= default // 2, "the engine's process reuses the buffer"
