"""The MD runner: the shipped simulations, resume after SIGKILL, and clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch
from helpers import small_model

from tensornet_openmm import save_model
from tensornet_openmm.checkpoints import shipped_models
from tensornet_openmm.cli import main
from tensornet_openmm.export import read_metadata
from tensornet_openmm.nn import kernels

ROOT = Path(__file__).resolve().parents[1]
SIMULATIONS = ROOT / "simulations"
QUICK = ["--no-progress", "--set", "equilibration_steps=5", "--set", "minimize.max_iterations=20",
         "--set", "report_interval=5", "--set", "checkpoint_interval=10"]  # fmt: skip


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The shipped model when the package has one; otherwise a small random float32 model."""
    if "ala2-water-gfn2" in shipped_models():
        return "ala2-water-gfn2"
    model = small_model(cutoff=4.5, dtype=torch.float32)
    model.metadata["elements"] = [1, 6, 7, 8]
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, path)
    return str(path)


def csv_steps(folder):
    return np.genfromtxt(folder / "energies.csv", delimiter=",", names=True)["step"].astype(int)


@pytest.mark.parametrize("name", ["ala2-vacuum", "ala2-water", "water-box"])
def test_shipped_simulations_run(name, model_file, tmp_path):
    out = tmp_path / name
    argv = ["run", str(SIMULATIONS / f"{name}.yaml"), "--model", model_file, "--steps", "10",
            "--output", str(out), *QUICK]  # fmt: skip
    assert main(argv) == 0
    config = (out / "config.resolved.yaml").read_text()
    assert "production_steps: 10" in config
    assert json.loads((out / "model.json").read_text())["metadata"]["elements"] == [1, 6, 7, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 2 and np.isfinite(summary["final_energy_kj_per_mol"])
    trajectory = next(out.glob("trajectory.*"))
    top = SIMULATIONS / "alanine-dipeptide.pdb" if name == "ala2-vacuum" else None
    frames = (
        mdtraj.load(str(trajectory), top=str(top))
        if top
        else mdtraj.load(str(trajectory))
        if trajectory.suffix == ".h5"
        else None
    )
    if frames is not None:
        assert len(frames) == 2
    assert list(csv_steps(out)) == [5, 10]


def test_exported_module_runs_pure_ml(model_file, tmp_path, capsys):
    import openmm.app as app

    pdb = app.PDBFile(str(SIMULATIONS / "alanine-dipeptide.pdb"))
    numbers = ",".join(str(a.element.atomic_number) for a in pdb.topology.atoms())
    exported = tmp_path / "ala2.pt"
    assert main(["export", model_file, "-o", str(exported), "--atomic-numbers", numbers]) == 0
    lean = tmp_path / "ala2-low-memory.pt"
    assert main(["export", model_file, "-o", str(lean), "--atomic-numbers", numbers,
                 "--low-memory"]) == 0  # fmt: skip
    assert read_metadata(lean)["low_memory"] and not read_metadata(exported)["low_memory"]
    out = tmp_path / "run"
    argv = ["run", str(SIMULATIONS / "ala2-vacuum.yaml"), "--model", str(exported), "--steps",
            "10", "--output", str(out), *QUICK]  # fmt: skip
    assert main(argv) == 0
    assert "exported module" in (out / "run.log").read_text()
    # its pair list is dynamic: a CUDA graph would refuse the search's host synchronisation
    import openmmtorch

    from tensornet_openmm.runner import build, load_config

    config = load_config(SIMULATIONS / "ala2-vacuum.yaml", [{"model": str(exported)}])
    *_, system, description = build(config, log=lambda _: None)
    assert "dynamic pair list (no CUDA graphs)" in description
    (force,) = [openmmtorch.TorchForce.cast(f) for f in system.getForces()
                if openmmtorch.TorchForce.isinstance(f)]  # fmt: skip
    assert force.getProperties()["useCUDAGraphs"] == "false"
    water = ["run", str(SIMULATIONS / "water-box.yaml"), "--model", str(exported), "--output",
             str(tmp_path / "w"), *QUICK]  # fmt: skip
    assert main(water) == 2
    assert "export it again" in capsys.readouterr().err


def _run_args(model_file, out, steps):
    return ["run", str(SIMULATIONS / "ala2-vacuum.yaml"), "--model", model_file, "--steps",
            str(steps), "--output", str(out), "--platform", "Reference", *QUICK,
            "--set", "trajectory=trajectory.xtc"]  # fmt: skip


def test_resume_after_sigkill_loses_and_repeats_nothing(model_file, tmp_path):
    steps = 200
    reference = tmp_path / "uninterrupted"
    assert main(_run_args(model_file, reference, steps)) == 0

    killed = tmp_path / "killed"
    code = "import sys; from tensornet_openmm.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *_run_args(model_file, killed, steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # kill at an arbitrary moment past the first checkpoints (however long a loaded machine
    # takes to get there: the deadline only guards against a hang)
    deadline = time.time() + 1800
    csv = killed / "energies.csv"
    while not (csv.exists() and len(csv.read_text().splitlines()) > 8):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run wrote no 8 reports in 30 minutes"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main([*_run_args(model_file, killed, steps), "--resume"]) == 0

    assert list(csv_steps(killed)) == list(range(5, steps + 1, 5))  # none lost, none repeated
    top = str(SIMULATIONS / "alanine-dipeptide.pdb")
    a = mdtraj.load(str(reference / "trajectory.xtc"), top=top)
    b = mdtraj.load(str(killed / "trajectory.xtc"), top=top)
    assert len(a) == len(b) == steps // 5
    np.testing.assert_allclose(b.xyz, a.xyz, atol=2e-3)  # the same trajectory (xtc precision)
    np.testing.assert_allclose(b.time, a.time)


def test_run_errors_are_clear(model_file, tmp_path, capsys):
    base = ["run", str(SIMULATIONS / "ala2-vacuum.yaml"), "--model", model_file, *QUICK]
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main([*base, "--set", "integratr.timestep_fs=1"]) == 2
    assert "unknown configuration key 'integratr'" in capsys.readouterr().err
    assert main([*base, "--set", "ml.low_memory=ture"]) == 2
    assert "'ml.low_memory' must be true or false, not 'ture'" in capsys.readouterr().err
    assert main([*base, "--set", "ml.radial_tables=fine"]) == 2
    assert (
        "'ml.radial_tables' must be true, false or a number, not 'fine'" in capsys.readouterr().err
    )
    assert main([*base, "--set", "ml.radial_tables=2", "--output", str(tmp_path / "t")]) == 2
    assert "radial table tolerance 2.0 must lie between 0 and 1" in capsys.readouterr().err
    assert main([*base, "--set", "integrator.step=1", "--output", str(tmp_path / "a")]) == 2
    assert "allowed keys in integrator" in capsys.readouterr().err
    assert main([*base, "--set", "system.pdb=missing.pdb", "--output", str(tmp_path / "b")]) == 2
    assert "missing.pdb' does not exist" in capsys.readouterr().err
    argv = [*base, "--set", "ml.atoms=resname LIG", "--output", str(tmp_path / "c")]
    assert main(argv) == 2
    assert "matches no atoms" in capsys.readouterr().err

    narrow = small_model(cutoff=4.5, dtype=torch.float32)
    narrow.metadata["elements"] = [1, 6, 8]
    save_model(narrow, tmp_path / "no-nitrogen.pt")
    assert main([*base, "--model", str(tmp_path / "no-nitrogen.pt"), "--output",
                 str(tmp_path / "d")]) == 2  # fmt: skip
    assert "contains [7]" in capsys.readouterr().err
    wide = small_model(cutoff=7.0, dtype=torch.float32)
    save_model(wide, tmp_path / "wide.pt")
    water = ["run", str(SIMULATIONS / "water-box.yaml"), "--model", str(tmp_path / "wide.pt"),
             "--output", str(tmp_path / "e"), *QUICK]  # fmt: skip
    assert main(water) == 2
    assert "at least twice the cutoff" in capsys.readouterr().err

    blow = tmp_path / "blow"  # ML/MM water with a 20 fs step and no minimisation: NaN
    argv = ["run", str(SIMULATIONS / "ala2-water.yaml"), "--model", model_file, *QUICK,
            "--set", "integrator.timestep_fs=20", "--set", "minimize.enabled=false",
            "--set", "equilibration_steps=0",
            "--steps", "200", "--output", str(blow)]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "Likely causes" in err and "checkpoint.json" in err
    assert (blow / "energies.csv").exists() and (blow / "checkpoint.json").exists()
    assert main(argv) == 3  # an existing run is not overwritten without --resume
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("integrator.timestep_fs=-1", "integrator.timestep_fs=-1 must be more than 0"),
        ("integrator.temperature_k=abc", "integrator.temperature_k='abc' must be a number"),
        ("seed=1.5", "seed=1.5 must be an integer"),
        ("seed=true", "seed=True must be an integer"),
        ("equilibration_steps=-3", "equilibration_steps=-3 must be at least 0"),
        ("minimize.max_iterations=-5", "minimize.max_iterations=-5 must be at least 0"),
        ("ml.total_charge=abc", "ml.total_charge='abc' must be a number"),
        ("prepare.padding_nm=.nan", "prepare.padding_nm=nan must be a number"),
        ("precision=half", "precision='half' must be single, mixed or double"),
        ("trajectory=5", "trajectory=5 must be text"),
        ("system.pdb=5", "system.pdb=5 must be text"),
        ("ml.atoms=5", "ml.atoms=5 must be 'all', an mdtraj selection"),
        ("prepare.forcefield=5", "prepare.forcefield=5 must be a list of OpenMM force field"),
        ("output.folder=x", "'output' is one value, not a mapping: set output itself"),
        ("ml.cuda_graphs=maybe", "ml.cuda_graphs='maybe' must be true, false or auto"),
    ],
)
def test_configuration_values_are_checked_before_the_run(override, message):
    from tensornet_openmm.runner import load_config, parse_override

    with pytest.raises(ValueError) as err:
        load_config(SIMULATIONS / "ala2-vacuum.yaml", [parse_override(override)])
    assert message in str(err.value)


def test_configuration_numbers_given_as_text_become_numbers():
    from tensornet_openmm.runner import load_config, parse_override

    overrides = ["integrator.timestep_fs=2e0", "equilibration_steps=1e3", "ml.atoms=[0, 1]",
                 "prepare.forcefield=amber14-all.xml"]  # fmt: skip
    config = load_config(SIMULATIONS / "ala2-vacuum.yaml", [parse_override(o) for o in overrides])
    assert config["integrator"]["timestep_fs"] == 2.0  # YAML reads 2e0 as text
    assert config["equilibration_steps"] == 1000 and isinstance(config["equilibration_steps"], int)
    assert config["ml"]["atoms"] == [0, 1]
    assert config["prepare"]["forcefield"] == ["amber14-all.xml"]


def test_cuda_graphs_auto_follows_the_ml_region_size(model_file, monkeypatch):
    """ml.cuda_graphs: auto (the default) gives a small region graphs and a fixed pair list and a
    large one neither, and a CUDA run's log says why it has no graphs."""
    from tensornet_openmm import forces
    from tensornet_openmm.runner import _graphs_note, build, load_config

    def built(*overrides):
        config = load_config(SIMULATIONS / "water-box.yaml", [{"model": model_file}, *overrides])
        system = build(config, log=lambda _: None)[3]
        return config, system

    config, system = built()
    assert config["ml"]["cuda_graphs"] == "auto" and system.getNumParticles() < 1000
    assert len(forces.fixed_pair_lists(system, "CUDA")) == 1
    assert _graphs_note(config, forces.fixed_pair_lists(system, "CUDA"), "CUDA") == ""
    config, system = built({"ml": {"cuda_graphs": False}})
    assert "CUDA graphs off (ml.cuda_graphs: false)" in _graphs_note(
        config, forces.fixed_pair_lists(system, "CUDA"), "CUDA"
    )
    monkeypatch.setattr(forces, "GRAPHS_BELOW_ATOMS", 100)  # the box counts as large
    config, system = built()
    assert forces.fixed_pair_lists(system, "CUDA") == []
    note = _graphs_note(config, forces.fixed_pair_lists(system, "CUDA"), "CUDA")
    assert "auto captures them for ML regions of fewer than 100 atoms" in note
    assert _graphs_note(config, [], "CPU") == ""
    config, system = built({"ml": {"cuda_graphs": True}})
    assert len(forces.fixed_pair_lists(system, "CUDA")) == 1


class _FailingIntegrator:
    def __init__(self, message):
        self.message = message

    def step(self, n):
        import openmm

        raise openmm.OpenMMException(self.message)


@pytest.mark.parametrize("low_memory", [False, True])
def test_running_out_of_memory_names_the_fix(tmp_path, low_memory):
    """A step that runs out of memory (as torch reports it through OpenMM) says so and names
    ml.low_memory, or, with low-memory forces already, a bigger device; other failures keep the
    usual causes."""
    from tensornet_openmm.runner import RunError, _steps

    oom = _FailingIntegrator("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB)")
    with pytest.raises(RunError) as failure:
        _steps(None, oom, 10, tmp_path, "production", 40, low_memory=low_memory)
    message = str(failure.value)
    assert "steps 40..50" in message and "ran out of memory" in message
    assert "Likely causes" not in message
    assert ("set ml.low_memory: true" in message) != low_memory
    assert ("even with low-memory forces" in message) == low_memory
    other = _FailingIntegrator("Particle coordinate is NaN")
    with pytest.raises(RunError, match="Likely causes: a time step too large"):
        _steps(None, other, 10, tmp_path, "production", 40, low_memory=low_memory)


def _water_run(model_file, out, setting):
    """Ten steps of the water box with one ``--set``: the run log and the potential energies."""
    argv = ["run", str(SIMULATIONS / "water-box.yaml"), "--model", model_file, "--steps", "10",
            "--output", str(out), "--set", setting, *QUICK]  # fmt: skip
    assert main(argv) == 0
    table = np.genfromtxt(out / "energies.csv", delimiter=",", names=True)
    return (out / "run.log").read_text(), table[table.dtype.names[2]]


def test_low_memory_run_follows_the_same_trajectory(model_file, tmp_path):
    """ml.low_memory: the same MD (same seed) as the default forces, step for step."""
    energies = {}
    for low in ("false", "true"):
        log, energies[low] = _water_run(model_file, tmp_path / low, f"ml.low_memory={low}")
        assert f"low_memory: {low}" in (tmp_path / low / "config.resolved.yaml").read_text()
        assert ("low-memory forces" in log) == (low == "true")
        expect_kernels = kernels.wanted() and kernels.load()  # low_memory runs them too
        assert ("fused CPU" in log) == expect_kernels  # "fused CPU (and CUDA) kernels"
    np.testing.assert_allclose(energies["true"], energies["false"], rtol=2e-4)


def test_radial_tables_run_follows_the_same_trajectory(model_file, tmp_path):
    """ml.radial_tables: the log says so, and the MD (same seed) stays with the exact one."""
    energies = {}
    for tables in ("false", "1e-6"):
        log, energies[tables] = _water_run(
            model_file, tmp_path / tables, f"ml.radial_tables={tables}"
        )
        assert ("radial tables (tolerance 1e-06)" in log) == (tables != "false")
    np.testing.assert_allclose(energies["1e-6"], energies["false"], rtol=2e-4)


def test_pair_list_overflow_names_its_fill_and_the_fix(model_file, tmp_path, capsys):
    """A pair list of fixed capacity (CUDA graphs; here a module fixed on the CPU as well) is
    logged with how full it is, and when it overflows the run stops saying how full it was and
    what to make bigger (an exported module: export it again)."""
    import openmm.app as app

    from tensornet_openmm import load_model
    from tensornet_openmm.export import TensorNetForce, export, pair_counts

    pdb = app.PDBFile(str(SIMULATIONS / "alanine-dipeptide.pdb"))
    numbers = [a.element.atomic_number for a in pdb.topology.atoms()]
    model = load_model(model_file)
    angstrom = np.asarray(pdb.positions.value_in_unit(pdb.positions.unit)) * 10.0
    count, _ = pair_counts(model.cutoff_upper, angstrom)
    slots = count - 50
    path = tmp_path / "fixed.pt"
    export(TensorNetForce(model, numbers, capacity=slots, fixed_on_cpu=True), path)
    out = tmp_path / "run"
    argv = ["run", str(SIMULATIONS / "ala2-vacuum.yaml"), "--model", str(path), "--output",
            str(out), *QUICK]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err
    fill = f"{count} of {slots} pair slots in use ({round(100 * count / slots)}%)"
    assert (
        f"pair list of fixed capacity (as exported): {fill} at the start"
        in (out / "run.log").read_text()
    )
    assert "the energy of the initial structure is not finite" in err
    assert f"At the start: {fill}." in err
    assert "export the module again with more pair slots" in err
    assert "ml.cuda_graphs: false" in err


def test_capacity_margin_sizes_the_pair_list(model_file, tmp_path):
    """ml.capacity_margin reaches the force: its pair slots are the margin times the pairs at
    the start, plus 64; a run that outgrows them is told to raise it."""
    from tensornet_openmm.export import pair_counts
    from tensornet_openmm.forces import fixed_pair_lists
    from tensornet_openmm.runner import _PairLists, build, load_config

    slots = {}
    for margin in (1.5, 2.0):
        config = load_config(SIMULATIONS / "water-box.yaml", [
            {"model": model_file, "ml": {"capacity_margin": margin}}])  # fmt: skip
        model, topology, positions, system, _ = build(config, log=lambda _: None)
        assert fixed_pair_lists(system, "CPU") == []  # the CPU runs the exact dynamic list
        (module,) = fixed_pair_lists(system, "CUDA")
        slots[margin] = int(module.inner.capacity)
    pos = np.asarray(positions.value_in_unit(positions.unit)) * 10.0  # nm -> A
    box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(positions.unit)) * 10.0
    count, _ = pair_counts(model.cutoff_upper, pos, box)
    assert slots == {1.5: int(np.ceil(1.5 * count)) + 64, 2.0: 2 * count + 64}

    lists = _PairLists(system, "CUDA", config, exported=False)
    squeezed = pos / 10.0 * 0.7  # the same molecules in a box 0.7 as wide: more pairs
    lists.see(squeezed, box / 10.0 * 0.7, "step 40")
    advice = lists.advice()
    found, _ = pair_counts(model.cutoff_upper, squeezed * 10.0, box * 0.7)
    assert found > slots[2.0]
    assert f"At step 40: {found:,} of {slots[2.0]:,} pair slots in use" in advice
    assert "raise ml.capacity_margin (now 2; for example --set ml.capacity_margin=3)" in advice
    for bad in (0.5, "wide", True):
        with pytest.raises(ValueError, match=r"ml.capacity_margin=.* must be a number of at"):
            load_config(SIMULATIONS / "water-box.yaml", [{"ml": {"capacity_margin": bad}}])
