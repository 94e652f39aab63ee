"""The unit contract of tensornet_openmm.

The model works in Angstrom and eV (the units of the reference implementation and its data).
OpenMM works in nm and kJ/mol. Every conversion factor used anywhere in the package is defined
here, derived from exact CODATA 2018 values rather than typed in.

Imports neither torch nor openmm.
"""

# Exact SI defining constants (CODATA 2018).
ELEMENTARY_CHARGE = 1.602176634e-19  # C
AVOGADRO = 6.02214076e23  # 1/mol

#: eV -> kJ/mol: e * N_A / 1000 = 96.48533212331...
EV_TO_KJ_PER_MOL = ELEMENTARY_CHARGE * AVOGADRO / 1000.0
KJ_PER_MOL_TO_EV = 1.0 / EV_TO_KJ_PER_MOL

#: The reference implementation's OpenMM examples used 96.4916 (not a CODATA value).
#: Only for reproducing numbers produced with those wrappers; never used by this package.
REFERENCE_WRAPPER_EV_TO_KJ_PER_MOL = 96.4916

NM_TO_ANGSTROM = 10.0
ANGSTROM_TO_NM = 0.1

#: Forces: eV/A -> kJ/mol/nm.
EV_PER_ANGSTROM_TO_KJ_PER_MOL_PER_NM = EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM
