"""The fused CPU kernels (tensornet_openmm/nn/kernels.py, csrc/pair_ops.cpp) against PyTorch.

Where a C++ compiler exists (CI has one) the kernels must build: a failed build fails here
instead of silently running the slower PyTorch code everywhere else.
"""

import copy
import itertools
import os
import shutil
import subprocess
import sys
import warnings
from itertools import pairwise

import numpy as np
import pytest
import torch
from helpers import (
    context_for,
    energy_forces,
    openmm_energy_forces,
    random_molecule,
    small_model,
    water_box_nm,
)

from tensornet_openmm import create_force
from tensornet_openmm.export import TensorNetForce, export, pair_capacity, read_metadata, script
from tensornet_openmm.neighbors import minimum_image_of, neighbor_pairs
from tensornet_openmm.nn import kernels, layers

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the fused kernels did not build (see the warning)"


class _TorchEverywhere(kernels.PairKernels):
    """The PyTorch versions of the kernels, taken on the model's fused path."""

    def applies(self, like):
        return True


def _with(model, kind):
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "pair_kernels"):
            module.pair_kernels = kind(torch.float64)
    return model


def _pairs(n=9, p=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (p,), generator=g), torch.randint(0, n, (p,), generator=g)


@pytest.mark.parametrize("half", [True, False])
def test_message_kernel_values_and_gradients(half):
    src, dst = _pairs()
    y = torch.randn(9, 10, 6, dtype=torch.float64, requires_grad=True)
    filters = torch.randn(23, 3, 6, dtype=torch.float64, requires_grad=True)
    reference = kernels.PairKernels(torch.float64)

    def fused(y, filters):
        return torch.ops.tensornet_openmm.messages(y, filters, src, dst, half)

    torch.testing.assert_close(fused(y, filters), reference.messages(y, filters, src, dst, half))
    assert torch.autograd.gradcheck(fused, (y, filters))
    seed = torch.randn(9, 10, 6, dtype=torch.float64)
    expected = torch.autograd.grad(
        reference.messages(y, filters, src, dst, half), (y, filters), seed
    )
    actual = torch.autograd.grad(fused(y, filters), (y, filters), seed)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("channels", [6, 37])
def test_messages_starting_from_the_self_pair(half, channels):
    """messages_self: the pair sums plus the self pair's messages f(0)[GROUP] y (what an
    interaction layer sums), kernel and PyTorch against the two apart; gradcheck of y, the
    filters and the self pair's filters; with no pairs; and a bad self filter named."""
    src, dst = _pairs()
    f64 = {"dtype": torch.float64, "requires_grad": True}
    y, filters = torch.randn(9, 10, channels, **f64), torch.randn(23, 3, channels, **f64)
    f0 = torch.randn(3, channels, **f64)
    reference = kernels.PairKernels(torch.float64)
    expected = y * f0.index_select(0, reference.group) + reference.messages(
        y, filters, src, dst, half
    )
    op = torch.ops.tensornet_openmm.messages_self

    def fused(y, filters, f0, src=src, dst=dst):
        return op(y, filters, src, dst, half, f0)

    torch.testing.assert_close(fused(y, filters, f0), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(reference.messages_self(y, filters, src, dst, half, f0), expected)
    assert torch.autograd.gradcheck(fused, (y, filters, f0))
    none = torch.zeros(0, dtype=torch.long)
    torch.testing.assert_close(fused(y, filters[:0], f0, none, none),
                               y * f0.index_select(0, reference.group))  # fmt: skip
    with pytest.raises(RuntimeError, match=f"self pair's filters must be \\(3, {channels}\\)"):
        fused(y, filters, f0[:2])


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("channels", [6, 37])
def test_message_filter_gradient_is_the_messages_backward(half, channels):
    """message_filter_grad, kernel and PyTorch, is the messages' gradient with respect to their
    filters (what the low-memory forces take a block at a time)."""
    src, dst = _pairs()
    y = torch.randn(9, 10, channels, dtype=torch.float64)
    filters = torch.randn(23, 3, channels, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(9, 10, channels, dtype=torch.float64)
    reference = kernels.PairKernels(torch.float64)
    (expected,) = torch.autograd.grad(reference.messages(y, filters, src, dst, half), filters, seed)
    fused = torch.ops.tensornet_openmm.message_filter_grad(seed, y, src, dst, half)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(reference.message_filter_grad(seed, y, src, dst, half), expected)
    with pytest.raises(RuntimeError, match="grad must be shaped as y"):
        torch.ops.tensornet_openmm.message_filter_grad(seed[:4], y, src, dst, half)


@pytest.mark.parametrize("half", [True, False])
def test_sums_added_in_place_equal_the_sums(half):
    """messages_add and embedding_sums_add (kernel and PyTorch) add the same sums onto what
    ``out`` holds, and embedding_pair_grads is the embedding's gradient with respect to its
    radial functions and geometry: what the low-memory forces take a block at a time."""
    src, dst = _pairs(seed=2)
    f64 = {"dtype": torch.float64}
    y, filters = torch.randn(9, 10, 6, **f64), torch.randn(23, 3, 6, **f64)
    radial, geom = torch.randn(23, 3, 6, **f64), torch.randn(23, 10, **f64)
    z_recv, z_send = torch.randn(9, 6, **f64), torch.randn(9, 6, **f64)
    start = torch.randn(9, 10, 6, **f64)
    reference = kernels.PairKernels(torch.float64)
    ops = torch.ops.tensornet_openmm
    for add in (ops.messages_add, reference.messages_add):
        out = start.clone()
        add(out, y, filters, src, dst, half)
        torch.testing.assert_close(out, start + reference.messages(y, filters, src, dst, half))
    sums = reference.embedding_sums(radial, z_recv, z_send, geom, src, dst, half)
    for add in (ops.embedding_sums_add, reference.embedding_sums_add):
        out = start.clone()
        add(out, radial, z_recv, z_send, geom, src, dst, half)
        torch.testing.assert_close(out, start + sums)
    leaves = (radial.clone().requires_grad_(), geom.clone().requires_grad_())
    seed = torch.randn(9, 10, 6, **f64)
    expected = torch.autograd.grad(
        reference.embedding_sums(leaves[0], z_recv, z_send, leaves[1], src, dst, half),
        leaves, seed,
    )  # fmt: skip
    for grads in (ops.embedding_pair_grads, reference.embedding_pair_grads):
        actual = grads(seed, radial, z_recv, z_send, geom, src, dst, half)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e)
    with pytest.raises(RuntimeError, match=r"messages_add: out must be \[9, 10, 6\] Double"):
        ops.messages_add(start[:4].clone(), y, filters, src, dst, half)
    with pytest.raises(RuntimeError, match="messages_add: out must not be an input"):
        ops.messages_add(y, y, filters, src, dst, half)
    with pytest.raises(RuntimeError, match=r"embedding_sums_add: out must be contiguous"):
        strided = start.transpose(0, 1).contiguous().transpose(0, 1)  # (9, 10, 6), not contiguous
        ops.embedding_sums_add(strided, radial, z_recv, z_send, geom, src, dst, half)
    with pytest.raises(RuntimeError, match=r"embedding_pair_grads: grad must be \(9, 10, 6\)"):
        ops.embedding_pair_grads(seed[:, :3], radial, z_recv, z_send, geom, src, dst, half)


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("sizes", [(23,), (7, 7, 9), (0, 23), (10, 0, 13)], ids=str)
def test_sums_over_blocks_of_pairs(half, sizes):
    """message_blocks and embedding_blocks (kernel and PyTorch): the sums of pairs in blocks,
    block b's radial functions for the next sizes[b] pairs, equal the one-block operators on the
    whole list (values and every gradient, float64), with and without each block's tap (through
    which the radial functions' gradients then flow); gradcheck of each input; blocks or taps
    that do not match the pair list refused with the counts."""
    src, dst = _pairs(seed=3)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    y, filters, f0 = (
        torch.randn(9, 10, 6, **f64),
        torch.randn(23, 3, 6, **f64),
        torch.randn(3, 6, **f64),
    )
    radial, geom = torch.randn(23, 3, 6, **f64), torch.randn(23, 10, **f64)
    z_recv, z_send = torch.randn(9, 6, **f64), torch.randn(9, 6, **f64)
    ops = torch.ops.tensornet_openmm
    seed = torch.randn(9, 10, 6, dtype=torch.float64)

    def close(got, expected, inputs):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
        for a, e in zip(
            torch.autograd.grad(got, inputs, seed), torch.autograd.grad(expected, inputs, seed),
            strict=True,
        ):  # fmt: skip
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)

    for kind, tapped in itertools.product((kernels.FusedPairKernels, kernels.PairKernels), (0, 1)):
        k = kind(torch.float64)
        pieces = (src.split(sizes), dst.split(sizes))
        blocks = list(filters.split(sizes))
        taps = [
            k.message_filter_tap(b, y, i, j, half) for b, i, j in zip(blocks, *pieces, strict=True)
        ]
        got = k.message_blocks(y, blocks, src, dst, half, f0, taps if tapped else [])
        close(got, ops.messages_self(y, filters, src, dst, half, f0), (y, filters, f0))
        blocks = list(radial.split(sizes))

        def embedding_taps(k=k, blocks=blocks, tapped=tapped):  # (a graph per call)
            if not tapped:
                return []
            pieces = zip(blocks, geom.split(sizes), src.split(sizes), dst.split(sizes), strict=True)
            return [k.embedding_tap(b, g, z_recv, z_send, i, j, half) for b, g, i, j in pieces]

        inputs = (radial, z_recv, z_send, geom)
        got = k.embedding_blocks(blocks, z_recv, z_send, geom, src, dst, half, embedding_taps())
        close(got, ops.embedding_sums(*inputs, src, dst, half), inputs)
        # the species terms are constants in a force: the other gradients alone
        got = k.embedding_blocks(blocks, z_recv.detach(), z_send.detach(), geom, src, dst, half,
                                 embedding_taps())  # fmt: skip
        expected = ops.embedding_sums(radial, z_recv.detach(), z_send.detach(), geom, src, dst,
                                      half)  # fmt: skip
        close(got, expected, (radial, geom))

    def messages(y, f0, *blocks):
        return ops.message_blocks(y, list(blocks), src, dst, half, f0, [])

    def embedding(z_recv, z_send, geom, *blocks):
        return ops.embedding_blocks(list(blocks), z_recv, z_send, geom, src, dst, half, [])

    def leaves(t):  # each block a leaf of its own (gradcheck takes no empty ones)
        return [b.clone().requires_grad_(b.numel() > 0) for b in t.detach().split(sizes)]

    assert torch.autograd.gradcheck(messages, (y, f0, *leaves(filters)))
    assert torch.autograd.gradcheck(embedding, (z_recv, z_send, geom, *leaves(radial)))
    with pytest.raises(
        RuntimeError, match=r"message_blocks: the blocks hold 22 pairs, the pair list \[23\]"
    ):
        ops.message_blocks(y, [filters[:10], filters[10:22]], src, dst, half, f0, [])
    with pytest.raises(RuntimeError, match=r"message_blocks: give one tap per block \(1\)"):
        ops.message_blocks(y, [filters], src, dst, half, f0, [y, y])
    with pytest.raises(RuntimeError, match=r"taps must be shaped as the sums \[9, 10, 6\]"):
        ops.message_blocks(y, [filters], src, dst, half, f0, [y[:3]])
    # a tap's pairs are checked where it is made (its backward indexes with them)
    with pytest.raises(RuntimeError, match="pair indices must be two vectors of 23 entries"):
        ops.message_filter_tap(filters, y, src[:5], dst[:5], half)
    bad = dst.clone()
    bad[4] = 40
    with pytest.raises(RuntimeError, match=r"pair 4 is \(\d+, 40\): atom indices must lie in"):
        ops.embedding_tap(radial, geom, z_recv, z_send, src, bad, half)
    with pytest.raises(RuntimeError, match="embedding_blocks: give at least one block of pairs"):
        ops.embedding_blocks([], z_recv, z_send, geom, src, dst, half, [])
    with pytest.raises(RuntimeError, match=r"embedding_blocks: geometry must be \(23, 10\)"):
        ops.embedding_blocks([radial], z_recv, z_send, geom[:5], src, dst, half, [])


def test_block_taps_make_one_block_gradient_at_a_time():
    """Each block's tap made right after its radial functions: autograd runs a block's tap (its
    filter gradient made) and then its network before the next block's tap, blocks last to
    first, so one block's filter gradient exists at a time. Taps made after every block's
    network would all run first (what the layers avoid)."""
    src, dst = _pairs(seed=5)
    y = torch.randn(9, 10, 6, dtype=torch.float64, requires_grad=True)
    f0 = torch.randn(3, 6, dtype=torch.float64)
    sizes = (8, 8, 7)
    ops = torch.ops.tensornet_openmm
    orders = {}
    for placement in ("after each", "after all"):
        order, blocks, taps = [], [], []

        def tap(b, filters, order=order):
            t = ops.message_filter_tap(filters, y, src.split(sizes)[b], dst.split(sizes)[b], True)
            t.grad_fn.register_hook(lambda *_: order.append(f"tap {b}"))
            return t

        for b, rows in enumerate(sizes):
            x = torch.randn(rows, 3, 6, dtype=torch.float64, requires_grad=True)
            x.register_hook(lambda g, b=b, o=order: o.append(f"network {b}"))
            blocks.append(torch.tanh(x))  # a block's network
            if placement == "after each":
                taps.append(tap(b, blocks[-1]))
        if placement == "after all":
            taps = [tap(b, filters) for b, filters in enumerate(blocks)]
        ops.message_blocks(y, blocks, src, dst, True, f0, taps).backward(torch.ones(9, 10, 6))
        orders[placement] = order
    assert orders["after each"] == [
        "tap 2", "network 2", "tap 1", "network 1", "tap 0", "network 0"
    ]  # fmt: skip
    assert orders["after all"][:3] == ["tap 2", "tap 1", "tap 0"]


@pytest.mark.parametrize("half", [True, False])
def test_embedding_kernel_values_and_gradients(half):
    src, dst = _pairs(seed=1)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    radial, geom = torch.randn(23, 3, 6, **f64), torch.randn(23, 10, **f64)
    z_recv, z_send = torch.randn(9, 6, **f64), torch.randn(9, 6, **f64)
    reference = kernels.PairKernels(torch.float64)

    def fused(radial, z_recv, z_send, geom):
        return torch.ops.tensornet_openmm.embedding_sums(
            radial, z_recv, z_send, geom, src, dst, half
        )

    inputs = (radial, z_recv, z_send, geom)
    expected = reference.embedding_sums(*inputs, src, dst, half)
    torch.testing.assert_close(fused(*inputs), expected)
    assert torch.autograd.gradcheck(fused, inputs)
    # only some inputs needing gradients (the species terms are constants in a force)
    out = fused(radial, z_recv.detach(), z_send.detach(), geom)
    seed = torch.randn_like(out)
    actual = torch.autograd.grad(out, (radial, geom), seed)
    expected = torch.autograd.grad(
        reference.embedding_sums(radial, z_recv.detach(), z_send.detach(), geom, src, dst, half),
        (radial, geom),
        seed,
    )
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("strided", [False, True], ids=["bmm-copy", "component_mix"])
@pytest.mark.parametrize("atoms", [7, 300])
def test_batched_mix_equals_the_three_linears(atoms, strided, two_threads):
    """The fused path's channel mixing (one batched product: the CPU's bmm and copy, and the
    GPU's component_mix operator, strided_mix) against PyTorch's three linears, values and
    gradients (float64; 300 atoms split between two threads)."""
    fused = kernels.FusedPairKernels(torch.float64)
    fused.strided_mix = strided
    torch.jit.script(fused)  # TorchScript compiles it
    g = torch.Generator().manual_seed(4)
    p = torch.randn(atoms, 10, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 16, 16, dtype=torch.float64, generator=g, requires_grad=True)
    got, expected = fused.mix(p, w), fused._torch_mix(p, w)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    seed = torch.randn_like(got)
    for a, e in zip(
        torch.autograd.grad(got, (p, w), seed), torch.autograd.grad(expected, (p, w), seed),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_component_mix_operator_values_gradients_and_errors():
    """component_mix(p, w): out[:, c] = p[:, c] @ w[c], written atom-major; gradcheck of both
    inputs (a strided seed too), bmm and a copy's numbers (on the CPU their very bits; a small
    molecule's on a GPU come from a kernel of our own, which sums in its own order), and bad
    shapes named."""
    g = torch.Generator().manual_seed(8)
    f64 = {"dtype": torch.float64, "generator": g}
    p = torch.randn(5, 10, 6, **f64).requires_grad_(True)
    w = torch.randn(10, 6, 4, **f64).requires_grad_(True)
    op = torch.ops.tensornet_openmm.component_mix
    out = op(p, w)
    assert out.shape == (5, 10, 4) and out.is_contiguous()
    torch.testing.assert_close(
        out, torch.bmm(p.transpose(0, 1), w).transpose(0, 1), rtol=1e-14, atol=1e-14
    )
    assert torch.autograd.gradcheck(op, (p, w))
    seed = torch.randn(10, 5, 4, **f64).transpose(0, 1)  # a gradient that is not contiguous
    got = torch.autograd.grad(op(p, w), (p, w), seed)
    expected = torch.autograd.grad(torch.einsum("ncf,cfg->ncg", p, w), (p, w), seed)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    with pytest.raises(RuntimeError, match="weights must be \\(10, 6, channels out\\)"):
        op(p, w[:, :5])
    with pytest.raises(RuntimeError, match="p must be \\(atoms, 10, channels\\)"):
        op(p[:, :9], w)


@pytest.mark.parametrize("atoms", [5, 40])
def test_gated_mix_operator_values_gradients_and_errors(atoms):
    """gated_mix(p, w, gates) = component_mix(p, w) times gates (atoms, 3, F') part by part
    (component c by gates[:, GROUP[c]]): values, gradcheck of all three inputs, the gradient of
    p and of the gates alone (a GPU's small molecule takes its own kernels for those), and bad
    gates named. 40 atoms: two blocks of atoms on a GPU."""
    g = torch.Generator().manual_seed(9)
    f64 = {"dtype": torch.float64, "generator": g}
    p = torch.randn(atoms, 10, 6, **f64).requires_grad_(True)
    w = torch.randn(10, 6, 4, **f64).requires_grad_(True)
    gates = torch.randn(atoms, 3, 4, **f64).requires_grad_(True)
    op = torch.ops.tensornet_openmm.gated_mix
    group = torch.tensor(kernels.GROUP)

    def expected(p, w, gates):
        return torch.einsum("ncf,cfg->ncg", p, w) * gates.index_select(1, group)

    out = op(p, w, gates)
    assert out.shape == (atoms, 10, 4) and out.is_contiguous()
    torch.testing.assert_close(out, expected(p, w, gates), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(op, (p, w, gates))
    seed = torch.randn(10, atoms, 4, **f64).transpose(0, 1)  # a gradient that is not contiguous
    for inputs in ((p, w, gates), (p,), (gates,), (p, gates)):
        got = torch.autograd.grad(op(p, w, gates), inputs, seed)
        want = torch.autograd.grad(expected(p, w, gates), inputs, seed)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    with pytest.raises(RuntimeError, match=rf"gates must be \({atoms}, 3, 4\)"):
        op(p, w, gates[:, :2])


GEOMETRIES = {
    "expnorm": {},
    "gauss-lower": {"rbf_type": "gauss", "cutoff_lower": 0.5},
    "expnorm-lower": {"cutoff_lower": 0.7},
}


@pytest.mark.parametrize("options", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_geometry_kernel_values_and_gradients(options):
    """Cutoff, packed (1, u, u u^T) and radial basis of pair vectors, some beyond the cutoff and
    inside the lower one: against the model's PyTorch code (float64), with gradcheck."""
    model = small_model(**options)
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(40, 3, generator=g, dtype=torch.float64)
    lengths = torch.linspace(0.2, model.cutoff_upper + 1.0, 40, dtype=torch.float64)
    vec = (directions / directions.norm(dim=1, keepdim=True) * lengths[:, None]).requires_grad_()
    kind, centers, widths, alpha, basis_lower = model.distance_expansion.fused_parameters()
    args = (centers, widths, kind, alpha, basis_lower, model.cutoff_lower, model.cutoff_upper)

    def fused(v):
        return torch.ops.tensornet_openmm.geometry(v, *args)

    cut, rhat, basis = model._geometry(vec)
    ones = torch.ones(40, 1, dtype=torch.float64)
    expected = (cut, torch.cat((ones, rhat, layers.algebra.symmetric_outer(rhat)), 1), basis)
    got = fused(vec)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-14)
    assert (got[0][lengths >= model.cutoff_upper] == 0).all()
    assert torch.autograd.gradcheck(fused, (vec,))
    seeds = [torch.randn_like(e) for e in expected]
    wanted = torch.autograd.grad(expected, vec, seeds)
    actual = torch.autograd.grad(fused(vec), vec, seeds)
    torch.testing.assert_close(actual[0], wanted[0], rtol=1e-11, atol=1e-12)
    # one output used (the others' gradients undefined), as in a model with the cutoff unused
    (only_basis,) = torch.autograd.grad(fused(vec)[2].sum(), vec)
    (expected_basis,) = torch.autograd.grad(model._geometry(vec)[2].sum(), vec)
    torch.testing.assert_close(only_basis, expected_basis, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("rbf_type", ["expnorm", "gauss"])
def test_geometry_kernel_makes_no_subnormal_basis_values(rbf_type):
    """Far from their centres, 32 basis functions underflow to subnormal numbers in float (the
    CPU's microcode handles those: the networks' first matrix product ran four times slower).
    The kernel makes them 0 and gives them no slope; every other value and slope is PyTorch's,
    and a layer's output from the basis is the same to the last bit."""
    model = small_model(dtype=torch.float32, num_rbf=32, cutoff=5.0, rbf_type=rbf_type)
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(3000, 3, generator=g)
    lengths = torch.linspace(0.05, 5.0, 3000)
    vec = (directions / directions.norm(dim=1, keepdim=True) * lengths[:, None]).requires_grad_()
    kind, centers, widths, alpha, basis_lower = model.distance_expansion.fused_parameters()
    args = (centers, widths, kind, alpha, basis_lower, model.cutoff_lower, model.cutoff_upper)
    basis = torch.ops.tensornet_openmm.geometry(vec, *args)[2]
    expected = model._geometry(vec)[2]
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (expected != 0) & (expected.abs() < tiny)
    assert subnormal.sum() > 100  # the case occurs
    assert not ((basis != 0) & (basis.abs() < tiny)).any()
    assert (basis[subnormal] == 0).all()
    # (float32 arithmetic, written differently: a few ulp of the largest values)
    torch.testing.assert_close(basis[~subnormal], expected[~subnormal], rtol=1e-5, atol=1e-7)
    # slopes: the flushed values' are 0, the others PyTorch's (float64 on the same vectors)
    seed = torch.rand(basis.shape, generator=g)
    (got,) = torch.autograd.grad(basis, vec, seed)
    vec64 = vec.detach().double().requires_grad_()
    (wanted,) = torch.autograd.grad(model.double()._geometry(vec64)[2], vec64, seed.double())
    torch.testing.assert_close(got.double(), wanted, rtol=1e-4, atol=1e-4)
    weight, bias = torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    kept, flushed = expected.detach(), expected.detach().masked_fill(subnormal, 0)
    assert torch.equal(torch.addmm(bias, kept, weight.t()), torch.addmm(bias, flushed, weight.t()))


def test_geometry_kernel_refuses_bad_input_and_basis_gradients():
    vec = torch.randn(5, 3, dtype=torch.float64)
    centers, widths = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    geometry = torch.ops.tensornet_openmm.geometry
    with pytest.raises(RuntimeError, match=r"vectors must be \(pairs, 3\), got \[5, 2\]"):
        geometry(vec[:, :2], centers, widths, 0, 1.0, 0.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="basis kind must be 0 .* got 7"):
        geometry(vec, centers, widths, 7, 1.0, 0.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="0 <= lower < upper, got 5 and 4"):
        geometry(vec, centers, widths, 0, 1.0, 0.0, 5.0, 4.0)
    with pytest.raises(RuntimeError, match="centers and widths must be two vectors of one length"):
        geometry(vec, centers, widths[:3], 0, 1.0, 0.0, 0.0, 5.0)
    trained = centers.clone().requires_grad_()
    out = geometry(vec, trained, widths, 0, 1.0, 0.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="no gradients for the basis parameters"):
        torch.autograd.grad(out[2].sum(), trained)


def _network_inputs(seed=1, pairs=37, functions=8, f=6, networks=2):
    """Basis, cutoff, first linears (a projection of 3 f rows, then f rows per network) and two
    further layers per network (f -> 2 f -> 3 f), float64."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    rows = 3 * f + networks * f
    weights = [w for _ in range(networks) for w in (r(2 * f, f), r(3 * f, 2 * f))]
    biases = [b for _ in range(networks) for b in (r(2 * f), r(3 * f))]
    return r(pairs, functions), r(pairs), r(rows, functions), r(rows), weights, biases


@pytest.mark.parametrize("act", [0, 1], ids=["silu", "tanh"])
def test_radial_networks_operator_equals_the_networks_one_by_one(act, two_threads):
    """radial_networks: every pair network in one operator (the first linears one matrix product
    each way) against the same networks in PyTorch: values, the gradients of the basis and the
    cutoff (all outputs used, and some unused), gradcheck; weights that want gradients and
    mismatched shapes are refused with the values."""
    basis, cut, w0, b0, weights, biases = _network_inputs()
    basis.requires_grad_()
    cut.requires_grad_()
    f = 6
    op = torch.ops.tensornet_openmm.radial_networks
    torch_kernels = kernels.PairKernels(torch.float64)

    def both():
        args = (basis, cut, w0, b0, 3 * f, 2, weights, biases, act)
        return op(*args), torch_kernels.radial_networks(*args)

    got, expected = both()
    assert [t.shape for t in got] == [(37, 3 * f)] * 3
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    g = torch.Generator().manual_seed(2)
    seeds = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    actual = torch.autograd.grad(got, [basis, cut], seeds)
    wanted = torch.autograd.grad(expected, [basis, cut], seeds)
    for a, e in zip(actual, wanted, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    got, expected = both()  # the last network's output unused
    actual = torch.autograd.grad(got[0].sum() + got[1].sum(), [basis, cut])
    wanted = torch.autograd.grad(expected[0].sum() + expected[1].sum(), [basis, cut])
    for a, e in zip(actual, wanted, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, c: op(x, c, w0, b0, 3 * f, 2, weights, biases, act), (basis, cut)
    )
    trained = [w.clone().requires_grad_() for w in weights]
    with pytest.raises(RuntimeError, match="no gradients for the weights"):
        op(basis, cut, w0, b0, 3 * f, 2, trained, biases, act)
    with pytest.raises(RuntimeError, match="network 1 layer 2 has weight \\[18, 11\\]"):
        op(basis, cut, w0, b0, 3 * f, 2, weights[:3] + [weights[3][:, :11]], biases, act)
    with pytest.raises(RuntimeError, match="30 first-layer rows are not a projection of 17"):
        op(basis, cut, w0, b0, 17, 2, weights, biases, act)
    with pytest.raises(RuntimeError, match=r"activation must be 0 \(SiLU\) or 1 \(tanh\), got 2"):
        op(basis, cut, w0, b0, 3 * f, 2, weights, biases, 2)


def _tangent_case(
    rbf_type, act, pairs=41, f=6, networks=2, seed=3, dtype=torch.float64, functions=8
):
    """Pair vectors (some beyond the cutoff, one inside the lower one), the basis parameters of
    a small model and radial networks over ``networks`` networks: the arguments of
    tangent_radial_networks, and of geometry + radial_networks for the same outputs."""
    model = small_model(5.0, dtype, num_rbf=functions, rbf_type=rbf_type, cutoff_lower=0.3)
    kind, centers, widths, alpha, basis_lower = model.distance_expansion.fused_parameters()
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(pairs, 3, generator=g, dtype=dtype)
    lengths = torch.rand(pairs, generator=g, dtype=dtype) * 5.6 + 0.2
    vec = (directions / directions.norm(dim=1, keepdim=True) * lengths[:, None]).requires_grad_()
    _, _, w0, b0, weights, biases = _network_inputs(seed, pairs, functions, f, networks)
    geo = (centers, widths, kind, alpha, basis_lower, model.cutoff_lower, model.cutoff_upper)

    def scaled(w):  # (values of order one, as a trained network's)
        return (w / w.shape[1] ** 0.5).to(dtype)

    nets = (scaled(w0), b0.to(dtype), 3 * f, networks, [scaled(w) for w in weights],
            [b.to(dtype) for b in biases], act)  # fmt: skip
    return vec, geo, nets


@pytest.mark.parametrize("act", [0, 1], ids=["silu", "tanh"])
@pytest.mark.parametrize("rbf_type", ["expnorm", "gauss"])
def test_tangent_radial_networks_equal_the_reverse_mode(rbf_type, act, two_threads):
    """tangent_radial_networks (the cutoff, the geometry and the radial networks of the pair
    vectors, the networks differentiated forward in r) against geometry + radial_networks
    (reverse mode) in float64 (on a GPU: the small networks' kernel with the derivatives as more
    rows): the same outputs (the cutoff and the geometry to the last bit), the same vectors'
    gradients for every output seeded, for the networks alone (some unused), for the cutoff and
    the geometry alone, gradcheck (central differences), pairs beyond the cutoff with no
    gradient from the networks; weights to train and bad shapes refused."""
    vec, geo, nets = _tangent_case(rbf_type, act)
    ops = torch.ops.tensornet_openmm

    def reverse(v):
        cut, geom, basis = ops.geometry(v, *geo)
        return [cut, geom, *ops.radial_networks(basis, cut, *nets)]

    def tangent(v):
        return ops.tangent_radial_networks(v, *geo, *nets)

    got, expected = tangent(vec), reverse(vec)
    assert [t.shape for t in got] == [(41,), (41, 10)] + [(41, 18)] * 3
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for a, e in zip(got[2:], expected[2:], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    g = torch.Generator().manual_seed(4)
    seeds = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    (actual,) = torch.autograd.grad(got, vec, seeds)
    (wanted,) = torch.autograd.grad(expected, vec, seeds)
    torch.testing.assert_close(actual, wanted, rtol=1e-11, atol=1e-12)
    (networks_only,) = torch.autograd.grad(tangent(vec)[2:], vec, seeds[2:])
    beyond = vec.detach().norm(dim=1) >= 5.0
    assert beyond.any() and (networks_only[beyond] == 0).all()
    for used in ([4], [0, 1], [1]):  # a network alone; the cutoff and the geometry; the geometry
        got, expected = tangent(vec), reverse(vec)
        (actual,) = torch.autograd.grad([got[o] for o in used], vec, [seeds[o] for o in used])
        (wanted,) = torch.autograd.grad([expected[o] for o in used], vec, [seeds[o] for o in used])
        torch.testing.assert_close(actual, wanted, rtol=1e-11, atol=1e-12, msg=str(used))
    assert torch.autograd.gradcheck(lambda v: tangent(v), (vec,))
    w0, b0, proj, networks, weights, biases, act_ = nets
    trained = [w.clone().requires_grad_() for w in weights]
    with pytest.raises(RuntimeError, match="tangent_radial_networks: no gradients for the weights"):
        ops.tangent_radial_networks(vec, *geo, w0, b0, proj, networks, trained, biases, act_)
    with pytest.raises(RuntimeError, match="network 1 layer 2 has weight \\[18, 11\\]"):
        bad = weights[:3] + [weights[3][:, :11]]
        ops.tangent_radial_networks(vec, *geo, w0, b0, proj, networks, bad, biases, act_)


@pytest.mark.parametrize(
    "pairs, f, functions", [(2100, 16, 8), (231, 128, 32)], ids=["products", "bench-shape"]
)
def test_tangent_radial_networks_in_float32_are_the_reverse_modes_to_rounding(pairs, f, functions):
    """In float32 (a force's precision) the tangent operator's outputs are the reverse mode's and
    its gradients agree to float32's rounding: 2,100 pairs (on a GPU above the small-network
    kernels: products and tangent_activate_kernel), and the bench model's networks at alanine
    dipeptide's 231 pairs (on a GPU the tangent forward kernel at 4 rows a block, in 56 KB of
    shared memory: the kernel's limit raised above the default 48 KB)."""
    vec, geo, nets = _tangent_case(
        "expnorm", 0, pairs=pairs, f=f, dtype=torch.float32, functions=functions
    )
    ops = torch.ops.tensornet_openmm
    cut, _, basis = ops.geometry(vec, *geo)
    expected = ops.radial_networks(basis, cut, *nets)
    got = ops.tangent_radial_networks(vec, *geo, *nets)[2:]
    for a, e in zip(got, expected, strict=True):  # (the CPU's reverse mode adds its biases apart)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    (wanted,) = torch.autograd.grad(sum(e.sum() for e in expected), vec)
    (actual,) = torch.autograd.grad(sum(a.sum() for a in got), vec)
    torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4 * wanted.abs().max().item())


@pytest.mark.parametrize("periodic", [False, True], ids=["vacuum", "triclinic"])
def test_pair_difference_values_gradients_and_errors(periodic):
    """pair_difference(pos, src, dst, scale, box) = scale (pos[src] - pos[dst]), at its minimum
    image in the box (times the scale) if one is given, against PyTorch (neighbors'
    minimum_image_of): the same numbers to the last bit in float64 and float32, atoms in many
    pairs and in none; its gradient; gradcheck; bad input refused with the value."""
    g = torch.Generator().manual_seed(8)
    box = torch.tensor([[2.0, 0.0, 0.0], [0.3, 2.2, 0.0], [-0.4, 0.5, 2.5]], dtype=torch.float64)
    pos = (torch.rand(9, 3, generator=g, dtype=torch.float64) * 5.0 - 1.0).requires_grad_()
    src, dst = _pairs()
    op = torch.ops.tensornet_openmm.pair_difference
    empty = pos.new_empty(0)

    def expected_of(x, scale):
        d = (x[src] - x[dst]) * scale
        return minimum_image_of(d, box.to(x.dtype) * scale if periodic else None)

    def got_of(x, scale):
        return op(x, src, dst, scale, box.to(x.dtype) if periodic else empty.to(x.dtype))

    expected, got = expected_of(pos, 10.0), got_of(pos, 10.0)
    assert torch.equal(got, expected)
    if periodic:  # pairs brought back: none longer than half the box's widths allow
        assert (got.norm(dim=1) < (pos[src] - pos[dst]).norm(dim=1) * 10.0).any()
    single = pos.detach().float()
    assert torch.equal(got_of(single, 10.0), expected_of(single, 10.0))
    seed = torch.randn(23, 3, generator=g, dtype=torch.float64)
    (wanted,) = torch.autograd.grad(expected, pos, seed)
    (actual,) = torch.autograd.grad(got, pos, seed)
    torch.testing.assert_close(actual, wanted, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: got_of(x, 0.5), (pos,))
    assert op(pos, src[:0], dst[:0], 10.0, empty).shape == (0, 3)
    with pytest.raises(RuntimeError, match=r"pair 4 is \(\d+, 40\): atom indices must lie"):
        bad = dst.clone()
        bad[4] = 40
        op(pos, src, bad, 10.0, empty)
    with pytest.raises(RuntimeError, match=r"positions must be \(atoms, 3\), got \[9, 2\]"):
        op(pos[:, :2], src, dst, 10.0, empty)
    with pytest.raises(RuntimeError, match="pair indices must be two vectors"):
        op(pos, src[None], dst, 10.0, empty)
    with pytest.raises(RuntimeError, match=r"the box must be \(3, 3\) in the positions' dtype"):
        op(pos, src, dst, 10.0, box[:2])
    if periodic:  # a box narrower than min_width (scaled): every vector and gradient NaN
        assert torch.isfinite(op(pos, src, dst, 10.0, box, 19.9)).all()
        narrow = op(pos, src, dst, 10.0, box, 20.1)
        assert torch.isnan(narrow).all()
        (g_narrow,) = torch.autograd.grad(narrow, pos, seed)
        assert torch.isnan(g_narrow).all()  # the atoms in no pair too


def _search_boxes():
    orthorhombic = torch.diag(torch.tensor([14.0, 12.5, 13.0], dtype=torch.float64))
    triclinic = orthorhombic.clone()
    triclinic[1, 0], triclinic[2, 0], triclinic[2, 1] = 3.0, -4.0, 2.5
    return {"vacuum": None, "orthorhombic": orthorhombic, "triclinic": triclinic}


@pytest.mark.parametrize("box_kind", ["vacuum", "orthorhombic", "triclinic"])
@pytest.mark.parametrize("strategy", ["brute", "cell"])
def test_pair_search_finds_the_pytorch_search_pairs_in_order(box_kind, strategy):
    """The pair_search kernel (FusedPairKernels.neighbor_pairs) against the PyTorch search: the
    same pairs in the same order, the same vectors to the last bit and the same count, in float64
    and float32, half and full lists, dynamic and with capacities that hold every pair, drop some
    (an overflow: the count above the capacity) or hold none; atoms outside the box (unwrapped);
    the vectors' gradient reaches the positions as the PyTorch search's does."""
    box = _search_boxes()[box_kind]
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(70, 3, generator=g, dtype=torch.float64) * 20.0 - 3.0
    fused = kernels.FusedPairKernels()
    cutoff = 4.0
    found = 0
    for dtype in (torch.float64, torch.float32):
        x, b = pos.to(dtype), None if box is None else box.to(dtype)
        for half in (True, False):
            count = int(neighbor_pairs(x, cutoff, b, strategy=strategy, half=half).num_pairs)
            found = max(found, count)
            for capacity in (-1, count + 17, count // 2, 0):
                cells = 70 if capacity >= 0 and strategy == "cell" else -1
                args = (cutoff, b, capacity, strategy, cells, half)
                leaf = x.clone().requires_grad_()
                expected = neighbor_pairs(leaf, *args)
                got = fused.neighbor_pairs(leaf, *args)
                assert torch.equal(got.edge_index, expected.edge_index)
                assert torch.equal(got.vectors, expected.vectors)
                assert torch.equal(got.distances, expected.distances)
                assert int(got.num_pairs) == int(expected.num_pairs) == count
                seed = torch.randn(expected.vectors.shape, generator=g, dtype=torch.float64)
                (want,) = torch.autograd.grad(expected.vectors, leaf, seed.to(dtype))
                (have,) = torch.autograd.grad(got.vectors, leaf, seed.to(dtype))
                assert torch.equal(have, want)
    assert found > 100  # (a search that finds nothing would agree too)


def test_pair_search_refuses_bad_input_with_the_value():
    op = torch.ops.tensornet_openmm.pair_search
    pos = torch.rand(5, 3, dtype=torch.float64)
    order = torch.arange(5)
    start, end = torch.zeros(5, 1, dtype=torch.int64), torch.full((5, 1), 5)
    empty = pos.new_empty(0)
    with warnings.catch_warnings():  # (autograd's warning for an operator it cannot go through)
        warnings.simplefilter("error")
        pairs, shift, count = op(pos.requires_grad_(), order, start, end, 10.0, empty, -1, True)
    assert not shift.requires_grad  # constants: the vectors' gradient is pos[i] - pos[j]'s
    assert pairs.tolist() == torch.triu_indices(5, 5, 1).tolist() and int(count) == 10
    torch.testing.assert_close(shift, torch.zeros(10, 3, dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"order\[2\] = 7 is not an atom index in \[0, 5\)"):
        op(pos, torch.tensor([0, 1, 7, 3, 4]), start, end, 10.0, empty, -1, True)
    with pytest.raises(RuntimeError, match=r"candidate range 3 is \[0, 6\), outside \[0, 5\]"):
        bad = end.clone()
        bad[3] = 6
        op(pos, order, start, bad, 10.0, empty, -1, True)
    with pytest.raises(RuntimeError, match="ranges must be two int64 \\(atoms, ranges\\) tensors"):
        op(pos, order, start[:4], end[:4], 10.0, empty, -1, True)
    with pytest.raises(RuntimeError, match=r"positions must be \(atoms, 3\), got \[5, 2\]"):
        op(pos[:, :2], order, start, end, 10.0, empty, -1, True)
    with pytest.raises(RuntimeError, match=r"the box must be \(3, 3\) in the positions' dtype"):
        op(pos, order, start, end, 10.0, torch.eye(3), -1, True)
    with pytest.raises(RuntimeError, match="the cutoff must be positive, got -1"):
        op(pos, order, start, end, -1.0, empty, -1, True)
    with pytest.raises(RuntimeError, match="a fixed capacity needs at least one atom"):
        op(pos[:0], order[:0], start[:0], end[:0], 10.0, empty, 4, True)
    with pytest.raises(ValueError, match="unknown strategy 'cells'; choose 'auto', 'brute'"):
        kernels.FusedPairKernels().neighbor_pairs(pos, 1.0, None, -1, "cells", -1, True)


def test_bad_input_is_refused_with_the_value():
    src, dst = _pairs()
    y, filters = torch.randn(9, 10, 6), torch.randn(23, 3, 6)
    with pytest.raises(
        RuntimeError, match=r"pair 4 is \(\d+, 40\): atom indices must lie in \[0, 9\)"
    ):
        bad = dst.clone()
        bad[4] = 40
        torch.ops.tensornet_openmm.messages(y, filters, src, bad, True)
    with pytest.raises(RuntimeError, match="filters must be \\(pairs, 3, channels\\)"):
        torch.ops.tensornet_openmm.messages(y, filters[:, :2], src, dst, True)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        torch.ops.tensornet_openmm.messages(y.double(), filters, src, dst, True)


OTHER_MODEL = {
    "equivariance_invariance_group": "SO(3)",
    "rbf_type": "gauss",
    "cutoff_lower": 0.5,
    "activation": "tanh",
    "num_layers": 1,
}


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize(
    "options", [{}, OTHER_MODEL, {"activation": "ssp"}], ids=["O3", "SO3-gauss-lower", "ssp"]
)
def test_model_with_fused_kernels_equals_pytorch(half, blocks, options, monkeypatch):
    """Energies and forces of a charged molecule, float64: fused kernels, the PyTorch versions
    of the same sums, and the model's default code; with several pair blocks too (summed by
    message_blocks and embedding_blocks with a graph, added in place without one)."""
    if blocks:
        for name in ("_block_elements", "_fused_block_elements"):  # 7 pairs per block
            monkeypatch.setattr(layers, name, lambda: 10 * 32 * 7)
    model = small_model(**options)
    z, pos = random_molecule(14, spread=2.5)
    pairs = neighbor_pairs(pos, model.cutoff_upper, half=half)
    charge = torch.tensor([-1.0], dtype=torch.float64)
    results = []
    variants = (model, _with(model, kernels.FusedPairKernels), _with(model, _TorchEverywhere))
    for variant in variants:
        v = pairs.vectors.detach().clone().requires_grad_(True)
        energy = variant(z, pos, pairs.edge_index, v, None, charge, 1, half)
        (grad,) = torch.autograd.grad(energy.sum(), v)
        results.append((energy.detach(), grad))
        with torch.no_grad():
            plain = variant(z, pos, pairs.edge_index, pairs.vectors, None, charge, 1, half)
        torch.testing.assert_close(plain, results[-1][0], rtol=1e-13, atol=1e-13)
    assert pairs.num_pairs > 7
    for energy, grad in results[1:]:
        # the kernels sum the O(3) product as packed(M Y) + packed(Y M): other rounding
        torch.testing.assert_close(energy, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-9, atol=1e-10)


def test_scripted_frozen_model_uses_the_kernels():
    model = small_model()
    fused = _with(model, kernels.FusedPairKernels)
    z, pos = random_molecule(10)
    frozen = torch.jit.freeze(torch.jit.script(fused).eval())
    graph = str(frozen.graph)
    assert "tensornet_openmm::messages" in graph and "tensornet_openmm::embedding_sums" in graph
    assert "tensornet_openmm::mlp" in graph and "tensornet_openmm::geometry" in graph
    e_fused, f_fused = energy_forces(frozen, z, pos)
    e_ref, f_ref = energy_forces(model, z, pos)
    torch.testing.assert_close(e_fused, e_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_fused, f_ref, rtol=1e-9, atol=1e-10)


def test_fused_kernels_on_padded_fixed_capacity_pairs():
    """The fixed-capacity pair list of CUDA graphs (padding slots: self pairs beyond the cutoff,
    spread over the atoms), searched by the pair_search kernel, through the fused kernels gives
    the dynamic list's energy and forces in plain PyTorch (float64, a periodic water box)."""
    z, pos, box = water_box_nm(1.2)
    model = small_model()
    capacity, cell_capacity, strategy = pair_capacity(model, len(z), pos * 10, box * 10)
    results = []
    for fixed, fused in ((False, False), (True, True)):
        module = TensorNetForce(
            model, z, periodic=True, capacity=capacity if fixed else -1, strategy=strategy,
            cell_capacity=cell_capacity if fixed else -1, outputs_forces=True,
            fixed_on_cpu=fixed, fused_kernels=fused,
        )  # fmt: skip
        assert module.fused_kernels == fused
        scripted = script(module)
        # the fused path searches with the pair_search kernel
        assert ("tensornet_openmm::pair_search" in str(scripted.inlined_graph)) == fused
        energy, forces = scripted(torch.tensor(pos), torch.tensor(box))
        results.append((energy.item(), forces.numpy()))
    (e0, f0), (e1, f1) = results
    assert e1 == pytest.approx(e0, rel=1e-10)
    np.testing.assert_allclose(f1, f0, rtol=1e-9, atol=1e-9 * np.abs(f0).max())


def test_openmm_force_defaults_to_the_kernels_and_matches_pytorch(monkeypatch):
    """create_force on a machine without CUDA takes the kernels by default; a periodic water box
    through the CPU platform gives the same energy, forces and lambda derivative as PyTorch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    z, pos, box = water_box_nm(1.2)
    model = small_model()
    results = []
    for fused in (None, False):
        force = create_force(model, z, periodic=True, positions=pos, box_vectors=box,
                             lambda_parameter="lam", fused_kernels=fused)  # fmt: skip
        context = context_for(force, len(z), "CPU", box)
        context.setParameter("lam", 0.6)
        energy, forces = openmm_energy_forces(context, pos)
        derivative = context.getState(getParameterDerivatives=True).getEnergyParameterDerivatives()
        results.append((energy, forces, derivative["lam"]))
    (e0, f0, d0), (e1, f1, d1) = results
    assert e0 == pytest.approx(e1, rel=1e-10) and d0 == pytest.approx(d1, rel=1e-10)
    np.testing.assert_allclose(f0, f1, rtol=1e-9, atol=1e-9 * np.abs(f1).max())
    assert TensorNetForce(model, z, periodic=True, fused_kernels=True).fused_kernels
    assert not TensorNetForce(model, z, periodic=True).fused_kernels


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENVIRONMENT_SWITCH, "0")
    assert not kernels.wanted() and not kernels.load()
    assert not TensorNetForce(small_model(), [8, 1, 1], fused_kernels=True).fused_kernels


def test_a_misspelt_switch_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv(kernels.ENVIRONMENT_SWITCH, "of")
    with pytest.raises(
        ValueError, match="TENSORNET_OPENMM_FUSED='of' is not a switch: set it to 0"
    ):
        kernels.wanted()


def test_exported_file_with_kernels_loads_in_a_fresh_process(tmp_path):
    """A file made with the kernels names them; plain torch.jit.load in a new process fails,
    jit_load (and so load_system and the runner) loads them first."""
    z, pos = [8, 1, 1, 6, 1], np.random.default_rng(0).uniform(0, 0.3, (5, 3))
    module = TensorNetForce(small_model(), z, fused_kernels=True)
    path = tmp_path / "fused.pt"
    export(module, path)
    assert read_metadata(path)["fused_kernels"] is True
    expected = script(module)(torch.tensor(pos)).item()
    code = (
        "import sys, torch\n"
        "from tensornet_openmm.nn.kernels import jit_load\n"
        "try:\n"
        "    torch.jit.load(sys.argv[1]); print('plain load worked')\n"
        "except RuntimeError:\n"
        "    pass\n"
        f"x = torch.tensor({pos.tolist()!r}, dtype=torch.float64)\n"
        "print(repr(jit_load(sys.argv[1])(x).item()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != kernels.ENVIRONMENT_SWITCH}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "plain load worked" not in out.stdout
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-12)
    # where the kernels are switched off (or cannot be built) the error names the way out
    env[kernels.ENVIRONMENT_SWITCH] = "0"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode != 0 and "fused_kernels=False" in out.stderr


def test_a_lock_left_by_an_interrupted_build_is_removed(tmp_path, monkeypatch):
    """torch waits for a build's lock file without end: one left by an interrupted build (older
    than STALE_LOCK_SECONDS) is removed with a warning naming it; a fresh one, another
    process's build, is waited for (with a warning) until it goes."""
    import threading
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match=r"removed .*lock, 16 min old, left by an interrupted"):
        kernels.wait_for_other_build(tmp_path, poll=0.01)
    assert not lock.exists()
    lock.write_text("")
    timer = threading.Timer(0.3, lock.unlink)
    timer.start()
    with pytest.warns(RuntimeWarning, match="waiting for another process building"):
        kernels.wait_for_other_build(tmp_path, poll=0.01)
    timer.join()
    assert not lock.exists()
    kernels.wait_for_other_build(tmp_path)  # no lock: returns at once


def test_a_failed_build_warns_and_falls_back(tmp_path):
    """No compiler (here: a source that does not compile): a warning naming the fix, and the
    force still works in PyTorch."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    code = (
        "import warnings, torch\n"
        "from pathlib import Path\n"
        "from tensornet_openmm.nn import kernels\n"
        f"kernels.SOURCE = Path({str(broken)!r})\n"
        "import os\n"
        "before = os.environ['PATH']\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = kernels.load()\n"
        "print(ok, any('pip install ninja' in str(w.message) for w in caught),\n"
        "      os.environ['PATH'] == before)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(kernels.ENVIRONMENT_SWITCH, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]  # and PATH is left as it was


# channels: fewer than the kernels' 16 lanes (one channel at a time), and 2 x 16 lanes + 5
CHANNELS = [7, 37]


@pytest.mark.parametrize("channels", CHANNELS)
def test_packed_product_kernel_values_and_gradients(channels):
    """packed(A B) and packed(A B + B A) per atom and channel against the PyTorch path (full
    form, broadcast product, decomposition), with the same tensor on both sides too (dX^2)."""
    f64 = {"dtype": torch.float64, "requires_grad": True}
    a, b = torch.randn(5, 10, channels, **f64), torch.randn(5, 10, channels, **f64)
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.packed_product
    for symmetric in (False, True):
        torch.testing.assert_close(fused(a, b, symmetric), reference.product(a, b, symmetric))
        torch.testing.assert_close(fused(a, a, symmetric), reference.product(a, a, symmetric))
        assert torch.autograd.gradcheck(lambda x, y, s=symmetric: fused(x, y, s), (a, b))
        assert torch.autograd.gradcheck(lambda t, s=symmetric: fused(t, t, s), (a,))
    with pytest.raises(RuntimeError, match="must be \\(atoms, 10, channels\\) alike"):
        fused(a[:, :9], b[:, :9])


def test_packed_mix_kernel_values_and_gradients():
    """Channel mixing with one weight per part, and its gradients (weights included): the
    operator that modules exported by earlier versions call."""
    f64 = {"dtype": torch.float64, "requires_grad": True}
    p, w = torch.randn(6, 10, 5, **f64), torch.randn(3, 5, 5, **f64)
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.packed_mix
    torch.testing.assert_close(fused(p, w), reference.mix(p, w))
    assert torch.autograd.gradcheck(fused, (p, w))
    with pytest.raises(RuntimeError, match="weights must be \\(3, channels, channels\\)"):
        fused(p, w[:2])


@pytest.mark.parametrize("channels", CHANNELS)
def test_packed_normalize_kernel_values_and_gradients(channels):
    p = torch.randn(6, 10, channels, dtype=torch.float64, requires_grad=True)
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.packed_normalize
    torch.testing.assert_close(fused(p), reference.normalize(p))
    assert torch.autograd.gradcheck(fused, (p,))


@pytest.mark.parametrize("channels", CHANNELS)
def test_packed_part_norms_kernel_values_gradients_and_errors(channels):
    """packed_part_norms (the output head's 3 I^2, |A|^2, |S|^2) against PyTorch's squares
    times the parts' weights, and against the parts' Frobenius norms of the full 3x3 tensors;
    its gradient by gradcheck; bad input refused with the value."""
    p = torch.randn(6, 10, channels, dtype=torch.float64)
    p[:, 4:7] -= p[:, 4:7].mean(1, keepdim=True)  # S traceless, as TensorNet's are
    p.requires_grad_()
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.packed_part_norms
    got = fused(p)
    torch.testing.assert_close(got, reference.part_norms(p), rtol=1e-15, atol=1e-15)
    full = reference.algebra.full(p)  # (n, 3, 3, F): I, A and S from the full tensor
    eye = torch.eye(3, dtype=torch.float64)[None, :, :, None]
    iso = full.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None, :] * eye
    anti = 0.5 * (full - full.transpose(1, 2))
    sym = 0.5 * (full + full.transpose(1, 2)) - iso
    norms = torch.stack([(t * t).sum((1, 2)) for t in (iso, anti, sym)], 1)
    torch.testing.assert_close(got, norms, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (p,))
    with pytest.raises(RuntimeError, match=r"p must be \(atoms, 10, channels\), got \[6, 9, "):
        fused(p[:, :9])


@pytest.mark.parametrize("channels", CHANNELS)
def test_layer_steps_in_one_operator_equal_the_separate_ones(channels):
    """packed_product_normalize (normalize(packed(M Y) q)) and packed_square_add
    (x + d + packed(D D) q) against the operators they replace, without charge factors (empty)
    and with them: values, gradcheck, and the factors refused where they need a gradient."""
    f64 = {"dtype": torch.float64, "requires_grad": True}
    a, b = torch.randn(5, 10, channels, **f64), torch.randn(5, 10, channels, **f64)
    q = torch.rand(5, dtype=torch.float64) + 0.5
    reference = kernels.PairKernels(torch.float64)
    ops = torch.ops.tensornet_openmm
    for factor in (None, q):
        factors = a.new_empty(0) if factor is None else factor
        scale = 1.0 if factor is None else q.reshape(-1, 1, 1)
        for symmetric in (False, True):
            expected = reference.normalize(reference.product(a, b, symmetric) * scale)
            actual = ops.packed_product_normalize(a, b, symmetric, factors)
            torch.testing.assert_close(actual, expected, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(reference.product_normalize(a, b, symmetric, factor),
                                       expected, rtol=0, atol=0)  # fmt: skip

            def step(x, y, s=symmetric, f=factors):
                return ops.packed_product_normalize(x, y, s, f)

            assert torch.autograd.gradcheck(step, (a, b))
        expected = a + b + reference.product(b, b) * scale
        torch.testing.assert_close(ops.packed_square_add(a, b, factors), expected)
        torch.testing.assert_close(reference.square_add(a, b, factor), expected, rtol=0, atol=0)
        assert torch.autograd.gradcheck(lambda x, d, f=factors: ops.packed_square_add(x, d, f),
                                        (a, b))  # fmt: skip
    fused = kernels.FusedPairKernels(torch.float64)  # differentiable factors: PyTorch's
    q_grad = q.clone().requires_grad_(True)
    out = fused.square_add(a, b, q_grad) + fused.product_normalize(a, b, True, q_grad)
    assert torch.autograd.grad(out.sum(), q_grad)[0].shape == (5,)
    with pytest.raises(RuntimeError, match="no gradient with respect to the charge factors"):
        torch.autograd.grad(ops.packed_square_add(a, b, q_grad).sum(), q_grad)
    with pytest.raises(RuntimeError, match="charge factors must be \\(atoms,\\) = \\(5,\\)"):
        ops.packed_product_normalize(a, b, True, q[:3])
    with pytest.raises(RuntimeError, match="must be \\(atoms, 10, channels\\) alike"):
        ops.packed_square_add(a, b[:4], q)


@pytest.mark.parametrize("channels", CHANNELS)
def test_embedding_prepare_equals_the_separate_steps(channels):
    """embedding_prepare(sums, self terms): X (the term added to I, S traceless) and |X|^2 in
    one operator against the PyTorch steps of TensorEmbedding.finish; gradcheck with both
    outputs used and with each alone (the other's gradient undefined)."""
    f64 = {"dtype": torch.float64, "requires_grad": True}
    sums, own = torch.randn(6, 10, channels, **f64), torch.randn(6, channels, **f64)
    reference = kernels.PairKernels(torch.float64)
    x, norm = torch.ops.tensornet_openmm.embedding_prepare(sums, own)
    s = sums.detach()
    diag = s[:, 4:7] - s[:, 4:7].mean(1, keepdim=True)
    expected = torch.cat(((s[:, 0] + own.detach()).unsqueeze(1), s[:, 1:4], diag, s[:, 7:]), 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(norm, reference.algebra.squared_norm(expected).squeeze(1))
    for a, e in zip(reference.embedding_prepare(sums, own), (x, norm), strict=True):
        torch.testing.assert_close(a, e)
    op = torch.ops.tensornet_openmm.embedding_prepare
    assert torch.autograd.gradcheck(lambda t, u: op(t, u), (sums, own))
    assert torch.autograd.gradcheck(lambda t, u: op(t, u)[0], (sums, own))
    assert torch.autograd.gradcheck(lambda t, u: op(t, u)[1], (sums, own))
    with pytest.raises(RuntimeError, match=f"self pair terms must be \\(atoms, channels\\) = "
                                           f"\\(6, {channels}\\)"):  # fmt: skip
        op(sums, own[:5])


def _radial_inputs(pairs, widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": g}
    basis = torch.rand(pairs, widths[0], **f64).requires_grad_(True)
    cut = torch.rand(pairs, **f64).requires_grad_(True)
    weights = [torch.randn(n, m, **f64).requires_grad_(True) for m, n in pairwise(widths)]
    biases = [torch.randn(n, **f64).requires_grad_(True) for n in widths[1:]]
    return basis, cut, weights, biases


# activation codes: SiLU, tanh, none, and SiLU or tanh with none after the last layer (+ 4)
MLP_CODES = pytest.mark.parametrize(
    "act", [0, 1, 2, 4, 5], ids=["silu", "tanh", "none", "silu-linear-last", "tanh-linear-last"]
)


# The gradients of these networks reach 1e3 (basis) and 3e3 (cutoff); where terms cancel, the
# operator's and autograd's differ by up to 1e-14 of that (SiLU's gradient: the CPU kernel's is
# within 4 ulp, ATen's within 20, whose 1 - sigmoid(x) cancels)
MLP_GRAD_ATOL = 2e-11


@MLP_CODES
def test_mlp_kernel_values_and_gradients(act, two_threads):
    """A small network as one operator against PyTorch: values, gradients (gradcheck, every
    input), and a block of rows large enough to be split between threads."""
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.mlp
    widths = [5, 8, 9, 12] if act != 2 else [5, 12]
    basis, cut, weights, biases = _radial_inputs(7, widths)
    n = len(weights)

    def call(b, c, *params):
        return fused(b, c, list(params[:n]), list(params[n:]), act)

    assert torch.autograd.gradcheck(call, (basis, cut, *weights, *biases))
    for pairs, sizes in ((7, widths), (3000, [32, 64, 128, 96])):
        basis, cut, weights, biases = _radial_inputs(pairs, sizes, seed=1)
        inputs = [basis, cut, *weights, *biases]
        out = fused(basis, cut, weights, biases, act)
        expected = reference.mlp(basis, cut, weights, biases, act)
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
        seed = torch.randn_like(out)
        actual = torch.autograd.grad(out, inputs, seed)
        wanted = torch.autograd.grad(expected, inputs, seed)
        for a, e in zip(actual, wanted, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=MLP_GRAD_ATOL)
    # forces only: the basis and the cutoff need gradients, the frozen weights do not (the
    # operator then keeps fewer activations for the backward pass)
    basis, cut, weights, biases = _radial_inputs(3000, [32, 64, 128, 96], seed=2)
    frozen = [w.detach() for w in weights], [b.detach() for b in biases]
    seed = torch.randn(3000, 96, dtype=torch.float64)
    got = torch.autograd.grad(fused(basis, cut, *frozen, act), [basis, cut], seed)
    wanted = torch.autograd.grad(reference.mlp(basis, cut, *frozen, act), [basis, cut], seed)
    for g, e in zip(got, wanted, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=MLP_GRAD_ATOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_kernel_projection_times_the_scale_with_constant_weights(dtype, two_threads):
    """One layer without activation, times the scale, constant weights: the embedding's distance
    projections in a force, which the CPU runs as one product with the scale folded into its
    columns (and keeps nothing pair-sized). Values and the basis' and scale's gradients against
    PyTorch, with and without autograd, for 0, 7 and 3,000 rows; gradcheck in float64."""
    reference = kernels.PairKernels(dtype)
    fused = torch.ops.tensornet_openmm.mlp
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    for pairs in (0, 7, 3000):
        inputs = _radial_inputs(pairs, [32, 96], seed=4)
        basis, cut = (t.detach().to(dtype).requires_grad_() for t in inputs[:2])
        w, b = [inputs[2][0].detach().to(dtype)], [inputs[3][0].detach().to(dtype)]
        out = fused(basis, cut, w, b, 2)
        expected = reference.mlp(basis, cut, w, b, 2)
        assert out.shape == (pairs, 96)
        torch.testing.assert_close(out, expected, **tol)
        with torch.no_grad():
            torch.testing.assert_close(fused(basis, cut, w, b, 2), expected, **tol)
        if pairs == 0:
            continue
        seed = torch.randn(pairs, 96, dtype=dtype)
        actual = torch.autograd.grad(out, [basis, cut], seed)
        wanted = torch.autograd.grad(expected, [basis, cut], seed)
        for a, e in zip(actual, wanted, strict=True):
            torch.testing.assert_close(a, e, **tol)
        # the scale's gradient alone, and the basis' alone
        (g_cut,) = torch.autograd.grad(fused(basis, cut, w, b, 2), [cut], seed)
        torch.testing.assert_close(g_cut, wanted[1], **tol)
        (g_basis,) = torch.autograd.grad(fused(basis, cut.detach(), w, b, 2), [basis], seed)
        torch.testing.assert_close(g_basis, wanted[0], **tol)
    basis, cut, weights, biases = _radial_inputs(7, [5, 12], seed=5)
    frozen = [weights[0].detach()], [biases[0].detach()]
    assert torch.autograd.gradcheck(lambda x, c: fused(x, c, *frozen, 2), (basis, cut))


@MLP_CODES
def test_mlp_kernel_without_scale(act, two_threads):
    """An empty scale (the per-atom networks: embedding gates, output head) scales nothing:
    values and gradients against PyTorch's act(L_n(... act(L_1(x)))), with and without weight
    gradients (forces only: the operator then keeps no activations but the last tanh's)."""
    reference = kernels.PairKernels(torch.float64)
    fused = torch.ops.tensornet_openmm.mlp
    basis, _, weights, biases = _radial_inputs(6, [5, 8, 9])
    none = torch.zeros(0, dtype=torch.float64)

    def call(b, *params):
        return fused(b, none, list(params[:2]), list(params[2:]), act)

    assert torch.autograd.gradcheck(call, (basis, *weights, *biases))
    empty = none.clone().requires_grad_(True)  # an empty scale's gradient is empty
    (g_empty,) = torch.autograd.grad(fused(basis, empty, weights, biases, act).sum(), [empty])
    assert g_empty.shape == (0,)
    for frozen in (False, True):
        basis, _, weights, biases = _radial_inputs(3000, [32, 64, 96], seed=3)
        if frozen:
            weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
        out = fused(basis, none, weights, biases, act)
        plain = basis
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            plain = torch.nn.functional.linear(plain, w, b)
            if act < 4 or k < len(weights) - 1:  # (+ 4: no activation after the last layer)
                plain = [torch.nn.functional.silu, torch.tanh, lambda t: t][act % 4](plain)
        torch.testing.assert_close(out, plain, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(reference.mlp(basis, none, weights, biases, act), plain)
        inputs = [basis] + ([] if frozen else [*weights, *biases])
        seed = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, seed)
        wanted = torch.autograd.grad(plain, inputs, seed)
        for g, e in zip(got, wanted, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_silu_kernels_at_every_width_and_at_the_extremes(dtype):
    """The CPU's own SiLU kernels (exp written out to vectorise, a vector register at a time):
    one layer of identity weights makes the network SiLU(x) * scale itself. Values and both
    gradients against SiLU in float64 (sigmoid and 1 - sigmoid as sigmoid(x) and sigmoid(-x),
    without cancellation), for widths 1 to 40 (every remainder of 16 floats and 8 doubles) and
    inputs from -1e4 to 1e4, 0 and -0 included: no NaN, nothing off by more than 16 ulp of the
    size of the terms (values below 1e-25 absolutely: the kernels cap |x| at 87 in float). The
    gradient takes some ten roundings in a row: 8.4 ulp were seen in double in the emulated
    CUDA build (other compiler flags); a wrong polynomial coefficient is off by 1e-3."""
    fused = torch.ops.tensornet_openmm.mlp
    ulp = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(5)
    extremes = torch.tensor([-1e4, -800.0, -100.0, -88.0, -87.5, -20.0, -1.278, -1e-3, -0.0, 0.0,
                             1e-30, 1e-3, 1.5, 20.0, 88.0, 100.0, 800.0, 1e4],
                            dtype=torch.float64)  # fmt: skip
    for width in range(1, 41):
        x = torch.randn(23, width, generator=g, dtype=torch.float64) * 6
        x.view(-1)[: extremes.numel()] = extremes[: x.numel()]
        x, scale = x.to(dtype), (torch.rand(23, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        seed = torch.randn(23, width, generator=g, dtype=torch.float64).to(dtype)
        xs, cs = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        eye, zero = torch.eye(width, dtype=dtype), torch.zeros(width, dtype=dtype)
        out = fused(xs, cs, [eye], [zero], 0)
        g_x, g_c = torch.autograd.grad(out, [xs, cs], seed)
        x, scale, seed = x.double(), scale.double().unsqueeze(1), seed.double()
        s, sc = torch.sigmoid(x), torch.sigmoid(-x)
        silu = x * s
        checks = (  # (got, expected, the size of its terms)
            (out, silu * scale, (silu * scale).abs()),
            (g_x, seed * scale * s * (1 + x * sc), (seed * scale).abs() * s * (1 + x.abs() * sc)),
            (g_c, (seed * silu).sum(1), (seed * silu).abs().sum(1)),
        )
        for got, expected, size in checks:
            assert torch.isfinite(got).all(), width
            error = ((got.double() - expected).abs() / size.clamp_min(1e-25)).max().item()
            assert error < 16 * ulp, (width, error / ulp)


def test_mlp_kernel_refuses_bad_input():
    basis, cut, weights, biases = _radial_inputs(4, [5, 8, 3])
    fused = torch.ops.tensornet_openmm.mlp
    with pytest.raises(RuntimeError, match="activation must be 0 \\(SiLU\\), 1 \\(tanh\\) or 2"):
        fused(basis, cut, weights, biases, 7)
    with pytest.raises(RuntimeError, match="layer 1 has weight \\[3, 6\\] and bias \\[3\\] for "
                       "inputs of width 8"):  # fmt: skip
        fused(basis, cut, [weights[0], weights[1][:, :6]], biases, 0)
    with pytest.raises(RuntimeError, match="scale must be \\(4\\) or empty \\(no scale\\)"):
        fused(basis, cut[:3], weights, biases, 0)


def test_packed_mix_in_parallel_with_weight_gradients(two_threads):
    """A mixing large enough to be split between threads, weights requiring gradients (the
    threads must not see autograd)."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(300, 10, 40, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(3, 40, 40, dtype=torch.float64, generator=g).requires_grad_(True)
    out = torch.ops.tensornet_openmm.packed_mix(p, w)
    expected = kernels.PairKernels(torch.float64).mix(p, w)
    torch.testing.assert_close(out, expected)
    seed = torch.randn_like(out)
    for a, e in zip(
        torch.autograd.grad(out, (p, w), seed), torch.autograd.grad(expected, (p, w), seed),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(a, e)
