"""glibc malloc settings for the processes that run a model: memory a step frees is kept for the next.

A training step on CPU allocates and frees the same large buffers every step (activations,
gradients, MiniLM's 47 MB embedding gradient). glibc serves blocks above its mmap threshold with
fresh pages and returns them on free, so every step faults them in again: 1.0 to 1.6 million minor
page faults in one 13 to 15 s fit of MiniLM (320 records x 4 epochs, batch 32, 2 cores). Kept in
the heap instead (mmap off, no trimming), the same fit faulted 24 to 190 thousand times and took
12.4 to 12.8 s; on a Ray Train worker, 14.2 to 14.4 s against 15.9 to 16.9 s.
Peak memory barely moves (1,254 against 1,238 MB for that fit): the step's buffers are reused,
not added. The teacher's decode loop does the same with its attention cache, which grows with
the prompts: 51 SST-2 prompts with 8 feedback examples each (greedy, 2 cores) took 10.7 to 13.5 s
with 2.1 to 5.6 million page faults, and 9.3 to 9.5 s with none once the memory was kept.

The settings apply to a whole process. :func:`keep_freed_memory` sets them from inside it (the
in-process loop before a fit, :class:`~gold_ray.teacher.hf_engine.HFEngine` when it loads), which
covers the threads that have no arena of their own yet. A Ray Train worker and a teacher's Serve
replica get :data:`KEEP_FREED_MEMORY_ENV` at start instead: their model runs in a thread of its
own beside Ray's, and a thread that allocated before the call keeps an arena that glibc's default
serves (measured: a 64 MB buffer faulted in on all 20 allocations in such a thread, 8 of 20 with
the settings from the start). Elsewhere (not glibc) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

TRIM_THRESHOLD = 2**31 - 1
"""Bytes free at the top of the heap before glibc gives them back: as good as never."""

KEEP_FREED_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
"""The same settings as environment variables, read by glibc when a process starts: one arena for
every thread, no block served by mmap, no trimming."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Keep memory this process frees for its next allocations (glibc only; idempotent).

    Returns:
        True when glibc took the settings, False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # Threads started later share the main arena (threads that already have one keep it).
    return (bool(libc.mallopt(_M_ARENA_MAX, 1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
