"""Cartesian rank-2 tensor algebra for TensorNet, channels last.

A feature tensor X has shape (n, 3, 3, channels). It splits into
I = (tr X / 3) Id (scalar part, stored as the scalar tr X / 3 of shape (n, channels)),
A = (X - X^T) / 2 (skew-symmetric, vector part) and S = (X + X^T) / 2 - I (symmetric traceless).
"norm" follows the reference: the squared Frobenius norm.
"""

import torch
from torch import Tensor


def _eye(x: Tensor) -> Tensor:
    return torch.eye(3, dtype=x.dtype, device=x.device)[None, :, :, None]  # (1, 3, 3, 1)


def scalar_to_tensor(iso: Tensor) -> Tensor:
    """(n, F) scalars -> (n, 3, 3, F) multiples of the identity."""
    return iso[:, None, None, :] * _eye(iso)


def decompose(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``x`` (n, 3, 3, F) into tr/3 (n, F), skew part and symmetric traceless part."""
    xt = x.transpose(1, 2)
    iso = x.diagonal(dim1=1, dim2=2).mean(-1)  # (n, F)
    skew = 0.5 * (x - xt)
    sym = 0.5 * (x + xt) - scalar_to_tensor(iso)
    return iso, skew, sym


def squared_norm(x: Tensor) -> Tensor:
    """Squared Frobenius norm of each 3x3 block: (n, 3, 3, F) -> (n, F)."""
    return (x * x).sum((1, 2))


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel 3x3 matrix product of (n, 3, 3, F) tensors."""
    return (
        a[:, :, 0, None] * b[:, None, 0]
        + a[:, :, 1, None] * b[:, None, 1]
        + a[:, :, 2, None] * b[:, None, 2]
    )


# Packed per-atom form: 10 components per channel, (n, 10, F):
# [I, vx, vy, vz, Sxx, Syy, Szz, Sxy, Sxz, Syz] where A = skew(v).
def pack(iso: Tensor, skew: Tensor, sym: Tensor) -> Tensor:
    """(n, F), (n, 3, 3, F), (n, 3, 3, F) -> (n, 10, F)."""
    comps = (
        iso,
        skew[:, 2, 1],
        skew[:, 0, 2],
        skew[:, 1, 0],
        sym[:, 0, 0],
        sym[:, 1, 1],
        sym[:, 2, 2],
        sym[:, 0, 1],
        sym[:, 0, 2],
        sym[:, 1, 2],
    )
    return torch.stack(comps, dim=1)


def unpack(p: Tensor) -> Tensor:
    """(n, 10, F) -> the full tensor I Id + skew(v) + S, shape (n, 3, 3, F)."""
    i, vx, vy, vz = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    sxx, syy, szz, sxy, sxz, syz = p[:, 4], p[:, 5], p[:, 6], p[:, 7], p[:, 8], p[:, 9]
    rows = (
        i + sxx, sxy - vz, sxz + vy,
        sxy + vz, i + syy, syz - vx,
        sxz - vy, syz + vx, i + szz,
    )  # fmt: skip
    return torch.stack(rows, dim=1).reshape(p.shape[0], 3, 3, p.shape[2])


def symmetric_outer(v: Tensor) -> Tensor:
    """The 6 components [xx, yy, zz, xy, xz, yz] of v v^T: (P, 3) -> (P, 6)."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    return torch.stack((x * x, y * y, z * z, x * y, x * z, y * z), dim=1)
