"""The CPU allocator setting that the runner applies."""

import ctypes
import platform

import pytest

from tensornet_openmm import allocator


def test_thresholds_fit_mallopt_int():
    # mallopt takes a C int: a larger value would wrap around (a trim threshold of 0, say)
    limit = 2 ** (8 * ctypes.sizeof(ctypes.c_int) - 1) - 1
    assert 0 < allocator.MMAP_THRESHOLD <= limit
    assert 0 < allocator.TRIM_THRESHOLD <= limit


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")  # fmt: skip
def test_keep_freed_memory_applies_on_glibc():
    assert allocator.keep_freed_memory() is True
