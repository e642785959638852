"""glibc keeps the memory a training step frees (gold_ray.student.allocator): counted in page faults."""

import os
import platform
import subprocess
import sys

import pytest

from gold_ray.student.allocator import KEEP_FREED_MEMORY_ENV

pytestmark = pytest.mark.slow  # four fresh processes importing torch

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

# Allocate, fill and free a 64 MB tensor 20 times, as a training step does with its gradients;
# print the minor page faults of the loop.
LOOP = """
import resource, sys
import torch
from gold_ray.student.allocator import keep_freed_memory
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
