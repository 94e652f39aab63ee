"""Cartesian rank-2 tensor algebra for TensorNet in packed form, channels last.

A per-atom feature X = I Id + A + S (scalar, skew-symmetric and symmetric traceless parts) is
stored as its 10 packed components per channel, shape (n, 10, F):

    [I, vx, vy, vz, Sxx, Syy, Szz, Sxy, Sxz, Syz]   with A = skew(v) = [[0, -vz, vy],
                                                                      [vz, 0, -vx],
                                                                      [-vy, vx, 0]]

so the decomposition is free and channel-mixing linears act on each part directly. The maps between
packed and full (n, 3, 3, F) form are linear: :class:`PackedAlgebra` holds them as constant
matrices, so each is one batched matrix product, and 3x3 products per channel are one broadcast
product and one sum. "norm" follows the reference: the squared Frobenius norm, a weighted sum of
squares of the packed components.
"""

import torch
from torch import Tensor, nn

PARTS = ((0, 1), (1, 4), (4, 10))
"""Packed component ranges of the I, A and S parts."""

NORM_WEIGHTS = (3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0)
"""|X|^2 = sum_c NORM_WEIGHTS[c] p_c^2 (each off-diagonal entry appears twice)."""


def _full_from_packed(p: Tensor) -> Tensor:
    """(..., 10) packed components -> (..., 9) row-major entries of I Id + skew(v) + S."""
    i, vx, vy, vz, sxx, syy, szz, sxy, sxz, syz = p.unbind(-1)
    rows = (
        i + sxx, sxy - vz, sxz + vy,
        sxy + vz, i + syy, syz - vx,
        sxz - vy, syz + vx, i + szz,
    )  # fmt: skip
    return torch.stack(rows, dim=-1)


def _packed_from_full(x: Tensor) -> Tensor:
    """(..., 9) row-major entries -> (..., 10) packed components of the decomposition."""
    xx, xy, xz, yx, yy, yz, zx, zy, zz = x.unbind(-1)
    iso = (xx + yy + zz) / 3.0
    comps = (
        iso, 0.5 * (zy - yz), 0.5 * (xz - zx), 0.5 * (yx - xy),
        xx - iso, yy - iso, zz - iso, 0.5 * (xy + yx), 0.5 * (xz + zx), 0.5 * (yz + zy),
    )  # fmt: skip
    return torch.stack(comps, dim=-1)


def _constants() -> dict[str, Tensor]:
    """The matrices of :class:`PackedAlgebra`, exact in float64."""
    eye = torch.eye(10, dtype=torch.float64)
    to_full = _full_from_packed(eye).T  # (9, 10): column c = full form of component c
    to_packed = _packed_from_full(torch.eye(9, dtype=torch.float64)).T  # (10, 9)
    weights = torch.tensor(NORM_WEIGHTS, dtype=torch.float64)
    # rows: 3 I^2, |A|^2, |S|^2 from the squared components (the output head's features)
    part_norms = torch.zeros(3, 10, dtype=torch.float64)
    for k, (first, last) in enumerate(PARTS):
        part_norms[k, first:last] = weights[first:last]
    return {
        "to_full": to_full,
        "to_packed": to_packed,
        "weights": weights[:, None],  # (10, 1)
        "part_weights": part_norms,
    }


class PackedAlgebra(nn.Module):
    """The constant matrices of the packed form, as buffers that follow the module's dtype and
    device (not saved in checkpoints)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value in _constants().items():
            self.register_buffer(name, value.to(dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.double()`` and the like: the constants are made again from their float64 values
        (1/3 cast from float32 to float64 is not 1/3)."""
        super()._apply(fn, recurse)
        for name, value in _constants().items():
            current = getattr(self, name)
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))
        return self

    def full(self, p: Tensor) -> Tensor:
        """Packed (n, 10, F) -> full (n, 3, 3, F)."""
        return torch.matmul(self.to_full, p).reshape(p.shape[0], 3, 3, p.shape[2])

    def packed(self, x: Tensor) -> Tensor:
        """Full (n, 3, 3, F) -> packed components of its I, A, S decomposition, (n, 10, F)."""
        return torch.matmul(self.to_packed, x.reshape(x.shape[0], 9, x.shape[3]))

    def squared_norm(self, p: Tensor) -> Tensor:
        """Squared Frobenius norm of packed tensors: (n, 10, F) -> (n, 1, F)."""
        return (p * p * self.weights).sum(1, keepdim=True)

    def part_norms(self, p: Tensor) -> Tensor:
        """3 I^2, |A|^2 and |S|^2 of packed tensors: (n, 10, F) -> (n, 3, F)."""
        return torch.matmul(self.part_weights, p * p)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel 3x3 matrix product of full (n, 3, 3, F) tensors."""
    return (a.unsqueeze(3) * b.unsqueeze(1)).sum(2)  # views: no slice to undo in backward


def packed_geometry(u: Tensor) -> Tensor:
    """(1, u, [xx, yy, zz, xy, xz, yz] of u u^T) of unit vectors: (P, 3) -> (P, 10), the packed
    components a pair adds in the embedding."""
    return torch.cat((u.new_ones((u.shape[0], 1)), u, symmetric_outer(u)), 1)


def symmetric_outer(v: Tensor) -> Tensor:
    """The 6 components [xx, yy, zz, xy, xz, yz] of v v^T: (P, 3) -> (P, 6)."""
    x, y, z = v.unbind(1)
    return torch.stack((x * x, y * y, z * z, x * y, x * z, y * z), dim=1)
