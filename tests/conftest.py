"""Shared fixtures and the one tolerance table of the test suite."""

import pytest
import torch

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
