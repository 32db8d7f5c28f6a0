"""The host (CPU) memory allocator's settings for training and sampling on the CPU.

glibc's ``malloc`` serves each allocation above its mmap threshold (128 KiB at start, raised as such blocks are
freed, at most 32 MiB) with a fresh ``mmap``, and gives the free memory at the top of a heap back to the system as
soon as it exceeds the trim threshold (128 KiB at start, then twice the raised mmap threshold). A diffusion model on
the CPU frees and re-allocates the same activation buffers (hundreds of KiB to a few MiB) at every forward, so with
those defaults much of that memory is handed back and faulted in again, page by page, each time. ``tuned`` fixes the
mmap threshold at its 32 MiB maximum and the trim threshold at 1 GiB: those buffers stay in the heap and are reused.
Measured on 2 cores (docs/benchmarks.md, ``scripts/bench_allocator.py``): the CPU default recipe's iteration takes
0.82-0.86x the time. The cost is that up to 1 GiB of free memory at the top of each heap stays with the process.

``trainer.host_allocator``: ``auto`` (tuned when the run's device is the CPU), ``tuned`` or ``default`` (glibc's own
settings). Nothing is changed where the C library is not glibc, where another allocator is preloaded (jemalloc,
tcmalloc, mimalloc), or where the environment sets the thresholds itself (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or the same ``glibc.malloc.*`` tunables or
``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

MODES = ("auto", "tuned", "default")
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                  "glibc.malloc.mmap_max", "glibc.malloc.hugetlb")

_applied: str | None = None  # what tune() did in this process (the settings hold for the whole process)


def check_mode(mode: str) -> None:
    from alignrl.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"trainer.host_allocator='{mode}' is not known; use auto (tuned on the CPU), tuned or "
                          f"default")


def _why_not() -> str | None:
    """Why the allocator cannot or should not be tuned here, or None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} is preloaded"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user = [k for k in _USER_SETTINGS if k in os.environ] + [f"GLIBC_TUNABLES {t}" for t in _USER_TUNABLES
                                                             if t in tunables]
    if user:
        return f"the environment sets glibc's malloc ({', '.join(user)})"
    return None


def tune(mode: str, device: str) -> str:
    """Apply ``mode`` for a run on ``device`` (cpu, cuda, ...); returns one line saying what holds now (for the run
    log). The settings are process-wide and stay: ``default`` after ``tuned`` in the same process reports that."""
    global _applied
    check_mode(mode)
    want = mode == "tuned" or (mode == "auto" and str(device).startswith("cpu"))
    if not want:
        if _applied:
            return f"host allocator: {_applied} (tuned earlier in this process; trainer.host_allocator={mode} " \
                   f"cannot undo it)"
        return "host allocator: glibc's defaults" if _why_not() is None else "host allocator: unchanged"
    if _applied:
        return f"host allocator: {_applied}"
    reason = _why_not()
    if reason is not None:
        return f"host allocator: left as it is ({reason})"
    libc = ctypes.CDLL(None)
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "host allocator: left as it is (glibc refused the mmap threshold)"
    if libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:  # the mmap threshold holds (fixed) from here on
        _applied = (f"partly tuned (glibc: blocks up to {MMAP_THRESHOLD >> 20} MiB from the heap; it refused the "
                    f"trim threshold)")
        return f"host allocator: {_applied}"
    _applied = (f"tuned (glibc: blocks up to {MMAP_THRESHOLD >> 20} MiB reused from the heap, up to "
                f"{TRIM_THRESHOLD >> 30} GiB of free memory kept at a heap's top; trainer.host_allocator=default "
                f"turns it off)")
    return f"host allocator: {_applied}"
