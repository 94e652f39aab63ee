"""Pair search for TensorNet: free space and periodic (triclinic) boxes, TorchScript-clean.

Returns ordered pairs (i, j), i != j, both directions, with r_ij = pos[i] - pos[j] under the
minimum-image convention; the model adds the self pairs. Two modes:

- dynamic (``capacity < 0``): exactly the pairs within the cutoff; shapes depend on the data.
- fixed capacity (``capacity >= 0``): shapes are fixed, as CUDA-graph capture needs. Unused slots
  hold pair (0, 0) with a displacement of length 2 * cutoff, which contributes exactly nothing to
  TensorNet's energy or forces. The true pair count is returned as a tensor, so an overflow
  (count > capacity, pairs dropped) is visible without a host synchronisation.

Boxes are in OpenMM's reduced form (rows a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz),
ax >= 2|bx|, ax >= 2|cx|, by >= 2|cy|) with the cutoff at most half of each width; check them
with :func:`check_box` before use. Positions need not be wrapped into the box.

This module does not import OpenMM.
"""

from typing import Optional

import torch
from torch import Tensor


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


def _displacements(pos: Tensor, rows: Tensor, box: Optional[Tensor]) -> Tensor:
    """pos[rows, None] - pos[None, :] with minimum image: (len(rows), N, 3)."""
    d = pos[rows, None, :] - pos[None, :, :]
    if box is not None:
        d = minimum_image(d, box)
    return d


def _within(d: Tensor, rows: Tensor, cutoff: float) -> Tensor:
    """Mask of pairs closer than the cutoff, excluding i == j: (len(rows), N)."""
    close = (d * d).sum(-1) < cutoff * cutoff
    cols = torch.arange(d.shape[1], device=d.device)
    return close & (rows[:, None] != cols[None, :])


def _dynamic(pos: Tensor, cutoff: float, box: Optional[Tensor], block: int = 1024) -> Tensor:
    """Row blocks of ``block`` atoms bound the temporaries to block x N."""
    n = pos.shape[0]
    blocks = []
    with torch.no_grad():
        for start in range(0, n, block):
            rows = torch.arange(start, min(n, start + block), device=pos.device)
            mask = _within(_displacements(pos, rows, box), rows, cutoff)
            ij = mask.nonzero()
            blocks.append(torch.stack((ij[:, 0] + start, ij[:, 1])))
    return torch.cat(blocks, dim=1)


def _fixed(pos: Tensor, cutoff: float, box: Optional[Tensor], capacity: int):
    n = pos.shape[0]
    with torch.no_grad():
        rows = torch.arange(n, device=pos.device)
        flat = _within(_displacements(pos, rows, box), rows, cutoff).reshape(-1)
        slot = torch.cumsum(flat.to(torch.int64), 0) - 1  # position of each pair in the output
        count = slot[-1] + 1
        keep = flat & (slot < capacity)
        target = torch.where(keep, slot, torch.full_like(slot, capacity))  # the rest: dump slot
        ids = torch.full((capacity + 1,), -1, dtype=torch.int64, device=pos.device)
        ids = ids.scatter(0, target, torch.arange(n * n, device=pos.device))[:capacity]
        used = ids >= 0
        ids = torch.where(used, ids, torch.zeros_like(ids))
        pairs = torch.stack((ids // n, ids % n))
    return pairs, used, count


def neighbor_pairs(
    positions: Tensor, cutoff: float, box: Optional[Tensor] = None, capacity: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs within ``cutoff``, both directions, by brute force.

    Parameters
    ----------
    positions : Tensor, shape (n_atoms, 3)
        Any length unit; ``cutoff`` and ``box`` in the same unit.
    cutoff : float
    box : Tensor, shape (3, 3), optional
        Periodic box, rows a, b, c, reduced form (see :func:`check_box`).
    capacity : int
        Number of pair slots; negative for the dynamic mode.

    Returns
    -------
    edge_index : Tensor, shape (2, n_pairs or capacity), int64
    vectors : Tensor, shape (n_pairs or capacity, 3)
        pos[i] - pos[j] (minimum image); differentiable with respect to ``positions``.
    num_pairs : Tensor, shape (), int64
        The number of pairs within the cutoff; larger than ``capacity`` on overflow.
    """
    if capacity < 0:
        pairs = _dynamic(positions, cutoff, box)
        used = torch.ones(pairs.shape[1], dtype=torch.bool, device=positions.device)
        count = torch.tensor(pairs.shape[1], device=positions.device)
    else:
        pairs, used, count = _fixed(positions, cutoff, box, capacity)
    vectors = positions[pairs[0]] - positions[pairs[1]]
    if box is not None:
        vectors = minimum_image(vectors, box)
    if capacity >= 0:
        padding = torch.zeros_like(vectors)
        padding[:, 0] = 2.0 * cutoff
        vectors = torch.where(used[:, None], vectors, padding)
    return pairs, vectors, count
