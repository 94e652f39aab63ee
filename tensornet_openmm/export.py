"""TorchScript export of a TensorNet with OpenMM's calling convention (nm in, kJ/mol out).

:class:`TensorNetForce` is what openmm-torch evaluates: it takes the positions of every particle of
the System in nm (plus the box, plus one scalar per global parameter), picks the ML atoms, finds
their pairs (minimum image in a periodic box), runs TensorNet with the atomic numbers and total
charge baked in, and returns the energy in kJ/mol (and the forces in kJ/mol/nm on request).

:func:`export` scripts it into a self-contained file (it loads with ``torch.jit.load`` in a process
that never imported tensornet_openmm) with its metadata stored beside the code;
:func:`read_metadata` reads that metadata without loading or running the module.

Pair capacity. With a fixed capacity (CUDA graphs) an overflow, that is more pairs than slots or a
cell fuller than ``cell_capacity``, makes the energy and every force NaN (OpenMM's CUDA platform
sums forces in fixed point, where a NaN becomes -2^31 kJ/mol/nm). The step fails loudly (a NaN
energy, NaN or flung coordinates) instead of using a truncated energy. To recover, rebuild
the force with a capacity sized from the current positions (``create_force(...,
positions=state_positions)``), make a new Context and restart from the last good state (the
runner does this from its last checkpoint). A capacity that holds every pair of the ML atoms (a
small molecule's: :func:`pair_capacity` never gives more) makes every pair a slot, in a fixed
order: no search, no padding and no overflow to check; the pairs beyond the cutoff add nothing,
as the model's cosine cutoff is zero there, so the energy and forces are those of the pairs within.

This module imports neither OpenMM nor openmm-torch.
"""

from __future__ import annotations

import copy
import io
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .neighbors import cell_list_min_atoms, check_box, neighbor_pairs
from .nn import TensorNet
from .nn.kernels import use_fused_kernels
from .nn.model import no_history
from .nn.tables import describe, tabulate_radial
from .units import ANGSTROM_TO_NM, EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM

METADATA_NAME = "tensornet_openmm.json"
"""Name of the metadata record stored in an exported file (``torch.jit`` extra file)."""

DENSITY_BOUND = 0.2
"""Atoms per cubic Angstrom assumed at most (water: 0.1) when no positions size the capacity."""

STORE_SPECIES_UP_TO = 20_000
"""Atoms up to which the module stores the embedding's per-atom species terms (3 rows of the
model's channels per atom, 31 MB for 20,000 atoms at 128 channels): six operators fewer a call,
which is what counts for a small molecule's step. A larger system computes them each call (a few
microseconds against a step of milliseconds) rather than carry them in every copy of the module:
at 600,000 atoms they were 0.9 GB, which made the System in 30 s of saves and loads."""


class TensorNetForce(nn.Module):
    """A TensorNet with OpenMM's calling convention.

    forward(positions (n_particles, 3) nm, [box (3, 3) nm if periodic], [scale () if
    ``scale_parameter``]) -> energy () kJ/mol, or (energy, forces (n_particles, 3) kJ/mol/nm) when
    ``outputs_forces``. Computation runs in the model's dtype; forces come back in the dtype of
    ``positions``.

    Parameters
    ----------
    model : TensorNet
        Copied; the copy is put in evaluation mode with gradients off for its parameters.
    atomic_numbers : sequence of int
        One per ML atom.
    atoms : sequence of int, optional
        Indices of the ML atoms among the System's particles (default: all particles, in order).
    periodic : bool
        Minimum image in the box that OpenMM passes.
    total_charge : float
        Total charge of the ML region, in e.
    capacity : int
        Pair slots (each pair counted once) for fixed shapes, which CUDA-graph capture needs;
        negative for a dynamic pair list. Fixed shapes are used on CUDA devices only: elsewhere
        there is nothing to capture, so the exact dynamic list runs and no slot is padding
        (``fixed_on_cpu=True`` forces them everywhere, for testing).
    strategy, cell_capacity
        Pair search, see :func:`tensornet_openmm.neighbors.neighbor_pairs`.
    outputs_forces : bool
        Return forces computed inside the module (openmm-torch ``setOutputsForces``).
    scale_parameter : bool
        Take one more input, a scalar that multiplies energy and forces (for example the ML/MM
        interpolation parameter); OpenMM differentiates the energy with respect to it.
    low_memory : bool
        Forces without keeping any pair's activations for the backward pass
        (:meth:`TensorNet.energy_and_gradient`): same numbers, a fraction of the memory (the
        largest box that fits grows accordingly), one more pass over the pairs.
    fused_kernels : bool
        Run the pair geometry, the pair sums and the per-atom algebra with the compiled kernels
        of :mod:`tensornet_openmm.nn.kernels` (built on first use): on CPU tensors, and on CUDA
        tensors where the CUDA kernels were built; PyTorch elsewhere or if they cannot be built.
        The scripted module then needs them loaded in any process that loads it
        (:func:`tensornet_openmm.nn.kernels.jit_load` does that).
    radial_tables : float, optional
        Tolerance of radial tables (:func:`tensornet_openmm.nn.tables.tabulate_radial`): each
        pair's radial functions are then read from tables instead of running their networks,
        approximately (None: the networks run, exactly); on every path (fused kernels, PyTorch,
        low_memory).
    """

    def __init__(
        self,
        model: TensorNet,
        atomic_numbers: Sequence[int],
        atoms: Optional[Sequence[int]] = None,
        periodic: bool = False,
        total_charge: float = 0.0,
        capacity: int = -1,
        strategy: str = "auto",
        cell_capacity: int = -1,
        outputs_forces: bool = False,
        scale_parameter: bool = False,
        fixed_on_cpu: bool = False,
        low_memory: bool = False,
        fused_kernels: bool = False,
        radial_tables: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the low-memory path has its own pair loops, in PyTorch
        self.fused_kernels = use_fused_kernels(self.model, fused_kernels)
        self.radial_tables = ""  # what tabulate_radial made, for logs and metadata
        if radial_tables is not None:
            self.radial_tables = describe(tabulate_radial(self.model, radial_tables))
        self.model.store_self_pair_terms()  # constants of the weights: computed once, here
        self.model.store_energy_scale(EV_TO_KJ_PER_MOL)  # energies in kJ/mol, no product a call
        dtype = next(self.model.parameters()).dtype
        z = torch.as_tensor(np.asarray(atomic_numbers, dtype=np.int64))
        if z.ndim != 1 or z.numel() == 0:
            raise ValueError(f"atomic_numbers must be a non-empty list; got shape {tuple(z.shape)}")
        self.register_buffer("z", z)
        n = z.numel()
        # a fixed capacity for every pair: all of them are the slots (see the module docstring)
        self.every_pair = n > 1 and int(capacity) >= n * (n - 1) // 2
        slots = torch.triu_indices(n, n, 1) if self.every_pair else torch.zeros((2, 0))
        self.register_buffer("pair_slots", slots.to(torch.int64))
        if n <= STORE_SPECIES_UP_TO:
            self.model.store_species_terms(z)  # constants of the weights and these atoms
        self.use_subset = atoms is not None
        index = torch.arange(z.numel()) if atoms is None else torch.as_tensor(list(atoms))
        if index.shape != z.shape:
            raise ValueError(
                f"{index.numel()} ML atom indices but {z.numel()} atomic numbers; give one "
                "atomic number per ML atom"
            )
        if atoms is not None:
            unique, counts = torch.unique(index, return_counts=True)
            if (counts > 1).any() or (index < 0).any():
                twice = unique[counts > 1].tolist()[:10]
                raise ValueError(
                    f"ML atom indices must be distinct particle indices (0 or more); "
                    f"{f'listed more than once: {twice}' if twice else 'negative ones given'}"
                )
        self.register_buffer("atoms", index.to(torch.int64))
        # the System's particles the positions must hold: exactly the ML atoms without
        # ``atoms``, else at least up to the highest index (checked every call, on the host)
        self.particles = int(index.max()) + 1
        # the slots' particles among the System's: their vectors come from OpenMM's positions
        # directly, with no selection of the ML atoms to differentiate
        self.register_buffer("pair_particles", self.atoms[self.pair_slots])
        try:
            charge = float(total_charge)
        except (TypeError, ValueError):
            raise ValueError(f"total_charge={total_charge!r} must be a number (e)") from None
        self.register_buffer("total_charge", torch.tensor([charge], dtype=dtype))
        # the forces' seed, made once (a fill kernel a call otherwise)
        self.register_buffer("minus_one", torch.full((), -1.0, dtype=dtype), persistent=False)
        self.neutral = charge == 0.0  # the model then skips its charge factors
        self.periodic = bool(periodic)
        self.capacity = int(capacity)
        self.strategy = str(strategy)
        self.cell_capacity = int(cell_capacity)
        self.fixed_on_cpu = bool(fixed_on_cpu)
        self.outputs_forces = bool(outputs_forces)
        self.scale_parameter = bool(scale_parameter)
        self.low_memory = bool(low_memory)
        self.cutoff = float(self.model.cutoff_upper)
        self.dtype = dtype
        self.nm_to_angstrom = NM_TO_ANGSTROM

    def energy_and_overflow(
        self, positions: Tensor, box: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Energy (kJ/mol, model dtype) of the ML atoms, and whether the step failed: the pair
        slots overflowed, or the box is narrower than twice the cutoff (None where neither can
        happen, and for every pair a slot, whose pair vectors' operator checks the box itself
        and makes them NaN)."""
        pos = positions.to(self.dtype)
        box_nm: Optional[Tensor] = None if box is None else box.to(self.dtype)
        capacity, cell_capacity = self.capacity, self.cell_capacity
        if not self.captured(pos):
            capacity, cell_capacity = -1, -1  # nothing to capture: no padding work
        overflow: Optional[Tensor] = None
        if capacity >= 0 and self.every_pair:
            # every pair a slot: their vectors in A straight from the positions in nm, one
            # operator each way with the fused kernels (minimum image included; no selection of
            # the ML atoms, no scale, no box in A to make)
            edge_index = self.pair_slots
            particles = self.pair_particles
            vectors = self.model.tensor_embedding.pair_kernels.pair_difference(
                pos, particles[0], particles[1], self.nm_to_angstrom, box_nm, 2.0 * self.cutoff
            )
        else:
            box_a: Optional[Tensor] = None
            if box_nm is not None:
                box_a = box_nm * self.nm_to_angstrom
            if self.use_subset:  # (index_select: advanced indexing's gradient sorts the indices)
                pos = pos.index_select(0, self.atoms)
            pos = pos * self.nm_to_angstrom
            # (the fused kernels' pair_search where they apply, else PyTorch's search)
            pairs = self.model.tensor_embedding.pair_kernels.neighbor_pairs(
                pos, self.cutoff, box_a, capacity, self.strategy, cell_capacity, True
            )
            edge_index, vectors = pairs.edge_index, pairs.vectors
            if capacity >= 0:
                overflow = pairs.num_pairs > capacity
            if box_a is not None:  # (the box's diagonal: a view)
                small = box_a.diagonal().min() < 2.0 * self.cutoff
                overflow = small if overflow is None else overflow | small
        charge: Optional[Tensor] = None if self.neutral else self.total_charge
        if self.low_memory:
            fixed = no_history(vectors)
            e, grad = self.model.energy_and_gradient(self.z, edge_index, fixed, charge, True, 0)
            # the energy's value, with the gradient it has through the pair vectors: autograd
            # (OpenMM's or ours) carries it on to the positions through that small graph alone
            energy = (e + (grad * (vectors - fixed)).sum())[None]
        else:
            energy = self.model(self.z, pos, edge_index, vectors, None, charge, 1, half=True)
        # reshape, not [0]: a view's gradient is a view, where select's fills zeros and copies
        return energy.reshape(()), overflow  # kJ/mol: see store_energy_scale

    def captured(self, positions: Tensor) -> bool:
        """Whether a call may be captured in a CUDA graph (on CUDA, or as if, ``fixed_on_cpu``):
        the pair list then keeps the fixed capacity, where one is given."""
        return positions.is_cuda or self.fixed_on_cpu

    def carry_nan(self, energy: Tensor, positions: Tensor, box: Optional[Tensor]) -> Tensor:
        """The energy, NaN where an ML atom's coordinate is NaN or infinite, on the dynamic
        pair list without a box: there nothing can fail, and such an atom would only lose its
        pairs (no distance passes the cutoff test), the energy staying finite. The other routes
        carry it already, through the every-pair slots' vectors or the failure term's sum of the
        coordinates. Applied after the gradient: three operators forward, none back (inside the
        differentiated graph, six)."""
        dynamic = self.capacity < 0 or not self.captured(positions)
        if not dynamic or box is not None:
            return energy
        ml = positions.index_select(0, self.atoms) if self.use_subset else positions
        # a + 0 b in one operator (a product and a sum would be an autodiff subgraph)
        return torch.add(energy, ml.detach().sum().to(energy.dtype), alpha=0.0)

    def check_particles(self, positions: Tensor) -> None:
        """Refuse positions that are not those of the System the force was made for: a force
        for n ML atoms without ``atoms`` in a System of more or fewer particles, or one whose
        ML atom indices reach past the System's particles (shapes only: no synchronisation)."""
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError(
                "positions must be (particles, 3) in nm; got shape " + str(positions.shape)
            )
        count = positions.shape[0]
        n = self.z.shape[0]
        if self.use_subset and count < self.particles:
            raise ValueError(
                "the ML atoms' particle indices reach " + str(self.particles - 1) + " but the "
                "System has " + str(count) + " particles: add the force to the System whose "
                "particle indices were given as atoms"
            )
        if not self.use_subset and count != n:
            raise ValueError(
                "this force was made for " + str(n) + " ML atoms and no atoms= indices, but "
                "the System has " + str(count) + " particles: for an ML region of a larger "
                "System give create_force atoms= (the ML atoms' particle indices), or add the "
                "force to a System of exactly those " + str(n) + " particles"
            )

    def forward(
        self, positions: Tensor, arg1: Optional[Tensor] = None, arg2: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        box: Optional[Tensor] = None
        scale: Optional[Tensor] = None
        if self.periodic:
            box, scale = arg1, arg2
        else:
            scale = arg1
        self.check_particles(positions)
        if self.outputs_forces:
            positions = positions.detach().requires_grad_(True)
        energy, failed = self.energy_and_overflow(positions, box)
        # failures make energy and forces NaN without a host synchronisation (CUDA graphs):
        # a pair-list overflow, or a box (NPT) that shrank below twice the cutoff (neither can
        # happen to a dynamic pair list without a box: nothing to check then)
        if failed is not None:
            # NaN times every particle's coordinates on failure, zero otherwise: then the energy
            # and all forces are NaN (one term, five kernels in a CUDA graph)
            nan_or_zero = torch.where(failed, math.nan, 0.0).to(energy.dtype)
            # (one addcmul: a product and a sum would be an autodiff subgraph of TorchScript's)
            energy = torch.addcmul(energy, nan_or_zero, positions.sum().to(energy.dtype))
        if scale is not None:
            energy = energy * scale.to(energy.dtype)
        if not self.outputs_forces:  # (the zeros dropped by _EnergyOnly and freezing)
            return self.carry_nan(energy, positions, box), torch.zeros_like(positions)
        # seeded with -1, the gradient is the forces: no negation. openmm-torch differentiates
        # the energy again for the scale's derivative
        seed: list[Optional[Tensor]] = [self.minus_one.expand_as(energy)]
        forces = torch.autograd.grad(
            [energy], [positions], seed, retain_graph=scale is not None, allow_unused=True
        )[0]
        if forces is None:
            forces = torch.zeros_like(positions)
        return self.carry_nan(energy, positions, box), forces


def _returns_tuple(module: TensorNetForce) -> nn.Module:
    """OpenMM expects a bare energy unless forces are output: wrap accordingly."""
    return _WithForces(module) if module.outputs_forces else _EnergyOnly(module)


class _EnergyOnly(nn.Module):
    def __init__(self, inner: TensorNetForce) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, positions: Tensor, arg1: Optional[Tensor] = None, arg2: Optional[Tensor] = None
    ) -> Tensor:
        return self.inner(positions, arg1, arg2)[0]


class _WithForces(_EnergyOnly):
    def forward(  # type: ignore[override]
        self, positions: Tensor, arg1: Optional[Tensor] = None, arg2: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        return self.inner(positions, arg1, arg2)


def pair_capacity(
    model: TensorNet,
    n_atoms: int,
    positions_angstrom: Optional[np.ndarray] = None,
    box_angstrom: Optional[np.ndarray] = None,
    margin: float = 1.5,
    strategy: str = "auto",
) -> tuple[int, int, str]:
    """Pair slots, cell capacity and strategy for a fixed-capacity (CUDA-graph) pair list.

    From positions: ``margin`` x the pairs (and the fullest cell) found there, plus a floor of
    64 slots. Without positions: a bound from :data:`DENSITY_BOUND` (atoms per A^3 within the
    cutoff sphere), never more than all n(n-1) pairs; the cell list needs positions.
    """
    if margin < 1.0:
        raise ValueError(f"capacity margin {margin} must be at least 1")
    cutoff = float(model.cutoff_upper)
    if strategy == "auto":
        strategy = "cell" if n_atoms >= cell_list_min_atoms() else "brute"
    all_pairs = n_atoms * (n_atoms - 1) // 2  # each pair counted once (half list)
    if positions_angstrom is None:
        if strategy == "cell":
            raise ValueError(
                f"sizing a cell-list pair capacity for {n_atoms} atoms needs their positions: "
                "pass positions= (or cuda_graphs=False for a dynamic pair list)"
            )
        per_atom = DENSITY_BOUND * 4.0 / 3.0 * math.pi * cutoff**3 / 2.0
        return min(all_pairs, math.ceil(n_atoms * per_atom)), -1, strategy
    count, fullest = pair_counts(cutoff, positions_angstrom, box_angstrom, strategy == "cell")
    capacity = min(all_pairs, math.ceil(margin * count) + 64)
    cell_capacity = -1 if fullest < 0 else math.ceil(margin * fullest) + 4
    return max(capacity, 1), cell_capacity, strategy


def pair_counts(
    cutoff: float,
    positions_angstrom: np.ndarray,
    box_angstrom: Optional[np.ndarray] = None,
    cells: bool = False,
) -> tuple[int, int]:
    """The pairs within ``cutoff`` at these positions (each once), and with ``cells`` the atoms
    of the cell list's fullest cell (else -1): what a fixed-capacity pair list must hold."""
    pos = torch.as_tensor(np.asarray(positions_angstrom, dtype=np.float64))
    box = None if box_angstrom is None else torch.as_tensor(np.asarray(box_angstrom, np.float64))
    search = "cell" if len(pos) > 1 else "brute"
    count = int(neighbor_pairs(pos, cutoff, box, strategy=search, half=True).num_pairs)
    fullest = -1
    if cells:
        from .neighbors import _cells

        fullest = int(torch.bincount(_cells(pos, cutoff, box)[0]).max())
    return count, fullest


def pair_list_fill(module, positions_nm: np.ndarray, box_nm: Optional[np.ndarray]) -> dict:
    """How full a force module's fixed-capacity pair list is at these positions (all particles
    of the System, nm): ``pairs`` and ``capacity``, ``fullest_cell`` and ``cell_capacity`` (-1
    where the list has no cells). ``module`` is a :class:`TensorNetForce`, scripted or not, or
    the TorchScript wrapper around one (``TorchForce.getModule()``)."""
    inner = module.inner if hasattr(module, "inner") else module
    pos = np.asarray(positions_nm, dtype=np.float64)
    if bool(inner.use_subset):
        pos = pos[np.asarray(inner.atoms, dtype=np.int64)]
    box = None if box_nm is None or not bool(inner.periodic) else np.asarray(box_nm) * 10.0
    cells = int(inner.cell_capacity) >= 0
    pairs, fullest = pair_counts(float(inner.cutoff), pos * 10.0, box, cells)
    return {
        "pairs": pairs,
        "capacity": int(inner.capacity),
        "fullest_cell": fullest,
        "cell_capacity": int(inner.cell_capacity),
    }


def script(module: TensorNetForce) -> torch.jit.ScriptModule:
    """TorchScript of the module in OpenMM's calling convention, its forward inlined
    (:func:`inline_forward`)."""
    return inline_forward(torch.jit.script(_returns_tuple(module)))


def inline_forward(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``module``, with every method and function call of its forward inlined (in place).

    openmm-torch freezes the module it loads (``torch::jit::freeze``), which inlines those calls
    itself and then drops the submodules' methods that the inlined nodes' call stacks still
    point at. An error raised inside the module (positions of the wrong System, a CUDA
    out-of-memory error, any operator's check) then crashes the whole process in TorchScript's
    error report (torch 2.9: a segmentation fault in ``InterpreterStateImpl::callstack``)
    instead of reaching the caller as an OpenMMException with its message. A forward that calls
    nothing leaves freezing nothing to inline. The graph is the same computation; TorchScript
    shares it between modules scripted from the same class and settings, which it leaves
    equally correct.
    """
    torch._C._jit_pass_inline(module.forward.graph)
    return module


def metadata(module: TensorNetForce) -> dict[str, Any]:
    """What an exported file records about itself (plain JSON data)."""
    from . import __version__

    model = module.model
    return {
        "format": "tensornet_openmm.export",
        "format_version": 1,
        "config": model.config.to_dict(),
        "dtype": str(module.dtype).replace("torch.", ""),
        "cutoff_nm": module.cutoff * ANGSTROM_TO_NM,
        "atomic_numbers": module.z.tolist(),
        "elements": sorted(set(module.z.tolist())),
        "atoms": module.atoms.tolist() if module.use_subset else None,
        "total_charge": float(module.total_charge[0]),
        "periodic": module.periodic,
        "capacity": module.capacity,
        "pairs": "half",
        "strategy": module.strategy,
        "cell_capacity": module.cell_capacity,
        "outputs_forces": module.outputs_forces,
        "scale_parameter": module.scale_parameter,
        "low_memory": module.low_memory,
        "fused_kernels": module.fused_kernels,
        "radial_tables": module.radial_tables,
        "units": {"positions": "nm", "box": "nm", "energy": "kJ/mol", "forces": "kJ/mol/nm"},
        "model_metadata": model.metadata,
        "versions": {"tensornet_openmm": __version__, "torch": str(torch.__version__)},
    }


def export(module: TensorNetForce, path: str | Path | None = None) -> bytes:
    """Script ``module`` and save it with its metadata; returns the file's bytes.

    The file is written through a temporary name and a rename when ``path`` is given.
    """
    scripted = script(module)
    buffer = io.BytesIO()
    extra = {METADATA_NAME: json.dumps(metadata(module), indent=1, default=str)}
    torch.jit.save(scripted, buffer, _extra_files=extra)
    data = buffer.getvalue()
    if path is not None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def read_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """The metadata of an exported file, read from the archive without loading the module."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with zipfile.ZipFile(handle) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_NAME)]
            if not names:
                raise ValueError(f"{source!r:.80} is a TorchScript file without tensornet metadata")
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{source!r:.80} is not a TorchScript archive: {err}") from err


def validate_elements(model: TensorNet, atomic_numbers: Sequence[int]) -> None:
    """Raise ValueError when the model cannot describe these elements."""
    z = [int(v) for v in atomic_numbers]
    bad = sorted({v for v in z if not 0 < v < model.max_z})
    if bad:
        raise ValueError(
            f"atomic numbers {bad} are outside this model's range 1..{model.max_z - 1} (max_z)"
        )
    known = model.metadata.get("elements")
    if known is not None:
        missing = sorted(set(z) - {int(v) for v in known})
        if missing:
            raise ValueError(
                f"the model was trained on elements {sorted(int(v) for v in known)} but the ML "
                f"region contains {missing}; use a model that covers them or leave those atoms MM"
            )


def check_periodic_box(model: TensorNet, box_nm: np.ndarray) -> None:
    """check_box in nm for this model's cutoff (clear errors for a box that is too small)."""
    check_box(torch.as_tensor(np.asarray(box_nm, np.float64)) * NM_TO_ANGSTROM, model.cutoff_upper)
