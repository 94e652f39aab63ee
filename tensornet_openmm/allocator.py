"""CPU speed: keep freed memory in the process instead of returning it to the system at once.

A TensorNet step on the CPU allocates and frees many tensors of a few hundred kB to tens of MB.
With glibc's default settings, large blocks come straight from the kernel (mmap) and are handed
back on free, so every step touches fresh pages and pays a page fault for each 4 kB of them (850
faults per energy + forces call of alanine dipeptide with a 128-channel model; 14 once tuned).
:func:`keep_freed_memory` raises glibc's mmap and trim thresholds so that freed blocks are reused.
Measured on the project's 2-core machine with ``benchmarks/bench_md.py --allocator both``: 5% of
an alanine dipeptide MD step, 7% of the same in water (ML/MM). It changes the whole process and
only the allocator's bookkeeping (freed memory is returned to the system later, not at once).
The command-line runner calls it; call it yourself in scripts that run TensorNet on the CPU, or
set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Blocks below this come from the heap and are reused (glibc's largest allowed value)."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap kept for reuse before it is returned to the system (the
largest value mallopt's int takes, 2 GiB)."""


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for TensorNet on the CPU; True when applied (False off glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mmap threshold first: setting it also fixes glibc's dynamic thresholds
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return applied and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
