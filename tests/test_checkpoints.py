"""Our checkpoint format and the reference importer's error handling."""

import pytest
import torch
from helpers import energy_forces, random_molecule

from tensornet_openmm import TensorNet, load_model, save_model


def test_round_trip_is_weights_only_and_exact(tmp_path):
    model = TensorNet(
        hidden_channels=16, num_layers=1, num_rbf=8, max_z=10, atomref_size=10, dtype=torch.float64
    )
    with torch.no_grad():
        model.atomref.copy_(torch.randn(10, dtype=torch.float64))
        model.mean.fill_(-3.0)
    path = tmp_path / "model.pt"
    save_model(model, path, metadata={"trained_on": "unit test"})
    payload = torch.load(path, weights_only=True)  # no pickled code needed
    assert payload["config"]["hidden_channels"] == 16
    assert payload["metadata"] == {"trained_on": "unit test"}
    loaded = load_model(path)
    assert loaded.config == model.config
    z, pos = random_molecule(8)
    assert torch.equal(energy_forces(loaded, z, pos)[0], energy_forces(model, z, pos)[0])


def test_loaded_model_converts_to_double(tmp_path):
    save_model(TensorNet(hidden_channels=8, num_layers=1, num_rbf=4, max_z=10), tmp_path / "m.pt")
    model = load_model(tmp_path / "m.pt").double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.mean.dtype == torch.float64


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


class Opaque:
    """A pickled class instance: something weights-only loading refuses."""


def test_pickled_reference_file_needs_explicit_trust(tmp_path):
    path = tmp_path / "ref.ckpt"
    torch.save({"hyper_parameters": {"model": "tensornet"}, "state_dict": {}, "x": Opaque()}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_model(path)


def test_unknown_config_key_is_named(tmp_path):
    model = TensorNet(hidden_channels=8, num_layers=1, num_rbf=4, max_z=10)
    path = tmp_path / "m.pt"
    save_model(model, path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["hiden_channels"] = 3
    torch.save(payload, path)
    with pytest.raises(ValueError, match="hiden_channels.*allowed keys"):
        load_model(path)


def test_unsupported_prior_is_refused(tmp_path):
    from tensornet_openmm.checkpoints import from_reference

    hp = {
        "model": "tensornet",
        "prior_model": "ZBL",
        "embedding_dimension": 8,
        "num_layers": 1,
        "num_rbf": 4,
        "cutoff_upper": 5.0,
        "max_z": 10,
    }
    with pytest.raises(ValueError, match="ZBL"):
        from_reference(hp, {})


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="activation='relu'"):
        TensorNet(activation="relu")
    with pytest.raises(ValueError, match="cutoff_lower"):
        TensorNet(cutoff_lower=5.0, cutoff_upper=4.0)


def test_shipped_model_loads_by_name():
    from tensornet_openmm.checkpoints import shipped_models

    assert "ala2-water-gfn2" in shipped_models()
    model = load_model("ala2-water-gfn2")
    assert model.metadata["elements"] == [1, 6, 7, 8]
    assert "GFN2-xTB" in model.metadata["level_of_theory"]
    assert model.cutoff_upper == 4.5 and not model.training


def test_unknown_model_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"shipped with the package: \['ala2-water-gfn2'"):
        load_model("no-such-model")
