"""Shared fixtures and the one tolerance table of the test suite."""

import os

import pytest
import torch

# tests/cuda_emulation/operators.py: the fused operators' CUDA code built for the CPU, registered
# before tensornet_openmm loads its own, so that CPU tensors take the CUDA route
EMULATED_CUDA = bool(os.environ.get("TENSORNET_OPENMM_EMULATED_CUDA"))
if EMULATED_CUDA:
    torch.ops.load_library(os.environ["TENSORNET_OPENMM_EMULATED_CUDA"])
    # sums by atomic adds, as on a GPU: the last bits vary from one run to the next; and fast
    # mode (a random projection of the Jacobian), since every emulated launch runs its threads
    _gradcheck = torch.autograd.gradcheck

    def _gradcheck_atomic(*args, **kwargs):
        kwargs.setdefault("nondet_tol", 1e-12)
        kwargs.setdefault("fast_mode", True)
        return _gradcheck(*args, **kwargs)

    torch.autograd.gradcheck = _gradcheck_atomic


def pytest_sessionfinish(session):
    """Under the emulated CUDA operators, write their launches by kernel ("name count" lines)
    where ``TENSORNET_OPENMM_EMULATED_REPORT`` says (tests/test_cuda_emulation.py reads it)."""
    report = os.environ.get("TENSORNET_OPENMM_EMULATED_REPORT")
    if EMULATED_CUDA and report:
        import ctypes

        library = ctypes.CDLL(os.environ["TENSORNET_OPENMM_EMULATED_CUDA"])
        library.tn_emulated_launches.restype = ctypes.c_char_p
        with open(report, "wb") as out:
            out.write(library.tn_emulated_launches())


# Relative tolerances by dtype. float64 comparisons with the reference are exact up to
# summation order; float32 ones are limited by single-precision rounding.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5}
# Absolute floor for quantities that can be near zero (forces), in the quantity's own unit.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def two_threads():
    """At least two intra-op threads, so that large inputs take the kernels' parallel path."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))
    yield
    torch.set_num_threads(before)
