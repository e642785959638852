"""What the machine's processors can do fast: the default torch device and the dtypes to compute in.

Both the teacher (its weights' dtype) and the student (the dtype its training computes in) ask
here, so a machine's answer is the same for both. Torch is imported where a function needs it:
the Ray processes that only forward teacher calls import this module (``shared_threads``) and
never load torch.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def shared_threads(sharers: int) -> int:
    """Torch threads for one of ``sharers`` processes that share this machine's cores evenly.

    Cores are the physical ones this process may run on (torch's own default in a fresh process),
    not the CPUs Ray booked for it: Ray sets ``OMP_NUM_THREADS`` to an actor's booked CPUs, so a
    teacher replica or a training worker booking one CPU would compute with one thread, while
    the run's stages take turns and the cores booked by the waiting ones lie idle.
    """
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(usable, psutil.cpu_count(logical=False) or usable)
    return max(1, cores // max(1, sharers))


def default_device() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (read from ``/proc/cpuinfo``; Linux).

    ``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` but not whether the bf16
    extensions exist; without them bf16 matmuls are emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype for a configured name.

    Args:
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).

    Returns:
        For ``auto``: bfloat16 on a GPU that supports it (else float16); on CPU bfloat16 when
        :func:`cpu_has_fast_bf16`, else float32. Otherwise the named dtype.

    Raises:
        ValueError: an unknown name.
    """
    import torch

    if dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def training_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype a student's training computes its forward and backward passes in.

    Mixed precision only: weights, gradients and optimiser state stay float32, and bfloat16 needs
    no loss scaling (float16 would, so it is not offered).

    Args:
        precision: ``auto`` (bfloat16 where the device computes it fast: a CUDA GPU that supports
            it, a CPU with AMX-BF16 or AVX512-BF16; else float32), ``bfloat16`` or ``float32``.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).

    Raises:
        ValueError: an unknown name.
    """
    import torch

    if precision == "auto":
        # Where the device's own best dtype is float16 (a GPU without bf16), train in float32.
        return torch.bfloat16 if resolve_dtype("auto", device) is torch.bfloat16 else torch.float32
    if precision not in ("bfloat16", "float32"):
        raise ValueError(f"student.precision {precision!r}: expected auto, bfloat16 or float32")
    return getattr(torch, precision)


def autocast(dtype: torch.dtype, device: str) -> AbstractContextManager[object]:
    """A context that computes in ``dtype`` (torch autocast), or does nothing for float32."""
    import torch

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
