"""ML and ML/MM Systems: energy decomposition, interpolation, errors, short dynamics."""

import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch
from helpers import quiet_testsystems, small_model

from tensornet_openmm import create_mixed_system, create_ml_system
from tensornet_openmm.export import TensorNetForce

KJ = u.kilojoule_per_mole
ONE_4PI_EPS0 = 138.93545764438198


def context(system, positions, platform="Reference"):
    integrator = openmm.LangevinMiddleIntegrator(
        300 * u.kelvin, 1 / u.picosecond, 0.5 * u.femtosecond
    )
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(positions)
    return ctx


def energy(ctx):
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)


def ml_energy(model, test, atoms, total_charge=0.0, periodic=False):
    """kJ/mol of the ML region by the eager module (independent of the System plumbing)."""
    pos = torch.tensor(np.asarray(test.positions.value_in_unit(u.nanometer)))
    numbers = [a.element.atomic_number for a in test.topology.atoms()]
    module = TensorNetForce(model, [numbers[i] for i in atoms], atoms, periodic, total_charge)
    box = None
    if periodic:
        vectors = test.system.getDefaultPeriodicBoxVectors()
        box = torch.tensor([v.value_in_unit(u.nanometer) for v in vectors], dtype=torch.float64)
    return module(pos, box)[0].item()


def mm_region_energy(system, positions, atoms):
    """MM energy of the ML region alone, by NumPy from the force-field parameters.

    Bonded terms whose atoms are all ML plus every ML-ML nonbonded pair (exception parameters
    where one exists, combining rules otherwise) as plain Coulomb + Lennard-Jones, minimum image:
    exactly what mechanical embedding takes out of the MM System.
    """
    x = np.asarray(positions.value_in_unit(u.nanometer))
    box = np.asarray([v.value_in_unit(u.nanometer) for v in system.getDefaultPeriodicBoxVectors()])
    periodic = system.usesPeriodicBoundaryConditions()
    ml = set(atoms)

    def vec(i, j):
        d = x[i] - x[j]
        if periodic:
            for k in (2, 1, 0):
                d = d - np.round(d[k] / box[k, k]) * box[k]
        return d

    def angle(i, j, k):
        a, b = vec(i, j), vec(k, j)
        return np.arccos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    def dihedral(i, j, k, l):
        b0, b1, b2 = vec(j, i), vec(k, j), vec(l, k)
        n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
        m = np.cross(n1, b1 / np.linalg.norm(b1))
        return np.arctan2(np.dot(m, n2), np.dot(n1, n2))

    total = 0.0
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for k in range(force.getNumBonds()):
                i, j, r0, kb = force.getBondParameters(k)
                if {i, j} <= ml:
                    r = np.linalg.norm(vec(i, j))
                    total += (
                        0.5
                        * kb.value_in_unit(KJ / u.nanometer**2)
                        * (r - r0.value_in_unit(u.nanometer)) ** 2
                    )
        elif isinstance(force, openmm.HarmonicAngleForce):
            for k in range(force.getNumAngles()):
                i, j, l, a0, ka = force.getAngleParameters(k)
                if {i, j, l} <= ml:
                    total += (
                        0.5
                        * ka.value_in_unit(KJ / u.radian**2)
                        * (angle(i, j, l) - a0.value_in_unit(u.radian)) ** 2
                    )
        elif isinstance(force, openmm.PeriodicTorsionForce):
            for k in range(force.getNumTorsions()):
                i, j, l, m, n, phase, kt = force.getTorsionParameters(k)
                if {i, j, l, m} <= ml:
                    theta = dihedral(i, j, l, m)
                    total += kt.value_in_unit(KJ) * (
                        1 + np.cos(n * theta - phase.value_in_unit(u.radian))
                    )
        elif isinstance(force, openmm.NonbondedForce):
            exceptions = {}
            for k in range(force.getNumExceptions()):
                i, j, qq, sig, eps = force.getExceptionParameters(k)
                exceptions[frozenset((i, j))] = (qq, sig, eps)
            for a, i in enumerate(atoms):
                for j in atoms[a + 1 :]:
                    if frozenset((i, j)) in exceptions:
                        qq, sig, eps = exceptions[frozenset((i, j))]
                    else:
                        qi, si, ei = force.getParticleParameters(i)
                        qj, sj, ej = force.getParticleParameters(j)
                        qq, sig, eps = qi * qj, (si + sj) / 2, (ei * ej).sqrt()
                    r = np.linalg.norm(vec(i, j))
                    s = sig.value_in_unit(u.nanometer) / r
                    total += ONE_4PI_EPS0 * qq.value_in_unit(u.elementary_charge**2) / r
                    total += 4 * eps.value_in_unit(KJ) * (s**12 - s**6)
        elif not isinstance(force, openmm.CMMotionRemover):
            raise AssertionError(f"no reference for {force.__class__.__name__}")
    return total


@pytest.fixture(scope="module")
def vacuum():
    return quiet_testsystems().AlanineDipeptideVacuum(constraints=None)


@pytest.fixture(scope="module")
def explicit():
    return quiet_testsystems().AlanineDipeptideExplicit(
        nonbondedMethod=openmm.app.PME, constraints=openmm.app.HBonds
    )


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_vacuum_decomposition_with_a_cut_region(vacuum, model):
    """ML region = the alanine residue, bonds to ACE and NME cut: MM(all) - MM(ML) + ML exactly."""
    with pytest.warns(UserWarning, match=r"cuts 2 covalent bond\(s\).*ALA2:N \(ML"):
        mixed = create_mixed_system(
            vacuum.topology, vacuum.system, "resname ALA", model, allow_cut_bonds=True,
            positions=vacuum.positions,
        )  # fmt: skip
    atoms = [a.index for a in vacuum.topology.atoms() if a.residue.name == "ALA"]
    expected = (
        energy(context(vacuum.system, vacuum.positions))
        - mm_region_energy(vacuum.system, vacuum.positions, atoms)
        + ml_energy(model, vacuum, atoms)
    )
    assert energy(context(mixed, vacuum.positions)) == pytest.approx(expected, abs=0.01)


def test_cut_bonds_are_an_error_unless_allowed(vacuum, model):
    with pytest.raises(ValueError, match=r"cuts 2 covalent bond.*allow_cut_bonds=True"):
        create_mixed_system(vacuum.topology, vacuum.system, "resname ALA", model)


def test_explicit_water_pme_decomposition_and_interpolation(explicit, model):
    test = explicit
    atoms = [a.index for a in test.topology.atoms() if a.residue.name != "HOH"]
    mm = energy(context(test.system, test.positions))
    ml = ml_energy(model, test, atoms, periodic=True)
    region = mm_region_energy(test.system, test.positions, atoms)

    plain = create_mixed_system(test.topology, test.system, "not water", model,
                                positions=test.positions)  # fmt: skip
    assert energy(context(plain, test.positions)) == pytest.approx(mm - region + ml, abs=0.01)

    mixed = create_mixed_system(test.topology, test.system, atoms, model, interpolate=True,
                                positions=test.positions)  # fmt: skip
    ctx = context(mixed, test.positions)
    values = {}
    for lam in (0.0, 0.3, 0.5, 1.0):
        ctx.setParameter("lambda_interpolate", lam)
        values[lam] = energy(ctx)
    assert values[0.0] == pytest.approx(mm, abs=0.01)  # lambda = 0 is the MM System
    assert values[1.0] == pytest.approx(mm - region + ml, abs=0.01)
    assert values[0.5] == pytest.approx((values[0.0] + values[1.0]) / 2, abs=0.01)  # linear
    ctx.setParameter("lambda_interpolate", 0.3)
    state = ctx.getState(getParameterDerivatives=True)
    derivative = state.getEnergyParameterDerivatives()["lambda_interpolate"]
    h = 1e-3
    ctx.setParameter("lambda_interpolate", 0.3 + h)
    up = energy(ctx)
    ctx.setParameter("lambda_interpolate", 0.3 - h)
    down = energy(ctx)
    assert derivative == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-3)
    assert derivative == pytest.approx(ml - region, abs=0.01)


def test_mixed_system_structure(explicit, model):
    test = explicit
    atoms = [a.index for a in test.topology.atoms() if a.residue.name != "HOH"]
    ml = set(atoms)
    mixed = create_mixed_system(test.topology, test.system, atoms, model, positions=test.positions)
    constraints = [mixed.getConstraintParameters(k)[:2] for k in range(mixed.getNumConstraints())]
    assert not any(i in ml and j in ml for i, j in constraints)
    assert len(constraints) == test.system.getNumConstraints() - sum(
        1
        for k in range(test.system.getNumConstraints())
        if set(test.system.getConstraintParameters(k)[:2]) <= ml
    )
    for force in mixed.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            bonds = [force.getBondParameters(k)[:2] for k in range(force.getNumBonds())]
            assert not any({i, j} <= ml for i, j in bonds)
    assert test.system.getNumForces() + 1 == mixed.getNumForces()  # the TorchForce
    kept = create_mixed_system(test.topology, test.system, atoms, model, remove_constraints=False,
                               positions=test.positions)  # fmt: skip
    assert kept.getNumConstraints() == test.system.getNumConstraints()


def test_unsupported_forces_and_bad_selections_are_clear_errors(vacuum, model):
    implicit = quiet_testsystems().AlanineDipeptideImplicit()
    with pytest.raises(ValueError, match=r"does not know how to split \['CustomGBForce'\]"):
        create_mixed_system(implicit.topology, implicit.system, [0, 1, 2, 3, 4, 5], model)
    twice = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(vacuum.system))
    for force in vacuum.system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            twice.addForce(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force)))
    with pytest.raises(ValueError, match="2 NonbondedForces"):
        create_mixed_system(vacuum.topology, twice, [0, 1, 2, 3, 4, 5], model)
    with pytest.raises(ValueError, match="matches no atoms"):
        create_mixed_system(vacuum.topology, vacuum.system, "resname LIG", model)
    with pytest.raises(ValueError, match="cannot parse"):
        create_mixed_system(vacuum.topology, vacuum.system, "resname and and", model)
    with pytest.raises(ValueError, match="between 0 and 21"):
        create_mixed_system(vacuum.topology, vacuum.system, [0, 22], model)
    model.metadata["elements"] = [1, 6, 8]
    try:
        with pytest.raises(ValueError, match=r"contains \[7\]"):
            create_ml_system(vacuum.topology, model)
    finally:
        del model.metadata["elements"]


def test_periodic_pure_ml_water_box(model):
    water = quiet_testsystems().WaterBox(box_edge=1.2 * u.nanometer, cutoff=0.5 * u.nanometer)
    system = create_ml_system(water.topology, model, positions=water.positions)
    assert system.usesPeriodicBoundaryConditions()
    assert system.getParticleMass(0).value_in_unit(u.dalton) == pytest.approx(15.999, abs=1e-3)
    assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    ctx = context(system, water.positions)
    atoms = list(range(water.topology.getNumAtoms()))
    assert energy(ctx) == pytest.approx(ml_energy(model, water, atoms, periodic=True), rel=1e-8)
    ctx.getIntegrator().step(10)
    state = ctx.getState(getEnergy=True, getPositions=True)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(KJ))
    assert np.isfinite(state.getPositions(asNumpy=True).value_in_unit(u.nanometer)).all()


def test_short_md_of_mixed_systems_stays_finite(explicit, model):
    test = explicit
    mixed = create_mixed_system(test.topology, test.system, "not water", model, interpolate=True,
                                positions=test.positions)  # fmt: skip
    ctx = context(mixed, test.positions)
    ctx.setParameter("lambda_interpolate", 0.5)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 20)
    ctx.getIntegrator().step(10)
    state = ctx.getState(getEnergy=True, getPositions=True)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(KJ))
    assert np.isfinite(state.getPositions(asNumpy=True).value_in_unit(u.nanometer)).all()
