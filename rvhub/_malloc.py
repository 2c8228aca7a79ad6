"""glibc's malloc, set up for the streaming commands (extract, apply, combine, compress, inspect).

Those commands allocate and free arrays of a few MB to a few tens of MB per chunk, on several threads. By
default glibc serves such a block with a fresh ``mmap`` (or returns freed heap tops to the system) and the next
chunk's arrays fault their pages in and zero them again: measured on ``rvhub apply`` of a 0.5B-shaped model,
217,000 minor page faults and 2.1 s of system time, against 26,000 faults and 1.2 s with blocks of up to 32 MB
kept in the heap (4.7 s -> 3.9 s wall on a 2-core host; docs/BENCHMARKS.md). This module sets that, once, for
the CLI process only: a library call never changes its host process's allocator.

What a user sets wins: with ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES`` or
``RVHUB_MALLOC=default`` in the environment nothing is changed. On other C libraries (musl, macOS) there is no
``libc.so.6`` and nothing is changed either.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)
TRIM_THRESHOLD = 128 << 20  # free memory at the top of a heap is returned to the system beyond this much
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_state: bool | None = None


def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); whether they were set. Idempotent."""
    global _state
    if _state is None:
        _state = _set()
    return _state


def _set() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("RVHUB_MALLOC", "") == "default":
        return False
    if any(k in os.environ for k in _USER_KNOBS):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; fixing a threshold also turns off glibc's own adjustment of both
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
