"""The openmm-ml adapter (plugin/): MLPotential('tensornet') equals our own System builders."""

import openmm
import openmm.unit as u
import pytest
from helpers import quiet_testsystems, small_model

from tensornet_openmm import create_mixed_system, create_ml_system, load_model, save_model

openmmml = pytest.importorskip("openmmml", reason="install openmmml==1.8 and ./plugin")


def energy(system, positions, lam=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))  # fmt: skip
    context.setPositions(positions)
    if lam is not None:
        context.setParameter("lambda_interpolate", lam)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = small_model(cutoff=4.5)
    model.metadata["elements"] = [1, 6, 7, 8]
    path = tmp_path_factory.mktemp("plugin") / "model.pt"
    save_model(model, path)
    return path


def test_registered_and_equal_to_create_ml_system(model_path):
    assert "tensornet" in openmmml.MLPotential._implFactories
    potential = openmmml.MLPotential("tensornet", modelPath=str(model_path))
    ts = quiet_testsystems()
    vacuum = ts.AlanineDipeptideVacuum(constraints=None)
    water = ts.WaterBox(box_edge=1.2 * u.nanometer, cutoff=0.5 * u.nanometer)

    ours = load_model(model_path)
    for test in (vacuum, water):
        theirs = potential.createSystem(test.topology)
        mine = create_ml_system(test.topology, ours, positions=test.positions)
        assert theirs.usesPeriodicBoundaryConditions() == (test is water)
        assert energy(theirs, test.positions) == pytest.approx(
            energy(mine, test.positions), rel=1e-10
        )
    # radialTables reaches create_force: the same approximate energy as ours with tables
    tabulated = potential.createSystem(vacuum.topology, radialTables=1e-6, fusedKernels=True)
    mine = create_ml_system(vacuum.topology, ours, radial_tables=1e-6, fused_kernels=True)
    assert energy(tabulated, vacuum.positions) == pytest.approx(
        energy(mine, vacuum.positions), rel=1e-12
    )


def test_mixed_systems_with_openmmml_interpolation(model_path):

    potential = openmmml.MLPotential("tensornet", modelPath=str(model_path), trustPickle=False)
    test = quiet_testsystems().AlanineDipeptideVacuum(constraints=None)
    atoms = list(range(test.topology.getNumAtoms()))
    ours = load_model(model_path)
    mine = create_mixed_system(test.topology, test.system, atoms, ours, interpolate=True,
                               positions=test.positions)  # fmt: skip
    theirs = potential.createMixedSystem(test.topology, test.system, atoms, interpolate=True,
                                         embedding="tensornet")  # fmt: skip
    for lam in (0.0, 0.4, 1.0):
        assert energy(theirs, test.positions, lam) == pytest.approx(
            energy(mine, test.positions, lam), abs=1e-6
        )
    # openmm-ml's own mechanical embedding, without interpolation, gives the same energy
    plain = potential.createMixedSystem(test.topology, test.system, atoms)
    assert energy(plain, test.positions) == pytest.approx(
        energy(mine, test.positions, 1.0), abs=1e-4
    )
    # its interpolation would wrap the TorchForce in a CustomCVForce: a clear error, no segfault
    with pytest.raises(ValueError, match="embedding='tensornet'"):
        potential.createMixedSystem(test.topology, test.system, atoms, interpolate=True)


def test_periodic_mixed_system_equals_ours(model_path):
    potential = openmmml.MLPotential("tensornet", modelPath=str(model_path))
    test = quiet_testsystems().AlanineDipeptideExplicit(constraints=None)
    atoms = [a.index for a in test.topology.atoms() if a.residue.name != "HOH"]
    mine = create_mixed_system(test.topology, test.system, atoms, load_model(model_path),
                               positions=test.positions)  # fmt: skip
    theirs = potential.createMixedSystem(test.topology, test.system, atoms)
    assert energy(theirs, test.positions) == pytest.approx(energy(mine, test.positions), abs=1e-3)


def test_unknown_arguments_are_clear_errors(model_path):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['modelFile'\]"):
        openmmml.MLPotential("tensornet", modelFile=str(model_path))
    with pytest.raises(ValueError, match="needs modelPath"):
        openmmml.MLPotential("tensornet")
    potential = openmmml.MLPotential("tensornet", modelPath=str(model_path))
    test = quiet_testsystems().AlanineDipeptideVacuum(constraints=None)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['charge'\]"):
        potential.createSystem(test.topology, charge=1)
    system = potential.createSystem(test.topology, totalCharge=1, cudaGraphs=False)
    assert system.getNumForces() == 2
