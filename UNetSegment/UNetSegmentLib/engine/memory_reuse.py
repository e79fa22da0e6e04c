"""Keep freed memory for the next array instead of handing it back to the system (glibc only).

A run allocates and frees dozens of volume-sized arrays (a 256² × 108 CT: 28 MB per float32 map)
and the network's activations. glibc serves every block above its mmap threshold (128 KiB at
first, raised only by the frees it sees) with a fresh ``mmap`` and trims the heap's free top beyond
128 KiB, so each new array is faulted in again page by page, zeroed by the kernel: about 23,000
page faults and 0.2 s of a 2 s warm run on the demo case (``bench/slicer_second_click.py``).
:func:`reuse_freed_memory` raises the mmap threshold to glibc's largest (32 MiB) and the trim
threshold to 1 GiB, and gives every thread the one heap (a run's helper threads would otherwise
fault in arenas of their own), so freed blocks stay in the heap for the next step: about a dozen
faults per run. The peak is unchanged; a long-lived process (the warm worker) keeps up to its last run's
working memory between runs, which it returns when it exits (idle timeout, module cleanup).

It is called by the processes this package owns (the ``unetsegment`` command, the worker), never
on import: a program that imports the library keeps its own allocator settings. A user's own
``GLIBC_TUNABLES`` / ``MALLOC_*_`` malloc settings are left as they are.
"""
from __future__ import annotations

import os
import sys

#: glibc's ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): 4 MiB · sizeof(long)
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the heap's top kept rather than trimmed
TRIM_THRESHOLD = 2**30
#: one heap for every thread: the helper threads of a run (input preparation, volume writes) reuse the
#: memory the main thread freed instead of faulting in an arena of their own
ARENA_MAX = 1

_applied: list[bool] = []


def user_malloc_settings() -> bool:
    """Whether the environment already tunes glibc's malloc (then it is left alone)."""
    env = os.environ
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(
        k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                           "MALLOC_ARENA_MAX"))


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks for reuse (module docstring); once per process.

    Returns whether the settings are in force: False off Linux/glibc (macOS and Windows allocators
    keep their own policies), when the environment sets malloc tunables itself, or if glibc refuses."""
    if _applied:
        return _applied[0]
    ok = False
    if sys.platform.startswith("linux") and not user_malloc_settings():
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            ok = all(libc.mallopt(param, value) for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)))
        except (OSError, AttributeError):  # not glibc (e.g. musl has no libc.so.6 or no mallopt)
            ok = False
    _applied.append(ok)
    return ok
