"""Pair search against an independent O(N^2) NumPy search over periodic images."""

import itertools

import numpy as np
import pytest
import torch

from tensornet_openmm import TensorNet, neighbors
from tensornet_openmm.neighbors import check_box, neighbor_pairs

CUBIC = np.diag([12.0, 12.0, 12.0])
TRICLINIC = np.array([[12.0, 0.0, 0.0], [3.6, 10.8, 0.0], [-2.4, 3.0, 10.2]])
# reduced, but so skewed that the cell list has one or two cells per axis
SKEWED = np.array([[10.0, 0.0, 0.0], [4.9, 10.0, 0.0], [-4.9, 4.9, 11.0]])
STRATEGIES = ["brute", "cell"]


def reference_pairs(pos, cutoff, box=None):
    """{(i, j): vector} for every i != j with an image closer than the cutoff (any image)."""
    shifts = np.zeros((1, 3))
    if box is not None:
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(box), axis=0)  # between lattice planes
        k = int(np.ceil((np.ptp(pos, axis=0).max() + cutoff) / spacing.min()))
        shifts = np.array(list(itertools.product(range(-k, k + 1), repeat=3))) @ box
    out = {}
    for i in range(len(pos)):
        d = pos[i] - (pos[:, None, :] + shifts[None, :, :])  # (n, n_shifts, 3)
        close = (d * d).sum(-1) < cutoff * cutoff
        close[i] = False
        for j, k in zip(*np.nonzero(close), strict=True):
            assert (i, j) not in out, "two images within the cutoff"
            out[(i, int(j))] = d[j, k]
    return out


def as_dict(pairs, vectors=None, count=None):
    if isinstance(pairs, neighbors.PairList):
        pairs, vectors, count = pairs.edge_index, pairs.vectors, pairs.num_pairs
    n = pairs.shape[1] if count is None else min(int(count), pairs.shape[1])
    return {
        (int(i), int(j)): v
        for (i, j), v in zip(pairs.T[:n].tolist(), vectors[:n].detach().numpy(), strict=True)
    }


def assert_same(found, expected):
    assert set(found) == set(expected)
    for key, vec in expected.items():
        np.testing.assert_allclose(found[key], vec, rtol=0, atol=1e-9)


BOXES = {"free": None, "cubic": CUBIC, "triclinic": TRICLINIC, "skewed": SKEWED}
CASES = [(b, s) for b in BOXES for s in STRATEGIES] + [("free", "cluster")]  # cluster: no boxes


@pytest.mark.parametrize("box_name, strategy", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_system_matches_reference(box_name, strategy, dtype):
    box = BOXES[box_name]
    if strategy == "cluster":
        pytest.importorskip("torch_cluster")
    rng = np.random.default_rng(3)
    pos = rng.uniform(-8.0, 20.0, size=(150, 3))  # many atoms outside the box: not wrapped
    expected = reference_pairs(pos, 5.0, box)
    box_t = None if box is None else torch.tensor(box, dtype=dtype)
    found = neighbor_pairs(torch.tensor(pos, dtype=dtype), 5.0, box_t, strategy=strategy)
    assert int(found.num_pairs) == found.edge_index.shape[1] == found.distances.shape[0]
    torch.testing.assert_close(found.distances, found.vectors.norm(dim=1))
    if dtype == torch.float64:
        assert int(found.num_pairs) == len(expected)
        assert_same(as_dict(found), expected)
    else:  # float32 rounding can move a pair sitting within 1e-5 of the cutoff
        assert len(set(as_dict(found)) ^ set(expected)) <= 2


@pytest.mark.parametrize("box", [None, TRICLINIC], ids=["free", "triclinic"])
def test_strategies_agree_in_float32(box):
    """Same candidates test, same arithmetic: identical pair sets and vectors in float32 too."""
    rng = np.random.default_rng(8)
    pos = torch.tensor(rng.uniform(-8.0, 20.0, size=(300, 3)), dtype=torch.float32)
    box_t = None if box is None else torch.tensor(box, dtype=torch.float32)
    results = [as_dict(neighbor_pairs(pos, 5.0, box_t, strategy=s)) for s in STRATEGIES]
    assert set(results[0]) == set(results[1])
    for key, vec in results[0].items():
        assert np.array_equal(results[1][key], vec)


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
        for strategy in STRATEGIES:
            found = neighbor_pairs(torch.tensor(p), 5.0, torch.tensor(box), strategy=strategy)
            assert_same(as_dict(found), expected)


@pytest.mark.parametrize("strategy", STRATEGIES + ["cluster"])
def test_pairs_exactly_at_the_cutoff_are_excluded(strategy):
    if strategy == "cluster":
        pytest.importorskip("torch_cluster")
    pos = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.5, 0.0]], dtype=torch.float64)
    found = neighbor_pairs(pos, 3.0, strategy=strategy)
    # (0, 1) sits exactly at the cutoff and is excluded; (1, 2) is 3.9 apart
    assert int(found.num_pairs) == 2
    assert {tuple(p) for p in found.edge_index.T.tolist()} == {(0, 2), (2, 0)}
    # the same across a periodic boundary: 0 and 1 are 3.0 apart through the face of the box
    box = torch.eye(3, dtype=torch.float64) * 10.0
    wrapped = torch.tensor([[0.5, 0.0, 0.0], [7.5, 0.0, 0.0], [0.5, 2.5, 0.0]], dtype=torch.float64)
    if strategy != "cluster":
        found = neighbor_pairs(wrapped, 3.0, box, strategy=strategy)
        assert {tuple(p) for p in found.edge_index.T.tolist()} == {(0, 2), (2, 0)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fixed_capacity_pads_and_reports_overflow(strategy):
    rng = np.random.default_rng(5)
    pos = torch.tensor(rng.uniform(0, 24, size=(400, 3)))
    box = torch.tensor(TRICLINIC * 2)
    dynamic = neighbor_pairs(pos, 5.0, box, strategy=strategy)
    count = int(dynamic.num_pairs)
    fixed = neighbor_pairs(pos, 5.0, box, count + 37, strategy, cell_capacity=64)
    assert fixed.edge_index.shape == (2, count + 37) and int(fixed.num_pairs) == count
    assert_same(as_dict(fixed), as_dict(dynamic))
    assert torch.all(fixed.vectors[count:].norm(dim=1) == 10.0)  # padding: length 2 * cutoff
    # padding slot k: the self pair of atom k mod n (spread, not all onto one atom's rows)
    spread = torch.arange(count, count + 37) % 400
    assert torch.equal(fixed.edge_index[:, count:], torch.stack((spread, spread)))
    assert torch.all(fixed.distances[count:] == 10.0)
    small = neighbor_pairs(pos, 5.0, box, 10, strategy, cell_capacity=64)
    assert small.edge_index.shape == (2, 10) and int(small.num_pairs) == count  # overflow visible
    assert set(as_dict(small)) <= set(as_dict(dynamic))


@pytest.mark.parametrize("box_name, strategy", CASES)
def test_half_list_is_the_full_list_once(box_name, strategy):
    rng = np.random.default_rng(8)
    pos = torch.tensor(rng.uniform(-8, 20, size=(300, 3)))
    box = None if BOXES[box_name] is None else torch.tensor(BOXES[box_name])
    full = as_dict(neighbor_pairs(pos, 5.0, box, strategy=strategy))
    expected = {key: vec for key, vec in full.items() if key[0] < key[1]}
    half = neighbor_pairs(pos, 5.0, box, strategy=strategy, half=True)
    assert int(half.num_pairs) == len(full) // 2 == len(expected)
    assert_same(as_dict(half), expected)
    if strategy != "cluster":  # fixed capacity: padded like the full list, overflow visible
        fixed = neighbor_pairs(pos, 5.0, box, len(expected) + 9, strategy, 300, half=True)
        assert fixed.edge_index.shape == (2, len(expected) + 9)
        assert_same(as_dict(fixed), expected)
        small = neighbor_pairs(pos, 5.0, box, 10, strategy, 300, half=True)
        assert int(small.num_pairs) == len(expected)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("capacity", [10, 700])  # overflowing, and padded
def test_small_fixed_half_list_at_once_equals_the_blocked_search(periodic, capacity, monkeypatch):
    """A small molecule's fixed-capacity half list in one go (fewer GPU kernels in a CUDA graph)
    gives the blocked search's pairs, slot order, padding, count and vectors to the last bit, and
    the same gradients with respect to the positions."""
    rng = np.random.default_rng(9)
    box = torch.tensor(TRICLINIC) if periodic else None
    pos = torch.tensor(rng.uniform(-2, 14, size=(90, 3)))
    results = []
    general = neighbors._search
    for blocked in (False, True):
        if blocked:  # 64 candidates per block: the general search, block by block
            monkeypatch.setattr(neighbors, "_block_elements", lambda: 64)
            monkeypatch.setattr(neighbors, "_search", general)
        else:  # every candidate in one block: not the general search
            monkeypatch.setattr(neighbors, "_search", None)
        x = pos.clone().requires_grad_(True)
        found = neighbor_pairs(x, 5.0, box, capacity, "brute", half=True)
        (grad,) = torch.autograd.grad((found.vectors**3).sum() + found.distances.sum(), x)
        results.append((found, grad))
    (once, g_once), (blocks, g_blocks) = results
    assert once.edge_index.shape == (2, capacity)
    assert torch.equal(once.edge_index, blocks.edge_index)
    assert torch.equal(once.vectors, blocks.vectors)
    assert torch.equal(once.distances, blocks.distances)
    expected = reference_pairs(pos.numpy(), 5.0, None if box is None else box.numpy())
    assert int(once.num_pairs) == int(blocks.num_pairs) == len(expected) // 2
    torch.testing.assert_close(g_once, g_blocks, rtol=1e-14, atol=1e-14)


def test_full_cell_reads_as_overflow():
    pos = torch.tensor(np.random.default_rng(6).uniform(0, 24, size=(400, 3)))
    box = torch.tensor(TRICLINIC * 2)
    count = int(neighbor_pairs(pos, 5.0, box).num_pairs)
    short = neighbor_pairs(pos, 5.0, box, count + 100, "cell", cell_capacity=3)
    assert int(short.num_pairs) > count + 100  # pairs may be missing: flagged, never silent
    with pytest.raises(ValueError, match="cell_capacity"):
        neighbor_pairs(pos, 5.0, box, count, "cell")


def test_auto_strategy_and_bad_arguments(monkeypatch):
    pos = torch.rand(50, 3, dtype=torch.float64) * 10
    calls = []
    real = neighbors._cell_list
    monkeypatch.setattr(neighbors, "_cell_list", lambda *a: calls.append(1) or real(*a))
    neighbor_pairs(pos, 3.0)
    assert not calls  # small: brute force
    big = torch.rand(neighbors.CELL_LIST_MIN_ATOMS, 3, dtype=torch.float64) * 40
    neighbor_pairs(big, 3.0)
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown strategy 'kd'"):
        neighbor_pairs(pos, 3.0, strategy="kd")
    with pytest.raises(ValueError, match="periodic"):
        neighbor_pairs(pos, 3.0, torch.tensor(CUBIC), strategy="cluster")


def test_padded_pairs_change_neither_energy_nor_forces():
    model = TensorNet(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10, cutoff_upper=5.0,
                      dtype=torch.float64)  # fmt: skip
    rng = np.random.default_rng(2)
    pos = torch.tensor(rng.uniform(0, 12, size=(40, 3)), requires_grad=True)
    z = torch.tensor(rng.choice([1, 6, 8], size=40))
    box = torch.tensor(CUBIC)
    results = []
    for capacity in (-1, 5000):
        pairs, vectors, _, _ = neighbor_pairs(pos, 5.0, box, capacity)
        energy = model(z, pos, pairs, vectors)
        results.append((energy, torch.autograd.grad(energy.sum(), pos)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_gradients_flow_through_vectors():
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [11.5, 0.0, 0.0]], dtype=torch.float64)
    pos.requires_grad_(True)
    vectors = neighbor_pairs(pos, 3.0, torch.tensor(CUBIC)).vectors
    (vectors * vectors).sum().backward()
    # d/dpos_i of |r_ij|^2 + |r_ji|^2 is 4 r_ij, summed over the neighbours j of i
    expected = np.zeros((3, 3))
    for (i, _), vec in reference_pairs(pos.detach().numpy(), 3.0, CUBIC).items():
        expected[i] += 4 * vec
    np.testing.assert_allclose(pos.grad.numpy(), expected, atol=1e-12)


def test_scripted_equals_eager():
    scripted = torch.jit.script(neighbor_pairs)
    pos = torch.rand(30, 3, dtype=torch.float64) * 12
    for box in (None, torch.tensor(TRICLINIC)):
        for strategy in STRATEGIES:
            for capacity in (-1, 900):
                args = (pos, 5.0, box, capacity, strategy, 30)
                a, b = scripted(*args), neighbor_pairs(*args)
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


@pytest.mark.parametrize("box_name", ["free", "triclinic"])
def test_one_block_half_search_equals_the_blocked_search(box_name, monkeypatch):
    """A small molecule's dynamic half list is searched in one go (the candidates' vectors kept
    for the pairs found): the same pairs, order, vectors and gradients as the search by blocks."""
    rng = np.random.default_rng(9)
    box = None if BOXES[box_name] is None else torch.tensor(BOXES[box_name])
    pos = torch.tensor(rng.uniform(-1, 11, size=(60, 3))).requires_grad_(True)
    seed = torch.tensor(rng.normal(size=(60 * 59 // 2, 3)))
    results = []
    for block in (neighbors._block_elements(), 50):  # one block; then one row per block
        monkeypatch.setattr(neighbors, "_block_elements", lambda b=block: b)
        found = neighbor_pairs(pos, 5.0, box, strategy="brute", half=True)
        (grad,) = torch.autograd.grad((found.vectors * seed[: found.vectors.shape[0]]).sum(), pos)
        results.append((found.edge_index, found.vectors.detach(), found.num_pairs, grad))
    assert results[0][0].shape[1] > 100
    for once, blocked in zip(results[0], results[1], strict=True):
        assert torch.equal(once, blocked)
