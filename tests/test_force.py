"""The exported module and create_force: OpenMM Contexts against the eager model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch
from helpers import context_for, quiet_testsystems, small_model, water_box_nm
from helpers import openmm_energy_forces as energy_forces

from tensornet_openmm import create_force, save_model
from tensornet_openmm.export import TensorNetForce, export, pair_capacity, read_metadata, script
from tensornet_openmm.forces import load_system, make_torch_force, save_system
from tensornet_openmm.neighbors import neighbor_pairs
from tensornet_openmm.nn import kernels, layers
from tensornet_openmm.units import EV_TO_KJ_PER_MOL

PLATFORMS = ["Reference", "CPU"]


def eager(model, z, pos_nm, box_nm=None):
    """Energy (kJ/mol) and forces (kJ/mol/nm) of the eager model, all atoms ML."""
    pos = torch.tensor(pos_nm * 10.0, dtype=torch.float64, requires_grad=True)
    box = None if box_nm is None else torch.tensor(box_nm * 10.0, dtype=torch.float64)
    pairs = neighbor_pairs(pos, model.cutoff_upper, box)
    energy = model(torch.tensor(z), pos, pairs.edge_index, pairs.vectors)[0] * EV_TO_KJ_PER_MOL
    (grad,) = torch.autograd.grad(energy, pos)
    return energy.item(), -grad.numpy() * 10.0


def molecule(n=12, seed=1):
    rng = np.random.default_rng(seed)
    while True:
        pos = rng.uniform(0.0, 0.45, size=(n, 3))
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(n)
        if d.min() > 0.09:
            return rng.choice([1, 6, 7, 8], size=n).tolist(), pos


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "box"])
@pytest.mark.parametrize("capacity", [-1, 200], ids=["dynamic", "fixed"])
def test_a_force_call_runs_no_autodiff_subgraph_of_torchscript(capacity, periodic):
    """TorchScript's executor makes an autodiff subgraph (a graph of its own with a symbolic
    backward, run through another executor each call, each way) of two differentiable operators
    in a row, such as a squeeze and an addition; a molecule's force call with the fused kernels
    had four, at a cost of a few percent on the CPU. None is left: the executed graph guards
    none. (The plain-PyTorch route, fused_kernels=False, has many, in its pair and tensor
    algebra.)"""
    z, pos = molecule()
    box = np.eye(3) * 0.9  # nm: the molecule's 12 atoms in a periodic box twice the cutoff
    args = [torch.tensor(pos)] + ([torch.tensor(box)] if periodic else [])
    model = small_model(atomref_size=10)
    model.atomref.uniform_(-1.0, 1.0)
    module = TensorNetForce(model, z, periodic=periodic, capacity=capacity,
                            fixed_on_cpu=capacity >= 0, outputs_forces=True,
                            fused_kernels=True)  # fmt: skip
    call = torch.jit.freeze(script(module).eval())
    for _ in range(3):  # the executor profiles, then optimises
        energy, forces = call(*args)
    graph = str(torch.jit.last_executed_optimized_graph())
    assert "prim::RequiresGradCheck" not in graph, [
        line for line in graph.splitlines() if "DifferentiableGraph_" in line and "=" in line
    ]
    eager = TensorNetForce(model, z, periodic=periodic, outputs_forces=True, fused_kernels=False)
    expected_energy, expected_forces = eager(*args)
    assert torch.allclose(energy, expected_energy, rtol=1e-12, atol=1e-9)
    assert torch.allclose(forces, expected_forces, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def water():
    return water_box_nm(1.2)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("graphs, outputs_forces", [(False, False), (True, False), (True, True)])
def test_context_equals_eager_model(platform, graphs, outputs_forces):
    model = small_model()
    z, pos = molecule()
    force = create_force(model, z, cuda_graphs=graphs, positions=pos, outputs_forces=outputs_forces)
    energy, forces = energy_forces(context_for(force, len(z), platform), pos)
    ref_energy, ref_forces = eager(model, z, pos)
    assert energy == pytest.approx(ref_energy, rel=1e-8)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-8, atol=1e-8 * np.abs(ref_forces).max())


def test_cuda_graphs_by_default_only_below_a_thousand_ml_atoms():
    """cuda_graphs=None (the default): graphs and a fixed pair list for a small molecule, neither
    for a 1,000-atom box (graphs were slower there on a GPU); True or False as given."""
    from tensornet_openmm.forces import GRAPHS_BELOW_ATOMS, fixed_pair_lists

    def graphs_and_fixed(force):
        system = openmm.System()
        for _ in range(force.getModule().inner.z.shape[0]):
            system.addParticle(12.0)
        system.addForce(force)
        return force.getProperties()["useCUDAGraphs"], len(fixed_pair_lists(system, "CUDA"))

    model = small_model(dtype=torch.float32)
    z, pos = molecule()
    assert graphs_and_fixed(create_force(model, z, positions=pos)) == ("true", 1)
    assert graphs_and_fixed(create_force(model, z, cuda_graphs=False)) == ("false", 0)
    z, pos, box = water_box_nm(2.2)
    assert GRAPHS_BELOW_ATOMS == 1000 <= len(z) < 1100
    options = dict(periodic=True, positions=pos, box_vectors=box)
    assert graphs_and_fixed(create_force(model, z, **options)) == ("false", 0)
    assert graphs_and_fixed(create_force(model, z, cuda_graphs=True, **options)) == ("true", 1)
    with pytest.raises(ValueError, match="cuda_graphs='yes' must be True, False or None"):
        create_force(model, z, cuda_graphs="yes", **options)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ml_subset_of_the_particles(platform):
    """ML atoms picked by index out of a larger System; other particles get no ML force."""
    model = small_model()
    z, pos = molecule(8)
    everything = np.concatenate([np.random.default_rng(4).uniform(2, 3, size=(5, 3)), pos])
    atoms = list(range(5, 13))[::-1]  # any order: atomic numbers follow ``atoms``
    force = create_force(model, z[::-1], atoms=atoms, positions=everything, total_charge=1)
    energy, forces = energy_forces(context_for(force, 13, platform), everything)
    module = TensorNetForce(model, z, total_charge=1)
    ref = module(torch.tensor(pos))[0].item()
    assert energy == pytest.approx(ref, rel=1e-10)
    assert np.all(forces[:5] == 0.0) and np.abs(forces[5:]).max() > 0


def test_periodic_water_box_wrapped_unwrapped_split_shifted(water):
    z, pos, box = water
    model = small_model()
    module = torch.jit.script(TensorNetForce(model, z, periodic=True))
    rng = np.random.default_rng(0)
    shifted = pos + rng.integers(-3, 4, size=(len(pos), 1)).repeat(3, 0).reshape(-1, 3)[
        : len(pos)
    ] * np.diag(box)  # whole molecules moved by lattice vectors
    split = pos - np.floor(pos / np.diag(box)) * np.diag(box)  # every atom wrapped alone
    scattered = pos + rng.integers(-2, 3, size=(len(pos), 3)) @ box  # each atom its own image
    tbox = torch.tensor(box)
    energies = [module(torch.tensor(p), tbox)[0].item() for p in (pos, shifted, split, scattered)]
    reference, _ = eager(model, z, pos, box)
    np.testing.assert_allclose(energies, reference, rtol=1e-10)
    # and through OpenMM, which receives the unwrapped positions
    force = create_force(model, z, periodic=True, positions=pos, box_vectors=box)
    context = context_for(force, len(z), "Reference", box)
    for p in (pos, scattered):
        assert energy_forces(context, p)[0] == pytest.approx(reference, rel=1e-8)


def test_triclinic_box_lattice_shifts():
    model = small_model()
    box = np.array([[1.2, 0.0, 0.0], [0.4, 1.1, 0.0], [-0.3, 0.5, 1.0]])
    rng = np.random.default_rng(7)
    pos = rng.uniform(0, 1, size=(60, 3)) @ box
    z = rng.choice([1, 6, 8], size=60).tolist()
    force = create_force(model, z, periodic=True, positions=pos, box_vectors=box)
    context = context_for(force, 60, "Reference", box)
    e0, f0 = energy_forces(context, pos)
    e1, f1 = energy_forces(context, pos + rng.integers(-2, 3, size=(60, 3)) @ box)
    assert e1 == pytest.approx(e0, rel=1e-10)
    np.testing.assert_allclose(f1, f0, atol=1e-8)
    assert e0 == pytest.approx(eager(model, z, pos, box)[0], rel=1e-8)


def test_xml_round_trip(tmp_path):
    model = small_model()
    z, pos = molecule()
    system = openmm.System()
    for _ in z:
        system.addParticle(12.0)
    harmonic = openmm.CustomExternalForce("x^2")
    harmonic.addParticle(0, [])
    system.addForce(harmonic)
    system.addForce(create_force(model, z, positions=pos, force_group=3, lambda_parameter="lam"))
    system.addForce(openmm.CMMotionRemover())
    save_system(system, tmp_path / "system.xml")
    copy = load_system(tmp_path / "system.xml")
    assert [f.getName() for f in copy.getForces()] == [
        "CustomExternalForce", "TensorNet", "CMMotionRemover"
    ]  # fmt: skip
    assert copy.getForce(1).getForceGroup() == 3
    results = []
    for s in (system, copy):
        context = openmm.Context(s, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName("Reference"))  # fmt: skip
        context.setParameter("lam", 0.5)
        results.append(energy_forces(context, pos))
        derivative = context.getState(getParameterDerivatives=True).getEnergyParameterDerivatives()
        results[-1] += (derivative["lam"],)
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2] != 0
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_forces_are_output_by_default_except_with_a_lambda():
    """create_force's module returns the forces itself unless a lambda parameter is asked for,
    whose derivative openmm-torch takes from its own backward; either way the energy, forces
    and dE/dlambda are the eager model's."""
    model = small_model()
    z, pos = molecule()
    ref_energy, ref_forces = eager(model, z, pos)
    plain = create_force(model, z, positions=pos)
    scaled = create_force(model, z, positions=pos, lambda_parameter="lam")
    assert plain.getOutputsForces() and not scaled.getOutputsForces()
    energy, forces = energy_forces(context_for(plain, len(z), "CPU"), pos)
    assert energy == pytest.approx(ref_energy, rel=1e-10)
    np.testing.assert_allclose(forces, ref_forces, rtol=0, atol=1e-9 * np.abs(ref_forces).max())
    context = context_for(scaled, len(z), "CPU")
    context.setParameter("lam", 0.7)
    energy, forces = energy_forces(context, pos)
    derivative = context.getState(getParameterDerivatives=True).getEnergyParameterDerivatives()
    assert energy == pytest.approx(0.7 * ref_energy, rel=1e-10)
    assert derivative["lam"] == pytest.approx(ref_energy, rel=1e-10)


@pytest.mark.parametrize("outputs_forces", [False, True])
def test_low_memory_force_equals_default(water, outputs_forces):
    """low_memory=True: the same energy, forces and lambda derivative through OpenMM, and on
    the fixed-capacity path (padding slots, as under CUDA graphs)."""
    z, pos, box = water
    model = small_model()
    results = []
    for low in (False, True):
        force = create_force(model, z, periodic=True, positions=pos, box_vectors=box,
                             lambda_parameter="lam", outputs_forces=outputs_forces,
                             low_memory=low)  # fmt: skip
        context = context_for(force, len(z), "CPU", box)
        context.setParameter("lam", 0.7)
        energy, forces = energy_forces(context, pos)
        state = context.getState(getParameterDerivatives=True)
        results.append((energy, forces, state.getEnergyParameterDerivatives()["lam"]))
    (e0, f0, d0), (e1, f1, d1) = results
    assert e1 == pytest.approx(e0, rel=1e-10) and d1 == pytest.approx(d0, rel=1e-10)
    np.testing.assert_allclose(f1, f0, rtol=1e-9, atol=1e-9 * np.abs(f0).max())
    capacity, cell_capacity, strategy = pair_capacity(model, len(z), pos * 10, box * 10)
    fixed = []
    for low in (False, True):
        module = TensorNetForce(model, z, periodic=True, capacity=capacity, strategy=strategy,
                                cell_capacity=cell_capacity, outputs_forces=True,
                                fixed_on_cpu=True, low_memory=low)  # fmt: skip
        energy, forces = script(module)(torch.tensor(pos), torch.tensor(box))
        fixed.append((energy.item(), forces.numpy()))
    assert fixed[0][0] == pytest.approx(e0 / 0.7, rel=1e-10)
    assert fixed[1][0] == pytest.approx(fixed[0][0], rel=1e-10)
    np.testing.assert_allclose(fixed[1][1], fixed[0][1], atol=1e-9 * np.abs(f0).max())


def _graph_nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _graph_nodes(inner)


@pytest.mark.parametrize("reduce_op", ["sum", "mean"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_the_force_folds_the_energy_scale_and_unit_into_its_copy(reduce_op, low_memory):
    """TensorNetForce gives kJ/mol with no products of its own: its copy of the model has the
    output scale (std) and eV -> kJ/mol in the last linear's weights, and the unit in the atom
    references and the mean. Energy and forces equal the eager model's times the unit, for a
    model with all three set; the caller's model is left as it was."""
    model = small_model(atomref_size=10, reduce_op=reduce_op)
    with torch.no_grad():
        model.std.fill_(1.7)
        model.mean.fill_(-0.3)
        model.atomref.copy_(torch.linspace(-2.0, 1.0, 10, dtype=torch.float64))
    before = model.output_network[2].weight.clone()
    z, pos = molecule()
    module = TensorNetForce(model, z, outputs_forces=True, low_memory=low_memory)
    assert module.model.std_folded and not model.std_folded
    assert torch.equal(model.output_network[2].weight, before) and model.std.item() == 1.7
    with pytest.raises(RuntimeError, match="energy scale is folded already"):
        module.model.store_energy_scale(EV_TO_KJ_PER_MOL)
    with pytest.raises(ValueError, match="weights give kJ/mol .* save the model the force was"):
        save_model(module.model, "never-written.pt")
    assert not module.model.zero_mean_dropped  # (a mean to add)
    energy, forces = torch.jit.freeze(script(module).eval())(torch.tensor(pos))
    ref_energy, ref_forces = eager(model, z, pos)
    assert energy.item() == pytest.approx(ref_energy, rel=1e-12)
    np.testing.assert_allclose(forces.numpy(), ref_forces, rtol=0,
                               atol=1e-10 * np.abs(ref_forces).max())  # fmt: skip
    # a mean of zero is not added at all: the same energy and forces, to the last bit
    with torch.no_grad():
        model.mean.zero_()
    with_zero = TensorNetForce(model, z, outputs_forces=True, low_memory=low_memory)
    assert with_zero.model.zero_mean_dropped
    kept = TensorNetForce(model, z, outputs_forces=True, low_memory=low_memory)
    kept.model.zero_mean_dropped = False
    frozen = [torch.jit.freeze(script(m).eval()) for m in (with_zero, kept)]
    results = [call(torch.tensor(pos)) for call in frozen]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    adds = [sum(n.kind() == "aten::add" for n in _graph_nodes(f.graph)) for f in frozen]
    assert adds[0] == adds[1] - 1


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused"])
def test_self_pair_terms_are_computed_once_at_export(fused):
    """The self pairs' radial terms (r = 0) depend on the weights alone and torch.jit.freeze does
    not fold them: TensorNetForce computes them once, on its own copy of the model, and the
    force calls read them. Same energy and forces to the last bit; the stored values are what
    runs (changing them changes the energy); no cosine is left in a fused force call. With
    them, the pair networks' first linears stored as one run all the networks in one
    operator: the same energy to the last bit, the forces to rounding (the gradient sums in
    another order). Either way the fused embedding gates its mixing in one operator
    (gated_mix, the three parts' gates: no selection of them)."""
    model = small_model()
    z, pos = molecule()
    x = torch.tensor(pos, dtype=torch.float64)
    stored = TensorNetForce(model, z, outputs_forces=True, fused_kernels=fused)
    assert stored.model.self_basis.shape == (1, model.config.num_rbf)
    for layer in [stored.model.tensor_embedding, *stored.model.layers]:
        assert layer.self_radial.shape == (1, 3, model.config.hidden_channels)
    assert model.self_basis.numel() == 0  # the caller's model is left alone
    computed = TensorNetForce(model, z, outputs_forces=True, fused_kernels=fused)
    computed.model.clear_self_pair_terms()
    call = torch.jit.freeze(script(stored).eval())
    e_stored, f_stored = call(x)
    computed_call = torch.jit.freeze(script(computed).eval())
    e_computed, f_computed = computed_call(x)
    assert torch.equal(e_stored, e_computed)
    torch.testing.assert_close(f_stored, f_computed, rtol=1e-12, atol=1e-12)
    if fused:  # the pairs' cutoffs are the geometry operator's: any cosine is a self pair's
        for run in (call, computed_call):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run(x)
            names = [event.name for event in prof.events()]
            # every pair network in one operator where their first linears are stored
            assert ("tensornet_openmm::radial_networks" in names) == (run is call)
            assert "tensornet_openmm::gated_mix" in names
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call(x)
        assert "aten::cos" not in {event.name for event in prof.events()}
    stored.model.layers[0].self_radial.mul_(1.5)
    assert not torch.equal(torch.jit.freeze(script(stored).eval())(x)[0], e_stored)


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "water"])
def test_radial_networks_differentiated_forward_give_the_same_force(periodic, monkeypatch):
    """TENSORNET_OPENMM_TANGENT_NETWORKS: 1 runs every pair network differentiated forward in r
    (tangent_radial_networks, the GPU's default; here forced on the CPU), 0 and unset (on the
    CPU) the reverse mode (radial_networks): the same energy and forces to float64's rounding,
    a molecule and a periodic water box; each run names its operator (profiler); another value
    is refused by name. (On the emulated CUDA build, unset is the forward mode, as on a GPU.)"""
    model = small_model(dtype=torch.float64)
    if periodic:
        z, pos_nm, box_nm = water_box_nm(1.0)
        x = torch.tensor(pos_nm, dtype=torch.float64)
        box = torch.tensor(box_nm, dtype=torch.float64)
        force = TensorNetForce(model, z, outputs_forces=True, fused_kernels=True, periodic=True)
        args = (x, box)
    else:
        z, pos = molecule()
        force = TensorNetForce(model, z, outputs_forces=True, fused_kernels=True)
        args = (torch.tensor(pos, dtype=torch.float64),)
    call = torch.jit.freeze(script(force).eval())
    gpu = bool(os.environ.get("TENSORNET_OPENMM_EMULATED_CUDA"))  # (CPU tensors as a GPU's)
    results = {}
    for setting in ("", "0", "1"):
        monkeypatch.setenv("TENSORNET_OPENMM_TANGENT_NETWORKS", setting)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results[setting] = call(*args)
        names = {event.name for event in prof.events()}
        tangent = setting == "1" or (setting == "" and gpu)
        assert ("tensornet_openmm::tangent_radial_networks" in names) == tangent, setting
        assert ("tensornet_openmm::radial_networks" in names) == (not tangent), setting
    for setting in ("", "1"):
        energy, forces = results[setting]
        torch.testing.assert_close(energy, results["0"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(forces, results["0"][1], rtol=1e-10, atol=1e-10)
        assert forces.abs().max() > 1e-3
    monkeypatch.setenv("TENSORNET_OPENMM_TANGENT_NETWORKS", "yes")
    with pytest.raises(RuntimeError, match="_TANGENT_NETWORKS='yes' is not a choice"):
        call(*args)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
def test_species_terms_are_stored_only_up_to_a_size(low_memory, monkeypatch):
    """The embedding's per-atom species terms are stored in the module up to
    STORE_SPECIES_UP_TO atoms (fewer operators a call for a small molecule); a larger system
    computes them each call instead of carrying three rows of channels per atom in every copy
    of the module (0.9 GB at 600,000 atoms): the same energy to the last bit and forces to
    rounding either way."""
    from tensornet_openmm import export as export_module

    model = small_model()
    z, pos = molecule()
    x = torch.tensor(pos, dtype=torch.float64)
    results = {}
    for limit in (len(z), len(z) - 1):
        monkeypatch.setattr(export_module, "STORE_SPECIES_UP_TO", limit)
        module = TensorNetForce(model, z, outputs_forces=True, low_memory=low_memory)
        stored = module.model.tensor_embedding.stored_species
        assert stored.shape[1] == (len(z) if limit == len(z) else 0)
        results[limit] = torch.jit.freeze(script(module).eval())(x)
    e_stored, f_stored = results[len(z)]
    e_computed, f_computed = results[len(z) - 1]
    assert torch.equal(e_stored, e_computed)
    torch.testing.assert_close(f_stored, f_computed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused"])
def test_a_small_molecule_pairs_run_as_one_block_without_splitting(fused, monkeypatch):
    """The pair loops take a small molecule's pairs whole: no split operator and no gradient
    gathered back from blocks (SplitBackward) in a force call; several blocks, where they are
    made, give the same energy and forces."""
    model = small_model()
    z, pos = molecule()
    x = torch.tensor(pos, dtype=torch.float64)
    whole = TensorNetForce(model, z, outputs_forces=True, fused_kernels=fused)
    whole = torch.jit.freeze(script(whole).eval())
    energy, forces = whole(x)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        whole(x)
    splits = [e.input_shapes[0] for e in prof.events() if e.name.startswith("aten::split")]
    assert all(shape[0] == len(z) for shape in splits)  # per-atom parts only
    assert "SplitBackward0" not in {event.name for event in prof.events()}
    for name in ("_block_elements", "_fused_block_elements"):  # 3 pairs per block
        monkeypatch.setattr(layers, name, lambda: 10 * model.config.hidden_channels * 3)
    blocks = TensorNetForce(model, z, outputs_forces=True, fused_kernels=fused)
    e_blocks, f_blocks = torch.jit.freeze(script(blocks).eval())(x)
    torch.testing.assert_close(e_blocks, energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_blocks, forces, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "strategy, low_memory", [("brute", False), ("cell", False), ("cell", True)]
)
def test_exported_module_makes_no_tensor_on_the_host(strategy, low_memory):
    """A CUDA graph capture refuses host-to-device copies. TorchScript's ``torch.tensor(...)``
    and item assignment of a number (``x[:, 0] = 2.0``) make the tensor on the host and copy it:
    the exported module (the fixed-capacity path that is captured included) has neither."""
    model = small_model()
    module = TensorNetForce(model, [1, 6, 8] * 4, periodic=True, capacity=100, cell_capacity=20,
                            strategy=strategy, fixed_on_cpu=True,
                            low_memory=low_memory)  # fmt: skip
    scripted = script(module)
    found = [
        node.sourceRange().splitlines()[0] if node.sourceRange() else str(node).strip()
        for node in _graph_nodes(scripted.forward.inlined_graph)
        if node.kind() == "aten::tensor"
    ]
    assert found == []


def case_atoms(water, periodic: bool, fused: bool):
    """(atomic numbers, positions nm, box nm or None) of a case: the water box if periodic,
    else the molecule; a case of the fused kernels is skipped where they are not built."""
    if fused and not kernels.load():
        pytest.skip("no fused kernels here")
    if periodic:
        return water
    z, pos = molecule()
    return z, pos, None


# operators that wait for the device: a CUDA graph capture refuses them (a value read back, a
# search whose output size depends on the data)
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
              "aten::equal", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::repeat_interleave", "aten::allclose",
              "aten::bincount", "aten::histc", "aten::_assert_async"}  # fmt: skip
CAPTURED_CASES = {  # periodic, strategy, capacity (None: every pair; "found": the pairs within
    # the cutoff and a margin, fewer than every pair), ML region, low memory, radial tables, lambda
    "molecule": (False, "brute", None, False, False, False, False),
    "molecule-search": (False, "brute", "found", False, False, False, True),
    "box-brute": (True, "brute", 3000, False, False, False, False),
    "box-cell": (True, "cell", 3000, False, False, False, False),
    "box-cell-lowmem": (True, "cell", 3000, False, True, False, False),
    "box-cell-tables": (True, "cell", 3000, False, False, True, False),
    "region": (True, "cell", 40, True, False, False, True),
}


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused"])
@pytest.mark.parametrize(
    "periodic, strategy, capacity, region, low_memory, tables, scale",
    CAPTURED_CASES.values(),
    ids=CAPTURED_CASES.keys(),
)
def test_the_captured_route_reads_nothing_back_from_the_device(
    water, fused, periodic, strategy, capacity, region, low_memory, tables, scale
):
    """The module that CUDA graphs capture (a fixed pair capacity) makes no host read in a call,
    forward and forces: no item(), no nonzero, no data-sized output; a capture refuses each. On
    the CPU the same module and code run (fixed_on_cpu), and with the emulated CUDA build
    (tests/test_cuda_emulation.py) the CUDA launchers too, whose host reads go through the same
    operators. The one exception is the box's inverse (``linalg.inv_ex``): the CPU's LU solve
    reads a pivot on the host, CUDA's does not (the 4,866-atom box ran captured on the H100)."""
    z, pos, box = case_atoms(water, periodic, fused)
    model, atoms = small_model(), None
    if region:  # the first 12 atoms of the box are the ML region
        atoms, z = list(range(12)), z[:12]
    every = len(z) * (len(z) - 1) // 2
    if capacity is None:
        capacity = every
    elif capacity == "found":  # the molecule stretched along x: some pairs beyond the cutoff
        pos = pos * np.array([4.0, 1.0, 1.0])
        found = int(neighbor_pairs(torch.tensor(pos) * 10, model.cutoff_upper, None).num_pairs)
        capacity = found // 2 + 8
        assert capacity < every
    tables = 1e-4 if tables else None
    module = TensorNetForce(model, z, atoms=atoms, periodic=periodic, capacity=capacity,
                            strategy=strategy, cell_capacity=200, fixed_on_cpu=True,
                            outputs_forces=True, scale_parameter=scale, low_memory=low_memory,
                            fused_kernels=fused, radial_tables=tables)  # fmt: skip
    assert module.every_pair == (capacity >= every)
    call = torch.jit.freeze(script(module).eval())
    args = [torch.tensor(pos)] + ([torch.tensor(box)] if periodic else [])
    args += [torch.tensor([0.7], dtype=torch.float64)] if scale else []
    for _ in range(3):  # TorchScript optimises the graph in the first calls (it compares the
        call(*args)  # frozen constants then): openmm-torch warms up before it captures, too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        energy, forces = call(*args)
    assert torch.isfinite(energy).all() and torch.isfinite(forces).all()

    def inside_box_inverse(event) -> bool:
        while event is not None:
            if event.name == "aten::linalg_inv_ex":
                return True
            event = event.cpu_parent
        return False

    reads = sorted(
        e.name for e in prof.events() if e.name in HOST_READS and not inside_box_inverse(e)
    )
    assert reads == []
    ran = {e.name for e in prof.events()}
    assert ("tensornet_openmm::pair_difference" in ran or "tensornet_openmm::pair_search" in ran
            or "tensornet_openmm::messages" in ran) == fused  # fmt: skip


EVERY_PAIR_CASES = {  # periodic, low_memory, ML region among other particles, fused kernels
    "vacuum": (False, False, False, False),
    "box": (True, False, False, False),
    "vacuum-lowmem": (False, True, False, False),
    "box-lowmem": (True, True, False, False),
    "vacuum-fused": (False, False, False, True),
    "box-fused": (True, False, False, True),
    "box-lowmem-fused": (True, True, False, True),
    "region": (False, False, True, False),
    "region-fused": (False, False, True, True),
}


@pytest.mark.parametrize(
    "periodic, low_memory, region, fused", EVERY_PAIR_CASES.values(), ids=EVERY_PAIR_CASES.keys()
)
def test_a_capacity_for_every_pair_makes_them_the_slots(water, periodic, low_memory, region, fused):
    """A fixed capacity that holds every pair of the ML atoms (a small molecule's, as
    pair_capacity sizes it) makes all the pairs the slots: a force call runs no pair search and
    no overflow check, and gives the dynamic list's energy and forces, with pairs beyond the
    cutoff among its slots. Their vectors come from the System's positions directly (with the
    fused kernels one ``pair_difference`` operator), also for an ML region among other
    particles, which get no force. One slot fewer and the search runs again."""
    z, pos, box = case_atoms(water, periodic, fused)
    model = small_model()
    if not periodic:
        assert pair_capacity(model, len(z), pos * 10, None)[0] == len(z) * (len(z) - 1) // 2
    every = len(z) * (len(z) - 1) // 2
    beyond = neighbor_pairs(torch.tensor(pos) * 10, 1e6, None if box is None else torch.tensor(box)
                            * 10, half=True).distances > model.cutoff_upper  # fmt: skip
    assert beyond.shape == (every,) and beyond.any()
    atoms, particles = None, pos
    if region:  # two particles before the ML atoms, one after
        atoms = list(range(2, 2 + len(z)))
        particles = np.concatenate([[[0.9, 0.1, 0.2], [0.3, 1.1, 0.4]], pos, [[1.4, 0.2, 0.9]]])
    args = (torch.tensor(particles),) if box is None else (torch.tensor(particles),
                                                           torch.tensor(box))  # fmt: skip
    results = {}
    for name, capacity in (("dynamic", -1), ("every", every), ("search", every - 1)):
        module = TensorNetForce(model, z, atoms=atoms, periodic=periodic, capacity=capacity,
                                fixed_on_cpu=True, cell_capacity=200, outputs_forces=True,
                                low_memory=low_memory, fused_kernels=fused)  # fmt: skip
        assert module.every_pair == (name == "every")
        call = torch.jit.freeze(script(module).eval())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            energy, forces = call(*args)
        names = {event.name for event in prof.events()}
        searches = {"aten::nonzero_static", "aten::nonzero", "aten::triu_indices"}
        searched = bool(names & (searches | {"tensornet_openmm::pair_search"}))
        assert searched == (name != "every"), name
        if name != "every":  # the fused kernels' search, or PyTorch's
            assert ("tensornet_openmm::pair_search" in names) == fused
        if name == "every":
            assert ("tensornet_openmm::pair_difference" in names) == fused
        results[name] = (energy.item(), forces.numpy())
    (e0, f0), (e1, f1) = results["dynamic"], results["every"]
    assert e1 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=1e-11 * np.abs(f0).max())
    if region:
        assert np.all(f1[[0, 1, -1]] == 0.0) and np.abs(f1[2:-1]).max() > 0
    assert results["search"][0] == pytest.approx(e0, rel=1e-12)


def test_overflow_and_small_box_fail_loudly():
    model = small_model()
    z, pos = molecule()
    # fixed shapes (as on CUDA) with far fewer slots than pairs
    module = TensorNetForce(model, z, capacity=4, fixed_on_cpu=True)
    force = make_torch_force(script(module))
    energy, forces = energy_forces(context_for(force, len(z), "Reference"), pos)
    assert np.isnan(energy) and np.isnan(forces).all()
    # off CUDA there is nothing to capture: the exact dynamic list runs whatever the capacity
    force = create_force(model, z, positions=pos, capacity=4)
    energy, forces = energy_forces(context_for(force, len(z), "Reference"), pos)
    expected = eager(model, z, pos)
    assert energy == pytest.approx(expected[0], rel=1e-10)
    np.testing.assert_allclose(forces, expected[1], rtol=1e-8, atol=1e-8)
    box = np.eye(3) * 1.0
    force = create_force(model, z, periodic=True, positions=pos, box_vectors=box)
    context = context_for(force, len(z), "Reference", box)
    assert np.isfinite(energy_forces(context, pos)[0])
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.eye(3) * 0.7])  # < 2 cutoffs
    assert np.isnan(energy_forces(context, pos)[0])
    with pytest.raises(ValueError, match="at least twice the cutoff"):
        create_force(model, z, periodic=True, box_vectors=np.eye(3) * 0.7)


# Run in a process of its own: where the error report crashes (see export.inline_forward) a
# segmentation fault must fail the test, not end the test session.
_WRONG_SYSTEM = """
import json, sys
import torch
import numpy as np
import openmm
sys.path.insert(0, sys.argv[1])
from helpers import context_for, small_model
from tensornet_openmm import create_force
from tensornet_openmm.export import TensorNetForce, script
from tensornet_openmm.forces import _openmmtorch, load_system, make_torch_force, save_system

z = [8, 1, 1, 6, 1, 1, 1]
pos = np.random.default_rng(0).uniform(0.0, 0.4, size=(20, 3))
model = small_model()
cases = [(5, None), (20, None), (6, list(range(7, 14))), (20, list(range(7, 14)))]


def report(context, particles):  # ["ok", particles, energy] or ["error", particles, message]
    context.setPositions(pos[:particles])
    try:
        energy = context.getState(getEnergy=True).getPotentialEnergy()._value
        print(json.dumps(["ok", particles, energy]), flush=True)
    except openmm.OpenMMException as error:
        print(json.dumps(["error", particles, str(error).strip().splitlines()[-1]]), flush=True)


for particles, atoms in cases:
    for graphs in (False, True):  # the dynamic pair list, and every pair a slot (fixed on the CPU)
        force = create_force(model, z, atoms=atoms, cuda_graphs=graphs)
        report(context_for(force, particles, "Reference"), particles)


class Unchecked(TensorNetForce):
    def check_particles(self, positions: torch.Tensor) -> None:
        pass  # so that the model's own operators meet the 20 particles: an error deep inside


force = make_torch_force(script(Unchecked(model, z)), outputs_forces=False)
report(context_for(force, 20, "Reference"), 20)

# a System file whose TorchForce holds a module that was not inlined (as an older version, or
# another tool, wrote it): load_system inlines it too
raw = torch.jit.script(Unchecked(model, z, outputs_forces=True))
force = _openmmtorch().TorchForce(raw)
force.setOutputsForces(True)
system = openmm.System()
for _ in range(20):
    system.addParticle(12.0)
system.addForce(force)
save_system(system, sys.argv[2])
report(openmm.Context(load_system(sys.argv[2]), openmm.VerletIntegrator(0.001),
                     openmm.Platform.getPlatformByName("Reference")), 20)
"""


def test_positions_of_another_system_are_refused_with_the_counts(tmp_path):
    """A force added to a System it was not made for (n ML atoms without ``atoms`` among more
    or fewer particles, or ML atom indices past the System's end) raises an OpenMMException
    that names the counts and the fix, where it gave a wrong energy (too few particles) or
    crashed the process (too many); and an error from deep inside the model (here an operator's
    check of the pair indices, with the particle check taken out) reaches OpenMM as an exception
    instead of a segmentation fault in TorchScript's error report (export.inline_forward),
    also from a System file whose module was not inlined."""
    script_file = tmp_path / "wrong_system.py"  # (TorchScript reads the classes' source)
    script_file.write_text(_WRONG_SYSTEM)
    run = subprocess.run(
        [sys.executable, str(script_file), str(Path(__file__).parent), str(tmp_path / "s.xml")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == 10, run.stdout
    for (outcome, particles, message), atoms in zip(
        results[:8], ["none"] * 4 + ["some"] * 4, strict=True
    ):
        if atoms == "none" or particles == 6:
            assert outcome == "error", (particles, message)
        if atoms == "none":
            assert f"made for 7 ML atoms and no atoms= indices, but the System has {particles}" in (
                message
            )
            assert "give create_force atoms=" in message
        elif particles == 6:
            assert "indices reach 13 but the System has 6 particles" in message
        else:
            assert outcome == "ok" and np.isfinite(message)
    for outcome, _, message in results[8:]:  # made here; loaded from a System file
        assert outcome == "error" and "index out of range" in message


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused"])
def test_every_pair_slots_fail_loudly_in_a_box_too_small(fused):
    """Every pair a slot checks the box inside the pair vectors' operator: a box narrower than
    twice the cutoff makes the energy and every particle's force NaN (the ML region's and the
    others'), a wide enough one gives finite numbers."""
    if fused and not kernels.load():
        pytest.skip("no fused kernels here")
    model = small_model()
    z, pos = molecule()
    particles = np.concatenate([[[0.9, 0.1, 0.2]], pos])  # one particle before the ML atoms
    every = len(z) * (len(z) - 1) // 2
    module = TensorNetForce(model, z, atoms=range(1, 1 + len(z)), periodic=True,
                            capacity=every, fixed_on_cpu=True, outputs_forces=True,
                            fused_kernels=fused)  # fmt: skip
    assert module.every_pair
    call = torch.jit.freeze(script(module).eval())
    x = torch.tensor(particles)
    energy, forces = call(x, torch.eye(3, dtype=torch.float64))
    assert torch.isfinite(energy) and torch.isfinite(forces).all() and forces[0].eq(0).all()
    energy, forces = call(x, torch.eye(3, dtype=torch.float64) * 0.7)  # < 2 cutoffs
    assert torch.isnan(energy) and torch.isnan(forces).all()


NAN_CASES = {  # periodic, capacity (-1: the dynamic list; None: every pair a slot), ML region,
    # low memory, forces output (else openmm-torch differentiates the energy)
    "vacuum": (False, -1, False, False, True),
    "vacuum-energy-only": (False, -1, False, False, False),
    "vacuum-lowmem": (False, -1, False, True, True),
    "vacuum-every-pair": (False, None, False, False, True),
    "box": (True, -1, False, False, True),
    "box-fixed": (True, 3000, False, False, True),
    "region": (False, -1, True, False, True),
}


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused"])
@pytest.mark.parametrize(
    "periodic, capacity, region, low_memory, outputs_forces",
    NAN_CASES.values(),
    ids=NAN_CASES.keys(),
)
def test_a_nan_coordinate_makes_the_energy_nan(
    water, periodic, capacity, region, low_memory, outputs_forces, fused
):
    """An ML atom with a NaN coordinate (a simulation that blew up) gives a NaN energy in OpenMM
    on every route, so that reporters, minimisers and the runner's check see it. The dynamic
    pair list in vacuum once gave a finite energy: the atom only lost its pairs, since no NaN
    distance passes the cutoff test. A NaN among the MM particles outside the ML region is not
    the force's to report."""
    z, pos, box = case_atoms(water, periodic, fused)
    model, atoms, particles = small_model(), None, pos
    if region:  # an MM particle before the ML atoms and one after
        atoms = list(range(1, 1 + len(z)))
        particles = np.concatenate([[[0.9, 0.1, 0.2]], pos, [[1.4, 0.2, 0.9]]])
    if capacity is None:
        capacity = len(z) * (len(z) - 1) // 2
    module = TensorNetForce(model, z, atoms=atoms, periodic=periodic, capacity=capacity,
                            cell_capacity=200, fixed_on_cpu=True, outputs_forces=outputs_forces,
                            low_memory=low_memory, fused_kernels=fused)  # fmt: skip
    force = make_torch_force(script(module), periodic=periodic, outputs_forces=outputs_forces)
    context = context_for(force, len(particles), "Reference", box)
    energy, _ = energy_forces(context, particles)
    assert np.isfinite(energy)
    first = 1 if region else 0  # the first ML atom's particle
    for bad in ([first], list(range(first, first + len(z)))):
        broken = particles.copy()
        broken[bad, 1] = np.nan
        assert np.isnan(energy_forces(context, broken)[0]), bad
    if region:  # the MM particles' coordinates are not read
        broken = particles.copy()
        broken[[0, -1]] = np.nan
        assert energy_forces(context, broken)[0] == pytest.approx(energy, rel=1e-12)


def test_elements_not_covered_are_a_build_time_error():
    model = small_model()
    with pytest.raises(ValueError, match=r"outside this model's range 1\.\.9"):
        create_force(model, [1, 6, 17])
    model.metadata["elements"] = [1, 6, 8]
    with pytest.raises(ValueError, match=r"trained on elements \[1, 6, 8\].*contains \[7\]"):
        create_force(model, [1, 6, 7, 8])
    with pytest.raises(ValueError, match="one atomic number per ML atom"):
        create_force(model, [1, 6], atoms=[0, 1, 2])


def test_bad_ml_atoms_charges_and_positions_are_build_time_errors():
    model = small_model()
    z, pos = molecule(4)
    with pytest.raises(ValueError, match=r"distinct particle indices.*more than once: \[1\]"):
        create_force(model, z, atoms=[0, 1, 1, 2], positions=pos)  # an atom twice: r = 0
    with pytest.raises(ValueError, match="distinct particle indices.*negative ones given"):
        create_force(model, z, atoms=[0, 1, 2, -1])
    with pytest.raises(ValueError, match="total_charge='one' must be a number"):
        create_force(model, z, total_charge="one")
    bad = pos.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"positions are not all finite numbers: rows \[2\]"):
        create_force(model, z, positions=bad, cuda_graphs=True)


def test_lambda_parameter_scales_energy_with_derivative():
    model = small_model()
    z, pos = molecule()
    force = create_force(model, z, positions=pos, lambda_parameter="lambda_ml")
    context = context_for(force, len(z), "Reference")
    full, full_forces = energy_forces(context, pos)
    context.setParameter("lambda_ml", 0.25)
    quarter, quarter_forces = energy_forces(context, pos)
    assert quarter == pytest.approx(0.25 * full, rel=1e-12)
    np.testing.assert_allclose(quarter_forces, 0.25 * full_forces, rtol=1e-10, atol=1e-12)
    state = context.getState(getParameterDerivatives=True)
    assert state.getEnergyParameterDerivatives()["lambda_ml"] == pytest.approx(full, rel=1e-10)


def test_exported_file_is_self_contained(tmp_path):
    model = small_model(dtype=torch.float32)
    model.metadata["elements"] = [1, 6, 7, 8]
    z, pos = molecule()
    path = tmp_path / "tensornet.pt"
    export(TensorNetForce(model, z, total_charge=-1), path)
    meta = read_metadata(path)
    assert meta["atomic_numbers"] == z and meta["total_charge"] == -1.0
    assert meta["units"]["energy"] == "kJ/mol" and meta["cutoff_nm"] == pytest.approx(0.4)
    assert meta["dtype"] == "float32" and meta["config"]["hidden_channels"] == 16
    assert meta["model_metadata"]["elements"] == [1, 6, 7, 8]
    code = (
        "import sys, json, torch\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "pos = torch.tensor(json.loads(sys.argv[2]), dtype=torch.float64)\n"
        "e = m(pos)\n"
        "assert 'tensornet_openmm' not in sys.modules\n"
        "print(json.dumps([e.dtype == torch.float32, e.item()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(pos.tolist())],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    is_float32, energy = json.loads(out.stdout)
    module = TensorNetForce(model, z, total_charge=-1)
    assert is_float32 and energy == pytest.approx(module(torch.tensor(pos))[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_metadata(b"not a zip file")


def test_nve_energy_conservation():
    """Velocity Verlet on alanine dipeptide, pure ML: the total energy does not drift."""
    test = quiet_testsystems().AlanineDipeptideVacuum(constraints=None)
    z = [a.element.atomic_number for a in test.topology.atoms()]
    pos = test.positions
    model = small_model(cutoff=5.0)
    system = openmm.System()
    for i in range(test.system.getNumParticles()):
        system.addParticle(test.system.getParticleMass(i))
    system.addForce(create_force(model, z, positions=pos))
    dt_fs = 0.5
    integrator = openmm.VerletIntegrator(dt_fs * u.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pos)
    context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    totals = []
    for _ in range(40):
        integrator.step(25)
        state = context.getState(getEnergy=True)
        totals.append(
            (state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(
                u.kilojoule_per_mole
            )
        )
    totals = np.array(totals)
    time_ns = np.arange(len(totals)) * 25 * dt_fs * 1e-6
    drift_per_ns = np.polyfit(time_ns, totals, 1)[0]
    kinetic = state.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
    print(f"NVE drift {drift_per_ns:.3g} kJ/mol/ns at {dt_fs} fs; fluctuation {totals.std():.3g}")
    assert np.all(np.isfinite(totals))
    assert totals.std() < 0.02 * kinetic  # no systematic heating within 0.5 ps
    assert abs(drift_per_ns) * 5e-4 < 0.02 * kinetic
