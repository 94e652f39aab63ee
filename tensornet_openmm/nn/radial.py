"""Radial basis functions and the cosine cutoff, as the reference computes them.

Distances in Angstrom.
"""

import math

import torch
from torch import Tensor, nn


def cosine_cutoff(r: Tensor, lower: float, upper: float) -> Tensor:
    """Smooth cutoff: 1 at the lower edge (or r = 0), 0 at and beyond ``upper``.

    Without a lower cutoff, 0.5 (cos(pi r / upper) + 1) for r < upper. With ``lower > 0`` the
    shifted form 0.5 (cos(pi (2 (r - lower) / (upper - lower) + 1)) + 1) on lower < r < upper.
    """
    if lower > 0.0:
        arg = math.pi * (2.0 * (r - lower) / (upper - lower) + 1.0)
        inside = (r > lower) & (r < upper)
    else:
        arg = r * (math.pi / upper)
        inside = r < upper
    return 0.5 * (torch.cos(arg) + 1.0) * inside.to(r.dtype)


# Basis kinds of fused_parameters() (the fused ``geometry`` kernel's codes; written as literals
# in the TorchScript methods, which cannot read module globals): 0 exp-normal, 1 Gaussian.


def exp_normal(
    r: Tensor, means: Tensor, betas: Tensor, alpha: float, lower: float, upper: float
) -> Tensor:
    """cos_cutoff(r) exp(-beta_k (exp(alpha (lower - r)) - mu_k)^2) for distances r (P, 1)."""
    cut = cosine_cutoff(r, 0.0, upper)
    shifted = torch.exp(alpha * (lower - r)) - means
    return cut * torch.exp(-betas * shifted * shifted)


def gaussian(r: Tensor, offset: Tensor, coeff: Tensor) -> Tensor:
    """exp(coeff (r - o_k)^2) for distances r (P, 1)."""
    d = r - offset
    return torch.exp(coeff * d * d)


class ExpNormalBasis(nn.Module):
    """exp-normal radial basis: phi(r) exp(-beta (exp(alpha (r_l - r)) - mu_k)^2).

    ``means`` (mu_k) and ``betas`` are buffers, or parameters when ``trainable``, named as in the
    reference checkpoints. The cosine cutoff inside always has lower edge 0, as in the reference.
    """

    def __init__(
        self,
        cutoff_lower: float,
        cutoff_upper: float,
        num_rbf: int,
        trainable: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.cutoff_lower = float(cutoff_lower)
        self.cutoff_upper = float(cutoff_upper)
        self.alpha = 5.0 / (cutoff_upper - cutoff_lower)
        start = math.exp(-(cutoff_upper - cutoff_lower))
        # The reference builds these in float32 and casts; do the same so values match bit-wise.
        means = torch.linspace(start, 1.0, num_rbf, dtype=torch.float32).to(dtype)
        width = (2.0 / num_rbf * (1.0 - torch.tensor(start, dtype=torch.float32))) ** -2
        betas = width.repeat(num_rbf).to(dtype)
        if trainable:
            self.means = nn.Parameter(means)
            self.betas = nn.Parameter(betas)
        else:
            self.register_buffer("means", means)
            self.register_buffer("betas", betas)

    def forward(self, r: Tensor) -> Tensor:
        """Basis values, shape (n_pairs, num_rbf), for distances ``r`` of shape (n_pairs,), A."""
        return exp_normal(
            r.unsqueeze(-1), self.means, self.betas, self.alpha, self.cutoff_lower,
            self.cutoff_upper,
        )  # fmt: skip

    def fused_parameters(self) -> tuple[int, Tensor, Tensor, float, float]:
        """(kind, centers, widths, alpha, lower) for the fused geometry kernel."""
        return 0, self.means, self.betas, self.alpha, self.cutoff_lower  # 0: exp-normal


class GaussianBasis(nn.Module):
    """Gaussian radial basis exp(-0.5 (r - o_k)^2 / delta^2) on evenly spaced offsets o_k."""

    def __init__(
        self,
        cutoff_lower: float,
        cutoff_upper: float,
        num_rbf: int,
        trainable: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        offset = torch.linspace(cutoff_lower, cutoff_upper, num_rbf, dtype=torch.float32)
        coeff = -0.5 / (offset[1] - offset[0]) ** 2
        if trainable:
            self.offset = nn.Parameter(offset.to(dtype))
            self.coeff = nn.Parameter(coeff.to(dtype))
        else:
            self.register_buffer("offset", offset.to(dtype))
            self.register_buffer("coeff", coeff.to(dtype))

    def forward(self, r: Tensor) -> Tensor:
        """Basis values, shape (n_pairs, num_rbf), for distances ``r`` of shape (n_pairs,), A."""
        return gaussian(r.unsqueeze(-1), self.offset, self.coeff)

    def fused_parameters(self) -> tuple[int, Tensor, Tensor, float, float]:
        """(kind, centers, widths, alpha, lower) for the fused geometry kernel."""
        return 1, self.offset, self.coeff.expand_as(self.offset), 0.0, 0.0  # 1: Gaussian


RADIAL_BASES = {"expnorm": ExpNormalBasis, "gauss": GaussianBasis}
