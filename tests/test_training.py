"""Data set format and training: a tiny end-to-end fit on the committed GFN2-xTB data."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tensornet_openmm import load_model
from tensornet_openmm.cli import main
from tensornet_openmm.data import make_dataset, read_dataset, write_dataset
from tensornet_openmm.training import TrainConfig, fit_reference_energies

DATA = Path(__file__).resolve().parents[1] / "data" / "ala2-water-gfn2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 frames of the training set (alanine dipeptide and water), as a data set file."""
    data = read_dataset(DATA / "train.npz")
    pick = np.r_[0:8, 1200:1208, len(data) - 8 : len(data)]  # ala2, clusters, periodic boxes
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    write_dataset(data.subset(pick), path)
    return path


def test_dataset_round_trip_and_errors(tmp_path):
    frames = [
        {"atomic_numbers": [8, 1, 1], "positions": np.eye(3), "energy": -1.5,
         "forces": np.ones((3, 3)), "box": np.eye(3) * 10, "total_charge": 1.0},
        {"atomic_numbers": [1, 1], "positions": np.eye(3)[:2], "energy": -0.5,
         "forces": np.zeros((2, 3))},
    ]  # fmt: skip
    write_dataset(make_dataset(frames), tmp_path / "d.npz")
    data = read_dataset(tmp_path / "d.npz")
    assert len(data) == 2 and data.elements == [1, 8]
    assert data.frame(1)["box"] is None and data.frame(0)["total_charge"] == 1.0
    np.testing.assert_array_equal(data.frame(1)["positions"], np.eye(3)[:2])
    np.savez(tmp_path / "bad.npz", n_atoms=[3], atomic_numbers=[8, 1, 1], positions=np.eye(3),
             energy=[0.0])  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks \['forces'\]"):
        read_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", n_atoms=[3], atomic_numbers=[8, 1], positions=np.eye(3),
             energy=[0.0], forces=np.eye(3))  # fmt: skip
    with pytest.raises(ValueError, match=r"atomic_numbers has shape \(2,\), expected \(3,\)"):
        read_dataset(tmp_path / "shape.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dataset(tmp_path / "missing.npz")


def test_reference_energies_reproduce_additive_energies():
    rng = np.random.default_rng(0)
    true = {1: -13.6, 6: -1030.0, 8: -2040.0}
    frames = []
    for _ in range(12):
        z = rng.choice([1, 6, 8], size=rng.integers(2, 9))
        energy = sum(true[int(v)] for v in z)
        frames.append({"atomic_numbers": z, "positions": rng.normal(size=(len(z), 3)),
                       "energy": energy, "forces": np.zeros((len(z), 3))})  # fmt: skip
    atomref = fit_reference_energies(make_dataset(frames), 10)
    for z, value in true.items():
        assert atomref[z] == pytest.approx(value, rel=1e-10)


def test_tiny_training_end_to_end(tiny, tmp_path):
    config = {
        "train": str(tiny),
        "validation": str(tiny),
        "test": [str(tiny)],
        "model": {"hidden_channels": 16, "num_layers": 1, "num_rbf": 8, "cutoff_upper": 4.5,
                  "max_z": 10},  # fmt: skip
        "epochs": 8, "batch_size": 4, "lr": 0.005, "seed": 1, "output": "out",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--output", str(tmp_path / "out")]) == 0
    history = np.genfromtxt(tmp_path / "out" / "history.csv", delimiter=",", names=True)
    assert history["val_loss"][1:].min() < 0.8 * history["val_loss"][0]  # the loss falls
    model = load_model(tmp_path / "out" / "best.pt")
    assert model.metadata["elements"] == [1, 6, 7, 8]
    assert model.metadata["validation"]["force_mae_mev_per_a"] > 0
    assert model.atomref[8] != 0  # reference energies fitted and stored
    # fine-tuning starts from the checkpoint and keeps its architecture
    assert main(["train", str(path), "--output", str(tmp_path / "fine"), "--epochs", "1",
                 "--init-from", str(tmp_path / "out" / "best.pt")]) == 0  # fmt: skip
    tuned = load_model(tmp_path / "fine" / "best.pt")
    assert tuned.config == model.config
    torch.testing.assert_close(tuned.atomref, model.atomref)


def test_bad_training_configs_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train": "x.npz", "learning_rate": 0.1}))
    assert main(["train", str(path)]) == 2
    assert "unknown training configuration key(s) ['learning_rate']" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"train": "x.npz", "model": {"channels": 3}}))
    assert main(["train", str(path)]) == 2
    assert "['channels']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig.from_dict({"train": "x.npz", "epochs": 0})
    path.write_text(yaml.safe_dump({"train": "missing.npz"}))
    assert main(["train", str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err
