"""The unit contract: factors derived from exact CODATA 2018 constants."""

import pytest

from tensornet_openmm import units


def test_ev_to_kj_per_mol_is_codata_2018():
    assert units.EV_TO_KJ_PER_MOL == pytest.approx(96.48533212331, rel=1e-12)
    assert units.KJ_PER_MOL_TO_EV * units.EV_TO_KJ_PER_MOL == pytest.approx(1.0, rel=1e-15)


def test_force_factor_combines_energy_and_length():
    assert units.EV_PER_ANGSTROM_TO_KJ_PER_MOL_PER_NM == pytest.approx(964.8533212331, rel=1e-12)
    assert units.NM_TO_ANGSTROM * units.ANGSTROM_TO_NM == 1.0
