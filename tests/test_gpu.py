"""On a CUDA device: the model, the pair list, the OpenMM force and the runner against the CPU.

Every test here is marked ``gpu`` and skipped without a CUDA device (see conftest). On a GPU
machine: ``python -m pytest -m gpu``. The OpenMM CUDA platform must then be there: a missing one
fails (with OpenMM's plugin load failures) rather than skips, since it means a broken install.
"""

import collections
import functools
import json
import math

import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch
from helpers import assert_close, quiet_testsystems, random_molecule, small_model, water_box_nm
from helpers import energy_forces as model_energy_forces
from test_force import context_for, eager, energy_forces, molecule
from test_runner import QUICK, SIMULATIONS

from tensornet_openmm import create_force, create_mixed_system, save_model
from tensornet_openmm.cli import main
from tensornet_openmm.export import TensorNetForce, script
from tensornet_openmm.neighbors import neighbor_pairs
from tensornet_openmm.nn import kernels
from tensornet_openmm.systems import LAMBDA

pytestmark = pytest.mark.gpu


def cuda_platform():
    try:
        return openmm.Platform.getPlatformByName("CUDA")
    except openmm.OpenMMException:
        failures = openmm.Platform.getPluginLoadFailures()
        pytest.fail(f"a CUDA device but no OpenMM CUDA platform; plugin failures: {failures}")


def cuda_context(force, n_particles, box_nm=None, precision="double"):
    """A Context of ``force`` alone on the CUDA platform (double precision unless told)."""
    cuda_platform()
    return context_for(force, n_particles, "CUDA", box_nm, properties={"Precision": precision})


@pytest.fixture(scope="module")
def water():
    return water_box_nm(1.6)


def test_model_on_cuda_equals_cpu_in_float64():
    """The CUDA path (lean message sums) against the CPU path (index_add_), float64."""
    model = small_model()
    z, pos = random_molecule(40)
    cpu = model_energy_forces(model, z, pos)
    cuda = model_energy_forces(model.to("cuda"), z.cuda(), pos.cuda())
    for got, expected in zip(cuda, cpu, strict=True):
        assert got.is_cuda
        assert_close(got.cpu(), expected)


@pytest.mark.parametrize("strategy", ["brute", "cell"])
def test_fixed_capacity_pairs_on_cuda_equal_cpu(water, strategy):
    z, pos, box = water
    pos = torch.tensor(pos * 10.0)
    box = torch.tensor(box * 10.0)
    expected = neighbor_pairs(pos, 5.0, box, half=True)
    got = neighbor_pairs(
        pos.cuda(), 5.0, box.cuda(), capacity=expected.num_pairs.item() + 100, strategy=strategy,
        cell_capacity=64 if strategy == "cell" else -1, half=True,
    )  # fmt: skip

    def pair_set(pairs):
        n = int(pairs.num_pairs)
        i, j = pairs.edge_index[:, :n].cpu().tolist()
        return set(zip(i, j, strict=True))

    assert int(got.num_pairs) == int(expected.num_pairs)
    assert pair_set(got) == pair_set(expected)


@pytest.mark.parametrize("graphs, outputs_forces", [(False, False), (True, False), (True, True)])
def test_cuda_context_equals_eager_model(graphs, outputs_forces):
    model = small_model()
    z, pos = molecule()
    force = create_force(model, z, cuda_graphs=graphs, positions=pos, outputs_forces=outputs_forces)
    energy, forces = energy_forces(cuda_context(force, len(z)), pos)
    ref_energy, ref_forces = eager(model, z, pos)
    assert energy == pytest.approx(ref_energy, rel=1e-8)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-7, atol=1e-7 * np.abs(ref_forces).max())


def test_captured_graph_follows_new_positions_and_box(water):
    """A replayed CUDA graph must read the current positions and box, not the captured ones."""
    z, pos, box = water
    model = small_model()
    force = create_force(model, z, periodic=True, positions=pos, box_vectors=box)
    context = cuda_context(force, len(z), box)
    rng = np.random.default_rng(3)
    moved = pos + rng.normal(0, 0.01, size=pos.shape)
    for p in (pos, moved, pos, moved):
        energy, forces = energy_forces(context, p)
        ref_energy, ref_forces = eager(model, z, p, box)
        assert energy == pytest.approx(ref_energy, rel=1e-8)
        np.testing.assert_allclose(forces, ref_forces, atol=1e-7 * np.abs(ref_forces).max())
    bigger = box * 1.02  # NPT: the box is an input of the graph too
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in bigger])
    energy, _ = energy_forces(context, pos * 1.02)
    assert energy == pytest.approx(eager(model, z, pos * 1.02, bigger)[0], rel=1e-8)


def test_low_memory_on_cuda_equals_default(water):
    z, pos, box = water
    model = small_model()
    results = []
    for low in (False, True):
        force = create_force(model, z, periodic=True, positions=pos, box_vectors=box,
                             low_memory=low)  # fmt: skip
        results.append(energy_forces(cuda_context(force, len(z), box), pos))
    (e0, f0), (e1, f1) = results
    assert e1 == pytest.approx(e0, rel=1e-10)
    np.testing.assert_allclose(f1, f0, atol=1e-9 * np.abs(f0).max())


def test_cuda_md_single_precision_tracks_the_model(water):
    """Langevin MD on CUDA (mixed precision, graphs): the end state's energy is the model's."""
    z, pos, box = water
    model = small_model(dtype=torch.float32)
    system = openmm.System()
    for element in z:
        system.addParticle(1.008 if element == 1 else 15.999)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    system.addForce(create_force(model, z, periodic=True, positions=pos, box_vectors=box))
    integrator = openmm.LangevinMiddleIntegrator(300, 1.0, 0.0005)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, cuda_platform(), {"Precision": "mixed"})
    context.setPositions(pos)
    context.setVelocitiesToTemperature(300, 1)
    integrator.step(200)
    state = context.getState(getEnergy=True, getPositions=True)
    end = np.asarray(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
    assert np.isfinite(end).all() and np.abs(end - pos).max() > 1e-3
    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    assert energy == pytest.approx(eager(model.double(), z, end, box)[0], rel=1e-4, abs=1e-2)


def test_overflow_on_cuda_is_nan_not_a_truncated_energy():
    model = small_model()
    z, pos = molecule()
    force = create_force(model, z, positions=pos, capacity=4)  # far fewer slots than pairs
    energy, forces = energy_forces(cuda_context(force, len(z)), pos)
    assert np.isnan(energy)
    # OpenMM's CUDA platform sums forces in fixed point, where NaN turns into -2^31 kJ/mol/nm
    # (seen on an H200): every force is NaN or that, so the next step throws the atoms away
    assert np.all(np.isnan(forces) | (np.abs(forces) > 1e9))


def alanine_in_water(platform, properties, **options):
    """Alanine dipeptide in water with its 22 atoms ML (``create_mixed_system`` with
    ``options``), the TensorNet force in group 1, everything else in group 0: the test
    system, a Context on ``platform`` and the eager model's energy and forces of the ML atoms."""
    test = quiet_testsystems().AlanineDipeptideExplicit()
    model = small_model(cutoff=5.0)
    system = create_mixed_system(
        test.topology, test.system, list(range(22)), model, positions=test.positions, **options
    )
    for force in system.getForces():
        force.setForceGroup(1 if force.getName() == "TensorNet" else 0)
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), platform, properties)
    context.setPositions(test.positions)
    pos = np.asarray(test.positions.value_in_unit(u.nanometer))
    z = [a.element.atomic_number for a in test.topology.atoms()][:22]
    return test, context, eager(model, z, pos[:22])


def test_mixed_system_on_cuda_equals_the_model():
    """ML/MM on CUDA: the TensorNet force of the ML atoms is the model's, PME and all around it.

    (openmm-torch's CPU kernels do not run against the GPU machine's newer torch, so the
    comparison is with the eager model, not with the CPU platform.)"""
    test, context, (ref_energy, ref_forces) = alanine_in_water(
        cuda_platform(), {"Precision": "double"}
    )
    ml_energy, ml_forces = energy_forces(context, test.positions, groups={1})
    assert ml_energy == pytest.approx(ref_energy, rel=1e-8)
    np.testing.assert_allclose(ml_forces[:22], ref_forces, atol=1e-7 * np.abs(ref_forces).max())
    assert np.all(ml_forces[22:] == 0.0)
    total, forces = energy_forces(context, test.positions)
    assert np.isfinite(total) and np.isfinite(forces).all() and total != ml_energy


def interpolation_follows_lambda(platform, properties):
    """An interpolated ML/MM System whose TorchForce is captured at lambda = 1 and then asked at
    other values: the ML force's energy and forces must be lambda times the model's, and
    dE/dlambda the model's energy, at every value set after the capture (openmm-torch hands
    the module its global parameters as tensors; a graph that kept the captured value, or read
    a freed one, would fail here)."""
    test, context, (ref_energy, ref_forces) = alanine_in_water(
        platform, properties, interpolate=True, cuda_graphs=True
    )
    # openmm-torch's first call of each kind (forces, energy alone) warms up (10 calls: a
    # frozen module's second call still compares its constants, which capture refuses) and
    # captures, at lambda = 1
    for _ in range(2):
        energy_forces(context, test.positions, groups={1})
        context.getState(getEnergy=True, getParameterDerivatives=True, groups={1})
    for lam in (0.3, 1.0, 0.0, 0.75):
        context.setParameter(LAMBDA, lam)
        energy, forces = energy_forces(context, test.positions, groups={1})
        assert energy == pytest.approx(lam * ref_energy, rel=1e-8, abs=1e-9)
        np.testing.assert_allclose(
            forces[:22], lam * ref_forces, atol=1e-7 * np.abs(ref_forces).max()
        )
        state = context.getState(getEnergy=True, getParameterDerivatives=True, groups={1})
        assert state.getEnergyParameterDerivatives()[LAMBDA] == pytest.approx(ref_energy, rel=1e-8)
        assert state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) == pytest.approx(
            lam * ref_energy, rel=1e-8, abs=1e-9
        )


def test_interpolation_on_cuda_follows_lambda_after_capture():
    interpolation_follows_lambda(cuda_platform(), {"Precision": "double"})


def test_runner_on_cuda(tmp_path):
    model = small_model(cutoff=4.5, dtype=torch.float32)
    model.metadata["elements"] = [1, 6, 7, 8]
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "run"
    argv = ["run", str(SIMULATIONS / "ala2-vacuum.yaml"), "--model", str(tmp_path / "model.pt"),
            "--steps", "20", "--output", str(out), "--set", "platform=CUDA", *QUICK]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["final_energy_kj_per_mol"])
    assert "platform CUDA" in (out / "run.log").read_text()


def cuda_kernels():
    """The fused kernels with their CUDA part: built wherever the CUDA compiler is found (a
    failed build fails the test, it would otherwise leave the GPU on the slower PyTorch)."""
    missing = kernels._cuda_compiler()
    if missing is not None:
        pytest.skip(f"no fused CUDA kernels to test: {missing}")
    assert kernels.load() and kernels.cuda_available(), "the CUDA kernels did not build"


def _last(op, flag, *tensors):
    """op(*tensors, flag): the operators take their flag last."""
    return op(*tensors, flag)


def _fused_cases(channels):
    """(name, operator, float64 CPU inputs) of every CUDA operator, small random inputs."""
    g = torch.Generator().manual_seed(channels)
    n, p, f = 9, 41, channels

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    src, dst = torch.randint(0, n, (p,), generator=g), torch.randint(0, n, (p,), generator=g)
    ops = torch.ops.tensornet_openmm
    cases = []
    for half in (True, False):
        messages = functools.partial(_last, ops.messages, half)
        embedding = functools.partial(_last, ops.embedding_sums, half)
        cases.append((f"messages-half={half}", messages, [rand(n, 10, f), rand(p, 3, f), src, dst]))
        with_self = functools.partial(_messages_self, half)
        cases.append((f"messages-self-half={half}", with_self,
                      [rand(n, 10, f), rand(p, 3, f), rand(3, f), src, dst]))  # fmt: skip
        cases.append((f"embedding-half={half}", embedding,
                      [rand(p, 3, f), rand(n, f), rand(n, f), rand(p, 10), src, dst]))  # fmt: skip
        product = functools.partial(_last, ops.packed_product, half)  # half: symmetric here
        cases.append((f"product-symmetric={half}", product, [rand(n, 10, f), rand(n, 10, f)]))
    cases.append(("normalize", ops.packed_normalize, [rand(n, 10, f)]))
    cases.append(("part-norms", ops.packed_part_norms, [rand(n, 10, f)]))
    cases.append(("component-mix", ops.component_mix, [rand(n, 10, f), rand(10, f, 7)]))
    cases.append(("gated-mix", ops.gated_mix, [rand(n, 10, f), rand(10, f, 7), rand(n, 3, 7)]))
    cases.append(("embedding-prepare", _embedding_prepare, [rand(n, 10, f), rand(n, f)]))
    for factors in (rand(0), rand(n).abs() + 0.5):  # no charge factors, and some
        label = "-charged" if factors.numel() else ""
        for symmetric in (True, False):
            step = functools.partial(_product_normalize, symmetric, factors)
            cases.append((f"product-normalize-symmetric={symmetric}{label}", step,
                          [rand(n, 10, f), rand(n, 10, f)]))  # fmt: skip
        step = functools.partial(_square_add, factors)
        cases.append((f"square-add{label}", step, [rand(n, 10, f), rand(n, 10, f)]))
    for act in (0, 1, 2):  # SiLU, tanh, none: two layers, f -> 7 -> f
        network = functools.partial(_mlp, act)
        cases.append((f"mlp-{act}", network,
                      [rand(p, f), rand(p), rand(7, f), rand(7), rand(f, 7), rand(f)]))  # fmt: skip
        cases.append((f"mlp-{act}-no-scale", network,  # the per-atom networks: empty scale
                      [rand(n, f), rand(0), rand(7, f), rand(7), rand(f, 7), rand(f)]))  # fmt: skip
    for kind, lower in ((0, 0.0), (1, 0.6)):  # exp-normal; Gaussian with a lower cutoff
        vectors = rand(p, 3) * 2.5  # lengths about 0.5 to 8 A: some beyond the 5 A cutoff
        geometry = functools.partial(_geometry, kind, lower)
        widths = rand(f).abs() * (1 if kind == 0 else -1)  # Gaussian: exp(width d^2), width < 0
        cases.append((f"geometry-{kind}", geometry, [vectors, rand(f).abs(), widths]))
    for a, c, lower in ((1.0, 0.033, 0.0), (0.0, 1.0, 0.6)):  # exp-normal and Gaussian grids
        table = functools.partial(_table, a, c, lower)
        cases.append((f"table-a={a}", table, [rand(p, 3) * 2.5, rand(12, 4, f)]))
    # pairs repeating atoms (their gradients add up atomically on the GPU)
    box = torch.tensor([[2.0, 0.0, 0.0], [0.3, 2.2, 0.0], [-0.4, 0.5, 2.5]], dtype=torch.float64)
    for periodic in (None, box):  # and the minimum image in a triclinic box
        difference = functools.partial(_pair_difference, src, dst, periodic)
        cases.append((f"pair-difference-box={periodic is not None}", difference,
                      [rand(n, 3) * 3.0]))  # fmt: skip
    # every radial network at once: a projection (3 f, scaled, through a strided view on the
    # GPU) and two networks (f -> 7 -> 3 f)
    weights = [w for _ in range(2) for w in (rand(7, f), rand(3 * f, 7))]
    biases = [b for _ in range(2) for b in (rand(7), rand(3 * f))]
    for act in (0, 1):
        networks = functools.partial(_radial_networks, act, rand(5 * f, 8), rand(5 * f), weights,
                                     biases)  # fmt: skip
        cases.append((f"radial-networks-{act}", networks, [rand(p, 8), rand(p)]))
    return cases


def _radial_networks(act, w0, b0, weights, biases, basis, cut):
    """The operator's outputs in one tensor, its constant weights on the basis's device."""
    dev = basis.device
    out = torch.ops.tensornet_openmm.radial_networks(
        basis, cut, w0.to(dev), b0.to(dev), w0.shape[0] * 3 // 5, 2,
        [w.to(dev) for w in weights], [b.to(dev) for b in biases], act,
    )  # fmt: skip
    return torch.cat([o.flatten() for o in out])


def _pair_difference(src, dst, box, pos):
    box = pos.new_empty(0) if box is None else box.to(pos.device)
    return torch.ops.tensornet_openmm.pair_difference(
        pos, src.to(pos.device), dst.to(pos.device), 10.0, box
    )


def _table(a, c, lower, vectors, table):
    """The radial_table operator on a 12-interval grid over [0, 5] A."""
    v_max = a * (1.0 - math.exp(-1.1 * 5.0)) + c * 5.0
    return torch.ops.tensornet_openmm.radial_table(
        vectors, table, a, 1.1, c, 12 / v_max, lower, 5.0
    )


def _messages_self(half, y, filters, self_filters, src, dst):
    return torch.ops.tensornet_openmm.messages_self(y, filters, src, dst, half, self_filters)


def _embedding_prepare(sums, self_terms):
    """Both outputs in one tensor (the tests compare one output)."""
    x, norm = torch.ops.tensornet_openmm.embedding_prepare(sums, self_terms)
    return torch.cat((x.flatten(), norm.flatten()))


def _product_normalize(symmetric, factors, a, b):
    """The operator with constant charge factors (no gradient for them), on a's device."""
    return torch.ops.tensornet_openmm.packed_product_normalize(
        a, b, symmetric, factors.to(a.device)
    )


def _square_add(factors, x, d):
    return torch.ops.tensornet_openmm.packed_square_add(x, d, factors.to(x.device))


def _mlp(act, x, scale, w1, b1, w2, b2):
    return torch.ops.tensornet_openmm.mlp(x, scale, [w1, w2], [b1, b2], act)


def _geometry(kind, lower, vectors, centers, widths):
    """The geometry operator's three outputs in one tensor (the tests compare one output)."""
    cut, geom, basis = torch.ops.tensornet_openmm.geometry(
        vectors, centers, widths, kind, 1.1, lower, lower, 5.0
    )
    return torch.cat((cut.unsqueeze(1), geom, basis), 1)


@pytest.mark.parametrize("channels", [40, 160])
def test_fused_cuda_kernels_equal_the_cpu_kernels(channels):
    """Every CUDA operator against its CPU twin in float64: values, and the gradients of each
    floating input (channels: fewer than a warp's multiple, and more than a block row; the
    geometry's basis functions)."""
    cuda_kernels()
    for name, op, inputs in _fused_cases(channels):
        if name.startswith(("geometry", "table")):  # no gradients for basis parameters, tables
            cpu = [inputs[0].clone().requires_grad_(), *inputs[1:]]
            gpu = [inputs[0].cuda().requires_grad_(), *(x.cuda() for x in inputs[1:])]
        else:
            cpu = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
            gpu = [x.cuda().requires_grad_(x.is_floating_point()) for x in inputs]
        out_cpu, out_gpu = op(*cpu), op(*gpu)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-12, atol=1e-12, msg=name)
        seed = torch.randn_like(out_cpu)
        wrt_cpu = [x for x in cpu if x.requires_grad]
        wrt_gpu = [x for x in gpu if x.requires_grad]
        expected = torch.autograd.grad(out_cpu, wrt_cpu, seed)
        actual = torch.autograd.grad(out_gpu, wrt_gpu, seed.cuda())
        for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
            torch.testing.assert_close(a.cpu(), e, rtol=1e-11, atol=1e-11, msg=f"{name} input {k}")


def test_pair_difference_on_cuda_fails_loudly_in_a_narrow_box():
    """pair_difference on the GPU: a box narrower than min_width makes every vector and every
    position's gradient NaN (atoms in no pair too), a wide enough one does not."""
    cuda_kernels()
    pos = (torch.rand(9, 3, dtype=torch.float64) * 3.0).cuda().requires_grad_()
    src, dst = torch.tensor([0, 1, 2]).cuda(), torch.tensor([3, 4, 5]).cuda()
    box = torch.eye(3, dtype=torch.float64).cuda() * 2.0
    op = torch.ops.tensornet_openmm.pair_difference
    wide = op(pos, src, dst, 10.0, box, 19.9)
    (g_wide,) = torch.autograd.grad(wide.sum(), pos)
    assert torch.isfinite(wide).all() and torch.isfinite(g_wide).all()
    assert g_wide[6:].eq(0).all()
    narrow = op(pos, src, dst, 10.0, box, 20.1)
    (g_narrow,) = torch.autograd.grad(narrow.sum(), pos)
    assert torch.isnan(narrow).all() and torch.isnan(g_narrow).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["brute", "cell"])
def test_pair_search_kernel_on_cuda_equals_cpu(water, strategy, dtype):
    """The pair_search kernel on the GPU (a warp per atom, ballots) against the CPU kernel, whose
    pairs are the PyTorch search's (tests/test_kernels.py): the same pairs in the same order, the
    same lattice shifts and vectors, the same count; dynamic, a capacity that holds every pair and
    one that drops some; half and full lists; a triclinic box too."""
    cuda_kernels()
    fused = kernels.FusedPairKernels()
    z, pos_nm, box_nm = water
    pos = torch.tensor(pos_nm * 10.0, dtype=dtype)
    tilted = torch.tensor(box_nm * 10.0, dtype=dtype)
    tilted[1, 0], tilted[2, 0] = 3.0, -2.0
    for box in (torch.tensor(box_nm * 10.0, dtype=dtype), tilted, None):
        for half in (True, False):
            count = int(fused.neighbor_pairs(pos, 5.0, box, -1, strategy, -1, half).num_pairs)
            for capacity in (-1, count + 50, count // 3):
                args = (5.0, box, capacity, strategy, -1, half)
                cpu = fused.neighbor_pairs(pos, *args)
                gpu = fused.neighbor_pairs(pos.cuda(), 5.0, None if box is None else box.cuda(),
                                           *args[2:])  # fmt: skip
                assert gpu.edge_index.is_cuda
                assert torch.equal(gpu.edge_index.cpu(), cpu.edge_index)
                assert int(gpu.num_pairs) == int(cpu.num_pairs) == count
                torch.testing.assert_close(gpu.vectors.cpu(), cpu.vectors, rtol=0, atol=0)
    assert count > 1000


def _random_pairs(g, n, pairs):
    """Random pairs of n atoms (src, dst) and the order that sorts them by their first atom, as
    the searches give them."""
    src = torch.randint(0, n, (pairs,), generator=g)
    dst = torch.randint(0, n, (pairs,), generator=g)
    return src, dst, torch.sort(src, stable=True).indices


@pytest.mark.parametrize("half", [True, False])
def test_pair_sums_on_cuda_with_runs_of_pairs_equal_cpu(half):
    """Sums with enough pairs that a GPU thread takes a run of consecutive pairs (from 2^19 pairs
    times channels: run_length in pair_ops_cuda.cu), their first atoms sorted as the searches give
    them and shuffled, against the CPU kernels in float64: the messages (values and gradients) and
    the embedding's sums."""
    cuda_kernels()
    g = torch.Generator().manual_seed(5)
    n, pairs, f = 300, 9000, 128
    src, dst, order = _random_pairs(g, n, pairs)
    y = torch.randn(n, 10, f, generator=g, dtype=torch.float64)
    filt = torch.randn(pairs, 3, f, generator=g, dtype=torch.float64)
    radial = torch.randn(pairs, 3, f, generator=g, dtype=torch.float64)
    z_recv, z_send = (torch.randn(n, f, generator=g, dtype=torch.float64) for _ in range(2))
    geom = torch.randn(pairs, 10, generator=g, dtype=torch.float64)
    seed = torch.randn(n, 10, f, generator=g, dtype=torch.float64)
    for i, j in ((src[order], dst[order]), (src, dst)):
        results = []
        for device in ("cpu", "cuda"):
            a, w = y.to(device).requires_grad_(), filt.to(device).requires_grad_()
            out = torch.ops.tensornet_openmm.messages(a, w, i.to(device), j.to(device), half)
            grads = torch.autograd.grad(out, (a, w), seed.to(device))
            sums = torch.ops.tensornet_openmm.embedding_sums(
                radial.to(device), z_recv.to(device), z_send.to(device), geom.to(device),
                i.to(device), j.to(device), half,
            )  # fmt: skip
            results.append([t.detach().cpu() for t in (out, *grads, sums)])
        for got, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("half", [True, False])
def test_gathered_pair_sums_on_cuda_equal_cpu(half):
    """Sums of long pair lists (from 2^21 pairs times channels: kGatherWork in pair_ops_cuda.cu)
    are gathered per atom over its incidences, without atomic adds: the messages (values and
    gradients, whose transposed sums gather too), the self messages, the embedding's sums and
    their gradients (a half list's species gradients gathered too) equal the CPU kernels in
    float64, for pairs in the searches' order and shuffled, with padding self pairs; the same
    bits on a second run; the gather kernels are what ran; and a CUDA graph captures them."""
    cuda_kernels()
    g = torch.Generator().manual_seed(8)
    n, pairs, f = 700, 17000, 128
    src, dst, order = _random_pairs(g, n, pairs)
    pad = torch.arange(64) % n  # the padding slots' self pairs
    sorted_pairs = (torch.cat((src[order], pad)), torch.cat((dst[order], pad)))
    y = torch.randn(n, 10, f, generator=g, dtype=torch.float64)
    filt = torch.randn(pairs + 64, 3, f, generator=g, dtype=torch.float64)
    self_filt = torch.randn(3, f, generator=g, dtype=torch.float64)
    radial = torch.randn(pairs + 64, 3, f, generator=g, dtype=torch.float64)
    z_recv, z_send = (torch.randn(n, f, generator=g, dtype=torch.float64) for _ in range(2))
    geom = torch.randn(pairs + 64, 10, generator=g, dtype=torch.float64)
    seed = torch.randn(n, 10, f, generator=g, dtype=torch.float64)
    ops = torch.ops.tensornet_openmm

    def sums(device, i, j):
        a, w = y.to(device).requires_grad_(), filt.to(device).requires_grad_()
        i, j = i.to(device), j.to(device)
        out = ops.messages(a, w, i, j, half)
        grads = torch.autograd.grad(out, (a, w), seed.to(device))
        own = ops.messages_self(y.to(device), filt.to(device), i, j, half, self_filt.to(device))
        inputs = [t.to(device).requires_grad_() for t in (radial, z_recv, z_send, geom)]
        emb = ops.embedding_sums(*inputs, i, j, half)
        emb_grads = torch.autograd.grad(emb, inputs, seed.to(device))
        return [t.detach().cpu() for t in (out, *grads, own, emb, *emb_grads)]

    shuffled = torch.randperm(pairs + 64, generator=g)
    for i, j in (sorted_pairs, (sorted_pairs[0][shuffled], sorted_pairs[1][shuffled])):
        expected = sums("cpu", i, j)
        got = []
        names = _cuda_kernel_names(lambda: got.extend(sums("cuda", i, j)))  # noqa: B023
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        again = sums("cuda", i, j)
        # the same bits but where atomic adds remain: geom's gradient (a block's sum) and a full
        # list's species gradients (outputs: messages, 2 gradients, self messages, embedding, 4)
        atomic = {8} if half else {6, 7, 8}
        for k, (a, b) in enumerate(zip(got, again, strict=True)):
            assert k in atomic or torch.equal(a, b), k
        for kernel in ("messages_gather", "embedding_gather", "embedding_species_gather"):
            assert (f"{kernel}_kernel" in names) == (half or kernel != "embedding_species_gather")
    # captured in a CUDA graph (the incidences' kernels, prefix sum and copy included) and
    # replayed on new inputs, as OpenMM replays a force's graph
    i, j = (t.cuda() for t in sorted_pairs)
    y_c, filt_c = y.cuda(), filt.cuda()
    emb_in = [t.cuda() for t in (radial, z_recv, z_send, geom)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture
        ops.messages(y_c, filt_c, i, j, half)
        ops.embedding_sums(*emb_in, i, j, half)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.messages(y_c, filt_c, i, j, half)
        emb = ops.embedding_sums(*emb_in, i, j, half)
    y_c.copy_(2 * y_c)
    graph.replay()
    torch.cuda.synchronize()
    expected_out = ops.messages(2 * y, filt, sorted_pairs[0], sorted_pairs[1], half)
    torch.testing.assert_close(out.cpu(), expected_out, rtol=1e-12, atol=1e-12)
    expected_emb = ops.embedding_sums(radial, z_recv, z_send, geom, *sorted_pairs, half)
    torch.testing.assert_close(emb.cpu(), expected_emb, rtol=1e-12, atol=1e-12)


def _cuda_kernel_names(run):
    """The names of the CUDA kernels ``run()`` launches."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


def _small_network_case(device, dtype, rows, widths, act, scaled, seed):
    """mlp through rows x widths[0] -> ... -> widths[-1]: the output and the gradients of the
    input and the scale (seeded by fixed random numbers), on ``device`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, widths[0], generator=g, dtype=torch.float64)
    scale = torch.rand(rows if scaled else 0, generator=g, dtype=torch.float64) + 0.5
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
               for i, o in zip(widths[:-1], widths[1:], strict=True)]  # fmt: skip
    biases = [torch.randn(o, generator=g, dtype=torch.float64) for o in widths[1:]]
    seed_out = torch.randn(rows, widths[-1], generator=g, dtype=torch.float64)

    def cast(t):
        return t.to(device=device, dtype=dtype)

    x, scale = cast(x).requires_grad_(), cast(scale).requires_grad_(scaled)
    out = torch.ops.tensornet_openmm.mlp(
        x, scale, [cast(w) for w in weights], [cast(b) for b in biases], act
    )
    wrt = (x, scale) if scaled else (x,)
    if widths[-1] == 1:  # an energy: its sum's gradient comes expanded (rows 0 apart)
        grads = torch.autograd.grad(out.sum(), wrt)
    else:
        grads = torch.autograd.grad(out, wrt, cast(seed_out))
    return [t.detach().cpu().double() for t in (out, *grads)]


def _radial_case(device, dtype, rows, k, proj, networks, first, widths, act, wanted, seed):
    """radial_networks: a projection of ``proj`` columns and ``networks`` networks of
    first -> widths[0] -> ...; the outputs and the gradients of the basis and the cutoff,
    seeded through the outputs listed in ``wanted`` only (the others: no gradient)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, fan=1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / fan**0.5

    basis, cut = rand(rows, k), torch.rand(rows, generator=g, dtype=torch.float64)
    w0, b0 = rand(proj + networks * first, k, fan=k), rand(proj + networks * first)
    weights, biases = [], []
    for _ in range(networks):
        width_in = first
        for width in widths:
            weights.append(rand(width, width_in, fan=width_in))
            biases.append(rand(width))
            width_in = width

    def cast(t):
        return t.to(device=device, dtype=dtype)

    basis, cut = cast(basis).requires_grad_(), cast(cut).requires_grad_()
    outs = torch.ops.tensornet_openmm.radial_networks(
        basis, cut, cast(w0), cast(b0), proj, networks, [cast(w) for w in weights],
        [cast(b) for b in biases], act,
    )  # fmt: skip
    loss = sum((outs[o] * cast(rand(*outs[o].shape))).sum() for o in wanted)
    grads = torch.autograd.grad(loss, (basis, cut))
    return [t.detach().cpu().double() for t in (*outs, *grads)]


# rows, widths, activation, scaled: a lone row; the embedding's gates (last layer 1,280 wide: five
# blocks of outputs) and the output head of the bench model at 22 atoms (activation code 4: SiLU,
# none after the last layer); three layers with a
# hidden one wider than a block of threads and odd widths; identity; the row limit and one above
SMALL_MLPS = [
    (1, [13, 50, 37], 0, True),
    (22, [128, 256, 1280], 0, False),
    (22, [384, 128, 64], 0, False),
    (22, [384, 128, 64, 1], 4, False),  # the head as the model runs it: no activation at the end
    (37, [13, 300, 45, 33], 1, True),
    (231, [32, 128, 256, 384], 2, True),
    (2048, [20, 40, 30], 0, True),
    (2049, [20, 40, 30], 0, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_network_kernels_on_cuda_equal_cpu(dtype):
    """The small-network CUDA kernels (one kernel each way for a whole network of at most 2,048
    rows, pair_ops_cuda.cu) give the CPU's values and gradients (float64: to 1e-12; float32: to
    float32's rounding), for the per-atom chains (mlp) and every radial network at once
    (radial_networks, outputs without a gradient included); they run where they should and not
    above the row limit (profiler kernel names)."""
    cuda_kernels()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for k, (rows, widths, act, scaled) in enumerate(SMALL_MLPS):
        expected = _small_network_case("cpu", torch.float64, rows, widths, act, scaled, k)
        got = []
        names = _cuda_kernel_names(
            lambda: got.extend(  # noqa: B023
                _small_network_case("cuda", dtype, rows, widths, act, scaled, k)  # noqa: B023
            )
        )
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, **tol, msg=f"mlp {rows} x {widths}")
        ran = "network_forward_kernel" in names and "network_backward_kernel" in names
        assert ran == (rows <= 2048), (rows, widths)
    # rows, basis functions, projection, networks, first-layer share, further widths, activation,
    # outputs with a gradient: the bench model's at alanine dipeptide's 231 pair slots; three
    # networks of odd widths, tanh, one output without a gradient; the projection alone seeded
    radial = [
        (231, 32, 384, 2, 128, [256, 384], 0, [0, 1, 2]),
        (5, 8, 24, 3, 20, [45, 33], 1, [0, 2, 3]),
        (300, 32, 48, 2, 16, [40, 48], 0, [0]),
        (70, 16, 30, 1, 10, [21], 0, [1]),
    ]
    for k, case in enumerate(radial):
        expected = _radial_case("cpu", torch.float64, *case, seed=k)
        got = []
        names = _cuda_kernel_names(
            lambda: got.extend(_radial_case("cuda", dtype, *case, seed=k))  # noqa: B023
        )
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, **tol, msg=f"radial networks {case}")
        assert "network_forward_kernel" in names and "network_backward_kernel" in names, case


def _tangent_case(device, dtype, pairs, functions, f, act, seed):
    """tangent_radial_networks of ``pairs`` vectors (some beyond the 5 A cutoff) through the
    bench model's shape of networks (a projection of 3 f, two networks f -> 2 f -> 3 f): every
    output and the vectors' gradient seeded through all of them, on ``device`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, fan=1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / fan**0.5

    directions = rand(pairs, 3)
    lengths = torch.rand(pairs, generator=g, dtype=torch.float64) * 5.5 + 0.3
    vec = directions / directions.norm(dim=1, keepdim=True) * lengths[:, None]
    centers = torch.linspace(0.0, 1.0, functions, dtype=torch.float64)
    widths = torch.full((functions,), 20.0, dtype=torch.float64)
    w0, b0 = rand(5 * f, functions, fan=functions), rand(5 * f)
    weights = [w for _ in range(2) for w in (rand(2 * f, f, fan=f), rand(3 * f, 2 * f, fan=2 * f))]
    biases = [b for _ in range(2) for b in (rand(2 * f), rand(3 * f))]

    def cast(t):
        return t.to(device=device, dtype=dtype)

    x = cast(vec).requires_grad_()
    outs = torch.ops.tensornet_openmm.tangent_radial_networks(
        x, cast(centers), cast(widths), 0, 1.6, 0.0, 0.0, 5.0, cast(w0), cast(b0), 3 * f, 2,
        [cast(w) for w in weights], [cast(b) for b in biases], act,
    )  # fmt: skip
    loss = sum((o * cast(rand(*o.shape))).sum() for o in outs)
    (grad,) = torch.autograd.grad(loss, x)
    return [t.detach().cpu().double() for t in (*outs, grad)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tangent_radial_networks_on_cuda_equal_cpu(dtype):
    """The radial networks differentiated forward on a GPU (tangent_radial_networks:
    radial_tangent_kernel, the small-network forward kernel with the derivatives as more rows,
    tangent_grad_kernel; above 2,048 pairs cuBLAS's products and tangent_activate_kernel) give
    the CPU's outputs and vectors' gradient (float64: to 1e-12; float32: to its rounding): the
    bench model's networks at alanine dipeptide's 231 pairs (4 rows a block in 56 KB of shared
    memory, the kernel's limit raised), odd small shapes with tanh, and 2,100 pairs; no
    backward kernel through the layers runs, in a CUDA graph too."""
    cuda_kernels()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for k, (pairs, functions, f, act) in enumerate(
        [(231, 32, 128, 0), (5, 8, 7, 1), (300, 16, 11, 1), (2100, 32, 16, 0)]
    ):
        expected = _tangent_case("cpu", torch.float64, pairs, functions, f, act, k)
        got = []
        names = _cuda_kernel_names(
            lambda: got.extend(  # noqa: B023
                _tangent_case("cuda", dtype, pairs, functions, f, act, k)  # noqa: B023
            )
        )
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, **tol, msg=f"tangent networks {pairs} x {f}")
        assert "tangent_grad_kernel" in names and "network_backward_kernel" not in names, k
        small = "network_forward_kernel" in names
        assert small == (pairs <= 2048) and ("tangent_activate_kernel" in names) != small, k

    # captured: the raised shared-memory limit set in the eager call before
    def on_gpu(t):
        return t.to(device="cuda", dtype=dtype)

    x = on_gpu(torch.randn(231, 3) * 2.0)
    shapes = [(256, 128), (384, 256)] * 2
    args = (
        on_gpu(torch.linspace(0.0, 1.0, 32)), on_gpu(torch.full((32,), 20.0)), 0, 1.6, 0.0, 0.0,
        5.0, on_gpu(torch.randn(640, 32) / 6), on_gpu(torch.zeros(640)), 384, 2,
        [on_gpu(torch.randn(s) / s[1] ** 0.5) for s in shapes],
        [on_gpu(torch.zeros(s[0])) for s in shapes], 0,
    )  # fmt: skip
    op = torch.ops.tensornet_openmm.tangent_radial_networks
    eager = [t.clone() for t in op(x, *args)]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(x, *args)  # (warm-up on the capture's stream)
        with torch.cuda.graph(graph, stream=stream):
            captured = op(x, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("gated", [False, True], ids=["component_mix", "gated_mix"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_mix_kernel_on_cuda_equals_cpu(dtype, gated):
    """component_mix and gated_mix of at most 512 atoms run as small_mix_kernel
    (pair_ops_cuda.cu) each way (gated_mix's gates' gradient as gate_grad_kernel), of more as
    cuBLAS's batched product, and both give the CPU's values and the gradients of p (and the
    gates) (float64: to 1e-12; float32: to its rounding), for tiles cut short in atoms, inputs
    and outputs, and the weights both as the model passes them (a transposed view) and
    contiguous."""
    cuda_kernels()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    g = torch.Generator().manual_seed(11)
    ops = torch.ops.tensornet_openmm
    for atoms, f_in, f_out, transposed in ((22, 128, 128, True), (45, 20, 7, False),
                                            (300, 70, 33, True), (600, 16, 16, False)):  # fmt: skip
        p = torch.randn(atoms, 10, f_in, generator=g, dtype=torch.float64)
        w = torch.randn(10, f_out, f_in, generator=g, dtype=torch.float64).transpose(1, 2)
        w = w if transposed else w.contiguous()
        gates = torch.randn(atoms, 3, f_out, generator=g, dtype=torch.float64)
        seed = torch.randn(atoms, 10, f_out, generator=g, dtype=torch.float64)

        def call(p, w, gates):
            return ops.gated_mix(p, w, gates) if gated else ops.component_mix(p, w)

        inputs = [p.clone().requires_grad_(True), gates.clone().requires_grad_(gated)]
        expected = call(inputs[0], w, inputs[1])
        wanted = inputs if gated else inputs[:1]
        expected_grads = torch.autograd.grad(expected, wanted, seed)
        got_inputs = [t.to("cuda", dtype).requires_grad_(t.requires_grad) for t in inputs]
        got = []

        def run(got_inputs=got_inputs, w=w, seed=seed, got=got):
            out = call(got_inputs[0], w.to("cuda", dtype), got_inputs[1])
            wanted = got_inputs if gated else got_inputs[:1]
            got.extend([out, *torch.autograd.grad(out, wanted, seed.to("cuda", dtype))])

        names = _cuda_kernel_names(run)
        assert ("small_mix_kernel" in names) == (atoms <= 512), (atoms, names)
        assert ("gate_grad_kernel" in names) == (gated and atoms <= 512), (atoms, names)
        for a, e in zip(got, (expected, *expected_grads), strict=True):
            torch.testing.assert_close(a.double().cpu(), e.detach(), **tol, msg=f"{atoms} atoms")


@pytest.mark.parametrize("half", [True, False])
def test_message_filter_grad_on_cuda_equals_cpu(half):
    """The low-memory forces' message_filter_grad (no autograd of its own) on the GPU equals the
    CPU kernel in float64."""
    cuda_kernels()
    g = torch.Generator().manual_seed(5)
    n, p, f = 9, 41, 160
    grad, y = (torch.randn(n, 10, f, generator=g, dtype=torch.float64) for _ in range(2))
    src, dst = torch.randint(0, n, (p,), generator=g), torch.randint(0, n, (p,), generator=g)
    op = torch.ops.tensornet_openmm.message_filter_grad
    expected = op(grad, y, src, dst, half)
    actual = op(grad.cuda(), y.cuda(), src.cuda(), dst.cuda(), half)
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("half", [True, False])
def test_sums_added_in_place_on_cuda_equal_cpu(half):
    """The low-memory forces' in-place sums (messages_add, embedding_sums_add) and the
    embedding's pair gradients on the GPU equal the CPU kernels in float64."""
    cuda_kernels()
    g = torch.Generator().manual_seed(6)
    n, p, f = 9, 41, 160

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    y, start, grad = rand(n, 10, f), rand(n, 10, f), rand(n, 10, f)
    filters, radial, geom = rand(p, 3, f), rand(p, 3, f), rand(p, 10)
    z_recv, z_send = rand(n, f), rand(n, f)
    src, dst = torch.randint(0, n, (p,), generator=g), torch.randint(0, n, (p,), generator=g)
    ops = torch.ops.tensornet_openmm
    for add, inputs in (
        (ops.messages_add, (y, filters, src, dst)),
        (ops.embedding_sums_add, (radial, z_recv, z_send, geom, src, dst)),
    ):
        expected, actual = start.clone(), start.cuda()
        add(expected, *inputs, half)
        add(actual, *(x.cuda() for x in inputs), half)
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12)
    inputs = (grad, radial, z_recv, z_send, geom, src, dst)
    expected = ops.embedding_pair_grads(*inputs, half)
    actual = ops.embedding_pair_grads(*(x.cuda() for x in inputs), half)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12)


def test_fused_cuda_kernels_refuse_mixed_devices():
    cuda_kernels()
    y, w = torch.randn(4, 10, 8, device="cuda"), torch.randn(5, 3, 8, device="cuda")
    i = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="pair indices on cpu and cpu for tensors on cuda"):
        torch.ops.tensornet_openmm.messages(y, w, i, i, True)
    with pytest.raises(RuntimeError, match="messages: tensors on cuda:0 and cpu"):
        torch.ops.tensornet_openmm.messages(y, w.cpu(), i.cuda(), i.cuda(), True)


def _autograd_nodes(output):
    """How many autograd nodes of each name are behind ``output``; a fused operator's node is
    named ``CppNode<(anonymous namespace)::Class>`` after its class in ``csrc/pair_ops.cpp``."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return collections.Counter(
        node.name().removeprefix("torch::autograd::CppNode<(anonymous namespace)::").rstrip(">")
        for node in seen
    )


def test_cuda_force_module_runs_the_fused_cuda_kernels():
    """The force module as create_force makes it on a GPU machine (kernels by default), moved
    and frozen as openmm-torch does: its pair sums and 3x3 algebra go through the fused
    operators on CUDA tensors, the geometry and the radial networks through one operator
    differentiated forward (TangentRadialNetworks: no Geometry, no RadialNetworks), and it gives
    the eager model's energy and forces (float64)."""
    cuda_kernels()
    model = small_model()
    z, pos = molecule()
    module = TensorNetForce(model, z, fused_kernels=kernels.wanted())
    assert module.fused_kernels
    frozen = torch.jit.freeze(script(module).to("cuda").eval())
    x = torch.tensor(pos, device="cuda", requires_grad=True)
    energy = frozen(x)
    nodes = _autograd_nodes(energy)
    fused = (
        "TangentRadialNetworks", "Mlp", "EmbeddingSums", "EmbeddingPrepare", "MessagesSelf",
        "PackedProductNormalize", "PackedSquareAdd", "PackedNormalize", "ComponentMix",
    )  # fmt: skip
    assert not [op for op in fused if op not in nodes], sorted(nodes)
    assert "Geometry" not in nodes and "RadialNetworks" not in nodes, sorted(nodes)
    (grad,) = torch.autograd.grad(energy, x)
    ref_energy, ref_forces = eager(model, z, pos)
    assert energy.item() == pytest.approx(ref_energy, rel=1e-10)
    forces = -grad.cpu().numpy()
    np.testing.assert_allclose(forces, ref_forces, atol=1e-9 * np.abs(ref_forces).max())


def test_cuda_force_module_with_radial_tables_equals_the_cpu_one():
    """Radial tables on the GPU: the force module reads them through the radial_table operator
    (the pair networks' ``mlp``, one in the embedding and one per layer, are gone; the per-atom
    networks keep theirs), and gives the CPU kernels' energy and forces with the same tables."""
    cuda_kernels()
    model = small_model(cutoff=5.0)
    z, pos = molecule()
    x = torch.tensor(pos, device="cuda", requires_grad=True)
    exact = TensorNetForce(model, z, fused_kernels=True)
    exact_nodes = _autograd_nodes(torch.jit.freeze(script(exact).to("cuda").eval())(x))
    module = TensorNetForce(model, z, fused_kernels=True, radial_tables=1e-6)
    results = []
    for device in ("cpu", "cuda"):
        frozen = torch.jit.freeze(script(module).to(device).eval())
        x = torch.tensor(pos, device=device, requires_grad=True)
        energy = frozen(x)
        if device == "cuda":
            nodes = _autograd_nodes(energy)
            assert nodes["RadialTable"] == 1 + len(model.layers), sorted(nodes)
            assert nodes["Mlp"] == exact_nodes["Mlp"] - 1 - len(model.layers), sorted(nodes)
        (grad,) = torch.autograd.grad(energy, x)
        results.append((energy.item(), grad.cpu().numpy()))
    (e_cpu, g_cpu), (e_gpu, g_gpu) = results
    assert e_gpu == pytest.approx(e_cpu, rel=1e-11)
    np.testing.assert_allclose(g_gpu, g_cpu, atol=1e-10 * np.abs(g_cpu).max())


def test_fused_cuda_kernels_pass_gradcheck():
    """Gradients against finite differences on the GPU (atomic sums: not bit-reproducible), in
    gradcheck's fast mode: a full Jacobian is one GPU call per input element, 32 operators took
    more than the lease's 170 s for the whole file on an H200 (2026-11-28); the CPU kernels'
    full gradchecks are in test_kernels.py, and test_fused_cuda_kernels_equal_the_cpu_kernels
    compares every gradient with theirs. Last in the file, so that a cut run has the rest."""
    cuda_kernels()
    for name, op, inputs in _fused_cases(5):
        gpu = [x.cuda().requires_grad_(x.is_floating_point()) for x in inputs]
        for k in range(1, len(gpu) if name.startswith(("geometry", "table")) else 1):
            gpu[k].requires_grad_(False)
        assert torch.autograd.gradcheck(op, tuple(gpu), nondet_tol=1e-10, fast_mode=True), name
