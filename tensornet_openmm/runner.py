"""The MD runner behind ``tensornet-openmm run CONFIG.yaml``.

A run: read the configuration (YAML, every key checked against :data:`DEFAULTS`), load the model,
read and optionally prepare the system (hydrogens, solvent, ions), build a pure-ML or ML/MM System,
minimise, equilibrate, then run production with reporters:

- ``trajectory``: DCD, XTC or HDF5 (by suffix, written through mdtraj), one frame every
  ``report_interval`` production steps;
- ``energies.csv``: step, time, potential and kinetic energy, temperature, volume, speed;
- ``checkpoint.chk`` (OpenMM checkpoint, written atomically every ``checkpoint_interval`` steps)
  and ``checkpoint.json`` (its step and how many frames and CSV rows belong to it).

``resume=True`` continues from the checkpoint: the trajectory and CSV are cut back to what the
checkpoint covers, so nothing is lost or repeated even after the process was killed at any
moment. The model metadata and the resolved configuration are written to the output folder.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS: dict[str, Any] = {
    "model": None,  # shipped name, our checkpoint, a TorchMD-Net .ckpt, or an exported file
    "trust_pickle": False,
    "system": {"pdb": None, "prmtop": None, "inpcrd": None, "xml": None},
    "prepare": {
        "forcefield": ["amber14-all.xml", "amber14/tip3p.xml"],
        "add_hydrogens": False,
        "ph": 7.0,
        "solvate": False,
        "padding_nm": 1.0,
        "ionic_strength_molar": 0.0,
        "water_model": "tip3p",
    },
    "ml": {
        "atoms": "all",
        "total_charge": 0.0,
        "allow_cut_bonds": False,
        "cuda_graphs": "auto",  # true, false, or auto: for ML regions below 1,000 atoms
        "capacity_margin": 1.5,  # CUDA graphs: pair slots = margin x the pairs at the start + 64
        "low_memory": False,  # forces without the pairs' activations: largest systems
        "radial_tables": False,  # true or a tolerance: tabulated radial networks (approximate)
    },
    "platform": "auto",
    "precision": "mixed",
    "integrator": {"timestep_fs": 1.0, "temperature_k": 300.0, "friction_per_ps": 1.0},
    "ensemble": "nvt",
    "pressure_bar": 1.0,
    "constraints": "none",
    "nonbonded_cutoff_nm": 0.9,
    "minimize": {"enabled": True, "max_iterations": 1000, "tolerance_kj_per_mol_nm": 10.0},
    "equilibration_steps": 0,
    "production_steps": 1000,
    "report_interval": 100,
    "checkpoint_interval": 1000,
    "trajectory": "trajectory.dcd",
    "seed": 1,
    "output": "tensornet-run",
    "progress": True,
}


class RunError(RuntimeError):
    """A run that cannot go on; the message says what happened and what to do."""


# ---------------------------------------------------------------------------- configuration


_BOOL_OR_NUMBER = {"radial_tables"}  # true, false or a tolerance


def merge(base: dict, update: dict, where: str = "") -> dict:
    """``base`` updated with ``update``; unknown keys are an error naming the allowed ones."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ValueError(
                f"unknown configuration key {where + key!r}; allowed keys"
                f"{' in ' + where.rstrip('.') if where else ''}: {sorted(base)}"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where + key!r} must be a mapping of {sorted(base[key])}")
            out[key] = merge(base[key], value, f"{where}{key}.")
        elif isinstance(value, dict):  # `--set output.folder=x` where output is one value
            name = where + key
            raise ValueError(
                f"{name!r} is one value, not a mapping: set {name} itself (YAML `{name}: ...`, "
                f"`--set {name}=...`), not {name}.{next(iter(value), '')}"
            )
        elif isinstance(base[key], bool) and not isinstance(value, bool):
            # bool() would take any non-empty string, a typo included, for true
            if key not in _BOOL_OR_NUMBER:
                raise ValueError(f"{where + key!r} must be true or false, not {value!r}")
            try:  # YAML reads 1e-6 (no dot) as a string
                out[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where + key!r} must be true, false or a number, not {value!r}"
                ) from None
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``a.b=value`` (value parsed as YAML) -> {"a": {"b": value}}."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (for example ml.atoms=all)")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


# numbers of the configuration: (lowest value, whether that value itself is allowed, integer)
_NUMBERS: dict[str, tuple[float | None, bool, bool]] = {
    "integrator.timestep_fs": (0.0, False, False),
    "integrator.temperature_k": (0.0, False, False),
    "integrator.friction_per_ps": (0.0, True, False),
    "pressure_bar": (0.0, False, False),
    "nonbonded_cutoff_nm": (0.0, False, False),
    "minimize.max_iterations": (0, True, True),  # 0: until converged (OpenMM's meaning)
    "minimize.tolerance_kj_per_mol_nm": (0.0, False, False),
    "equilibration_steps": (0, True, True),
    "seed": (0, True, True),  # 0: OpenMM picks a random seed
    "ml.total_charge": (None, True, False),
    "prepare.ph": (None, True, False),
    "prepare.padding_nm": (0.0, False, False),
    "prepare.ionic_strength_molar": (0.0, True, False),
}


def _check_number(config: dict, key: str, low, low_allowed: bool, integer: bool) -> None:
    """Checks ``config``'s dotted ``key`` against its range, in place: a string that reads as a
    number (YAML reads 1e-6, without a dot, as a string) becomes that number."""
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    value = node[last]
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{key}={node[last]!r} must be {kind}") from None
    if isinstance(value, float) and integer and value.is_integer():
        value = int(value)
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_type or not math.isfinite(value):
        raise ValueError(f"{key}={node[last]!r} must be {kind}")
    if low is not None and (value < low or (value == low and not low_allowed)):
        bound = f"at least {low:g}" if low_allowed else f"more than {low:g}"
        raise ValueError(f"{key}={node[last]!r} must be {bound}")
    node[last] = value


def _check_text(config: dict, defaults: dict, where: str = "") -> None:
    """Keys whose default is text (or a file, None by default) must be text (``ml.atoms`` may
    also be a list, checked apart)."""
    for key, default in defaults.items():
        value = config[key]
        if where + key in ("ml.atoms", "ml.cuda_graphs"):
            continue
        if isinstance(default, dict):
            _check_text(value, default, f"{where}{key}.")
        elif (isinstance(default, str) or (default is None)) and not (
            isinstance(value, str) or (value is None and default is None)
        ):
            raise ValueError(f"{where + key}={value!r} must be text (a name or a file)")


def _check_precision(precision) -> None:
    if precision not in ("single", "mixed", "double"):
        raise ValueError(
            f"precision={precision!r} must be single, mixed or double (OpenMM's CUDA and "
            "OpenCL precision; the CPU and Reference platforms have no such setting)"
        )


def load_config(path: str | Path | None, overrides: list[dict] = ()) -> dict:
    from .config import read_yaml_mapping

    config = copy.deepcopy(DEFAULTS)
    base = Path.cwd()
    if path is not None:
        config = merge(config, read_yaml_mapping(path, "run configuration"))
        base = Path(path).parent.resolve()
    for override in overrides:
        config = merge(config, override)
    config["_base"] = str(base)
    if config["model"] is None:
        raise ValueError("the configuration must name a model (model: ala2-water-gfn2, or a file)")
    for key in ("production_steps", "report_interval", "checkpoint_interval"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"{key}={config[key]!r} must be a positive integer")
    for key, (low, low_allowed, integer) in _NUMBERS.items():
        _check_number(config, key, low, low_allowed, integer)
    _check_text(config, DEFAULTS)
    atoms = config["ml"]["atoms"]
    if not isinstance(atoms, str) and not (
        isinstance(atoms, list)
        and all(isinstance(a, int) and not isinstance(a, bool) for a in atoms)
    ):
        raise ValueError(
            f"ml.atoms={atoms!r} must be 'all', an mdtraj selection (resname ALA) or a list of "
            "atom indices"
        )
    if config["ml"]["cuda_graphs"] not in (True, False, "auto"):
        raise ValueError(
            f"ml.cuda_graphs={config['ml']['cuda_graphs']!r} must be true, false or auto (CUDA "
            "graphs for ML regions of fewer than 1,000 atoms)"
        )
    forcefield = config["prepare"]["forcefield"]
    if isinstance(forcefield, str):
        config["prepare"]["forcefield"] = forcefield = [forcefield]
    if not isinstance(forcefield, list) or not all(isinstance(f, str) for f in forcefield):
        raise ValueError(
            f"prepare.forcefield={forcefield!r} must be a list of OpenMM force field files "
            "(amber14-all.xml, amber14/tip3p.xml)"
        )
    _check_precision(config["precision"])
    margin = config["ml"]["capacity_margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 1.0:
        raise ValueError(
            f"ml.capacity_margin={margin!r} must be a number of at least 1 (the pair slots of a "
            "CUDA-graph pair list over the pairs at the start; 1.5 by default)"
        )
    if config["ensemble"] not in ("nvt", "npt"):
        raise ValueError(f"ensemble={config['ensemble']!r} must be 'nvt' or 'npt'")
    if config["constraints"] not in ("none", "hbonds", "allbonds", "hangles"):
        raise ValueError(
            f"constraints={config['constraints']!r}: choose none, hbonds, allbonds or hangles"
        )
    if Path(config["trajectory"]).suffix.lower() not in (".dcd", ".xtc", ".h5"):
        raise ValueError(f"trajectory {config['trajectory']!r} must end in .dcd, .xtc or .h5")
    return config


def _path(config: dict, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else Path(config["_base"]) / p


# ---------------------------------------------------------------------------- the system


def load_any_model(config: dict):
    """A TensorNet from a name or checkpoint, or an exported TorchScript file (with metadata)."""
    from .checkpoints import SHIPPED_MODELS, load_model

    name = str(config["model"])
    path = _path(config, name)
    if not path.is_file() and (SHIPPED_MODELS / f"{name}.pt").is_file():
        path = Path(name)  # a shipped model, by name
    return load_model(path, trust_pickle=bool(config["trust_pickle"]))


def build(config: dict, log=print):
    """Topology, positions, System and a description of the run's system."""
    import openmm.app as app

    sysconf, prep, mlconf = config["system"], config["prepare"], config["ml"]
    pdb, prmtop, inpcrd, xml = (
        _path(config, sysconf[k]) for k in ("pdb", "prmtop", "inpcrd", "xml")
    )
    for p in (pdb, prmtop, inpcrd, xml):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist")
    mm_system = None
    if prmtop is not None:
        if inpcrd is None:
            raise ValueError("an Amber prmtop needs its coordinates: set system.inpcrd")
        amber, coords = app.AmberPrmtopFile(str(prmtop)), app.AmberInpcrdFile(str(inpcrd))
        topology, positions = amber.topology, coords.getPositions()
        if coords.boxVectors is not None:
            topology.setPeriodicBoxVectors(coords.boxVectors)
        mm_system = amber.createSystem(
            nonbondedMethod=app.PME if coords.boxVectors is not None else app.NoCutoff,
            nonbondedCutoff=float(config["nonbonded_cutoff_nm"]) * _nm(),
            constraints=_constraints(config),
        )
    elif pdb is not None:
        reader = app.PDBxFile if pdb.suffix.lower() in (".cif", ".mmcif") else app.PDBFile
        structure = reader(str(pdb))
        topology, positions = structure.topology, structure.positions
    else:
        raise ValueError("set system.pdb (PDB or mmCIF), system.prmtop + inpcrd, or xml + pdb")
    if xml is not None:
        from .forces import load_system

        mm_system = load_system(xml)

    forcefield = None
    if prep["add_hydrogens"] or prep["solvate"] or (mm_system is None and mlconf["atoms"] != "all"):
        forcefield = app.ForceField(*prep["forcefield"])
    if prep["add_hydrogens"] or prep["solvate"]:
        if mm_system is not None:
            raise ValueError("prepare.add_hydrogens / solvate need a PDB system, not prmtop or xml")
        modeller = app.Modeller(topology, positions)
        if prep["add_hydrogens"]:
            modeller.addHydrogens(forcefield, pH=float(prep["ph"]))
        if prep["solvate"]:
            import openmm.unit as u

            modeller.addSolvent(
                forcefield,
                model=prep["water_model"],
                padding=float(prep["padding_nm"]) * u.nanometer,
                ionicStrength=float(prep["ionic_strength_molar"]) * u.molar,
            )
        topology, positions = modeller.topology, modeller.positions
        log(f"prepared: {topology.getNumAtoms()} atoms after hydrogens / solvent")

    periodic = topology.getPeriodicBoxVectors() is not None
    exported = _exported_metadata(config)
    if exported is not None:
        model = exported
        system = _system_from_export(config, topology, exported, periodic)
        description = f"pure ML (exported module), {topology.getNumAtoms()} atoms"
        if int(exported.meta.get("capacity", -1)) < 0:
            description += ", dynamic pair list (no CUDA graphs)"
    else:
        from .nn import kernels, tables

        tolerance = tables.requested_tolerance(mlconf["radial_tables"])  # checked before the work
        model = load_any_model(config)
        options = {
            "cuda_graphs": _graphs_option(config),
            "capacity_margin": float(mlconf["capacity_margin"]),
            "low_memory": bool(mlconf["low_memory"]),
            "radial_tables": tolerance or False,
        }
        if mlconf["atoms"] == "all":
            from .systems import create_ml_system

            system = create_ml_system(topology, model, float(mlconf["total_charge"]),
                                      positions=positions, **options)  # fmt: skip
            description = f"pure ML, {topology.getNumAtoms()} atoms"
        else:
            from .systems import create_mixed_system, select_atoms

            if mm_system is None:
                mm_system = forcefield.createSystem(
                    topology, nonbondedMethod=app.PME if periodic else app.NoCutoff,
                    nonbondedCutoff=float(config["nonbonded_cutoff_nm"]) * _nm(),
                    constraints=_constraints(config),
                )  # fmt: skip
            system = create_mixed_system(
                topology, mm_system, mlconf["atoms"], model, float(mlconf["total_charge"]),
                allow_cut_bonds=bool(mlconf["allow_cut_bonds"]), positions=positions, **options,
            )  # fmt: skip
            n_ml = len(select_atoms(topology, mlconf["atoms"]))
            description = (
                f"ML/MM, ML region {mlconf['atoms']!r}: {n_ml} of {topology.getNumAtoms()} atoms"
            )
        if options["low_memory"]:
            description += ", low-memory forces"
        if kernels.wanted() and kernels.available():
            description += ", " + kernels.description()
        if tolerance is not None:
            description += f", radial tables (tolerance {tolerance:g})"
    if config["ensemble"] == "npt":
        import openmm
        import openmm.unit as u

        if not periodic:
            raise ValueError("ensemble: npt needs a periodic box (solvate the system or use nvt)")
        system.addForce(openmm.MonteCarloBarostat(
            float(config["pressure_bar"]) * u.bar,
            float(config["integrator"]["temperature_k"]) * u.kelvin,
        ))  # fmt: skip
    return model, topology, positions, system, description


class ExportedModel:
    """What the runner needs to know of an exported TorchScript file (its metadata)."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta = path, meta
        self.metadata = {**meta.get("model_metadata", {}), "exported_atomic_numbers":
                         meta["atomic_numbers"]}  # fmt: skip
        self.cutoff_upper = meta["cutoff_nm"] * 10.0

    @property
    def config(self):
        from .config import ModelConfig

        return ModelConfig.from_dict(self.meta["config"])

    def num_parameters(self) -> int:
        import torch

        return sum(p.numel() for p in torch.jit.load(str(self.path)).parameters())


def _exported_metadata(config: dict) -> ExportedModel | None:
    """The metadata of an exported file named by ``model``, or None for other models."""
    import zipfile

    from .export import read_metadata

    path = _path(config, str(config["model"]))
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        return ExportedModel(path, read_metadata(path))
    except ValueError:
        return None  # a zip that is not ours: e.g. a checkpoint; load_model decides


def _system_from_export(config: dict, topology, exported: ExportedModel, periodic: bool):
    import openmm

    from .forces import make_torch_force, uses_cuda_graphs
    from .nn.kernels import jit_load
    from .systems import _atomic_numbers

    meta = exported.meta
    if config["ml"]["atoms"] != "all":
        raise ValueError(
            "an exported module is fixed to its atoms and runs pure-ML systems only; use the "
            "model's checkpoint (or shipped name) for ML/MM"
        )
    numbers = _atomic_numbers(topology, range(topology.getNumAtoms()))
    if meta["atomic_numbers"] != numbers or meta.get("atoms") is not None:
        raise ValueError(
            f"the exported module {exported.path} was made for {len(meta['atomic_numbers'])} "
            f"atoms with other atomic numbers than this system's {len(numbers)}; export it again "
            "for this system (tensornet-openmm export MODEL --atomic-numbers ...)"
        )
    if bool(meta["periodic"]) != periodic:
        raise ValueError(
            f"the exported module has periodic={meta['periodic']} but the system is "
            f"{'periodic' if periodic else 'not periodic'}; export it again with the matching flag"
        )
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    if periodic:
        system.setDefaultPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
    module = jit_load(exported.path)
    # a CUDA graph needs a pair list of fixed capacity; `tensornet-openmm export` writes the
    # dynamic one (its search synchronises with the host, which a capture refuses)
    graphs = int(meta.get("capacity", -1)) >= 0 and uses_cuda_graphs(
        _graphs_option(config), len(meta["atomic_numbers"])
    )
    system.addForce(make_torch_force(module, periodic, bool(meta["outputs_forces"]), graphs))
    system.addForce(openmm.CMMotionRemover())
    return system


def _graphs_option(config: dict) -> bool | None:
    """``ml.cuda_graphs`` as ``create_force`` takes it: None for auto (by the ML region's size)."""
    value = config["ml"]["cuda_graphs"]
    return None if value == "auto" else bool(value)


def _graphs_note(config: dict, fixed_lists: list, platform: str) -> str:
    """Why a CUDA run has no CUDA graphs ('' where it has them, that is fixed-capacity pair
    lists ``fixed_lists``, or is not on CUDA)."""
    from .forces import GRAPHS_BELOW_ATOMS

    if platform != "CUDA" or fixed_lists:
        return ""
    if config["ml"]["cuda_graphs"] is False:
        return "CUDA graphs off (ml.cuda_graphs: false): the pair list is dynamic"
    return (
        f"CUDA graphs off: ml.cuda_graphs: auto captures them for ML regions of fewer than "
        f"{GRAPHS_BELOW_ATOMS:,} atoms (on a GPU larger ones ran faster without); "
        "ml.cuda_graphs: true forces them"
    )


def _nm():
    import openmm.unit as u

    return u.nanometer


def _constraints(config: dict):
    import openmm.app as app

    return {"none": None, "hbonds": app.HBonds, "allbonds": app.AllBonds,
            "hangles": app.HAngles}[config["constraints"]]  # fmt: skip


def choose_platform(name: str, precision: str):
    """The named platform, or the fastest that runs a TorchForce (CUDA, then CPU)."""
    import openmm

    names = [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]
    if name == "auto":
        name = "CUDA" if "CUDA" in names else "CPU"
    if name not in names:
        raise ValueError(f"platform {name!r} is not available here; available: {names}")
    properties = {}
    if name in ("CUDA", "OpenCL"):
        _check_precision(precision)
        properties["Precision"] = precision
    return openmm.Platform.getPlatformByName(name), properties


# ---------------------------------------------------------------------------- reporting


class TrajectoryWriter:
    """Appends frames and closes the file after each one, so a kill loses at most that frame.

    DCD and XTC go through OpenMM's writers (append mode), HDF5 through mdtraj; reading and
    cutting back use mdtraj.
    """

    def __init__(self, path: Path, topology, dt_ps: float, interval: int) -> None:
        import mdtraj

        self.path, self.topology = path, topology
        self.kind = path.suffix.lower()
        self.mdtop = mdtraj.Topology.from_openmm(topology)
        self.dt_ps, self.interval = dt_ps, interval

    def count(self) -> int:
        if not self.path.exists():
            return 0
        import mdtraj

        return len(mdtraj.load(str(self.path), top=self.mdtop))

    def truncate(self, n_frames: int) -> None:
        """Keep the first ``n_frames`` frames (rewritten through a temporary file)."""
        if not self.path.exists():
            return
        import mdtraj

        if n_frames == 0:
            self.path.unlink()
            return
        # read only what is kept: a frame cut short by a kill may follow
        frames = next(iter(mdtraj.iterload(str(self.path), top=self.mdtop, chunk=n_frames)))
        tmp = self.path.with_name(self.path.stem + ".tmp" + self.path.suffix)
        frames[:n_frames].save(str(tmp), force_overwrite=True)
        tmp.replace(self.path)

    def write(self, positions_nm: np.ndarray, box_nm: np.ndarray | None, time_ps: float) -> None:
        import openmm
        import openmm.app as app
        import openmm.unit as u

        append = self.path.exists()
        box = None if box_nm is None else [openmm.Vec3(*row) for row in box_nm] * u.nanometer
        if self.kind in (".dcd", ".xtc"):
            positions = positions_nm * u.nanometer
            if self.kind == ".dcd":
                with open(self.path, "r+b" if append else "wb") as handle:
                    writer = app.DCDFile(handle, self.topology, self.dt_ps, self.interval,
                                         self.interval, append=append)  # fmt: skip
                    writer.writeModel(positions, periodicBoxVectors=box)
            else:
                writer = app.XTCFile(str(self.path), self.topology, self.dt_ps, self.interval,
                                     self.interval, append=append)  # fmt: skip
                writer.writeModel(positions, periodicBoxVectors=box)
            return
        import mdtraj

        lengths = angles = None
        if box_nm is not None:
            values = mdtraj.utils.box_vectors_to_lengths_and_angles(*box_nm)
            lengths, angles = np.array([values[:3]]), np.array([values[3:]])
        with mdtraj.formats.HDF5TrajectoryFile(str(self.path), "a" if append else "w") as f:
            if not append:
                f.topology = self.mdtop
            f.write(positions_nm[None].astype(np.float32), time=np.array([time_ps]),
                    cell_lengths=lengths, cell_angles=angles)  # fmt: skip


CSV_FIELDS = ["step", "time_ps", "potential_kj_per_mol", "kinetic_kj_per_mol",
              "temperature_k", "volume_nm3", "ns_per_day"]  # fmt: skip


def _truncate_csv(path: Path, n_rows: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[: n_rows + 1]))
    tmp.replace(path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------- the run


def run(config: dict, resume: bool = False, log=print) -> dict:
    """Run the simulation described by ``config``; returns a summary."""
    import openmm
    import openmm.unit as u

    out = _path(config, config["output"])
    out.mkdir(parents=True, exist_ok=True)
    state_file, chk_file = out / "checkpoint.json", out / "checkpoint.chk"  # chk: a name stem
    if resume and not state_file.exists():
        raise RunError(f"nothing to resume in {out}: no checkpoint.json (start without --resume)")
    if not resume and state_file.exists():
        raise RunError(
            f"{out} already holds a run (checkpoint.json); pass --resume to continue it or choose "
            "another output folder"
        )
    console = log

    def log(message: str) -> None:  # noqa: F811 - the console, and run.log in the output folder
        console(message)
        with (out / "run.log").open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    model, topology, positions, system, description = build(config, log)
    low_memory = bool(config["ml"]["low_memory"])  # for the advice on running out of memory
    if isinstance(model, ExportedModel):
        low_memory = bool(model.meta.get("low_memory", False))
    if not resume:  # the prepared structure: the topology for reading the trajectory
        import openmm.app as app

        with (out / "topology.pdb").open("w") as handle:
            app.PDBFile.writeFile(topology, positions, handle)
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    (out / "config.resolved.yaml").write_text(_yaml(public))
    (out / "model.json").write_text(json.dumps(
        {"config": model.config.to_dict(), "metadata": model.metadata,
         "parameters": model.num_parameters()}, indent=1, default=str))  # fmt: skip
    integ = config["integrator"]
    dt_ps = float(integ["timestep_fs"]) / 1000.0
    temperature = float(integ["temperature_k"])
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin,
        float(integ["friction_per_ps"]) / u.picosecond,
        dt_ps * u.picoseconds,
    )
    integrator.setRandomNumberSeed(int(config["seed"]))
    platform, properties = choose_platform(config["platform"], config["precision"])
    try:
        context = openmm.Context(system, integrator, platform, properties)
    except openmm.OpenMMException as err:
        raise ValueError(f"OpenMM cannot build this simulation: {err}") from err
    elements = model.metadata.get("elements", "not recorded")
    spin = ""
    if platform.getName() == "CPU":
        from .openmp import spin_setting

        spin = f" (OpenMP spin count {spin_setting()})"
    log(f"{description}; platform {platform.getName()} {properties}{spin}; model "
        f"{config['model']} ({model.num_parameters():,} parameters, cutoff "
        f"{model.cutoff_upper} A, elements {elements})")  # fmt: skip

    from .systems import _box_nm

    pair_lists = _PairLists(system, platform.getName(), config, isinstance(model, ExportedModel))
    pair_lists.see(np.asarray(positions.value_in_unit(u.nanometer)), _box_nm(topology),
                   "the start")  # fmt: skip
    if pair_lists.modules:
        log(pair_lists.summary())
    note = _graphs_note(config, pair_lists.modules, platform.getName())
    if note and not isinstance(model, ExportedModel):
        log(note)

    n_atoms = system.getNumParticles()
    dof = 3 * n_atoms - system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    interval = int(config["report_interval"])
    traj = TrajectoryWriter(out / config["trajectory"], topology, dt_ps, interval)
    csv_path = out / "energies.csv"
    total = int(config["production_steps"])
    done = 0
    if resume:
        saved = json.loads(state_file.read_text())
        context.loadCheckpoint((out / saved["checkpoint"]).read_bytes())
        done = int(saved["production_step"])
        traj.truncate(int(saved["frames"]))
        _truncate_csv(csv_path, int(saved["rows"]))
        log(f"resumed at production step {done} of {total} ({saved['frames']} frames kept)")
    else:
        context.setPositions(positions)
        if topology.getPeriodicBoxVectors() is not None:
            context.setPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
        try:
            _check_finite(context, "the initial structure", out, advice=pair_lists.advice)
            if config["minimize"]["enabled"]:
                openmm.LocalEnergyMinimizer.minimize(
                    context, float(config["minimize"]["tolerance_kj_per_mol_nm"]),
                    int(config["minimize"]["max_iterations"]),
                )  # fmt: skip
                log(f"minimised: E = {_energy(context):.2f} kJ/mol")
        except openmm.OpenMMException as err:
            raise RunError(
                f"the first energies (initial structure, minimisation) failed: {err}. "
                f"{_likely_causes(err, low_memory)}{pair_lists.advice()} {_kept(out)}"
            ) from err
        context.setVelocitiesToTemperature(temperature * u.kelvin, int(config["seed"]))
        if config["equilibration_steps"]:
            _steps(context, integrator, int(config["equilibration_steps"]), out, "equilibration",
                   low_memory=low_memory, pair_lists=pair_lists)  # fmt: skip
            log(f"equilibrated {config['equilibration_steps']} steps")
        context.setTime(0.0)
        context.setStepCount(0)
        with csv_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(CSV_FIELDS)
        _save_checkpoint(context, state_file, chk_file, 0, traj.count(), 0)

    start_wall, start_done = time.time(), done
    rows = sum(1 for _ in csv_path.open()) - 1
    frames = traj.count() if resume else 0
    while done < total:
        n = min(interval - done % interval, total - done)
        _steps(context, integrator, n, out, "production", start_step=done, low_memory=low_memory,
               pair_lists=pair_lists)  # fmt: skip
        done += n
        if done % interval == 0 or done == total:
            state = context.getState(getEnergy=True, getPositions=True)
            speed = _ns_per_day(done - start_done, dt_ps, time.time() - start_wall)
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.nanometer)
            periodic = system.usesPeriodicBoundaryConditions()
            now = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
            traj.write(now, np.asarray(box) if periodic else None, done * dt_ps)
            pair_lists.see(now, np.asarray(box), f"step {done}")
            frames += 1
            kinetic = state.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
            temperature_now = 2 * kinetic / (dof * 0.00831446261815324)  # R in kJ/mol/K
            volume = np.linalg.det(box) if periodic else ""
            row = [done, round(done * dt_ps, 6), _energy(context, state), kinetic,
                   temperature_now, volume, speed]  # fmt: skip
            with csv_path.open("a", newline="") as handle:
                csv.writer(handle).writerow(row)
            rows += 1
            if config["progress"]:
                left = (total - done) * (time.time() - start_wall) / max(done - start_done, 1)
                _progress(done, total, speed, left)
        if done % int(config["checkpoint_interval"]) == 0 or done == total:
            _save_checkpoint(context, state_file, chk_file, done, frames, rows)
    if config["progress"]:
        print(file=sys.stderr)
    elapsed = time.time() - start_wall
    summary = {
        "production_steps": total, "frames": frames, "final_energy_kj_per_mol": _energy(context),
        "ns_per_day": _ns_per_day(done - start_done, dt_ps, elapsed), "output": str(out),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done: {total} steps ({total * dt_ps:.3f} ps), {frames} frames, "
        f"{summary['ns_per_day']:.2f} ns/day; outputs in {out}")  # fmt: skip
    return summary


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _energy(context, state=None) -> float:
    import openmm.unit as u

    state = state or context.getState(getEnergy=True)
    return state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)


def _ns_per_day(steps: int, dt_ps: float, seconds: float) -> float:
    return steps * dt_ps * 1e-3 / max(seconds, 1e-9) * 86400.0


def _progress(done: int, total: int, speed: float, left: float) -> None:
    width = 30
    filled = int(width * done / total)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps  {speed:7.2f} ns/day  "
          f"{left / 60:6.1f} min left", end="", file=sys.stderr, flush=True)  # fmt: skip


class _PairLists:
    """The ML forces' pair lists of fixed capacity (CUDA graphs on the CUDA platform), and the
    positions they were last seen at (the start, then each report): an overflow makes the energy
    NaN, and a failed run's message then says how full they were."""

    def __init__(self, system, platform: str, config: dict, exported: bool) -> None:
        from .forces import fixed_pair_lists

        self.modules = fixed_pair_lists(system, platform)
        self.margin = config["ml"]["capacity_margin"]
        self.exported = exported
        self.seen: tuple | None = None

    def see(self, positions_nm, box_nm, when: str) -> None:
        if self.modules:  # only kept: counted when a message needs it
            self.seen = (np.array(positions_nm, dtype=np.float64), box_nm, when)

    def _fills(self) -> list[dict]:
        from .export import pair_list_fill

        positions, box, _ = self.seen
        return [pair_list_fill(module, positions, box) for module in self.modules]

    def summary(self) -> str:
        parts = [_fill_text(fill) for fill in self._fills()]
        how = "as exported" if self.exported else f"CUDA graphs, ml.capacity_margin {self.margin:g}"
        return f"pair list of fixed capacity ({how}): {'; '.join(parts)} at the start"

    def advice(self) -> str:
        """What to do if the failure was an overflow ('' without a fixed-capacity list)."""
        if not self.modules:
            return ""
        fills = self._fills() if np.isfinite(self.seen[0]).all() else []
        when = self.seen[2]
        seen = f" At {when}: {'; '.join(_fill_text(fill) for fill in fills)}." if fills else ""
        if self.exported:
            fix = "export the module again with more pair slots"
        else:
            bigger = max(2.0, round(1.5 * float(self.margin), 2))
            fix = (
                f"raise ml.capacity_margin (now {self.margin:g}; for example --set "
                f"ml.capacity_margin={bigger:g}) and --resume"
            )
        return (
            " The ML force's pair list has a fixed capacity (as CUDA graphs need); when more pairs "
            f"come within the cutoff the energy turns NaN.{seen} If it overflowed, {fix}, or set "
            "ml.cuda_graphs: false (a pair list without a capacity)."
        )


def _fill_text(fill: dict) -> str:
    text = (
        f"{fill['pairs']:,} of {fill['capacity']:,} pair slots in use "
        f"({100.0 * fill['pairs'] / max(fill['capacity'], 1):.0f}%)"
    )
    if fill["cell_capacity"] >= 0:
        text += f", fullest cell {fill['fullest_cell']} of {fill['cell_capacity']} atoms"
    return text


def _check_finite(
    context, what: str, out: Path, step: int | None = None, advice=lambda: ""
) -> None:
    energy = _energy(context)
    if not math.isfinite(energy):
        where = f" at step {step}" if step is not None else ""
        raise RunError(
            f"the energy of {what}{where} is not finite ({energy}). Likely causes: a time step "
            "too large for the (unconstrained) ML atoms, minimisation switched off, overlapping "
            f"atoms, or a pair list that outgrew its capacity.{advice()} {_kept(out)}"
        )


_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory")


def _likely_causes(err: Exception, low_memory: bool) -> str:
    """Why a step or an energy evaluation failed with ``err``, and what to do about it."""
    if not any(text in str(err).lower() for text in _OUT_OF_MEMORY):
        return (
            "Likely causes: a time step too large, no minimisation, or a pair list that outgrew "
            "its capacity."
        )
    if low_memory:
        return (
            "The device ran out of memory even with low-memory forces: use a device with more "
            "memory or fewer ML atoms."
        )
    return (
        "The device ran out of memory: set ml.low_memory: true (forces without keeping every "
        "pair's activations: about 40 KB per atom of water at 128 channels instead of 450 KB, "
        "for about half as much time again; `--set ml.low_memory=true`, or `export "
        "--low-memory` for an exported module)."
    )


def _steps(
    context, integrator, n: int, out: Path, phase: str, start_step: int = 0,
    low_memory: bool = False, pair_lists: _PairLists | None = None,
) -> None:  # fmt: skip
    import openmm

    advice = pair_lists.advice if pair_lists is not None else (lambda: "")
    try:
        integrator.step(n)
    except openmm.OpenMMException as err:
        raise RunError(
            f"{phase} failed within steps {start_step}..{start_step + n}: {err}. "
            f"{_likely_causes(err, low_memory)}{advice()} {_kept(out)}"
        ) from err
    _check_finite(context, f"the {phase}", out, start_step + n, advice)


def _kept(out: Path) -> str:
    record = out / "checkpoint.json"
    if not record.exists():
        return f"No checkpoint was written yet (the failure came before production); see {out}."
    step = json.loads(record.read_text())["production_step"]
    return (
        f"Everything written so far is kept in {out}; the last good checkpoint (production step "
        f"{step}) is recorded in {record}: continue with --resume after fixing the cause."
    )


def _save_checkpoint(context, state_file: Path, chk_file: Path, step: int, frames: int, rows: int):
    """Write the OpenMM checkpoint under a new name, then commit it by rewriting the record.

    The record (``checkpoint.json``) names the checkpoint file with its step, frame and row
    counts, so a kill at any moment leaves a consistent pair; older checkpoints are removed
    after the commit.
    """
    name = f"{chk_file.stem}-{step}{chk_file.suffix}"
    _atomic_write(chk_file.with_name(name), context.createCheckpoint())
    record = {"production_step": step, "frames": frames, "rows": rows, "checkpoint": name}
    _atomic_write(state_file, json.dumps(record).encode())
    for old in chk_file.parent.glob(f"{chk_file.stem}-*{chk_file.suffix}"):
        if old.name != name:
            old.unlink()
