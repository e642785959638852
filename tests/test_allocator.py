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

# Allocate, fill and free a 64 MB tensor 20 times, as a training step does with its gradients;
# print the minor page faults of the loop.
LOOP = """
import resource, sys
import torch
from gold_ray.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(16 * 2**20)  # the first one faults in any case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 * 2**20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 64 * 2**20 // 4096


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True, env=env)
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


# The in-process teacher: the engine keeps the memory when it loads.
ENGINE_LOOP = """
import resource, sys
import torch
if sys.argv[1] == "engine":
    from gold_ray.teacher.hf_engine import HFEngine
    HFEngine(sys.argv[2], device="cpu")
torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@glibc_only
def test_a_loaded_teacher_engine_keeps_freed_memory(tmp_path):
    from gold_ray.testing import save_tiny_chat_lm

    model = save_tiny_chat_lm(tmp_path / "lm")

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ENGINE_LOOP, mode, model], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    default = faults("plain")
    assert default >= 15 * PAGES, "glibc's default returns the buffer every time"
    assert faults("engine") <= default // 2, "the engine's process reuses the buffer"
