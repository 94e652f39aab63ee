"""Pair search against an independent O(N^2) NumPy search over periodic images."""

import itertools

import numpy as np
import pytest
import torch

from tensornet_openmm import TensorNet
from tensornet_openmm.neighbors import check_box, neighbor_pairs

CUBIC = np.diag([12.0, 12.0, 12.0])
TRICLINIC = np.array([[12.0, 0.0, 0.0], [3.6, 10.8, 0.0], [-2.4, 3.0, 10.2]])


def reference_pairs(pos, cutoff, box=None):
    """{(i, j): vector} for every i != j with an image closer than the cutoff (any image)."""
    shifts = np.zeros((1, 3))
    if box is not None:
        shifts = np.array(list(itertools.product(range(-2, 3), repeat=3))) @ box
    out = {}
    for i in range(len(pos)):
        d = pos[i] - (pos[:, None, :] + shifts[None, :, :])  # (n, n_shifts, 3)
        close = (d * d).sum(-1) < cutoff * cutoff
        close[i] = False
        for j, k in zip(*np.nonzero(close), strict=True):
            assert (i, j) not in out, "two images within the cutoff"
            out[(i, int(j))] = d[j, k]
    return out


def as_dict(pairs, vectors, count=None):
    n = pairs.shape[1] if count is None else min(int(count), pairs.shape[1])
    return {
        (int(i), int(j)): v
        for (i, j), v in zip(pairs.T[:n].tolist(), vectors[:n].detach().numpy(), strict=True)
    }


def assert_same(found, expected):
    assert set(found) == set(expected)
    for key, vec in expected.items():
        np.testing.assert_allclose(found[key], vec, rtol=0, atol=1e-9)


@pytest.mark.parametrize("box", [None, CUBIC, TRICLINIC], ids=["free", "cubic", "triclinic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_system_matches_reference(box, dtype):
    rng = np.random.default_rng(3)
    pos = rng.uniform(-3.0, 15.0, size=(120, 3))  # many atoms outside the box: not wrapped
    expected = reference_pairs(pos, 5.0, box)
    box_t = None if box is None else torch.tensor(box, dtype=dtype)
    pairs, vectors, count = neighbor_pairs(torch.tensor(pos, dtype=dtype), 5.0, box_t)
    assert int(count) == len(expected) == pairs.shape[1]
    if dtype == torch.float64:
        assert_same(as_dict(pairs, vectors), expected)
    else:  # float32 rounding can move a pair sitting within 1e-5 of the cutoff
        assert len(set(as_dict(pairs, vectors)) ^ set(expected)) <= 2


def test_water_box_and_lattice_shifts():
    openmm = pytest.importorskip("openmm")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from openmmtools.testsystems import WaterBox
    water = WaterBox(box_edge=1.5 * openmm.unit.nanometer, cutoff=0.5 * openmm.unit.nanometer)
    pos = np.asarray(water.positions.value_in_unit(openmm.unit.angstrom))
    box = np.array(
        [v.value_in_unit(openmm.unit.angstrom) for v in water.system.getDefaultPeriodicBoxVectors()]
    )
    expected = reference_pairs(pos, 5.0, box)
    shifted = pos + np.random.default_rng(0).integers(-2, 3, size=(len(pos), 3)) @ box
    for p in (pos, shifted):  # molecules split across the boundary and shifted by lattice vectors
        pairs, vectors, _ = neighbor_pairs(torch.tensor(p), 5.0, torch.tensor(box))
        assert_same(as_dict(pairs, vectors), expected)


def test_pairs_exactly_at_the_cutoff_are_excluded():
    pos = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.5, 0.0]], dtype=torch.float64)
    pairs, _, count = neighbor_pairs(pos, 3.0)
    # (0, 1) sits exactly at the cutoff and is excluded; (1, 2) is 3.9 apart
    assert int(count) == 2 and {tuple(p) for p in pairs.T.tolist()} == {(0, 2), (2, 0)}


def test_fixed_capacity_pads_and_reports_overflow():
    rng = np.random.default_rng(5)
    pos = torch.tensor(rng.uniform(0, 12, size=(60, 3)))
    box = torch.tensor(TRICLINIC)
    pairs, vectors, count = neighbor_pairs(pos, 5.0, box)
    fixed, fvec, fcount = neighbor_pairs(pos, 5.0, box, capacity=int(count) + 37)
    assert fixed.shape == (2, int(count) + 37) and int(fcount) == int(count)
    assert_same(as_dict(fixed, fvec, fcount), as_dict(pairs, vectors))
    assert torch.all(fvec[int(count) :].norm(dim=1) == 10.0)  # padding: length 2 * cutoff
    small, _, scount = neighbor_pairs(pos, 5.0, box, capacity=10)
    assert small.shape == (2, 10) and int(scount) == int(count) > 10  # overflow is visible


def test_padded_pairs_change_neither_energy_nor_forces():
    model = TensorNet(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10, cutoff_upper=5.0,
                      dtype=torch.float64)  # fmt: skip
    rng = np.random.default_rng(2)
    pos = torch.tensor(rng.uniform(0, 12, size=(40, 3)), requires_grad=True)
    z = torch.tensor(rng.choice([1, 6, 8], size=40))
    box = torch.tensor(CUBIC)
    results = []
    for capacity in (-1, 5000):
        pairs, vectors, _ = neighbor_pairs(pos, 5.0, box, capacity)
        energy = model(z, pos, pairs, vectors)
        results.append((energy, torch.autograd.grad(energy.sum(), pos)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_gradients_flow_through_vectors():
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [11.5, 0.0, 0.0]], dtype=torch.float64)
    pos.requires_grad_(True)
    _, vectors, _ = neighbor_pairs(pos, 3.0, torch.tensor(CUBIC))
    (vectors * vectors).sum().backward()
    # d/dpos_i of |r_ij|^2 + |r_ji|^2 is 4 r_ij, summed over the neighbours j of i
    expected = np.zeros((3, 3))
    for (i, _), vec in reference_pairs(pos.detach().numpy(), 3.0, CUBIC).items():
        expected[i] += 4 * vec
    np.testing.assert_allclose(pos.grad.numpy(), expected, atol=1e-12)


def test_scripted_equals_eager():
    scripted = torch.jit.script(neighbor_pairs)
    pos = torch.rand(30, 3, dtype=torch.float64) * 12
    box = torch.tensor(TRICLINIC)
    for capacity in (-1, 900):
        a, b = scripted(pos, 5.0, box, capacity), neighbor_pairs(pos, 5.0, box, capacity)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "box, message",
    [
        (np.diag([8.0, 12.0, 12.0]), "at least twice the cutoff"),
        (np.array([[12.0, 1.0, 0.0], [0.0, 12.0, 0.0], [0.0, 0.0, 12.0]]), "reduced form"),
        (np.array([[12.0, 0.0, 0.0], [7.0, 12.0, 0.0], [0.0, 0.0, 12.0]]), "not reduced"),
    ],
)
def test_bad_boxes_are_clear_errors(box, message):
    with pytest.raises(ValueError, match=message):
        check_box(torch.tensor(box), 5.0)
    check_box(torch.tensor(TRICLINIC), 5.0)  # a good one passes
