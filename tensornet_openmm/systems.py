"""OpenMM Systems with a TensorNet: the whole system ML, or an ML region in an MM System.

Mechanical embedding, as openmm-ml defines it: the ML region's internal MM terms (bonded terms whose
atoms are all ML, ML-ML nonbonded pairs) are removed and replaced by the TensorNet; every term that
involves an MM atom stays MM.

With ``interpolate=True`` the global parameter ``lambda_interpolate`` (1 by default) gives
E = lambda E_ML + (1 - lambda) E_MM(ML region) + E_MM(rest) without putting the TorchForce inside
a CustomCVForce, so CUDA graphs still apply: lambda scales the TorchForce directly (a TorchForce
global parameter), and the ML region's MM terms (its bonded terms, and its nonbonded pairs as
plain Coulomb + Lennard-Jones bonds, exactly what NonbondedForce exceptions compute) sit in one
CustomCVForce scaled by (1 - lambda). The NonbondedForce itself, PME included, is untouched apart
from the ML-ML exceptions. dE/dlambda comes from ``State.getEnergyParameterDerivatives()``.
"""

from __future__ import annotations

import copy
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np
import openmm
import openmm.unit as u

LAMBDA = "lambda_interpolate"
ONE_4PI_EPS0 = 138.93545764438198  # OpenMM's Coulomb constant, kJ nm / (mol e^2)

# force type -> XML container of its terms; a term is dropped or kept by the atoms it names
_BONDED = {
    "HarmonicBondForce": "Bonds",
    "HarmonicAngleForce": "Angles",
    "PeriodicTorsionForce": "Torsions",
    "RBTorsionForce": "Torsions",
    "CMAPTorsionForce": "Torsions",
    "CustomBondForce": "Bonds",
    "CustomAngleForce": "Angles",
    "CustomTorsionForce": "Torsions",
    "CustomCompoundBondForce": "Bonds",
}
# forces that involve no ML-ML double counting: kept unchanged
_KEPT = {
    "CMMotionRemover",
    "MonteCarloBarostat",
    "MonteCarloAnisotropicBarostat",
    "MonteCarloFlexibleBarostat",
    "MonteCarloMembraneBarostat",
    "AndersenThermostat",
    "CustomExternalForce",
    "CustomCentroidBondForce",
    "RMSDForce",
}
_ATOM_ATTRIBUTE = re.compile(r"^(p\d+|a\d|b\d)$")


def _atomic_numbers(topology, atoms: Sequence[int]) -> list[int]:
    all_atoms = list(topology.atoms())
    numbers = []
    for i in atoms:
        element = all_atoms[i].element
        if element is None:
            a = all_atoms[i]
            raise ValueError(
                f"atom {i} ({a.name} in {a.residue.name}{a.residue.id}) has no element (a virtual "
                "site or extra particle?); it cannot be part of the ML region"
            )
        numbers.append(element.atomic_number)
    return numbers


def _box_nm(topology):
    vectors = topology.getPeriodicBoxVectors()
    return None if vectors is None else np.asarray(vectors.value_in_unit(u.nanometer))


def create_ml_system(
    topology,
    model,
    total_charge: float = 0.0,
    positions=None,
    remove_cmm_motion: bool = True,
    cuda_graphs: bool | None = None,
    **force_options,
):
    """A System in which TensorNet describes every atom of ``topology``.

    Periodic when the topology has a box (its box becomes the default box). Masses come from the
    elements. ``positions`` (recommended) size the pair capacity for CUDA graphs; other keyword
    arguments go to :func:`tensornet_openmm.create_force`.
    """
    from .forces import create_force

    atoms = list(range(topology.getNumAtoms()))
    numbers = _atomic_numbers(topology, atoms)
    system = openmm.System()
    daltons = {}  # each element's mass once: units cost microseconds a particle
    for atom in topology.atoms():
        mass = daltons.get(atom.element)
        if mass is None:
            mass = daltons[atom.element] = atom.element.mass.value_in_unit(u.dalton)
        system.addParticle(mass)
    box = _box_nm(topology)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    force = create_force(
        model, numbers, None, box is not None, total_charge, cuda_graphs,
        positions=positions, box_vectors=box, **force_options,
    )  # fmt: skip
    system.addForce(force)
    if remove_cmm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system


def select_atoms(topology, ml_atoms) -> list[int]:
    """Sorted atom indices from a list of indices or an mdtraj selection string."""
    n = topology.getNumAtoms()
    if isinstance(ml_atoms, str):
        import mdtraj

        try:
            selected = mdtraj.Topology.from_openmm(topology).select(ml_atoms)
        except Exception as err:  # mdtraj raises several types for bad syntax
            raise ValueError(f"cannot parse the ML selection {ml_atoms!r}: {err}") from err
        atoms = sorted(int(i) for i in selected)
        if not atoms:
            raise ValueError(f"the ML selection {ml_atoms!r} matches no atoms")
        return atoms
    atoms = sorted({int(i) for i in ml_atoms})
    if not atoms:
        raise ValueError("ml_atoms is empty: select at least one atom for the ML region")
    if atoms[0] < 0 or atoms[-1] >= n:
        raise ValueError(f"ml_atoms must be between 0 and {n - 1}; got {atoms[0]}..{atoms[-1]}")
    return atoms


def _cut_bonds(topology, ml: set[int]) -> list[str]:
    cut = []
    for bond in topology.bonds():
        a, b = bond[0], bond[1]
        if (a.index in ml) != (b.index in ml):
            inside, outside = (a, b) if a.index in ml else (b, a)
            cut.append(
                f"{inside.residue.name}{inside.residue.id}:{inside.name} (ML, {inside.index}) - "
                f"{outside.residue.name}{outside.residue.id}:{outside.name} (MM, {outside.index})"
            )
    return cut


def _split_terms(force, ml: set[int]):
    """Two copies of a bonded force: terms touching an MM atom, and terms entirely ML."""
    root = ET.fromstring(openmm.XmlSerializer.serialize(force))
    container = root.find(_BONDED[force.__class__.__name__])
    terms = list(container) if container is not None else []
    inside = [
        all(int(v) in ml for k, v in t.attrib.items() if _ATOM_ATTRIBUTE.match(k)) for t in terms
    ]
    parts = []
    for keep_ml in (False, True):
        for term, is_ml in zip(terms, inside, strict=True):
            container.remove(term)
            if is_ml == keep_ml:
                container.append(term)
        parts.append(openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode")))
        for term in list(container):
            container.remove(term)
        container.extend(terms)
    return parts[0], parts[1], sum(inside)


def _ml_pairs_force(nonbonded, ml: list[int], periodic: bool):
    """ML-ML pairs of a NonbondedForce as plain Coulomb + LJ bonds (what its exceptions compute)."""
    pairs = openmm.CustomBondForce(f"{ONE_4PI_EPS0}*qq/r + 4*eps*((sig/r)^12 - (sig/r)^6)")
    for name in ("qq", "sig", "eps"):
        pairs.addPerBondParameter(name)
    exceptions = {}
    for k in range(nonbonded.getNumExceptions()):
        i, j, qq, sig, eps = nonbonded.getExceptionParameters(k)
        exceptions[(min(i, j), max(i, j))] = (qq, sig, eps)
    params = [nonbonded.getParticleParameters(i) for i in ml]
    for a, i in enumerate(ml):
        qi, si, ei = params[a]
        for b in range(a + 1, len(ml)):
            j = ml[b]
            if (i, j) in exceptions:
                qq, sig, eps = exceptions[(i, j)]
            else:
                qj, sj, ej = params[b]
                qq, sig, eps = qi * qj, (si + sj) / 2, (ei * ej).sqrt()
            if qq.value_in_unit(u.elementary_charge**2) != 0 or eps.value_in_unit(
                u.kilojoule_per_mole
            ):
                pairs.addBond(i, j, [qq, sig, eps])
    pairs.setUsesPeriodicBoundaryConditions(periodic)
    return pairs


def create_mixed_system(
    topology,
    system,
    ml_atoms,
    model,
    total_charge: float = 0.0,
    interpolate: bool = False,
    remove_constraints: bool = True,
    allow_cut_bonds: bool = False,
    positions=None,
    cuda_graphs: bool | None = None,
    lambda_name: str = LAMBDA,
    **force_options,
):
    """An ML/MM System: TensorNet for ``ml_atoms``, the MM ``system`` for everything else.

    Parameters
    ----------
    topology : openmm.app.Topology
    system : openmm.System
        The MM System for the whole topology; it is copied, never modified.
    ml_atoms : list of int or str
        Atom indices, or an mdtraj selection string (for example ``"resname LIG"``).
    model : TensorNet, str or Path
    total_charge : float
        Total charge of the ML region, in e.
    interpolate : bool
        Add the global parameter ``lambda_name`` (see the module docstring).
    remove_constraints : bool
        Remove constraints between two ML atoms (TensorNet gives their bonds full flexibility).
    allow_cut_bonds : bool
        A covalent bond between an ML and an MM atom is an error unless this is True (then a
        warning naming the bonds).
    positions : Quantity or array (nm), optional
        All positions, to size the pair capacity for CUDA graphs.
    cuda_graphs, **force_options
        Passed to :func:`tensornet_openmm.create_force`.
    """
    from .forces import create_force

    if topology.getNumAtoms() != system.getNumParticles():
        raise ValueError(
            f"the topology has {topology.getNumAtoms()} atoms but the System has "
            f"{system.getNumParticles()} particles; they must describe the same system"
        )
    atoms = select_atoms(topology, ml_atoms)
    ml = set(atoms)
    numbers = _atomic_numbers(topology, atoms)
    names = [f.__class__.__name__ for f in system.getForces()]
    unknown = [n for n in names if n not in _BONDED and n not in _KEPT]
    unknown = [n for n in unknown if n not in ("NonbondedForce", "CustomNonbondedForce")]
    if unknown:
        raise ValueError(
            f"create_mixed_system does not know how to split {sorted(set(unknown))} between ML "
            "and MM (implicit solvent, polarisable and other many-body forces would be counted "
            "wrongly); remove them from the MM System or describe the whole system with ML"
        )
    if names.count("NonbondedForce") > 1:
        raise ValueError(
            f"the System has {names.count('NonbondedForce')} NonbondedForces; "
            "create_mixed_system supports one"
        )

    cut = _cut_bonds(topology, ml)
    if cut:
        message = (
            f"the ML region cuts {len(cut)} covalent bond(s) between ML and MM atoms: "
            + "; ".join(cut[:10])
            + ("; ..." if len(cut) > 10 else "")
        )
        if not allow_cut_bonds:
            raise ValueError(
                message
                + ". Pass allow_cut_bonds=True (the runner: ml.allow_cut_bonds: true) if this "
                "is intended."
            )
        warnings.warn(message, stacklevel=2)

    periodic = system.usesPeriodicBoundaryConditions()
    mixed = openmm.System()
    for i in range(system.getNumParticles()):
        mixed.addParticle(system.getParticleMass(i))
        if system.isVirtualSite(i):
            mixed.setVirtualSite(i, copy.deepcopy(system.getVirtualSite(i)))
    mixed.setDefaultPeriodicBoxVectors(*system.getDefaultPeriodicBoxVectors())
    for k in range(system.getNumConstraints()):
        i, j, distance = system.getConstraintParameters(k)
        if not (remove_constraints and i in ml and j in ml):
            mixed.addConstraint(i, j, distance)

    region_terms = []  # MM terms of the ML region, scaled by (1 - lambda) when interpolating
    for force in system.getForces():
        name = force.__class__.__name__
        if name in _BONDED:
            kept, inside, n_inside = _split_terms(force, ml)
            mixed.addForce(kept)
            if n_inside:
                region_terms.append(inside)
        elif name == "NonbondedForce":
            nonbonded = copy.deepcopy(force)
            if interpolate:
                region_terms.append(_ml_pairs_force(force, atoms, periodic))
            for a, i in enumerate(atoms):
                for j in atoms[a + 1 :]:
                    nonbonded.addException(i, j, 0.0, 1.0, 0.0, True)
            mixed.addForce(nonbonded)
        elif name == "CustomNonbondedForce":
            custom = copy.deepcopy(force)
            if interpolate:
                if force.getNumInteractionGroups() > 0:
                    raise ValueError(
                        "interpolate=True with a CustomNonbondedForce that has interaction "
                        "groups is not supported"
                    )
                inside = copy.deepcopy(force)
                inside.addInteractionGroup(atoms, atoms)
                inside.setUseLongRangeCorrection(False)
                region_terms.append(inside)
            excluded = set()
            for k in range(custom.getNumExclusions()):
                i, j = custom.getExclusionParticles(k)
                excluded.add((min(i, j), max(i, j)))
            for a, i in enumerate(atoms):
                for j in atoms[a + 1 :]:
                    if (i, j) not in excluded:
                        custom.addExclusion(i, j)
            mixed.addForce(custom)
        else:
            mixed.addForce(copy.deepcopy(force))

    if interpolate and region_terms:
        terms = "+".join(f"mm{k}" for k in range(len(region_terms)))
        region = openmm.CustomCVForce(f"(1-{lambda_name})*({terms})")
        region.addGlobalParameter(lambda_name, 1.0)
        region.addEnergyParameterDerivative(lambda_name)
        for k, term in enumerate(region_terms):
            region.addCollectiveVariable(f"mm{k}", term)
        region.setName("MM terms of the ML region")
        mixed.addForce(region)

    box = None
    if periodic:
        box = np.asarray([v.value_in_unit(u.nanometer) for v in
                          system.getDefaultPeriodicBoxVectors()])  # fmt: skip
    mixed.addForce(
        create_force(
            model,
            numbers,
            atoms,
            periodic,
            total_charge,
            cuda_graphs,
            positions=positions,
            box_vectors=box,
            lambda_parameter=lambda_name if interpolate else None,
            **force_options,
        )  # fmt: skip
    )
    return mixed
