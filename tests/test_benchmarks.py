"""The MD benchmark compares like with like: every ML route computes the same energy."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_md = pytest.importorskip("bench_md")
pytest.importorskip("torchmdnet")


@pytest.mark.parametrize("system", ["ala2", "water-150"])
def test_reference_route_computes_our_energy(tmp_path, system):
    import openmm
    import openmm.unit as u

    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    topology, positions, mm_system, ml_atoms = bench_md.build_system(system)
    energies = {}
    for route in ("ours", "reference"):
        spec = {"checkpoint": str(checkpoint), "graphs": "-"}
        routed = bench_md.route_system(route, spec, topology, positions, mm_system, ml_atoms)
        # a periodic box stays periodic whichever force says so (the reference route once lost it)
        assert routed.usesPeriodicBoundaryConditions() == (
            topology.getPeriodicBoxVectors() is not None
        )
        context = openmm.Context(
            routed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
        )
        context.setPositions(positions)
        state = context.getState(getEnergy=True)
        energies[route] = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    assert energies["reference"] == pytest.approx(energies["ours"], rel=1e-5, abs=1e-3)
