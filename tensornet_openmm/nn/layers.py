"""TensorNet's embedding and interaction layers (channels-last tensors, shape (n, 3, 3, F)).

Pairs are given as ``src`` (receiving atom i) and ``dst`` (sending atom j) with distances ``r``
and unit vectors ``rhat`` of r_ij = pos[i] - pos[j]. Self pairs are NOT in the pair list: their
contributions (distance 0, unit vector 0) are added per atom, with the radial functions evaluated
at r = 0 (``self_basis``, shape (1, num_rbf)). A pair at or beyond the upper cutoff contributes
exactly zero, so padded pair slots only need a distance >= cutoff_upper.
"""

import torch
from torch import Tensor, nn

from . import algebra
from .radial import cosine_cutoff


class ShiftedSoftplus(nn.Module):
    """softplus(x) - log 2."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - 0.6931471805599453


ACTIVATIONS = {
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mish": nn.Mish,
    "ssp": ShiftedSoftplus,
}


def _channel_linears(n: int, channels: int, dtype: torch.dtype) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(channels, channels, bias=False, dtype=dtype) for _ in range(n))


def _scatter(index: Tensor, values: Tensor, n: int) -> Tensor:
    """Sum ``values`` (P, ...) into ``n`` rows by ``index`` (P,)."""
    out = torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


class TensorEmbedding(nn.Module):
    """Builds the initial per-atom tensors X_i from neighbours' species and geometry."""

    def __init__(
        self,
        hidden_channels: int,
        num_rbf: int,
        activation: str,
        cutoff_lower: float,
        cutoff_upper: float,
        max_z: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        f = hidden_channels
        self.hidden_channels = f
        self.cutoff_lower = cutoff_lower
        self.cutoff_upper = cutoff_upper
        self.distance_proj1 = nn.Linear(num_rbf, f, dtype=dtype)
        self.distance_proj2 = nn.Linear(num_rbf, f, dtype=dtype)
        self.distance_proj3 = nn.Linear(num_rbf, f, dtype=dtype)
        self.emb = nn.Embedding(max_z, f, dtype=dtype)
        self.emb2 = nn.Linear(2 * f, f, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.linears_tensor = _channel_linears(3, f, dtype)
        self.linears_scalar = nn.ModuleList(
            [nn.Linear(f, 2 * f, dtype=dtype), nn.Linear(2 * f, 3 * f, dtype=dtype)]
        )
        self.init_norm = nn.LayerNorm(f, dtype=dtype)

    def forward(
        self,
        z: Tensor,
        src: Tensor,
        dst: Tensor,
        r: Tensor,
        rhat: Tensor,
        basis: Tensor,
        self_basis: Tensor,
    ) -> Tensor:
        n = z.shape[0]
        species = self.emb(z)  # (n, F)
        z_pair = self.emb2(torch.cat((species[src], species[dst]), dim=1))  # (P, F)
        z_self = self.emb2(torch.cat((species, species), dim=1))  # (n, F)
        cz = cosine_cutoff(r, self.cutoff_lower, self.cutoff_upper)[:, None] * z_pair
        cut0 = cosine_cutoff(torch.zeros_like(r[:1]), self.cutoff_lower, self.cutoff_upper)

        iso = _scatter(src, self.distance_proj1(basis) * cz, n)
        iso = iso + cut0 * z_self * self.distance_proj1(self_basis)  # self pairs
        f_a = self.distance_proj2(basis) * cz  # (P, F)
        vec = _scatter(src, f_a[:, None, :] * rhat[:, :, None], n)  # (n, 3, F)
        f_s = self.distance_proj3(basis) * cz
        outer = rhat[:, :, None] * rhat[:, None, :]  # (P, 3, 3)
        sym = _scatter(src, f_s[:, None, None, :] * outer[..., None], n)
        # rhat rhat^T summed, then made traceless (exact for unit vectors and for zero vectors)
        sym = sym - algebra.scalar_to_tensor(sym.diagonal(dim1=1, dim2=2).mean(-1))
        x = algebra.compose(iso, algebra.skew_from_vector(vec), sym)

        gates = self.init_norm(algebra.squared_norm(x))
        for linear in self.linears_scalar:
            gates = self.act(linear(gates))
        gates = gates.reshape(n, 3, self.hidden_channels)
        iso = self.linears_tensor[0](iso) * gates[:, 0]
        skew = self.linears_tensor[1](algebra.skew_from_vector(vec)) * gates[:, 1, None, None]
        sym = self.linears_tensor[2](sym) * gates[:, 2, None, None]
        return algebra.compose(iso, skew, sym)


class Interaction(nn.Module):
    """One TensorNet interaction layer: X_i -> X_i + dX + (1 + 0.1 q) dX^2."""

    def __init__(
        self,
        num_rbf: int,
        hidden_channels: int,
        activation: str,
        cutoff_lower: float,
        cutoff_upper: float,
        equivariance_invariance_group: str,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        f = hidden_channels
        self.hidden_channels = f
        self.cutoff_lower = cutoff_lower
        self.cutoff_upper = cutoff_upper
        self.o3 = equivariance_invariance_group == "O(3)"
        self.linears_scalar = nn.ModuleList(
            [
                nn.Linear(num_rbf, f, dtype=dtype),
                nn.Linear(f, 2 * f, dtype=dtype),
                nn.Linear(2 * f, 3 * f, dtype=dtype),
            ]
        )
        self.linears_tensor = _channel_linears(6, f, dtype)
        self.act = ACTIVATIONS[activation]()

    def _filters(self, basis: Tensor, r: Tensor) -> Tensor:
        """Radial filters f_I, f_A, f_S: (P, num_rbf) -> (P, 3, F), times the cutoff."""
        h = basis
        for linear in self.linears_scalar:
            h = self.act(linear(h))
        h = h * cosine_cutoff(r, self.cutoff_lower, self.cutoff_upper)[:, None]
        return h.reshape(h.shape[0], 3, self.hidden_channels)

    def _mix(
        self, first: int, iso: Tensor, skew: Tensor, sym: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        lin = self.linears_tensor
        if first == 0:
            return lin[0](iso), lin[1](skew), lin[2](sym)
        return lin[3](iso), lin[4](skew), lin[5](sym)

    def forward(
        self,
        x: Tensor,
        src: Tensor,
        dst: Tensor,
        r: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        charge_factor: Tensor,
    ) -> Tensor:
        n = x.shape[0]
        f = self._filters(basis, r)  # (P, 3, F)
        f0 = self._filters(self_basis, torch.zeros_like(r[:1]))[0]  # (3, F), the self pair

        x = x / (algebra.squared_norm(x) + 1.0)[:, None, None, :]
        iso, skew, sym = self._mix(0, *algebra.decompose(x))
        y = algebra.compose(iso, skew, sym)

        vec = algebra.vector_from_skew(skew)  # (n, 3, F)
        m_iso = _scatter(src, f[:, 0] * iso[dst], n) + f0[0] * iso
        m_vec = _scatter(src, f[:, 1, None] * vec[dst], n) + f0[1] * vec
        m_sym = _scatter(src, f[:, 2, None, None] * sym[dst], n) + f0[2] * sym
        msg = algebra.compose(m_iso, algebra.skew_from_vector(m_vec), m_sym)

        q = charge_factor[:, None, None, None]
        if self.o3:
            c = q * (algebra.matmul(msg, y) + algebra.matmul(y, msg))
        else:
            c = 2.0 * algebra.matmul(y, msg)
        iso, skew, sym = algebra.decompose(c)
        scale = 1.0 / (algebra.squared_norm(c) + 1.0)  # (n, F)
        iso, skew, sym = self._mix(
            3, iso * scale, skew * scale[:, None, None], sym * scale[:, None, None]
        )
        dx = algebra.compose(iso, skew, sym)
        return x + dx + q * algebra.matmul(dx, dx)
