"""Pair search for TensorNet: free space and periodic (triclinic) boxes, TorchScript-clean.

Returns ordered pairs (i, j), i != j, both directions, with r_ij = pos[i] - pos[j] under the
minimum-image convention; the model adds the self pairs. With ``half=True`` each pair comes once,
as i < j (TensorNet's radial filters are symmetric, so the model then does half the pair work).

Strategies (one interface, identical pair sets):

- ``"brute"``: every pair is tested, in row blocks, so temporaries stay at about 4M elements
  whatever the system size (no N x N array). Cost O(N^2); fastest for small systems.
- ``"cell"``: atoms are binned into cells at least one cutoff wide (in fractional coordinates for a
  periodic box) and only the 27 surrounding cells are searched. Cost O(N).
- ``"cluster"``: torch-cluster's ``radius_graph`` (no periodic box; eager only, not TorchScript).
- ``"auto"``: ``"cell"`` from :data:`CELL_LIST_MIN_ATOMS` atoms on, ``"brute"`` below.

Two modes:

- dynamic (``capacity < 0``): exactly the pairs within the cutoff; shapes depend on the data.
- fixed capacity (``capacity >= 0``): shapes are fixed, as CUDA-graph capture needs. Unused slot k
  holds the self pair (a, a), a = k mod n, with a displacement of length 2 * cutoff, which
  contributes exactly nothing to TensorNet's energy or forces. (Spread over the atoms, not all
  (0, 0): a GPU adds a pair's zero terms onto its atoms with atomic adds, and a third of the slots
  adding onto one atom would queue up on the same addresses.) The true pair count is returned as
  a tensor, so an overflow (count > capacity, pairs dropped) is visible without a host
  synchronisation.

Boxes are in OpenMM's reduced form (rows a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz),
ax >= 2|bx|, ax >= 2|cx|, by >= 2|cy|) with the cutoff at most half of each width; check them
with :func:`check_box` before use. Positions need not be wrapped into the box.

With the fused kernels (:mod:`tensornet_openmm.nn.kernels`) the OpenMM force searches with
their ``pair_search`` operator instead: :func:`candidate_ranges` lays the candidates out as
ranges, the operator tests them in two passes (CPU threads, or a GPU warp per atom) and
:func:`searched_pairs` makes the vectors; the same pairs in the same order and the same numbers.

This module does not import OpenMM.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

STRATEGIES = ("auto", "brute", "cell", "cluster")


def cell_list_min_atoms() -> int:
    """Atoms from which ``"auto"`` uses the cell list (see benchmarks/bench_neighbors.py)."""
    return 1000


CELL_LIST_MIN_ATOMS = cell_list_min_atoms()


def _block_elements() -> int:
    """Candidate pairs tested at once: bounds the temporaries whatever the system size."""
    return 1 << 22


def _cell_margin() -> float:
    """Cells slightly wider than the cutoff absorb rounding in the binning."""
    return 1.0 + 1e-3


class PairList(NamedTuple):
    """Result of :func:`neighbor_pairs`."""

    edge_index: Tensor
    """(2, P) int64: pairs (i, j), both directions, i != j."""
    vectors: Tensor
    """(P, 3): pos[i] - pos[j] under minimum image; differentiable in the positions."""
    distances: Tensor
    """(P,): lengths of ``vectors``."""
    num_pairs: Tensor
    """() int64: pairs within the cutoff; above the capacity when pairs were dropped."""


def check_box(box: Tensor, cutoff: float) -> None:
    """Raise ValueError unless ``box`` (3, 3, rows a, b, c) is reduced and wide enough."""
    if box.shape != (3, 3):
        raise ValueError(f"box must have shape (3, 3) (rows a, b, c); got {tuple(box.shape)}")
    b = box.detach().to(torch.float64).cpu()
    if b[0, 1] != 0 or b[0, 2] != 0 or b[1, 2] != 0:
        raise ValueError(
            f"box {b.tolist()} is not in OpenMM's reduced form: a must lie along x and b in the "
            "xy plane (a_y = a_z = b_z = 0). Use OpenMM's reduced periodic box vectors."
        )
    ax, by, cz = float(b[0, 0]), float(b[1, 1]), float(b[2, 2])
    if min(ax, by, cz) <= 0:
        raise ValueError(f"box {b.tolist()} has a non-positive width")
    if ax < 2 * abs(float(b[1, 0])) or ax < 2 * abs(float(b[2, 0])) or by < 2 * abs(float(b[2, 1])):
        raise ValueError(
            f"box {b.tolist()} is not reduced (need ax >= 2|bx|, ax >= 2|cx|, by >= 2|cy|)"
        )
    if 2 * cutoff > min(ax, by, cz):
        raise ValueError(
            f"the box widths {ax:.4g}, {by:.4g}, {cz:.4g} must be at least twice the cutoff "
            f"({cutoff:.4g}); use a larger box or a smaller cutoff"
        )


def minimum_image(d: Tensor, box: Tensor) -> Tensor:
    """Minimum-image displacements (..., 3) in a reduced triclinic box: c, then b, then a."""
    d = d - torch.round(d[..., 2:3] / box[2, 2]) * box[2]
    d = d - torch.round(d[..., 1:2] / box[1, 1]) * box[1]
    return d - torch.round(d[..., 0:1] / box[0, 0]) * box[0]


def _difference(pos: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """pos[i] - pos[j], gathered by ``index_select``: its gradient is an ``index_add`` (on a GPU a
    zero fill and one kernel of atomic adds), where advanced indexing's is an ``index_put`` with
    accumulation, which sorts the indices first (on a GPU some five kernels and a radix sort of
    every pair's index, twice a call)."""
    return pos.index_select(0, i) - pos.index_select(0, j)


def _lattice_shift(d: Tensor, box: Optional[Tensor]) -> Optional[Tensor]:
    """The lattice vectors that bring the differences ``d`` to their minimum image (None without
    a box), as a constant: their gradient is zero, and autograd through the rounding would spend a
    dozen operators (GPU kernels) a call computing it."""
    shift: Optional[Tensor] = None
    if box is not None:  # (one return: TorchScript fails on an early one before a with block)
        with torch.no_grad():
            shift = minimum_image(d, box) - d
    return shift


def minimum_image_of(d: Tensor, box: Optional[Tensor]) -> Tensor:
    """Differences ``d`` (P, 3) under minimum image when there is a box (reduced, see
    :func:`check_box`), by a constant lattice shift (see :func:`_lattice_shift`); ``d`` itself
    without a box."""
    shift = _lattice_shift(d, box)
    return d if shift is None else d + shift


def _displacements(pos: Tensor, i: Tensor, j: Tensor, box: Optional[Tensor]) -> Tensor:
    """r_ij = pos[i] - pos[j] of the pairs (i, j), under minimum image when there is a box."""
    return minimum_image_of(_difference(pos, i, j), box)


def _slot_vectors(
    pos: Tensor,
    pairs: Tensor,
    used: Tensor,
    shift: Optional[Tensor],
    box: Optional[Tensor],
    cutoff: float,
) -> Tensor:
    """The vectors of fixed pair slots: pos[i] - pos[j] + shift in the used slots and (2 cutoff,
    0, 0) in the others, beyond the cutoff, so that they add no terms. ``shift`` is the slots'
    lattice shift if known, else found from ``box``. An unused slot holds a self pair (see
    :func:`_spread`), whose difference is zero: the padding is added as part of the constant
    shift (the same numbers as selecting it, with no selection to differentiate)."""
    d = _difference(pos, pairs[0], pairs[1])
    if shift is None:
        shift = _lattice_shift(d, box)
    with torch.no_grad():
        padding = torch.zeros_like(d)
        # fill_, not item assignment: TorchScript would copy the number from the host, which a
        # CUDA graph capture refuses
        padding.select(1, 0).fill_(2.0 * cutoff)
        if shift is None:
            shift = torch.where(used[:, None], 0.0, padding)
        else:
            shift = torch.where(used[:, None], shift, padding)
    return d + shift


def _close(
    pos: Tensor, i: Tensor, j: Tensor, ok: Tensor, cutoff: float, box: Optional[Tensor], half: bool
):
    """Mask of the candidates (i, j) that are valid, distinct (i < j if half) and within cutoff."""
    d = _displacements(pos, i, j, box)
    order = (i < j) if half else (i != j)
    return ok & order & ((d * d).sum(-1) < cutoff * cutoff)


class _Compactor:
    """Collects accepted candidates block by block, as a list or into fixed slots.

    Fixed slots keep the first ``capacity`` accepted pairs in candidate order. Each block is
    merged with ``nonzero_static`` over (kept, block): no host synchronisation (CUDA graphs) and
    no rejected candidate writing anywhere. The scatter it replaces sent every rejected candidate
    to one dump slot: 4.7 million writes to one address per step of a 4,866-atom water box, which a
    GPU serialises (not yet measured there; on the CPU both take the same time).
    """

    def __init__(self, capacity: int, device: torch.device, atoms: int = 1):
        self.capacity = capacity
        self.atoms = max(atoms, 1)
        self.found: list[Tensor] = []
        size = max(capacity, 0)
        self.kept = torch.zeros((2, size), dtype=torch.int64, device=device)
        self.used = torch.zeros(size, dtype=torch.bool, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, i: Tensor, j: Tensor, mask: Tensor):
        if self.capacity < 0:
            keep = mask.nonzero().squeeze(1)
            self.found.append(torch.stack((i[keep], j[keep])))
            return
        self.count = self.count + mask.sum()
        ok = torch.cat((self.used, mask))
        pick = torch.nonzero_static(ok, size=self.capacity, fill_value=-1)[:, 0]
        self.used = pick >= 0
        pick = torch.clamp(pick, min=0)
        both = torch.cat((self.kept, torch.stack((i, j))), dim=1)
        self.kept = torch.where(self.used, both.index_select(1, pick), 0)

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.capacity < 0:
            device = self.kept.device
            pairs = torch.cat(self.found, dim=1) if len(self.found) > 0 else self.kept[:, :0]
            used = torch.ones(pairs.shape[1], dtype=torch.bool, device=device)
            return pairs, used, torch.full((), pairs.shape[1], dtype=torch.int64, device=device)
        return _spread(self.kept, self.used, self.atoms), self.used, self.count


def _spread(pairs: Tensor, used: Tensor, atoms: int) -> Tensor:
    """``pairs`` (2, capacity) with unused slot k the self pair (k mod n, k mod n) (see the
    module's docstring)."""
    slots = torch.arange(used.shape[0], device=used.device)
    return torch.where(used, pairs, torch.remainder(slots, atoms).expand(2, -1))


def _brute(pos: Tensor, cutoff: float, box: Optional[Tensor], half: bool, out: _Compactor) -> None:
    n = pos.shape[0]
    block = max(1, _block_elements() // max(n, 1))
    for start in range(0, n, block):
        rows = torch.arange(start, min(n, start + block), device=pos.device)
        cols = torch.arange(start + 1 if half else 0, n, device=pos.device)  # half: j > i only
        i = rows[:, None].expand(-1, cols.shape[0]).reshape(-1)
        j = cols[None, :].expand(rows.shape[0], -1).reshape(-1)
        out.add(i, j, _close(pos, i, j, torch.ones_like(i, dtype=torch.bool), cutoff, box, half))


def _brute_half_at_once(
    positions: Tensor, cutoff: float, box: Optional[Tensor], capacity: int = -1
) -> PairList:
    """The brute-force half list when every candidate fits in one block (a small molecule's):
    the same pairs, vectors and order as the general search (candidates (i, j > i) in row-major
    order; with a capacity, the first ``capacity`` found, unused slots padded as
    :meth:`_Compactor.pairs` pads them), in one pass over the candidates instead of blocks:
    some twenty operators instead of some forty with a capacity (each a GPU kernel in a CUDA
    graph; alanine dipeptide: 231 candidates). The candidates are measured without a graph, with
    their lattice shifts kept; the vectors of the pairs found are then taken from the positions
    again, so that the gradient flows through the pairs alone. (A force whose capacity holds
    every candidate skips the search: ``TensorNetForce.every_pair``.)"""
    n = positions.shape[0]
    candidates = torch.triu_indices(n, n, 1, device=positions.device)
    with torch.no_grad():
        d = _difference(positions, candidates[0], candidates[1])
        shift = _lattice_shift(d, box)
        if shift is not None:
            d = d + shift
        within = (d * d).sum(-1) < cutoff * cutoff
    if capacity < 0:
        keep = within.nonzero().squeeze(1)
        count = torch.full((), keep.shape[0], dtype=torch.int64, device=positions.device)
        pairs = candidates.index_select(1, keep)
        vectors = _difference(positions, pairs[0], pairs[1])
        if shift is not None:
            vectors = vectors + shift.index_select(0, keep)
        return PairList(pairs, vectors, torch.linalg.vector_norm(vectors, dim=-1), count)
    pick = torch.nonzero_static(within, size=capacity, fill_value=-1)[:, 0]
    used = pick >= 0
    pick = torch.clamp(pick, min=0)
    pairs = _spread(candidates.index_select(1, pick), used, n)
    kept_shift = None if shift is None else shift.index_select(0, pick)
    vectors = _slot_vectors(positions, pairs, used, kept_shift, box, cutoff)
    return PairList(pairs, vectors, torch.linalg.vector_norm(vectors, dim=-1), within.sum())


def _cells(pos: Tensor, cutoff: float, box: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Cell id of every atom (N,), the ids of its 27 neighbour cells (N, 27), cells per axis (3,).

    Computed in float64. Cells are at least ``cutoff`` wide (perpendicular width for a box), so any
    pair within the cutoff lies in the same or adjacent cells. An id of -1 marks "no such cell".
    """
    x = pos.detach().to(torch.float64)
    width = cutoff * _cell_margin()
    off = torch.arange(-1, 2, dtype=torch.int64, device=pos.device)  # made there: no host copy
    off = torch.stack(torch.meshgrid(off, off, off, indexing="ij"), -1).reshape(27, 3)
    if box is not None:
        # inv_ex: no error check, so no host synchronisation inside a CUDA graph
        inverse = torch.linalg.inv_ex(box.detach().to(torch.float64)).inverse
        frac = x @ inverse
        frac = frac - torch.floor(frac)
        # distance between lattice planes, per axis: cells must be this wide / n_cells
        plane_spacing = 1.0 / torch.linalg.vector_norm(inverse, dim=0)
        n_cells = torch.clamp(torch.floor(plane_spacing / width), min=1).to(torch.int64)
        cell = torch.minimum(torch.floor(frac * n_cells).to(torch.int64), n_cells - 1)
        nb = torch.remainder(cell[:, None, :] + off[None], n_cells)
        # with fewer than 3 cells on an axis, offsets -1 and +1 would revisit a cell
        repeat = ((off == 1) & (n_cells < 3)) | ((off == -1) & (n_cells < 2))
        invalid = repeat.any(-1)[None, :].expand(nb.shape[0], -1)
    else:
        low = x.min(0).values if x.shape[0] > 0 else torch.zeros(3, dtype=x.dtype, device=x.device)
        cell = torch.floor((x - low) / width).to(torch.int64)
        n_cells = (cell.max(0).values + 1) if x.shape[0] > 0 else torch.ones_like(off[0])
        nb = cell[:, None, :] + off[None]
        invalid = ((nb < 0) | (nb >= n_cells)).any(-1)
    nb_id = (nb[..., 0] * n_cells[1] + nb[..., 1]) * n_cells[2] + nb[..., 2]
    cell_id = (cell[:, 0] * n_cells[1] + cell[:, 1]) * n_cells[2] + cell[:, 2]
    return cell_id, torch.where(invalid, -1, nb_id), n_cells


def _cell_ranges(
    pos: Tensor, cutoff: float, box: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The atoms sorted by cell (N,; stably: by index within a cell) and where each atom's 27
    neighbour cells start and end in that order (N, 27 each; a missing cell is empty)."""
    cell_id, nb_id, _ = _cells(pos, cutoff, box)
    cell_id, order = torch.sort(cell_id, stable=True)
    start = torch.searchsorted(cell_id, nb_id)
    end = torch.searchsorted(cell_id, nb_id, right=True)
    return order, start, end


def candidate_ranges(
    positions: Tensor, cutoff: float, box: Optional[Tensor], strategy: str, half: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidates of a compiled search (the fused kernels' ``pair_search``) as ranges: atom
    i's candidates are ``order[k]`` for k in [start[i, r], end[i, r]), r in turn. ``"cell"``: its
    27 neighbour cells, in the order :func:`_cell_list` searches them; ``"brute"``: the atoms after
    it (``half``) or all. ``"auto"`` as in :func:`neighbor_pairs`. The search then finds the same
    pairs in the same order as this module's, without a tensor per candidate."""
    n = positions.shape[0]
    if strategy == "auto":
        strategy = "cell" if n >= cell_list_min_atoms() else "brute"
    if strategy == "cell":
        with torch.no_grad():
            return _cell_ranges(positions, cutoff, box)
    if strategy != "brute":
        raise ValueError(
            f"a compiled pair search takes 'auto', 'brute' or 'cell', not '{strategy}'"
        )
    order = torch.arange(n, device=positions.device)
    # (arange, not order + 1: two operators in a row that TorchScript's executor would make an
    # autodiff subgraph of, at a cost per call, though nothing here has a gradient)
    if half:
        start = torch.arange(1, n + 1, device=positions.device)[:, None]
    else:
        start = torch.zeros_like(order)[:, None]
    return order, start, torch.full_like(start, n)


def searched_pairs(
    positions: Tensor, pairs: Tensor, shift: Optional[Tensor], count: Tensor
) -> PairList:
    """The :class:`PairList` of a compiled search's pairs, lattice shifts (constants: padding
    slots' included; None where all are zeros: a dynamic list without a box) and count: vectors
    pos[i] - pos[j] + shift, differentiable in the positions, the numbers of
    :func:`_displacements` and :func:`_slot_vectors`."""
    vectors = _difference(positions, pairs[0], pairs[1])
    if shift is not None:
        vectors = vectors + shift
    return PairList(pairs, vectors, torch.linalg.vector_norm(vectors, dim=-1), count)


def _cell_list(
    pos: Tensor,
    cutoff: float,
    box: Optional[Tensor],
    cell_capacity: int,
    half: bool,
    out: _Compactor,
) -> Tensor:
    """Search the 27 neighbour cells of every atom; returns whether a cell overflowed."""
    n = pos.shape[0]
    order, start, end = _cell_ranges(pos, cutoff, box)
    fill = end - start
    most = cell_capacity
    if cell_capacity < 0:
        most = int(fill.max().item()) if n > 0 else 0
    overflow = (fill > most).any() if n > 0 else torch.zeros((), dtype=torch.bool)
    slots = torch.arange(most, device=pos.device)
    block = max(1, _block_elements() // max(27 * most, 1))
    for first in range(0, n, block):
        rows = torch.arange(first, min(n, first + block), device=pos.device)
        k = start[rows, :, None] + slots  # (B, 27, most) positions in the sorted order
        ok = (k < end[rows, :, None]).reshape(-1)
        j = order[torch.clamp(k, max=n - 1).reshape(-1)]
        i = rows[:, None].expand(-1, 27 * most).reshape(-1)
        out.add(i, j, _close(pos, i, j, ok, cutoff, box, half))
    return overflow


@torch.jit.unused
def _radius_graph(pos: Tensor, cutoff: float, half: bool, out: _Compactor) -> None:
    try:
        from torch_cluster import radius_graph
    except ImportError as error:
        raise ImportError(
            "the 'cluster' strategy needs torch-cluster: pip install 'tensornet-openmm[cluster]' "
            "(or use strategy='cell', which needs nothing extra)"
        ) from error
    # a slightly larger radius and our own test keep the pair set identical to the other strategies
    found = radius_graph(pos.detach(), cutoff * (1 + 1e-6), max_num_neighbors=pos.shape[0])
    j, i = found[0], found[1]
    out.add(i, j, _close(pos, i, j, torch.ones_like(i, dtype=torch.bool), cutoff, None, half))


def neighbor_pairs(
    positions: Tensor,
    cutoff: float,
    box: Optional[Tensor] = None,
    capacity: int = -1,
    strategy: str = "auto",
    cell_capacity: int = -1,
    half: bool = False,
) -> PairList:
    """Pairs within ``cutoff``: both directions (i != j), or each pair once (i < j) if ``half``.

    Parameters
    ----------
    positions : Tensor, shape (n_atoms, 3)
        Any length unit; ``cutoff`` and ``box`` in the same unit. Need not be wrapped.
    cutoff : float
        Pairs with distance strictly below it are returned.
    box : Tensor, shape (3, 3), optional
        Periodic box, rows a, b, c, reduced form (see :func:`check_box`).
    capacity : int
        Number of pair slots; negative for the dynamic mode.
    strategy : str
        ``"auto"``, ``"brute"``, ``"cell"`` or ``"cluster"`` (see the module docstring).
    cell_capacity : int
        Cell list in the fixed-capacity mode only (which must set it): atoms per cell to search. A
        fuller cell makes ``num_pairs`` exceed ``capacity``, so it reads as an overflow. The dynamic
        mode searches the fullest cell (one host synchronisation).
    half : bool
        Each pair once, as (i, j) with i < j; ``capacity`` and ``num_pairs`` then count these.
    """
    if strategy not in ["auto", "brute", "cell", "cluster"]:
        raise ValueError(
            "unknown strategy '" + strategy + "'; choose 'auto', 'brute', 'cell' or 'cluster'"
        )
    if capacity >= 0 and positions.shape[0] == 0:
        raise ValueError("a fixed-capacity search needs at least one atom (padding uses atom 0)")
    if strategy == "auto":
        strategy = "cell" if positions.shape[0] >= cell_list_min_atoms() else "brute"
    n = positions.shape[0]
    if strategy == "brute" and half and n * (n - 1) // 2 <= _block_elements():
        found = _brute_half_at_once(positions, cutoff, box, capacity)
    else:
        found = _search(positions, cutoff, box, capacity, strategy, cell_capacity, half)
    return found


def _search(
    positions: Tensor,
    cutoff: float,
    box: Optional[Tensor],
    capacity: int,
    strategy: str,
    cell_capacity: int,
    half: bool,
) -> PairList:
    """:func:`neighbor_pairs` by blocks of candidates (brute), cells or torch-cluster."""
    out = _Compactor(capacity, positions.device, positions.shape[0])
    with torch.no_grad():
        if strategy == "brute":
            _brute(positions, cutoff, box, half, out)
        elif strategy == "cell":
            if capacity >= 0 and cell_capacity < 0:
                raise ValueError(
                    "a fixed-capacity cell-list search needs cell_capacity (atoms per cell) >= 0"
                )
            # the dynamic mode always searches the fullest cell: it has no way to report a drop
            fixed_cells = cell_capacity if capacity >= 0 else -1
            overflow = _cell_list(positions, cutoff, box, fixed_cells, half, out)
            if capacity >= 0:  # a full cell may hide pairs: report it as an overflow
                flagged = torch.clamp(out.count, min=capacity + 1)
                out.count = torch.where(overflow, flagged, out.count)
        else:
            if box is not None:
                raise ValueError(
                    "torch-cluster's radius_graph does not handle periodic boxes; "
                    "use strategy='cell' or 'brute'"
                )
            _radius_graph(positions, cutoff, half, out)
    pairs, used, count = out.pairs()
    if capacity >= 0:
        vectors = _slot_vectors(positions, pairs, used, None, box, cutoff)
    else:
        vectors = _displacements(positions, pairs[0], pairs[1], box)
    return PairList(pairs, vectors, torch.linalg.vector_norm(vectors, dim=-1), count)
