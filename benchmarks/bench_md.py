"""MD speed of every route from TensorNet into OpenMM: ms/step, ns/day and peak memory.

One command, one table (and a CSV). Every ML route runs the same weights: a random TorchMD-Net
TensorNet (128 channels, 2 layers, 32 radial functions, 5 A cutoff by default, float32) written as
a TorchMD-Net checkpoint, which both our loader and TorchMD-Net read.

Routes:

- ``ours``: ``tensornet_openmm.create_force`` (TorchForce running our TorchScript module: half pair
  list, fixed capacity on CUDA only).
- ``ours-lowmem``: the same with ``low_memory=True`` (forces without the pairs' activations kept
  for the backward pass: one more pass over the pairs, a fraction of the memory).
- ``ours-pytorch``: ``ours`` without the fused kernels (``fused_kernels=False``: the pair sums and
  the per-atom algebra in plain PyTorch, on the CPU and on CUDA), to show what the kernels bring.
- ``ours-tables``: ``ours`` with ``radial_tables=True``: the radial networks read from tables
  (approximate, relative error 1e-6; see ``tensornet_openmm/nn/tables.py``), not the
  reference's arithmetic to the last digit, so it is listed apart from ``ours``;
  ``ours-lowmem-tables``: ``ours-lowmem`` with them.
- ``reference``: TorchMD-Net 3.1.0's TensorNet (static shapes, 64 neighbour slots per atom, its
  Warp kernels) scripted into a TorchForce with a thin nm / kJ/mol wrapper.
- ``pythonforce``: the same checkpoint through openmm-ml's ``MLPotential('torchmdnet')``, that is
  OpenMM's PythonForce with ``torch.compile`` (the route openmm-ml takes; the first steps compile).
  Its E0 differs from the others: openmm-ml 1.8 passes ``check_errors=False`` to TorchMD-Net's
  ``load_model``, which writes it into the checkpoint's hyperparameters before testing them for
  the old checkpoint layout, so current checkpoints are remapped as old ones (scrambled gate
  weights). The cost per step is the same, so its timing stands.
- ``mm``: the MM-only System (amber96 / TIP3P, PME, rigid water, h-bond constraints): the floor.

Systems: ``ala2`` (alanine dipeptide in vacuum, 22 atoms, pure ML), ``ala2-water`` (22 ML atoms in
TIP3P water with PME, mechanical embedding, 2,269 atoms) and ``water-N`` (periodic pure-ML water
boxes of about N atoms at liquid density).

Each case runs in a fresh process; with ``--interleave N`` the routes of a system run side by side
instead, one process each, set up together and then taking turns for N timed blocks, so that a
machine whose speed wanders between minutes weighs on every route alike (steadier ratios; all of a
system's routes are in memory at once; column ``x ref/blk`` pairs the routes' blocks: the median and
quartiles of the reference's time over ours, block by block). Keep the blocks (``--seconds`` / N) at
2 s or more: after a pause a process's first steps are slower, ours more than the reference's
(alanine dipeptide: 5.92 ms/step in 0.5 s blocks, 3.95 in 3 s blocks, the reference 15.8 and 14.4).
Time: LangevinMiddle at 300 K, 1 fs, after warm-up steps (Warp kernels, CUDA-graph capture and
torch.compile happen there and are excluded), the median of three (or N) timed blocks sized to
``--seconds``, each from the same initial positions and velocities with the same Langevin seed.
(With random weights a free molecule drifts far from its start: alanine dipeptide's pairs within 5 A
went from 161 to 95 in under 1,000 steps, and our step time, which follows the pair count, with
them; the reference's static shapes do not.) glibc's malloc is tuned in every route as our runner
tunes it (:mod:`tensornet_openmm.allocator`; ``--allocator default`` or ``both`` to compare), and
libgomp's idle threads spin briefly, as the runner sets them (:mod:`tensornet_openmm.openmp`;
``--omp-spin default`` or ``both`` to compare). Peak memory: on CPU the growth of the process's peak
resident set (Linux VmHWM) from before the System is built; on CUDA torch's peak allocation
(OpenMM's own buffers are not included). E0 is the initial potential energy: the ML routes agree
when the weights are the same. A failed case (out of memory, time limit) is a row with its reason;
larger water boxes are then skipped for that route.

    .venv/bin/python benchmarks/bench_md.py                       # everything, every platform
    .venv/bin/python benchmarks/bench_md.py --systems ala2 --routes ours reference
    .venv/bin/python benchmarks/bench_md.py --systems ala2-water --routes ours reference mm \
        --interleave 10 --seconds 30                              # ratios on a noisy machine
    .venv/bin/python benchmarks/bench_md.py --water-sizes 648 1500 5000 20000 --csv md.csv
    .venv/bin/python benchmarks/bench_md.py --platforms CUDA --graphs best   # each at its best

CUDA graphs (``--graphs``): ``both`` (the default) times ours and the reference with graphs on
and off; ``best`` runs each route as it runs best, ours as ``create_force`` decides by size
(``auto``: graphs below ``forces.GRAPHS_BELOW_ATOMS`` ML atoms) and the reference with graphs,
and compares each ours row with the reference's fastest.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch  # before openmm: the openmm-torch plugin needs libtorch loaded

from tensornet_openmm.runner import _OUT_OF_MEMORY
from tensornet_openmm.units import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM

OURS = ("ours", "ours-tables", "ours-lowmem", "ours-lowmem-tables", "ours-pytorch")
ROUTES = (*OURS, "reference", "pythonforce", "mm")
TIMESTEP_FS = 1.0
MODEL_DEFAULTS = {"channels": 128, "layers": 2, "rbf": 32, "cutoff": 5.0}
NEIGHBOR_SLOTS = 64
TILE_ABOVE = 6000
"""Water boxes of more atoms are an openmmtools box tiled k^3 times (see :func:`tiled`)."""
SEED = 1
"""Initial velocities and Langevin noise: every route and block times the same stretch of
trajectory (as far as the routes' forces agree)."""


# ---------------------------------------------------------------- systems (run in the worker)


def _testsystems():
    # openmmtools prints a pymbar/JAX banner on import; keep tables clean
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools.testsystems as testsystems
    return testsystems


def build_system(name: str, mm: bool = True):
    """(topology, positions, MM system, ML atom indices or None for a pure-ML system).

    ``mm=False``: a tiled water box (more than ``TILE_ABOVE`` atoms) comes without its MM System
    (None), which only the ``mm`` route reads: OpenMM's force field takes about 20 s to make it
    for 600,000 atoms.
    """
    import openmm.unit as u

    ts = _testsystems()
    if name == "ala2":
        test = ts.AlanineDipeptideVacuum()
        return test.topology, test.positions, test.system, None
    if name == "ala2-water":
        test = ts.AlanineDipeptideExplicit()
        return test.topology, test.positions, test.system, list(range(22))
    if name.startswith("water-"):
        n_atoms = int(name.split("-", 1)[1])
        reps = max(1, math.ceil((n_atoms / TILE_ABOVE) ** (1 / 3))) if n_atoms > TILE_ABOVE else 1
        edge = (n_atoms / reps**3 / 3 / 33.4) ** (1 / 3)  # nm, 33.4 molecules per nm^3
        cutoff = min(0.9, 0.5 * edge - 0.01)
        test = ts.WaterBox(box_edge=edge * u.nanometer, cutoff=cutoff * u.nanometer)
        if reps == 1:
            return test.topology, test.positions, test.system, None
        return (*tiled(test.topology, test.positions, reps, cutoff, mm), None)
    raise ValueError(f"unknown system {name!r}; use ala2, ala2-water or water-N")


def tiled(topology, positions, reps: int, cutoff_nm: float, mm: bool = True):
    """A water box repeated reps^3 times: topology, positions and its TIP3P / PME System (None
    unless ``mm``).

    openmmtools builds a box with Modeller, minutes for 100,000 atoms; tiling an equilibrated box
    keeps its liquid structure and density and takes seconds. Each residue's bonds are read once
    from the small box: OpenMM's ``Residue.bonds()`` searches every bond of the topology, which
    was 10 of the 17 s that 96,066 atoms took.
    """
    import openmm
    import openmm.app as app
    import openmm.unit as u

    try:
        from systems import tile
    except ImportError:  # imported as a module from the repository root
        from benchmarks.systems import tile

    box = np.array([v.value_in_unit(u.nanometer) for v in topology.getPeriodicBoxVectors()])
    xyz = tile(np.asarray(positions.value_in_unit(u.nanometer)), box, reps)
    residues = list(topology.residues())
    place = {atom: k for residue in residues for k, atom in enumerate(residue.atoms())}
    bonds = [[] for _ in residues]  # each residue's bonds, by its atoms' places in it
    for a, b in topology.bonds():
        if a.residue is not b.residue:
            raise ValueError(f"tiled: a bond between residues ({a} - {b}); only water tiles")
        bonds[a.residue.index].append((place[a], place[b]))
    big = app.Topology()
    chain = big.addChain()
    for _ in range(reps**3):  # in tile's order: copy by copy
        for residue, its_bonds in zip(residues, bonds, strict=True):
            new = big.addResidue(residue.name, chain)
            atoms = [big.addAtom(a.name, a.element, new) for a in residue.atoms()]
            for i, j in its_bonds:
                big.addBond(atoms[i], atoms[j])
    vectors = [openmm.Vec3(*map(float, row)) for row in box * reps]
    big.setPeriodicBoxVectors(u.Quantity(vectors, u.nanometer))
    system = None
    if mm:
        system = app.ForceField("amber14/tip3p.xml").createSystem(
            big, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_nm * u.nanometer, rigidWater=True
        )
    return big, u.Quantity(xyz, u.nanometer), system


class ReferenceForce(torch.nn.Module):
    """A TorchMD-Net model with OpenMM's calling convention: nm in, kJ/mol out."""

    def __init__(self, model, atomic_numbers, atoms, periodic: bool):
        super().__init__()
        self.model = model
        self.register_buffer("z", torch.as_tensor(atomic_numbers, dtype=torch.int64))
        self.register_buffer("batch", torch.zeros(len(atomic_numbers), dtype=torch.int64))
        index = atoms if atoms is not None else range(len(atomic_numbers))
        self.register_buffer("atoms", torch.as_tensor(list(index), dtype=torch.int64))
        self.periodic = periodic
        self.nm_to_angstrom = NM_TO_ANGSTROM
        self.ev_to_kj_per_mol = EV_TO_KJ_PER_MOL

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None):
        pos = positions[self.atoms].to(torch.float32) * self.nm_to_angstrom
        cell: Optional[torch.Tensor] = None
        if box is not None:
            cell = box.to(torch.float32) * self.nm_to_angstrom
        energy, _ = self.model(self.z, pos, self.batch, box=cell)
        return energy.sum() * self.ev_to_kj_per_mol


def route_system(route: str, spec: dict, topology, positions, mm_system, ml_atoms):
    import openmm

    import tensornet_openmm as tn

    if route == "mm":
        return mm_system
    checkpoint = spec["checkpoint"]
    # "auto": create_force's default, graphs below forces.GRAPHS_BELOW_ATOMS ML atoms
    graphs = {"on": True, "auto": None}.get(spec["graphs"], False)
    if route == "pythonforce":
        from openmmml import MLPotential

        potential = MLPotential("torchmdnet", modelPath=checkpoint)
        if ml_atoms is None:
            return potential.createSystem(topology)
        # TensorNet is short-ranged: openmm-ml asks to be told so for periodic mixed systems
        return potential.createMixedSystem(topology, mm_system, ml_atoms, mlLongRange=False)
    model = tn.load_model(checkpoint, trust_pickle=True)
    options = {
        "cuda_graphs": graphs,
        "low_memory": route.startswith("ours-lowmem"),
        "fused_kernels": None if route != "ours-pytorch" else False,
        "radial_tables": route.endswith("-tables"),
    }
    if ml_atoms is None:
        system = tn.create_ml_system(topology, model, positions=positions, **options)
    else:
        system = tn.create_mixed_system(
            topology, mm_system, ml_atoms, model, positions=positions, **options
        )
    if route in OURS:
        return system
    # reference: our System minus our force, plus TorchMD-Net's model in a TorchForce
    from tensornet_openmm.forces import make_torch_force

    index = [i for i, f in enumerate(system.getForces()) if f.getName() == "TensorNet"]
    if len(index) != 1:
        raise RuntimeError(f"expected one TensorNet force, found {len(index)}")
    # before the removal: a pure-ML System has no other periodic force to say it is periodic
    periodic = system.usesPeriodicBoundaryConditions()
    system.removeForce(index[0])
    atoms = list(ml_atoms) if ml_atoms is not None else None
    z = [a.element.atomic_number for a in topology.atoms()]
    z = [z[i] for i in atoms] if atoms is not None else z
    module = reference_module(checkpoint, z, atoms, periodic)
    force = make_torch_force(module, periodic, cuda_graphs=graphs is not False)
    force.setName("TensorNet (TorchMD-Net)")
    system.addForce(force)
    assert isinstance(system, openmm.System)
    return system


def reference_module(checkpoint, z: list[int], atoms: list[int] | None, periodic: bool):
    """TorchMD-Net's model from ``checkpoint`` as a scripted TorchForce module (static shapes,
    :data:`NEIGHBOR_SLOTS` slots per atom, no parameter gradients); ImportError without it."""
    from torchmdnet.models.model import load_model as load_reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = load_reference(
            str(checkpoint), derivative=False, static_shapes=True,
            max_num_neighbors=min(NEIGHBOR_SLOTS, len(z)),
        )  # fmt: skip
    for p in reference.parameters():
        p.requires_grad_(False)
    return torch.jit.script(ReferenceForce(reference.eval(), z, atoms, periodic))


# ---------------------------------------------------------------- one case (fresh process)


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return math.nan


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set


PROGRESS = "bench_md progress: "
"""How a worker's ``--progress`` lines on stderr begin (the parent passes them on as they come)."""
_STARTED = time.perf_counter()


def _progress(spec: dict, text: str) -> None:
    """With ``--progress``: one stage of a case's set-up or timing on stderr, as it happens, with
    the seconds since the worker started, torch's peak CUDA memory so far and the device's
    memory in use (OpenMM's too), so that a case cut short by a time limit (a lease's last
    minutes) still says how far it got."""
    if not spec.get("progress"):
        return
    memory = ""
    if spec["platform"] == "CUDA" and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        memory = (f", torch peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB, device "
                  f"{(total - free) / 1e9:.2f} GB in use")  # fmt: skip
    print(
        f"{PROGRESS}{spec['system']} {spec['route']} graphs {spec['graphs']}: {text} "
        f"({time.perf_counter() - _STARTED:.1f} s{memory})",
        file=sys.stderr,
        flush=True,
    )


def _prepared(spec: dict) -> dict:
    """A case's System and Context, built and warmed up, with its timers (a worker's state)."""
    import openmm
    import openmm.unit as u

    cap_process_memory(spec.get("cpu_memory_gb"))
    if spec["allocator"] == "tuned":  # every route alike, as the runner does for ours
        from tensornet_openmm.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(spec["torch_threads"] or spec["threads"])
    cuda = spec["platform"] == "CUDA"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if spec.get("gpu_memory_gb"):
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = min(1.0, spec["gpu_memory_gb"] * 1e9 / total)
            torch.cuda.set_per_process_memory_fraction(fraction)
    _reset_peak()
    base_mb = _vm_hwm_mb()
    _progress(spec, "building the system")
    topology, positions, mm_system, ml_atoms = build_system(spec["system"], spec["route"] == "mm")
    _progress(spec, f"{topology.getNumAtoms():,} atoms built")
    build_start = time.perf_counter()
    system = route_system(spec["route"], spec, topology, positions, mm_system, ml_atoms)
    build_s = time.perf_counter() - build_start
    _progress(spec, "route's System made")
    properties = {"Threads": str(spec["threads"])} if spec["platform"] == "CPU" else {}
    if cuda:
        properties = {"Precision": spec["precision"]}
    integrator = openmm.LangevinMiddleIntegrator(
        300 * u.kelvin, 1 / u.picosecond, TIMESTEP_FS * u.femtosecond
    )
    integrator.setRandomNumberSeed(SEED)
    platform = openmm.Platform.getPlatformByName(spec["platform"])
    context = openmm.Context(system, integrator, platform, properties)

    def start() -> None:  # every timed stretch starts from the same state
        context.setPositions(positions)
        context.setVelocitiesToTemperature(300 * u.kelvin, SEED)

    _progress(spec, "Context made")
    start()
    e0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    _progress(spec, f"first energy {e0:.3f} kJ/mol")

    def steps(n: int) -> float:
        start = time.perf_counter()
        integrator.step(n)
        context.getState(getPositions=True)  # waits for the device
        return time.perf_counter() - start

    warmup_s = steps(spec["warmup"])
    _progress(spec, f"{spec['warmup']} warm-up steps in {warmup_s:.2f} s")
    return {"context": context, "system": system, "ml_atoms": ml_atoms, "start": start,
            "steps": steps, "e0": e0, "base_mb": base_mb, "build_s": build_s,
            "warmup_s": warmup_s, "cuda": cuda}  # fmt: skip


MIN_BLOCK_SECONDS = 2.0
"""Shortest timed block of ``--interleave`` that does not favour a route (module docstring)."""


def _block_steps(seconds: float, per_step: float) -> int:
    return int(min(max(seconds / max(per_step, 1e-6), 1), 20000))


def worker(spec: dict) -> dict:
    """One case: the median of three timed blocks sized to ``spec['seconds']``."""
    case = _prepared(spec)
    n = _block_steps(spec["seconds"] / 3, case["steps"](1))
    blocks = []
    for _ in range(3):
        case["start"]()
        blocks.append(case["steps"](n) / n)
        _progress(
            spec, f"timed block {len(blocks)} of 3: {n} steps, {1e3 * blocks[-1]:.2f} ms/step"
        )
    return _report(spec, case, 1e3 * statistics.median(blocks), 3 * n)


def serve(spec: dict) -> None:
    """One case of ``--interleave``: set up, say ``{"ready": seconds per step}``, then run a timed
    block of N steps for each line N read (answering ``{"ms": ms per step}``) until ``end``, and
    answer with the case's row."""
    case = _prepared(spec)
    print(json.dumps({"ready": case["steps"](1)}), flush=True)
    blocks: list[float] = []
    timed = 0
    for line in sys.stdin:
        if line.strip() == "end":
            break
        n = int(line)
        timed += n
        case["start"]()
        blocks.append(1e3 * case["steps"](n) / n)
        _progress(spec, f"timed block {len(blocks)}: {n} steps, {blocks[-1]:.2f} ms/step")
        print(json.dumps({"ms": blocks[-1]}), flush=True)
    ms = statistics.median(blocks) if blocks else math.nan
    print(json.dumps({**_report(spec, case, ms, timed), "blocks_ms": blocks}), flush=True)


def _report(spec: dict, case: dict, ms: float, steps_timed: int) -> dict:
    context, system, ml_atoms = case["context"], case["system"], case["ml_atoms"]
    cuda = case["cuda"]
    state = context.getState(getEnergy=True, getPositions=True)
    n_ml = system.getNumParticles() if ml_atoms is None else len(ml_atoms)
    n_ml = 0 if spec["route"] == "mm" else n_ml
    finite = bool(np.isfinite(state.getPositions(asNumpy=True)._value).all())
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = _vm_hwm_mb() - case["base_mb"]
    return {
        "atoms": system.getNumParticles(), "ml_atoms": n_ml,
        "ms_per_step": ms, "ns_per_day": TIMESTEP_FS * 1e-6 * 86400e3 / ms,
        "peak_mb": peak_mb, "e0_kj_per_mol": case["e0"], "steps_timed": steps_timed,
        "warmup_s": case["warmup_s"], "build_s": case["build_s"], "finite": finite,
    }  # fmt: skip


# ---------------------------------------------------------------- driver


def make_checkpoint(folder: Path, channels: int, layers: int, rbf: int, cutoff: float):
    from torchmdnet.models.model import create_model

    hp = dict(
        model="tensornet", embedding_dimension=channels, num_layers=layers, num_rbf=rbf,
        rbf_type="expnorm", trainable_rbf=False, activation="silu", cutoff_lower=0.0,
        cutoff_upper=cutoff, max_z=128, max_num_neighbors=NEIGHBOR_SLOTS, precision=32,
        equivariance_invariance_group="O(3)", static_shapes=False, derivative=True,
        atom_filter=-1, prior_model=None, output_model="Scalar", reduce_op="add",
        remove_ref_energy=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(dict(hp))
    path = folder / "tensornet.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)
    n_params = sum(p.numel() for p in model.parameters())
    return path, n_params


def given_checkpoint(path: Path, args) -> tuple[Path, int]:
    """A TorchMD-Net checkpoint named on the command line; ``args`` take its model options."""
    import tensornet_openmm as tn

    model = tn.load_model(path, trust_pickle=True)
    cfg = model.config
    args.channels, args.layers = cfg.hidden_channels, cfg.num_layers
    args.rbf, args.cutoff = cfg.num_rbf, cfg.cutoff_upper
    return path.resolve(), model.num_parameters()


def available_platforms() -> list[str]:
    import openmm

    names = [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]
    return [p for p in ("CPU", "CUDA") if p in names and (p != "CUDA" or _cuda_ok())]


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name(platform: str) -> str:
    if platform == "CUDA":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


def cap_process_memory(gigabytes: float | None) -> None:
    """Limit this process's heap and anonymous mappings (``RLIMIT_DATA``) to ``gigabytes``: a
    case that needs more fails as out of memory (torch's "not enough memory") instead of waking
    the kernel's out-of-memory killer, which may take another process. Linux; None: no limit."""
    if gigabytes is None:
        return
    import resource

    limit = int(gigabytes * 1e9)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _worker_env(spec: dict) -> dict:
    from tensornet_openmm import openmp

    env = {k: v for k, v in os.environ.items() if k != openmp.VARIABLE}
    if spec["spin"] == "short":  # read by libgomp as the worker starts, so set here
        env = openmp.tuned_environment(env)
    elif spec["spin"] != "default":
        env[openmp.VARIABLE] = spec["spin"]  # a count given on the command line
    return env


def _serve(spec: dict) -> subprocess.Popen:
    """A serving worker (``--serve``) for ``spec``, its stdout read line by line into
    ``proc.lines`` by a thread (so that :func:`_answer` can wait with a time limit)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env(spec),
    )  # fmt: skip
    _relay_stderr(proc)
    _read_lines(proc)
    return proc


def _relay_stderr(proc) -> None:
    """Read a worker's stderr by a thread: its ``--progress`` lines passed on to ours as they
    come, every line kept for :func:`_said` (a worker that fails says why there)."""
    proc.said = []

    def pump():
        for line in proc.stderr:
            proc.said.append(line)
            if line.startswith(PROGRESS):
                sys.stderr.write(line)
                sys.stderr.flush()

    proc.relay = threading.Thread(target=pump, daemon=True)
    proc.relay.start()


def _said(proc) -> str:
    """All a worker wrote to stderr, once it has ended."""
    proc.relay.join(timeout=10)
    return "".join(proc.said)


def _read_lines(proc) -> None:
    proc.lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            proc.lines.put(line)
        proc.lines.put(None)  # the end of its output

    threading.Thread(target=pump, daemon=True).start()


def _answer(proc, timeout: float) -> dict:
    """The next JSON line a serving worker prints (other output, such as Warp's banner, skipped);
    an error when it exits first, or when ``timeout`` seconds pass (the worker is then killed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = proc.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            proc.kill()
            proc.wait()
            return {"error": f"time limit ({timeout:.0f} s)"}
        if line is None:
            proc.wait()
            return _failure(_said(proc), proc.returncode)
        if line.startswith("{"):
            return json.loads(line)


OUT_OF_MEMORY = (*_OUT_OF_MEMORY, "bad_alloc", "memoryerror")
"""What torch (the runner's list), OpenMM (C++) and Python say when an allocation fails, lower
case."""


def _failure(stderr: str, returncode: int) -> dict:
    """A worker that ended without its row: the last line it wrote to stderr, out of memory
    named as such."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    reason = lines[-1] if lines else f"exit {returncode}"
    said = [x for x in lines if any(text in x.lower() for text in OUT_OF_MEMORY)]
    if said or returncode in (-9, 137):
        # the line that says so: C++ exceptions end with their stack's frames
        reason = "out of memory: " + (said[-1].strip() if said else reason)
    return {"error": reason[:160]}


def run_interleaved(specs: list[dict], blocks: int, timeout: float = 900.0) -> list[dict]:
    """The cases of one system side by side: one process each, all set up first, then taking
    turns (in rotating order) for ``blocks`` timed blocks of about ``seconds / blocks`` each. On
    a machine whose speed wanders, every case sees the same stretches of it, so their ratios
    hold better than those of cases run minutes apart. Rows as :func:`combine_rounds` makes them
    (median ms/step over the blocks, its spread). A worker that takes more than ``timeout``
    seconds for its set-up or for one block is stopped, and its row is that error."""
    procs = [_serve(spec) for spec in specs]
    results: list[dict] = [_answer(proc, timeout) for proc in procs]
    live = [i for i, r in enumerate(results) if "ready" in r]
    steps = {i: _block_steps(specs[i]["seconds"] / blocks, results[i]["ready"]) for i in live}
    for block in range(blocks):
        order = live[block % len(live) :] + live[: block % len(live)] if live else []
        for i in order:
            if "error" in results[i]:
                continue
            procs[i].stdin.write(f"{steps[i]}\n")
            procs[i].stdin.flush()
            answer = _answer(procs[i], timeout)
            if "error" in answer:
                results[i] = answer
    rows = []
    for i, (spec, proc) in enumerate(zip(specs, procs, strict=True)):
        if "error" not in results[i]:
            proc.stdin.write("end\n")
            proc.stdin.flush()
            results[i] = _answer(proc, timeout)
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.wait()
        result = results[i]
        if "error" in result:
            rows.append(result)
            continue
        per_block = [{**result, "ms_per_step": ms} for ms in result.pop("blocks_ms")]
        rows.append(combine_rounds(spec, per_block))
    return rows


def run_case(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile(mode="w+") as stdout:
        proc = subprocess.Popen(
            cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=_worker_env(spec)
        )
        _relay_stderr(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": f"time limit ({timeout:.0f} s)"}
        stdout.seek(0)
        lines = stdout.read().splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    return _failure(_said(proc), proc.returncode)


def cases(args, platforms):
    allocators = ["tuned", "default"] if args.allocator == "both" else [args.allocator]
    spins = ["short", "default"] if args.omp_spin == "both" else [args.omp_spin]
    systems = list(args.systems)
    if "water" in systems:
        systems.remove("water")
        systems += [f"water-{n}" for n in args.water_sizes]
    for platform in platforms:
        for system in systems:
            for route in args.routes:
                if (route in OURS or route == "reference") and platform == "CUDA":
                    graph_modes = GRAPH_MODES[args.graphs](route)
                else:
                    graph_modes = ["-"]  # no capture on CPU; torch.compile decides for itself
                for graphs, allocator, spin in itertools.product(graph_modes, allocators, spins):
                    yield dict(platform=platform, system=system, route=route, graphs=graphs,
                               allocator=allocator, spin=spin)  # fmt: skip


GRAPH_MODES = {
    "both": lambda route: ["on", "off"],
    "on": lambda route: ["on"],
    "off": lambda route: ["off"],
    # each route as it runs best: ours decides by size as create_force does by default (graphs
    # below forces.GRAPHS_BELOW_ATOMS ML atoms); the reference with graphs, faster at 22 and
    # 4,866 atoms on both leases that timed it both ways (H100 1.32 against 22.44 and 30.69
    # against 35.98 ms/step, H200 1.24 against 14.95 and 26.83 against 41.75)
    "best": lambda route: ["auto"] if route in OURS else ["on"],
}
"""The CUDA graph settings a route runs under each ``--graphs`` choice."""


def _spin_choice(text: str) -> str:
    if text in ("short", "default", "both") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a spin setting: use short, default, both or a count such as 3000"
    )


def _rounds(text: str) -> int:
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} rounds: give a whole number of at least 1")


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value > 0:  # also false for nan
        return value
    raise argparse.ArgumentTypeError(f"{text!r} GB: give a positive number, such as 80")


def water_atoms(text: str) -> int:
    """An argparse type: the atoms of a water box, a whole number of at least 3 (one molecule)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value >= 3:
        return value
    raise argparse.ArgumentTypeError(
        f"{text!r} atoms: give a water box's size, a whole number of at least 3, such as 1500"
    )


def known_system(text: str) -> str:
    """An argparse type: a system that :func:`build_system` makes (ala2, ala2-water, water-N)."""
    if text in ("ala2", "ala2-water"):
        return text
    if text.startswith("water-"):
        size = text.split("-", 1)[1]
        try:
            water_atoms(size)
        except argparse.ArgumentTypeError:
            pass
        else:
            return text
    raise argparse.ArgumentTypeError(
        f"unknown system {text!r}: give ala2, ala2-water or water-N (a water box of N atoms, "
        "N a whole number of at least 3, such as water-5000)"
    )


def bench_system(text: str) -> str:
    """An argparse type: a system of this benchmark (those of :func:`known_system`, or ``water``,
    whose sizes come from ``--water-sizes``)."""
    if text == "water":
        return text
    try:
        return known_system(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(
            f"{error}; or water for the boxes of --water-sizes"
        ) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument(
        "--systems", nargs="+", type=bench_system, default=["ala2", "ala2-water", "water"]
    )
    parser.add_argument("--water-sizes", type=water_atoms, nargs="+", default=[648, 1500])
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--platforms", nargs="+", help="default: CPU, and CUDA when present")
    parser.add_argument("--graphs", default="both", choices=list(GRAPH_MODES),
                        help="CUDA graphs for ours and the reference: both (on and off), on, off, "
                        "or best: ours by size as create_force decides (auto), the reference on; "
                        "each ours row is then compared with the reference's fastest")  # fmt: skip
    parser.add_argument("--precision", default="mixed", help="CUDA platform precision")
    parser.add_argument("--threads", type=int, default=2, help="OpenMM CPU and torch threads")
    parser.add_argument("--torch-threads", type=int, help="torch's threads, if not --threads")
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default", "both"],
                        help="glibc malloc kept tuned (tensornet_openmm.allocator, as the runner "
                        "does) or left at its defaults, in every route")  # fmt: skip
    parser.add_argument("--omp-spin", default="short", type=_spin_choice,
                        help="short: libgomp's idle threads spin briefly (tensornet_openmm.openmp, "
                        "as the runner sets them); default: as long as libgomp's default; both; "
                        "or a spin count. In every route.")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case")
    parser.add_argument("--rounds", type=_rounds, default=1,
                        help="run every case this many times, round-robin; the table shows the "
                        "median ms/step and its spread")  # fmt: skip
    parser.add_argument("--interleave", type=_rounds, metavar="BLOCKS",
                        help="run the routes of each system side by side, one process each, "
                        "taking turns for this many timed blocks (instead of --rounds): "
                        "steadier ratios on a noisy machine; a system's routes are in memory "
                        "at once; keep --seconds / BLOCKS at 2 s or more")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps (>= graph warm-up)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per case (--interleave: per set-up, per block)")  # fmt: skip
    for key, value in MODEL_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    parser.add_argument("--checkpoint", type=Path,
                        help="a TorchMD-Net TensorNet checkpoint to run instead of random weights "
                        "(the model options are then read from it)")  # fmt: skip
    parser.add_argument("--gpu-memory-gb", type=_gigabytes,
                        help="cap torch's CUDA memory at this many GB (a larger card standing in "
                        "for a smaller one); OpenMM's own buffers come on top")  # fmt: skip
    parser.add_argument("--cpu-memory-gb", type=_gigabytes,
                        help="cap each case's process at this many GB of heap (RLIMIT_DATA): "
                        "a box too large for it fails as out of memory, larger ones are "
                        "skipped (the largest box that fits, on a shared machine)")  # fmt: skip
    parser.add_argument("--progress", action="store_true",
                        help="print each case's stages on stderr as they happen (system built, "
                        "Context made, first energy, warm-up, timed blocks; seconds and torch's "
                        "CUDA peak), so that a case stopped by a time limit says how far it "
                        "got")  # fmt: skip
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file; give a TorchMD-Net TensorNet "
                     "checkpoint, or leave --checkpoint out for random weights")  # fmt: skip
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.serve:
        serve(json.loads(args.serve))
        return
    if args.interleave is not None and args.rounds > 1:
        parser.error("--interleave and --rounds: give one (--interleave N times the routes of a "
                     "system side by side; --rounds N reruns every case N times)")  # fmt: skip
    if args.interleave is not None and args.seconds / args.interleave < MIN_BLOCK_SECONDS:
        print(f"bench_md: warning: --seconds {args.seconds:g} / --interleave {args.interleave} = "
              f"{args.seconds / args.interleave:.2g} s per timed block; blocks under "
              f"{MIN_BLOCK_SECONDS:g} s weigh the slower first steps after each pause, which cost "
              f"ours more than the reference; give --seconds "
              f"{MIN_BLOCK_SECONDS * args.interleave:g} or more", file=sys.stderr)  # fmt: skip
    platforms = args.platforms or available_platforms()
    todo = list(cases(args, platforms))
    results: list[list[dict]] = [[] for _ in todo]
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, n_params = given_checkpoint(args.checkpoint, args)
        else:
            checkpoint, n_params = make_checkpoint(
                Path(tmp), args.channels, args.layers, args.rbf, args.cutoff
            )

        def spec_for(case: dict) -> dict:
            return {**case, "checkpoint": str(checkpoint), "threads": args.threads,
                    "torch_threads": args.torch_threads,
                    "precision": args.precision, "seconds": args.seconds,
                    "gpu_memory_gb": args.gpu_memory_gb,
                    "cpu_memory_gb": args.cpu_memory_gb,
                    "warmup": args.warmup, "progress": args.progress}  # fmt: skip

        if args.interleave is not None:
            rows_by_case: dict[int, dict] = {}
            groups: dict[tuple, list[int]] = {}
            for index, case in enumerate(todo):  # a system's routes side by side
                key = tuple(v for k, v in sorted(case.items()) if k != "route")
                groups.setdefault(key, []).append(index)
            failed: set[tuple] = set()  # as in run_rounds: routes that failed on a water box
            for indices in groups.values():
                run, skipped = [], []
                for i in indices:
                    skip = todo[i]["system"].startswith("water-") and _route_key(todo[i]) in failed
                    (skipped if skip else run).append(i)
                for i in skipped:
                    rows_by_case[i] = {**todo[i], "error": "skipped: a smaller box failed"}
                group_rows = run_interleaved(
                    [spec_for(todo[i]) for i in run], args.interleave, args.timeout
                ) if run else []  # fmt: skip
                for index, row in zip(run, group_rows, strict=True):
                    rows_by_case[index] = {**todo[index], **row}
                    if "error" in row and todo[index]["system"].startswith("water-"):
                        failed.add(_route_key(todo[index]))
                for index in indices:
                    print_row(rows_by_case[index], flush=True)
                if args.csv:  # the rows so far: a run stopped midway keeps them
                    write_csv([rows_by_case[i] for i in sorted(rows_by_case)], args.csv)
            rows = [rows_by_case[i] for i in range(len(todo))]
        else:
            rows = run_rounds(todo, results, args, spec_for)
    print()
    for platform in platforms:
        print(f"platform {platform}: {device_name(platform)}, threads {args.threads}"
              + (f", torch threads {args.torch_threads}" if args.torch_threads else "")
              + (f", precision {args.precision}" if platform == "CUDA" else ""))  # fmt: skip
    print(
        f"model: TensorNet {args.channels} channels, {args.layers} layers, {args.rbf} radial "
        f"functions, cutoff {args.cutoff} A, float32, {n_params:,} parameters; "
        f"LangevinMiddle {TIMESTEP_FS} fs; reference: {NEIGHBOR_SLOTS} neighbour slots per atom"
    )
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)


def run_rounds(todo: list[dict], results: list[list[dict]], args, spec_for) -> list[dict]:
    """Every case ``--rounds`` times, round-robin, each run in a fresh process."""
    failed: set[tuple] = set()  # (platform, route, graphs, ...) that failed on a water box
    for _ in range(args.rounds):  # round-robin: every case sees the machine's moods alike
        for case, done in zip(todo, results, strict=True):
            key = _route_key(case)
            if case["system"].startswith("water-") and key in failed:
                done.append({"error": "skipped: a smaller box failed"})
                continue
            result = run_case(spec_for(case), args.timeout)
            if "error" in result and case["system"].startswith("water-"):
                failed.add(key)
            done.append(result)
            print_row({**case, **result}, flush=True)
            if args.csv:  # the runs so far (each round's its own row): kept if stopped midway
                write_csv([{**c, **r} for c, runs in zip(todo, results, strict=True)
                           for r in runs], args.csv)  # fmt: skip
    return [combine_rounds(case, done) for case, done in zip(todo, results, strict=True)]


def _route_key(case: dict) -> tuple:
    """A case without its system: a route that failed on one water box skips the larger ones."""
    return tuple(case[k] for k in ("platform", "route", "graphs", "allocator", "spin"))


def combine_rounds(case: dict, results: list[dict]) -> dict:
    """One table row from a case's rounds: the median ms/step, its spread (max - min, in % of the
    median) and the largest peak memory; a case that never ran is its last error. When every
    round ran, the row keeps their times in order (``blocks_ms``), for :func:`speedups`."""
    good = [r for r in results if "error" not in r]
    if not good:
        return {**case, **results[-1]}
    ms = [r["ms_per_step"] for r in good]
    median = statistics.median(ms)
    row = {**case, **good[0], "ms_per_step": median, "rounds": len(ms)}
    row["ns_per_day"] = TIMESTEP_FS * 1e-6 * 86400e3 / median
    row["peak_mb"] = max(r["peak_mb"] for r in good)
    row["spread_pct"] = 100 * (max(ms) - min(ms)) / median if len(ms) > 1 else math.nan
    if len(good) == len(results):
        row["blocks_ms"] = ms
    return row


def paired_ratios(ours: dict, other: dict) -> tuple[float, str]:
    """The median and quartiles of other / ours, block by block: with ``--interleave`` (or
    ``--rounds``) block k of every route ran at about the same time, so each block's ratio sees
    one stretch of the machine, which the ratio of two medians does not. NaN and "" unless both
    rows kept the same number (2 or more) of blocks."""
    a, b = ours.get("blocks_ms"), other.get("blocks_ms")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return math.nan, ""
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), f"{low:.2f}-{high:.2f}"


def speedups(rows):
    """Steps per second of ours over the reference and PythonForce routes, matched by platform,
    system, allocator, spin and graph setting (PythonForce has one setting: torch.compile
    decides; ours with graphs ``auto``, which picks its own setting, against the reference's
    fastest row): the ratio of the medians, and the median and quartiles of the block-by-block
    ratios (:func:`paired_ratios`)."""
    found, fastest = {}, {}
    for r in rows:
        if "ms_per_step" in r:
            where = (r["platform"], r["system"], r["route"])
            setting = (r["allocator"], r["spin"])
            found[(*where, r["graphs"], *setting)] = r
            best = fastest.get((*where, *setting))
            if best is None or r["ms_per_step"] < best["ms_per_step"]:
                fastest[(*where, *setting)] = r
    for r in rows:
        if r["route"] in OURS and "ms_per_step" in r:
            where, setting = (r["platform"], r["system"]), (r["allocator"], r["spin"])
            reference = (
                fastest.get((*where, "reference", *setting))
                if r["graphs"] == "auto"
                else found.get((*where, "reference", r["graphs"], *setting))
            )
            others = {
                "reference": reference,
                "pythonforce": found.get((*where, "pythonforce", "-", *setting)),
            }
            for name, other in others.items():
                r[f"vs_{name}"] = other["ms_per_step"] / r["ms_per_step"] if other else math.nan
                paired, quartiles = paired_ratios(r, other) if other else (math.nan, "")
                r[f"vs_{name}_blocks"], r[f"vs_{name}_quartiles"] = paired, quartiles


COLUMNS = [
    ("platform", 8, "s"), ("system", 12, "s"), ("atoms", 6, "d"), ("ml_atoms", 6, "d"),
    ("route", 11, "s"), ("graphs", 6, "s"), ("allocator", 7, "s"), ("spin", 7, "s"),
    ("ms_per_step", 10, ".2f"),
    ("ns_per_day", 9, ".3f"),
    ("peak_mb", 8, ".0f"), ("e0_kj_per_mol", 14, ".3f"), ("vs_reference", 7, ".2f"),
    ("vs_pythonforce", 7, ".2f"), ("spread_pct", 7, ".0f"), ("vs_reference_blocks", 9, ".2f"),
    ("vs_reference_quartiles", 11, "s"),
]  # fmt: skip
HEADERS = {"ml_atoms": "ML", "allocator": "malloc", "ms_per_step": "ms/step",
           "ns_per_day": "ns/day", "peak_mb": "peak MB", "e0_kj_per_mol": "E0 kJ/mol",
           "vs_reference": "x ref", "spread_pct": "spread%",
           "vs_pythonforce": "x pyf", "vs_reference_blocks": "x ref/blk",
           "vs_reference_quartiles": "quartiles"}  # fmt: skip


def _cell(row, key, width, fmt):
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return " " * width
    return format(value, f"{width}{fmt}") if fmt != "s" else format(str(value), f"<{width}")


_CASE = [k for k, _, _ in COLUMNS].index("ms_per_step")  # the columns that name the case


def print_row(row, flush=False):
    text = " ".join(_cell(row, k, w, f) for k, w, f in COLUMNS[:_CASE])
    if "error" in row:
        text += "  FAILED: " + row["error"]
    else:
        text += " " + " ".join(_cell(row, k, w, f) for k, w, f in COLUMNS[_CASE : _CASE + 4])
    print(text, file=sys.stderr, flush=flush)


def print_table(rows):
    speedups(rows)
    print(
        " ".join(format(HEADERS.get(k, k), f"<{w}" if f == "s" else f">{w}") for k, w, f in COLUMNS)
    )
    for row in rows:
        cells = [_cell(row, k, w, f) for k, w, f in COLUMNS]
        line = " ".join(cells)
        if "error" in row:
            line = " ".join(cells[:_CASE]) + "  " + row["error"]
        print(line.rstrip())
    print("x ref / x pyf: steps per second of ours over the reference / PythonForce route "
          "(same platform, system, malloc, spin and graph setting; graphs auto: ours as "
          "create_force decides by size, against the reference's fastest). malloc: glibc tuned by "
          "tensornet_openmm.allocator (as the runner does) or default; spin: libgomp's idle "
          "threads spin short (tensornet_openmm.openmp, as the runner sets) or as long as by "
          "default; all routes alike. With --rounds (--interleave): ms/step is the median over "
          "rounds (timed blocks), spread% its range, and x ref/blk the median of the reference's "
          "time over ours block by block (blocks k of both routes ran at about the same time), "
          "with its quartiles.")  # fmt: skip


def write_csv(rows, path: Path):
    """``rows`` as CSV, through a temporary file and a rename: a run killed while it writes (a
    time limit) leaves the previous, complete file."""
    keys = ["platform", "system", "atoms", "ml_atoms", "route", "graphs", "allocator", "spin",
            "ms_per_step", "ns_per_day", "peak_mb", "e0_kj_per_mol", "vs_reference",
            "vs_pythonforce", "rounds", "spread_pct", "vs_reference_blocks",
            "vs_reference_quartiles", "vs_pythonforce_blocks", "vs_pythonforce_quartiles",
            "steps_timed", "warmup_s", "build_s", "finite", "error"]  # fmt: skip
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
