"""Benchmark systems built from openmmtools test systems (no downloads)."""

from __future__ import annotations

import contextlib
import io

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
