"""The pinned openmm / openmm-torch / torch stack loads and evaluates a TorchForce."""

import openmm
import pytest
import torch

from tensornet_openmm.forces import make_torch_force


class SquaredDistanceFromOrigin(torch.nn.Module):
    """E = sum_i |r_i|^2 (kJ/mol, r in nm): forces are -2 r."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions * positions).sum()


def _context(force, n, platform):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(1.0)
    system.addForce(force)
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_analytic_torch_force(platform):
    pos = torch.randn(7, 3, dtype=torch.float64)
    context = _context(make_torch_force(SquaredDistanceFromOrigin()), 7, platform)
    context.setPositions(pos.numpy())
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = torch.tensor(
        state.getForces(asNumpy=True).value_in_unit(
            openmm.unit.kilojoule_per_mole / openmm.unit.nanometer
        )
    )
    assert energy == pytest.approx(float((pos * pos).sum()), rel=1e-5)
    torch.testing.assert_close(forces, -2 * pos, rtol=1e-5, atol=1e-5)


def test_force_properties_and_errors():
    force = make_torch_force(
        SquaredDistanceFromOrigin(),
        cuda_graphs=False,
        force_group=3,
        global_parameters=[("scale", 0.5)],
    )
    assert force.getProperties()["useCUDAGraphs"] == "false"
    assert force.getForceGroup() == 3
    assert force.getGlobalParameterName(0) == "scale"
    with pytest.raises(ValueError, match="force_group=40"):
        make_torch_force(SquaredDistanceFromOrigin(), force_group=40)
