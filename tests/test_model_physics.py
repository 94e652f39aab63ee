"""Physical properties of the TensorNet energy model, float64."""

import math

import pytest
import torch
from helpers import all_pairs, assert_close, energy_forces, random_molecule

from tensornet_openmm import TensorNet
from tensornet_openmm.nn import kernels


def _model(group="O(3)", layers=2, **kw):
    torch.manual_seed(11)
    model = TensorNet(
        hidden_channels=16,
        num_layers=layers,
        num_rbf=10,
        max_z=10,
        equivariance_invariance_group=group,
        dtype=torch.float64,
        **kw,
    )
    with torch.no_grad():  # non-trivial LayerNorms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _rotation(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.det(q))  # proper rotation


@pytest.mark.parametrize("group", ["O(3)", "SO(3)"])
def test_rotation_translation_invariance_and_force_equivariance(group):
    model = _model(group)
    z, pos = random_molecule(12)
    e, f = energy_forces(model, z, pos)
    rot = _rotation(1)
    e2, f2 = energy_forces(
        model, z, pos @ rot.T + torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64)
    )
    assert_close(e2, e)
    assert_close(f2, f @ rot.T)


def test_reflection_invariance_o3_only():
    z, pos = random_molecule(12)
    mirror = pos * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    e, _ = energy_forces(_model("O(3)"), z, pos)
    assert_close(energy_forces(_model("O(3)"), z, mirror)[0], e)
    e_so3, _ = energy_forces(_model("SO(3)"), z, pos)
    # SO(3) models are chiral: a mirror image changes the energy (slightly, for random weights)
    assert not torch.allclose(energy_forces(_model("SO(3)"), z, mirror)[0], e_so3, rtol=1e-10)


def test_permutation_invariance():
    model = _model()
    z, pos = random_molecule(12)
    perm = torch.randperm(12)
    e, f = energy_forces(model, z, pos)
    e2, f2 = energy_forces(model, z[perm], pos[perm])
    assert_close(e2, e)
    assert_close(f2, f[perm])


@pytest.mark.parametrize("layers", [0, 2])
def test_forces_are_minus_gradient_by_finite_differences(layers):
    model = _model(layers=layers)
    z, pos = random_molecule(8, spread=2.0)
    charge = torch.tensor([1.0], dtype=torch.float64)
    _, forces = energy_forces(model, z, pos, total_charge=charge)
    h = 1e-5
    edges = all_pairs(torch.zeros_like(z))
    for atom, axis in [(0, 0), (3, 1), (7, 2)]:
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        plus = model(z, pos + step, edges, total_charge=charge)
        minus = model(z, pos - step, edges, total_charge=charge)
        numeric = (-(plus - minus) / (2 * h)).detach()
        assert abs(numeric.item() - forces[atom, axis].item()) < 1e-7 * max(
            1.0, abs(numeric.item())
        )


@pytest.mark.parametrize("group", ["O(3)", "SO(3)"])
def test_neutral_molecules_skip_the_charge_factor_exactly(group):
    """No total charge (None) skips the products with the charge factor 1 + 0.1 q, which is
    exactly 1 for a neutral molecule: energy and forces equal those with an explicit zero charge
    to the last bit (forward and the low-memory gradient), and a charge still counts."""
    model = _model(group)
    z, pos = random_molecule(10, spread=2.0)
    zero, one = (torch.tensor([q], dtype=torch.float64) for q in (0.0, 1.0))
    e_none, f_none = energy_forces(model, z, pos)
    e_zero, f_zero = energy_forces(model, z, pos, total_charge=zero)
    assert torch.equal(e_none, e_zero) and torch.equal(f_none, f_zero)
    assert not torch.equal(energy_forces(model, z, pos, total_charge=one)[0], e_none)
    edges = all_pairs(torch.zeros_like(z))
    vec = pos[edges[0]] - pos[edges[1]]
    skipped = model.energy_and_gradient(z, edges, vec, None, False, 0)
    multiplied = model.energy_and_gradient(z, edges, vec, zero, False, 0)
    assert all(torch.equal(a, b) for a, b in zip(skipped, multiplied, strict=True))


def test_pair_beyond_cutoff_has_exactly_zero_force():
    model = _model(cutoff_upper=4.0)
    z = torch.tensor([6, 8])
    for distance in (4.0, 4.0 + 1e-9, 6.0):
        pos = torch.tensor([[0.0, 0.0, 0.0], [distance, 0.0, 0.0]], dtype=torch.float64)
        _, forces = energy_forces(model, z, pos)
        assert torch.count_nonzero(forces) == 0
    pos = torch.tensor([[0.0, 0.0, 0.0], [3.9, 0.0, 0.0]], dtype=torch.float64)
    assert torch.count_nonzero(energy_forces(model, z, pos)[1]) > 0


def test_far_apart_fragments_are_additive():
    model = _model()
    z1, p1 = random_molecule(7)
    z2, p2 = random_molecule(9)
    e1, f1 = energy_forces(model, z1, p1)
    e2, f2 = energy_forces(model, z2, p2)
    shift = torch.tensor([40.0, 0.0, 0.0], dtype=torch.float64)
    e12, f12 = energy_forces(model, torch.cat([z1, z2]), torch.cat([p1, p2 + shift]))
    # mean is added once per molecule: the fragments count it twice
    assert_close(e12, e1 + e2 - model.mean)
    assert_close(f12, torch.cat([f1, f2]))


def test_padding_slots_contribute_nothing():
    model = _model()
    z, pos = random_molecule(10)
    edges = all_pairs(torch.zeros_like(z))
    vec = pos[edges[0]] - pos[edges[1]]
    pad_edges = torch.cat([edges, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    pad_vec = torch.cat([vec, torch.full((5, 3), 2 * model.cutoff_upper, dtype=torch.float64)])
    e = model(z, pos, edges, vec)
    assert_close(model(z, pos, pad_edges, pad_vec), e)


def test_half_pair_list_gives_the_same_energy_and_forces():
    model = _model()
    z, pos = random_molecule(12)
    edges = all_pairs(torch.zeros_like(z))
    e_full, f_full = energy_forces(model, z, pos, edge_index=edges)
    for half in (edges[:, edges[0] < edges[1]], edges[:, edges[0] > edges[1]]):
        padded = torch.cat([half, torch.zeros(2, 4, dtype=torch.long)], dim=1)  # (0, 0) slots
        x = pos.detach().clone().requires_grad_(True)
        vec = x[half[0]] - x[half[1]]
        vec = torch.cat([vec, torch.full((4, 3), 2 * model.cutoff_upper, dtype=torch.float64)])
        energy = model(z, x, padded, vec, half=True)
        (grad,) = torch.autograd.grad(energy.sum(), x)
        assert_close(energy.detach(), e_full)
        assert_close(-grad, f_full)


def test_scripted_equals_eager_and_double():
    model = TensorNet(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10)
    z, pos = random_molecule(9, dtype=torch.float32)
    scripted = torch.jit.script(model)
    e, f = energy_forces(model, z, pos)
    e_s, f_s = energy_forces(scripted, z, pos)
    assert torch.equal(e, e_s) or torch.allclose(e, e_s, rtol=1e-6, atol=0)
    assert torch.allclose(f, f_s, rtol=1e-5, atol=1e-6)
    model64 = model.double()
    e64, _ = energy_forces(model64, z, pos.double())
    assert e64.dtype == torch.float64
    assert math.isclose(float(e64), float(e), rel_tol=1e-5)


@pytest.mark.parametrize("half", [False, True])
def test_pair_blocks_do_not_change_energy_or_forces(monkeypatch, half):
    """Message sums over many small blocks of pairs equal one pass over all pairs."""
    from tensornet_openmm.nn import layers

    model = _model()
    z, pos = random_molecule(12)
    edges = all_pairs(torch.zeros_like(z))
    if half:
        edges = edges[:, edges[0] < edges[1]]

    def energy_and_forces():
        x = pos.detach().clone().requires_grad_(True)
        energy = model(z, x, edges, half=half)
        return energy.detach(), -torch.autograd.grad(energy.sum(), x)[0]

    monkeypatch.setattr(layers, "pair_block", lambda num_pairs, *_: num_pairs)
    e_one, f_one = energy_and_forces()
    monkeypatch.setattr(layers, "pair_block", lambda num_pairs, *_: 5)
    e_blocks, f_blocks = energy_and_forces()
    assert_close(e_blocks, e_one)
    assert_close(f_blocks, f_one)


@pytest.mark.parametrize("half", [False, True])
def test_no_pairs_gives_isolated_atoms(half):
    """A region without pairs (one ion, or atoms beyond the cutoff) has zero forces and the
    energy of its atoms alone, eager and scripted."""
    model = _model()
    z = torch.tensor([1, 8])
    pos = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]], dtype=torch.float64)
    no_pairs = torch.zeros(2, 0, dtype=torch.long)
    for m in (model, torch.jit.script(model)):
        x = pos.clone().requires_grad_(True)
        energy = m(z, x, no_pairs, half=half)
        (grad,) = torch.autograd.grad(energy.sum(), x)
        assert torch.equal(grad, torch.zeros_like(grad))
        singles = sum(m(z[i : i + 1], pos[i : i + 1], no_pairs, half=half) for i in range(2))
        assert_close(energy.detach(), singles.detach())


def _saved_sum_sources(energy):
    """Shapes of the tensors that index_add_ nodes of the graph keep for the backward pass."""
    seen, stack, kept = set(), [energy.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "IndexAddBackward0":
            kept.append(tuple(node._saved_source.shape))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return kept


def test_lean_message_sums_keep_no_pair_message_alive(monkeypatch):
    """Lean message sums (on GPUs) keep no per-pair summand for the backward pass, and give the
    same energy and forces as the fast CPU sums, which keep them (index_add_ saves its source)."""
    from tensornet_openmm.nn import layers

    model = _model()
    z, pos = random_molecule(12)
    edges = all_pairs(torch.zeros_like(z))
    edges = edges[:, edges[0] < edges[1]]
    results = {}
    for lean in (False, True):
        monkeypatch.setattr(layers, "lean_sums", lambda device, lean=lean: lean)
        x = pos.detach().clone().requires_grad_(True)
        energy = model(z, x, edges, half=True).sum()
        kept = _saved_sum_sources(energy)
        results[lean] = (energy.detach(), -torch.autograd.grad(energy, x)[0])
        if lean:  # none (one molecule: its atoms' energies are summed without index_add)
            assert kept == []
        else:
            assert any(len(shape) == 3 and shape[0] == edges.shape[1] for shape in kept)
    assert_close(results[True][0], results[False][0])
    assert_close(results[True][1], results[False][1])


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("variant", ["plain", "charged", "mean-atomref", "SO(3)", "gauss-ssp"])
@pytest.mark.parametrize("fused", [False, True])
def test_low_memory_gradient_equals_autograd(half, variant, fused):
    """energy_and_gradient (pair terms recomputed block by block) gives autograd's energy and
    pair-vector gradient in float64, eager and scripted, whatever the block size; with the fused
    kernels too, whose per-atom algebra is differentiated a chunk of ``block`` atoms at a time
    (blocks of 1 and 37 pairs: 30 chunks and one)."""
    options = {"reduce_op": "mean", "atomref_size": 10} if variant == "mean-atomref" else {}
    if variant == "SO(3)":
        options = {"equivariance_invariance_group": "SO(3)"}
    if variant == "gauss-ssp":  # an activation the fused network does not take: PyTorch's
        options = {"rbf_type": "gauss", "cutoff_lower": 0.5, "activation": "ssp"}
    torch.manual_seed(3)
    model = TensorNet(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10, cutoff_upper=4.0,
                      dtype=torch.float64, **options)  # fmt: skip
    if fused:
        assert kernels.use_fused_kernels(model)
    with torch.no_grad():
        model.atomref.normal_()
        model.mean.fill_(0.3)
    charge = torch.tensor([1.0], dtype=torch.float64) if variant == "charged" else None
    z, pos = random_molecule(30, species=(1, 6, 7, 8))
    edges = all_pairs(torch.zeros_like(z))
    if half:
        edges = edges[:, edges[0] < edges[1]]
    vec = (pos[edges[0]] - pos[edges[1]]).requires_grad_(True)
    energy = model(z, pos, edges, vec, total_charge=charge, half=half)[0]
    (expected,) = torch.autograd.grad(energy, vec)
    scripted = torch.jit.script(model)
    for block in (1, 37, 10**6):
        for m in (model, scripted):
            e, grad = m.energy_and_gradient(z, edges, vec.detach(), charge, half, block)
            assert_close(e, energy.detach())
            assert_close(grad, expected)


@pytest.mark.parametrize("fused", [False, True])
def test_low_memory_gradient_keeps_nothing_pair_sized(fused):
    """With blocks of 16 pairs, no tensor saved for a backward pass is larger than an atoms' or a
    block's (n or 16, 10, F); the autograd path saves pair-sized ones. With the fused kernels the
    per-atom algebra's gradients go 16 atoms at a time: nothing saved is atom-sized either."""
    model = _model()
    if fused:
        assert kernels.use_fused_kernels(model)
    n, f = 40, 16
    z, pos = random_molecule(n, spread=2.5, min_distance=0.7)
    edges = all_pairs(torch.zeros_like(z))
    edges = edges[:, edges[0] < edges[1]]
    assert edges.shape[1] > 500
    vec = pos[edges[0]] - pos[edges[1]]
    sizes = []
    atom_sized = set()  # storages of the atom-sized tensors saved

    def pack(t):
        sizes.append(t.numel())
        if t.numel() > 16 * 10 * f:
            atom_sized.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.energy_and_gradient(z, edges, vec, None, True, 16)
    assert sizes and max(sizes) <= n * 10 * f
    if fused:  # atom-sized: only the last X, which the head reads
        assert len(atom_sized) == 1
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = vec.clone().requires_grad_(True)
        model(z, pos, edges, x, half=True).sum().backward()
    assert max(sizes) >= edges.shape[1] * 3 * f


def test_double_after_construction_in_float32_is_exact():
    """model.double() gives the same numbers as a model made in float64 with the same weights:
    the packed algebra's constants (1/3, 1/2) are made again in float64, not cast from float32."""
    torch.manual_seed(0)
    hp = dict(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10)
    cast = TensorNet(**hp)
    exact = TensorNet(**hp, dtype=torch.float64)
    exact.load_state_dict(cast.state_dict())
    cast.double()
    z, pos = random_molecule(9)
    e_cast, f_cast = energy_forces(cast, z, pos)
    e_exact, f_exact = energy_forces(exact, z, pos)
    assert torch.equal(e_cast, e_exact) and torch.equal(f_cast, f_exact)


@pytest.mark.parametrize("fused", [False, True])
def test_stored_constants_give_the_same_energy_and_forces(fused):
    """An inference copy that stores its constants (the self pairs' terms, the distance
    projections, one molecule's species terms: what an OpenMM force does) gives the same energy
    to the last bit, on the autograd and the low-memory path, and the same forces to rounding
    (with the fused kernels the embedding's stored per-component gate weights sum the gates'
    gradients in another order); another molecule is refused; clearing computes them again."""
    import copy

    model = _model()
    if fused:
        kernels.use_fused_kernels(model)
    z, pos = random_molecule(9)
    e_ref, f_ref = energy_forces(model, z, pos)
    lean_ref = model.energy_and_gradient(z, all_pairs(torch.zeros_like(z)), _vectors(z, pos))
    stored = copy.deepcopy(model)
    stored.store_self_pair_terms()
    stored.store_species_terms(z)
    emb = stored.tensor_embedding
    assert emb.stored_species.shape == (3, 9, 16) and emb.stored_bias.shape == (48,)
    e, f = energy_forces(stored, z, pos)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-14)
    lean = stored.energy_and_gradient(z, all_pairs(torch.zeros_like(z)), _vectors(z, pos))
    assert torch.equal(lean[0], lean_ref[0])
    torch.testing.assert_close(lean[1], lean_ref[1], rtol=1e-12, atol=1e-14)
    # with the fused kernels the per-atom algebra goes a chunk of atoms at a time (here 4, as a
    # box of more than 204 atoms at 128 channels does): each chunk takes its rows of the stored
    # terms (the self pairs' were once taken whole, which failed)
    edges = all_pairs(torch.zeros_like(z))
    chunked_ref = model.energy_and_gradient(z, edges, _vectors(z, pos), None, False, 4)
    chunked = stored.energy_and_gradient(z, edges, _vectors(z, pos), None, False, 4)
    assert torch.equal(chunked[0], chunked_ref[0])
    torch.testing.assert_close(chunked[1], chunked_ref[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked[1], lean_ref[1], rtol=1e-12, atol=1e-14)
    z2, pos2 = random_molecule(7)
    with pytest.raises(RuntimeError, match="another molecule's species terms"):
        energy_forces(stored, z2, pos2)
    with pytest.raises(ValueError, match=r"atomic numbers \[12\] are outside this model's range"):
        stored.store_species_terms(torch.tensor([1, 12]))
    stored.clear_self_pair_terms()
    assert emb.stored_species.numel() == 0 and emb.stored_bias.numel() == 0
    assert torch.equal(energy_forces(stored, z2, pos2)[0], energy_forces(model, z2, pos2)[0])


def _vectors(z, pos):
    edges = all_pairs(torch.zeros_like(z))
    return pos[edges[0]] - pos[edges[1]]
