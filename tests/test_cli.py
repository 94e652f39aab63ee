"""The command line, driven through main([...])."""

from tensornet_openmm import TensorNet, save_model
from tensornet_openmm.cli import main
from tensornet_openmm.nn import kernels


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


def test_info_shows_elements_and_cutoff(tmp_path, capsys):
    model = TensorNet(hidden_channels=8, num_layers=1, num_rbf=4, max_z=10, cutoff_upper=4.0)
    model.metadata["elements"] = [1, 8]
    save_model(model, tmp_path / "m.pt")
    assert main(["info", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "cutoff: 4.0 A" in out and "elements: [1, 8]" in out
    model.metadata["validation"] = {"force_mae_mev_per_a": 23.766861901963523, "frames": 400}
    save_model(model, tmp_path / "m.pt")
    assert main(["info", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "  validation:\n    force_mae_mev_per_a: 23.77\n    frames: 400\n" in out


def test_export_writes_a_standalone_module(tmp_path, capsys):
    import torch

    from tensornet_openmm.export import TensorNetForce, read_metadata

    model = TensorNet(hidden_channels=8, num_layers=1, num_rbf=4, max_z=10, dtype=torch.float64)
    model.metadata["elements"] = [1, 8]
    save_model(model, tmp_path / "m.pt")
    out = tmp_path / "water.pt"
    argv = ["export", str(tmp_path / "m.pt"), "-o", str(out), "--atomic-numbers", "8,1,1"]
    assert main(argv) == 0
    assert read_metadata(out)["atomic_numbers"] == [8, 1, 1]
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.096, 0.0, 0.0], [-0.024, 0.093, 0.0]],
                             dtype=torch.float64)  # fmt: skip
    energy = torch.jit.load(str(out))(positions)
    expected = TensorNetForce(model, [8, 1, 1])(positions)[0]
    torch.testing.assert_close(energy, expected)
    assert main([*argv[:-1], "8,1,7"]) == 2  # nitrogen is not among the model's elements
    assert "contains [7]" in capsys.readouterr().err
    assert main([*argv[:-1], "O,H,H"]) == 2
    assert "--atomic-numbers 'O,H,H': give the ML atoms' atomic numbers as integers" in (
        capsys.readouterr().err
    )
    tabulated = tmp_path / "tables.pt"
    argv = [*argv[:3], str(tabulated), *argv[4:], "--radial-tables", "1e-5"]
    fused = kernels.wanted() and kernels.load()
    for extra in ([], ["--fused-kernels"] if fused else []):
        assert main([*argv, *extra]) == 0
        assert read_metadata(tabulated)["radial_tables"].startswith("radial tables: ")
        energy = kernels.jit_load(tabulated)(positions)
        torch.testing.assert_close(energy, expected, rtol=1e-5, atol=1e-6)
