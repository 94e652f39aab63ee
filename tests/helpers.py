"""Helpers shared by the tests: molecules, pair lists, energies and forces."""

from __future__ import annotations

import torch

from tensornet_openmm import TensorNet


def random_molecule(
    n_atoms: int,
    species=(1, 6, 7, 8),
    spread: float = 3.0,
    dtype=torch.float64,
    min_distance: float = 0.8,
    generator: torch.Generator | None = None,
):
    """Atomic numbers and positions (A) of a random, non-overlapping cluster."""
    g = generator or torch.Generator().manual_seed(n_atoms)
    species = torch.tensor(species)
    while True:
        pos = (torch.rand(n_atoms, 3, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
        d = torch.cdist(pos, pos) + 1e3 * torch.eye(n_atoms)
        if d.min() > min_distance:
            break
    z = species[torch.randint(len(species), (n_atoms,), generator=g)]
    return z, pos.to(dtype)


def all_pairs(batch: torch.Tensor) -> torch.Tensor:
    """Every ordered pair (i, j), i != j, of atoms in the same molecule: shape (2, n_pairs)."""
    same = batch[:, None] == batch[None, :]
    same.fill_diagonal_(False)
    return same.nonzero().T.contiguous()


def energy_forces(model: TensorNet, z, pos, batch=None, total_charge=None, edge_index=None):
    """Energies (eV, per molecule) and forces (eV/A) of ``model`` with an all-pairs list."""
    pos = pos.detach().clone().requires_grad_(True)
    if edge_index is None:
        edge_index = all_pairs(torch.zeros_like(z) if batch is None else batch)
    energy = model(z, pos, edge_index, batch=batch, total_charge=total_charge)
    (grad,) = torch.autograd.grad(energy.sum(), pos)
    return energy.detach(), -grad


def assert_close(actual, expected, dtype=torch.float64, rtol_scale: float = 1.0):
    from conftest import ATOL, RTOL

    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=RTOL[dtype] * rtol_scale,
        atol=ATOL[dtype] * rtol_scale,
    )


def quiet_testsystems():
    """openmmtools.testsystems without its import-time banner."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools.testsystems as testsystems
    return testsystems


def small_model(cutoff: float = 4.0, dtype=torch.float64, seed: int = 0, **overrides) -> TensorNet:
    """A small random TensorNet (16 channels, 2 layers) for OpenMM tests; elements below 10."""
    torch.manual_seed(seed)
    hp = dict(hidden_channels=16, num_layers=2, num_rbf=8, max_z=10, cutoff_upper=cutoff)
    hp.update(overrides)
    return TensorNet(**hp, dtype=dtype)


def water_box_nm(edge_nm: float, cutoff_nm: float = 0.5):
    """Atomic numbers, positions (nm) and box vectors (3, 3, nm) of an openmmtools water box."""
    import numpy as np
    import openmm.unit as u

    edge, cutoff = edge_nm * u.nanometer, cutoff_nm * u.nanometer
    test = quiet_testsystems().WaterBox(box_edge=edge, cutoff=cutoff)
    z = [a.element.atomic_number for a in test.topology.atoms()]
    pos = np.asarray(test.positions.value_in_unit(u.nanometer))
    box = np.asarray(
        [v.value_in_unit(u.nanometer) for v in test.system.getDefaultPeriodicBoxVectors()]
    )
    return z, pos, box


def context_for(force, n_particles, platform, box_nm=None, extra=(), properties=None):
    """An OpenMM Context of ``force`` (and ``extra`` forces) on n carbon-mass particles."""
    import openmm

    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
    system.addForce(force)
    for f in extra:
        system.addForce(f)
    integrator = openmm.VerletIntegrator(0.0005)
    platform = openmm.Platform.getPlatformByName(platform)
    return openmm.Context(system, integrator, platform, properties or {})


def openmm_energy_forces(context, positions_nm, groups=-1):
    """Energy (kJ/mol) and forces (kJ/mol/nm) of a Context at these positions."""
    import numpy as np
    import openmm.unit as u

    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (
        state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole),
        np.asarray(state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)),
    )
