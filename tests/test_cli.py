"""The command line, driven through main([...])."""

from tensornet_openmm import TensorNet, save_model
from tensornet_openmm.cli import main


def test_info_prints_hyperparameters(tmp_path, capsys):
    save_model(TensorNet(hidden_channels=8, num_layers=1, num_rbf=4, max_z=10), tmp_path / "m.pt")
    assert main(["info", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "hidden_channels: 8" in out and "parameters:" in out


def test_info_missing_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_selftest(capsys):
    assert main(["selftest"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == 2
