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


def compose(iso: Tensor, skew: Tensor, sym: Tensor) -> Tensor:
    """I Id + A + S with ``iso`` (n, F) and ``skew``, ``sym`` (n, 3, 3, F)."""
    return scalar_to_tensor(iso) + skew + sym


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


def skew_from_vector(v: Tensor) -> Tensor:
    """(n, 3, F) -> (n, 3, 3, F) with skew(v) w = v x w for each channel."""
    zero = torch.zeros_like(v[:, 0])
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    rows = (zero, -z, y, z, zero, -x, -y, x, zero)
    return torch.stack(rows, dim=1).reshape(v.shape[0], 3, 3, v.shape[2])


def vector_from_skew(a: Tensor) -> Tensor:
    """Inverse of :func:`skew_from_vector` for exactly skew tensors: (n, 3, 3, F) -> (n, 3, F)."""
    return torch.stack((a[:, 2, 1], a[:, 0, 2], a[:, 1, 0]), dim=1)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel 3x3 matrix product of (n, 3, 3, F) tensors."""
    return torch.einsum("nijf,njkf->nikf", a, b)
