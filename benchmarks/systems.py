"""Benchmark systems built from openmmtools test systems (no downloads)."""

from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import openmm.unit as u


def _quiet_testsystems():
    # openmmtools prints a pymbar/JAX banner on import; keep benchmark tables clean
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools.testsystems as testsystems
    return testsystems


def alanine_dipeptide():
    """22 atoms: atomic numbers and positions (Angstrom)."""
    test = _quiet_testsystems().AlanineDipeptideVacuum()
    z = np.array([a.element.atomic_number for a in test.topology.atoms()])
    return z, np.asarray(test.positions.value_in_unit(u.angstrom))


def water_box(n_atoms: int):
    """A periodic water box of about ``n_atoms`` atoms at liquid density.

    Returns atomic numbers, positions (Angstrom) and box vectors (3, 3) in Angstrom.
    """
    edge_nm = (n_atoms / 3 / 33.4) ** (1 / 3)  # 33.4 molecules per nm^3
    test = _quiet_testsystems().WaterBox(box_edge=edge_nm * u.nanometer, cutoff=0.4 * u.nanometer)
    z = np.array([a.element.atomic_number for a in test.topology.atoms()])
    box = np.array(
        [v.value_in_unit(u.angstrom) for v in test.system.getDefaultPeriodicBoxVectors()]
    )
    return z, np.asarray(test.positions.value_in_unit(u.angstrom)), box


def water_cluster(n_atoms: int):
    """The molecules of a water box, without the box: about ``n_atoms`` atoms."""
    z, pos, _ = water_box(n_atoms)
    return z, pos


def tiled_water_box(n_atoms: int, base_atoms: int = 3000):
    """About ``n_atoms`` atoms of liquid water: a box of at most ``base_atoms`` tiled k^3 times.

    Tiling keeps the liquid structure (and the density) of the equilibrated base box while making
    100,000-atom systems in seconds. Returns atomic numbers, positions and box (Angstrom).
    """
    reps = max(1, int(np.ceil((n_atoms / base_atoms) ** (1 / 3))))
    z, pos, box = water_box(n_atoms / reps**3)
    return np.tile(z, reps**3), tile(pos, box, reps), box * reps


def tile(positions: np.ndarray, box: np.ndarray, reps: int) -> np.ndarray:
    """Positions (N, 3) of a periodic box repeated reps^3 times, copy by copy: (reps^3 N, 3)."""
    shifts = np.array(list(itertools.product(range(reps), repeat=3))) @ box
    return (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
