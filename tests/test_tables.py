"""Radial tables (tensornet_openmm/nn/tables.py, the radial_table kernel): the tabulated radial
functions against the networks they replace, the kernel against its PyTorch arithmetic, and the
option through create_force, export and the runner."""

import copy
import shutil

import numpy as np
import pytest
import torch
from helpers import context_for, openmm_energy_forces, random_molecule, small_model, water_box_nm

from tensornet_openmm import create_force
from tensornet_openmm.export import TensorNetForce, export, pair_capacity, read_metadata, script
from tensornet_openmm.nn import kernels, tables
from tensornet_openmm.nn.kernels import jit_load
from tensornet_openmm.nn.radial import cosine_cutoff

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)
BASES = {"expnorm": {}, "gauss": {"rbf_type": "gauss"}, "lower": {"cutoff_lower": 0.5}}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the fused kernels did not build (see the warning)"


def _vectors(distances, seed=0):
    """Pair vectors of the given lengths in random directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(distances), 3, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    return directions * torch.as_tensor(distances, dtype=torch.float64).unsqueeze(1)


def _filters(model, vec):
    """Every layer's exact radial functions of the pair vectors, the cutoff included."""
    r = vec.norm(dim=1)
    cut = cosine_cutoff(r, model.cutoff_lower, model.cutoff_upper)
    basis = model.distance_expansion(r)
    modules = [model.tensor_embedding, *model.layers]
    return [m._network(cut, basis).reshape(len(r), -1) for m in modules]


def _tabulated(model, vec):
    modules = [model.tensor_embedding, *model.layers]
    return [
        tables.interpolate(vec, m.radial_table, *m.table_grid, m.cutoff_lower, m.cutoff_upper)
        for m in modules
    ]


@pytest.mark.parametrize("options", BASES.values(), ids=BASES.keys())
def test_tables_reproduce_the_networks_within_the_tolerance(options):
    """At random distances (not the points the build checked), every tabulated function and its
    derivative along r are within the tolerance of the network's, relative to their largest."""
    model = small_model(cutoff=5.0, hidden_channels=32, num_rbf=16, **options)
    reports = tables.tabulate_radial(model, 1e-6)
    assert [r.name for r in reports] == ["tensor_embedding", "layers.0", "layers.1"]
    assert all(max(r.value_error, r.derivative_error) <= 1e-6 for r in reports)
    g = torch.Generator().manual_seed(1)
    r = torch.rand(4000, generator=g, dtype=torch.float64) * 5.2  # some beyond the cutoff
    vec = _vectors(r).requires_grad_(True)
    exact, tabulated = _filters(model, vec), _tabulated(model, vec)
    for e, t in zip(exact, tabulated, strict=True):
        assert float((t - e).detach().abs().max() / e.detach().abs().max()) < 2e-6
    # derivatives through autograd of a weighted sum (the forces' path)
    for index in range(3):
        weights = torch.randn(exact[index].shape, generator=g, dtype=torch.float64)
        (ge,) = torch.autograd.grad((exact[index] * weights).sum(), vec, retain_graph=True)
        (gt,) = torch.autograd.grad((tabulated[index] * weights).sum(), vec, retain_graph=True)
        scale = ge.abs().max()
        assert float((gt - ge).abs().max() / scale) < 2e-5


def test_the_tolerance_sets_the_table_size_and_error():
    model = small_model(cutoff=5.0, hidden_channels=16, num_rbf=16)
    coarse = tables.tabulate_radial(copy.deepcopy(model), 1e-3)
    fine = tables.tabulate_radial(copy.deepcopy(model), 1e-7)
    for c, f in zip(coarse, fine, strict=True):
        assert c.intervals < f.intervals
        assert max(f.value_error, f.derivative_error) <= 1e-7 < c.derivative_error
        assert f.megabytes == pytest.approx(c.megabytes * f.intervals / c.intervals)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_equals_its_pytorch_arithmetic(dtype, two_threads):
    """The operator against tables.interpolate: values and the gradient to the vectors, for
    distances inside, at and beyond the cutoff, with a block large enough for the threads."""
    model = small_model(cutoff=5.0, hidden_channels=16, num_rbf=16).to(dtype)
    tables.tabulate_radial(model, 1e-5)
    layer = model.layers[1]
    grid = (*layer.table_grid, layer.cutoff_lower, layer.cutoff_upper)
    for n in (37, 20000):
        g = torch.Generator().manual_seed(n)
        r = torch.rand(n, generator=g, dtype=torch.float64) * 6.0
        r[:4] = torch.tensor([5.0, 10.0, 1e-3, 4.999999])
        vec = _vectors(r).to(dtype).requires_grad_(True)
        out = torch.ops.tensornet_openmm.radial_table(vec, layer.radial_table, *grid)
        expected = tables.interpolate(vec, layer.radial_table, *grid)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(
            out, expected, rtol=tol, atol=tol * float(expected.detach().abs().max())
        )
        assert torch.all(out[1] == 0) and torch.all(out[r >= 5.0] == 0)
        seed = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        (actual,) = torch.autograd.grad(out, vec, seed)
        (wanted,) = torch.autograd.grad(expected, vec, seed)
        torch.testing.assert_close(actual, wanted, rtol=tol, atol=tol * float(wanted.abs().max()))
        assert torch.all(actual[r >= 5.0] == 0)
    vec = _vectors([0.7, 1.3, 2.9, 4.4]).requires_grad_(True)
    table = model.layers[1].radial_table.double()
    assert torch.autograd.gradcheck(
        lambda v: torch.ops.tensornet_openmm.radial_table(v, table, *grid), (vec,)
    )


def test_kernel_refuses_bad_input_and_table_gradients():
    table = torch.zeros(8, 4, 5, dtype=torch.float64)
    vec = torch.ones(3, 3, dtype=torch.float64)
    op = torch.ops.tensornet_openmm.radial_table
    with pytest.raises(RuntimeError, match=r"\(intervals, 4, values\)"):
        op(vec, torch.zeros(8, 2, 5, dtype=torch.float64), 1.0, 1.0, 0.03, 10.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        op(vec.float(), table, 1.0, 1.0, 0.03, 10.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="increasing"):
        op(vec, table, 0.0, 1.0, 0.0, 10.0, 0.0, 5.0)
    with pytest.raises(RuntimeError, match="lower < upper"):
        op(vec, table, 1.0, 1.0, 0.03, 10.0, 5.0, 5.0)
    with pytest.raises(RuntimeError, match="no gradients for the table"):
        op(vec, table.clone().requires_grad_(True), 1.0, 1.0, 0.03, 10.0, 0.0, 5.0).sum().backward()


def test_tolerance_errors_name_the_value_and_the_fix(monkeypatch):
    assert tables.requested_tolerance(False) is None and tables.requested_tolerance(0) is None
    assert tables.requested_tolerance(True) == tables.DEFAULT_TOLERANCE
    assert tables.requested_tolerance("1e-5") == 1e-5
    for bad in (2.0, -1e-6, "fine"):
        with pytest.raises(ValueError, match="tolerance|radial_tables"):
            tables.requested_tolerance(bad)
    monkeypatch.setattr(tables, "MAX_INTERVALS", 512)
    with pytest.raises(
        ValueError, match=r"cannot be tabulated to 1e-12 with 512 intervals.*larger"
    ):
        tables.tabulate_radial(small_model(), 1e-12)


def _energy_forces(module, pos):
    x = pos.clone().requires_grad_(True)
    energy = module(x)
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad


def test_force_with_tables_is_close_to_the_exact_model():
    """A molecule's energy and forces with tables, float64, against the same force without them:
    within the tolerance; and the tables are what it reads (spoiling one changes the energy)."""
    model = small_model(cutoff=5.0, hidden_channels=32, num_rbf=16)
    z, pos = random_molecule(20, spread=3.0)
    pos_nm = pos / 10.0
    exact = TensorNetForce(model, z.tolist(), fused_kernels=True)
    tabulated = TensorNetForce(model, z.tolist(), fused_kernels=True, radial_tables=1e-6)
    assert tabulated.radial_tables.startswith("radial tables: ") and not exact.radial_tables
    e0, f0 = _energy_forces(script(exact), pos_nm)
    e1, f1 = _energy_forces(script(tabulated), pos_nm)
    assert e1 == pytest.approx(e0, rel=1e-6, abs=1e-6)
    assert e1 != e0  # an approximation, not the network
    assert float((f1 - f0).norm() / f0.norm()) < 5e-6
    spoiled = copy.deepcopy(tabulated)
    spoiled.model.tensor_embedding.radial_table.mul_(2.0)
    assert _energy_forces(script(spoiled), pos_nm)[0] != pytest.approx(e1, rel=1e-4)
    # the weights' file is unchanged: tables are not saved with them
    assert set(tabulated.model.state_dict()) == set(model.state_dict())
    tables.untabulate(spoiled.model)  # the networks again, exactly
    assert _energy_forces(script(spoiled), pos_nm)[0] == e0


@pytest.mark.parametrize("path", ["pytorch", "low_memory", "low_memory_fused"])
def test_every_path_reads_the_tables(path):
    """Without the fused kernels, and with low_memory (its own pair loops and adjoint, with
    PyTorch or the fused kernels), a force with tables gives the fused kernels' tabulated energy
    and forces (float64), not the exact ones."""
    model = small_model(cutoff=5.0, hidden_channels=16, num_rbf=16)
    z, pos = random_molecule(14, spread=3.0)
    pos_nm = pos / 10.0
    fused = path == "low_memory_fused"
    options = {"fused_kernels": fused, "low_memory": path.startswith("low_memory")}
    e_fused, f_fused = _energy_forces(
        script(TensorNetForce(model, z.tolist(), fused_kernels=True, radial_tables=1e-5)), pos_nm
    )
    module = TensorNetForce(model, z.tolist(), radial_tables=1e-5, **options)
    assert module.fused_kernels == fused and module.radial_tables
    e, f = _energy_forces(script(module), pos_nm)
    e_exact, _ = _energy_forces(script(TensorNetForce(model, z.tolist(), **options)), pos_nm)
    assert e == pytest.approx(e_fused, rel=1e-12) and e != pytest.approx(e_exact, rel=1e-12)
    torch.testing.assert_close(f, f_fused, rtol=1e-9, atol=1e-9 * float(f_fused.abs().max()))


def test_tables_on_padded_fixed_capacity_pairs():
    """The fixed-capacity pair list of CUDA graphs (padding slots: self pairs beyond the cutoff)
    with tables, fused kernels and PyTorch alike, gives the dynamic list's tabulated energy and
    forces (float64, a periodic water box)."""
    z, pos, box = water_box_nm(1.2)
    model = small_model(cutoff=5.0)
    capacity, cell_capacity, strategy = pair_capacity(model, len(z), pos * 10, box * 10)
    results = []
    for fixed, fused in ((False, True), (True, True), (True, False)):
        module = TensorNetForce(
            model, z, periodic=True, capacity=capacity if fixed else -1, strategy=strategy,
            cell_capacity=cell_capacity if fixed else -1, outputs_forces=True,
            fixed_on_cpu=fixed, fused_kernels=fused, radial_tables=1e-6,
        )  # fmt: skip
        energy, forces = script(module)(torch.tensor(pos), torch.tensor(box))
        results.append((energy.item(), forces.numpy()))
    (e0, f0), *others = results
    for e, f in others:
        assert e == pytest.approx(e0, rel=1e-10)
        np.testing.assert_allclose(f, f0, rtol=1e-9, atol=1e-9 * np.abs(f0).max())


def test_openmm_force_with_tables_is_as_close_as_float32_rounding(tmp_path):
    """create_force(radial_tables=True) through OpenMM's CPU platform in float32: the forces are
    as close to the float64 exact model's as the exact float32 model's are; the exported file
    records the tables and gives the same energy when loaded in this process."""
    model = small_model(cutoff=5.0, hidden_channels=32, num_rbf=16)
    z, pos = random_molecule(16, spread=3.0)
    pos_nm = (pos / 10.0).numpy()
    results = {}
    for name, dtype, tabulate in (
        ("exact64", torch.float64, False),
        ("exact32", torch.float32, False),
        ("tables32", torch.float32, True),
    ):
        force = create_force(copy.deepcopy(model).to(dtype), z.tolist(), radial_tables=tabulate)
        context = context_for(force, len(z), "CPU")
        results[name] = openmm_energy_forces(context, pos_nm)
    e64, f64 = results["exact64"]
    err = {k: np.linalg.norm(results[k][1] - f64) / np.linalg.norm(f64) for k in results}
    assert err["tables32"] < 3 * err["exact32"] + 1e-6
    assert results["tables32"][0] == pytest.approx(e64, rel=1e-5, abs=1e-3)
    module = TensorNetForce(model.float(), z.tolist(), fused_kernels=True, radial_tables=1e-6)
    path = tmp_path / "tables.pt"
    export(module, path)
    assert read_metadata(path)["radial_tables"].startswith("radial tables: ")
    loaded = jit_load(path)
    x = torch.as_tensor(pos_nm, dtype=torch.float32)
    with torch.no_grad():
        assert float(loaded(x)) == pytest.approx(float(script(module)(x)), rel=1e-6)
