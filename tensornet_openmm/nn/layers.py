"""TensorNet's embedding and interaction layers (channels-last tensors, shape (n, 3, 3, F)).

Per-pair messages never hold full 3x3 tensors: the scalar (P, F), vector (P, 3, F) and
symmetric (P, 6, F) parts travel as separate tensors (no slicing of pair-sized tensors, whose
backward is costly). Per atom, features switch between full tensors and the packed 10-component
form of :mod:`.algebra`; channel-mixing linears commute with taking components, so they act on
the packed form.

Pairs are given as ``src`` (receiving atom i) and ``dst`` (sending atom j) with distances ``r``
and unit vectors ``rhat`` of r_ij = pos[i] - pos[j]. Self pairs are NOT in the pair list: their
contributions (distance 0, unit vector 0) are added per atom, with the radial functions evaluated
at r = 0 (``self_basis``, shape (1, num_rbf)). A pair at or beyond the upper cutoff contributes
exactly zero, so padded pair slots only need a distance >= cutoff_upper.

Half pair lists (``half=True``): ``src``, ``dst`` and ``rhat`` cover both directions (the first
half is the list as given, the second the same pairs reversed), while ``r`` and ``basis`` cover
the first half only. The radial work (filter networks, cutoff), which is symmetric in i and j and
the bulk of the cost, is then done once per pair and repeated for the reversed pairs.
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


def _both_ways(per_pair: Tensor, half: bool) -> Tensor:
    """Radial values of a half list, repeated for the reversed pairs (see the module docs)."""
    return torch.cat((per_pair, per_pair)) if half else per_pair


def _message(src: Tensor, dst: Tensor, f: Tensor, f0: Tensor, parts: Tensor, n: int) -> Tensor:
    """sum_j f(ij) parts[j] over pairs, plus the self pair f0 parts[i]; parts (n, c, F)."""
    return _scatter(src, f * parts[dst], n) + f0 * parts


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

    def _project(self, basis: Tensor) -> Tensor:
        """The three distance projections at once: (P, K) -> (P, 3, F)."""
        weight = torch.cat(
            (self.distance_proj1.weight, self.distance_proj2.weight, self.distance_proj3.weight)
        )
        bias = torch.cat(
            (self.distance_proj1.bias, self.distance_proj2.bias, self.distance_proj3.bias)
        )
        return nn.functional.linear(basis, weight, bias).reshape(basis.shape[0], 3, -1)

    def forward(
        self,
        z: Tensor,
        src: Tensor,
        dst: Tensor,
        r: Tensor,
        rhat: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        half: bool = False,
    ) -> Tensor:
        n, f = z.shape[0], self.hidden_channels
        species = self.emb(z)  # (n, F)
        # emb2([e_i, e_j]) is linear: split it into a receiver part and a sender part per atom
        w = self.emb2.weight
        z_recv = nn.functional.linear(species, w[:, :f])
        z_send = nn.functional.linear(species, w[:, f:])
        z_pair = z_recv[src] + z_send[dst] + self.emb2.bias  # (P, F)
        z_self = z_recv + z_send + self.emb2.bias  # (n, F)

        cut = cosine_cutoff(r, self.cutoff_lower, self.cutoff_upper)[:, None, None]
        radial = _both_ways(self._project(basis) * cut, half)  # (P, 3, F)
        f_i, f_a, f_s = (radial * z_pair[:, None, :]).unbind(1)  # (P, F) each
        iso = _scatter(src, f_i, n)
        vec = _scatter(src, f_a[:, None] * rhat[:, :, None], n)  # (n, 3, F)
        outer = algebra.symmetric_outer(rhat)[:, :, None]  # (P, 6, 1)
        sym = _scatter(src, f_s[:, None] * outer, n)  # sum f_S rhat rhat^T, packed
        cut0 = cosine_cutoff(torch.zeros_like(r[:1]), self.cutoff_lower, self.cutoff_upper)
        iso = iso + cut0 * z_self * self._project(self_basis)[0, 0]  # plus the self pair
        diag = sym[:, 0:3]
        diag = diag - diag.mean(1, keepdim=True)  # make S traceless
        offdiag = sym[:, 3:6]

        x = algebra.unpack(torch.cat((iso[:, None], vec, diag, offdiag), dim=1))
        gates = self.init_norm(algebra.squared_norm(x))
        for linear in self.linears_scalar:
            gates = self.act(linear(gates))
        gates = gates.reshape(n, 3, f)
        iso = self.linears_tensor[0](iso) * gates[:, 0]
        vec = self.linears_tensor[1](vec) * gates[:, 1, None]
        sym = self.linears_tensor[2](torch.cat((diag, offdiag), dim=1)) * gates[:, 2, None]
        return algebra.unpack(torch.cat((iso[:, None], vec, sym), dim=1))


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

    def _mix(self, first: int, packed: Tensor) -> Tensor:
        """Channel mixing W_first, W_first+1, W_first+2 of the I, A, S parts of a packed tensor."""
        lin = self.linears_tensor
        if first == 0:
            parts = (lin[0](packed[:, 0:1]), lin[1](packed[:, 1:4]), lin[2](packed[:, 4:10]))
        else:
            parts = (lin[3](packed[:, 0:1]), lin[4](packed[:, 1:4]), lin[5](packed[:, 4:10]))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        x: Tensor,
        src: Tensor,
        dst: Tensor,
        r: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        charge_factor: Tensor,
        half: bool = False,
    ) -> Tensor:
        n = x.shape[0]
        f_i, f_a, f_s = _both_ways(self._filters(basis, r), half).unbind(1)  # (P, F) each
        f0 = self._filters(self_basis, torch.zeros_like(r[:1]))[0]  # (3, F), the self pair

        x = x / (algebra.squared_norm(x) + 1.0)[:, None, None, :]
        y_packed = self._mix(0, algebra.pack(*algebra.decompose(x)))  # (n, 10, F)
        y = algebra.unpack(y_packed)
        m_iso = _message(src, dst, f_i[:, None], f0[0], y_packed[:, 0:1], n)
        m_vec = _message(src, dst, f_a[:, None], f0[1], y_packed[:, 1:4], n)
        m_sym = _message(src, dst, f_s[:, None], f0[2], y_packed[:, 4:10], n)
        msg = algebra.unpack(torch.cat((m_iso, m_vec, m_sym), dim=1))

        q = charge_factor[:, None, None, None]
        if self.o3:
            c = q * (algebra.matmul(msg, y) + algebra.matmul(y, msg))
        else:
            c = 2.0 * algebra.matmul(y, msg)
        scale = 1.0 / (algebra.squared_norm(c) + 1.0)  # (n, F)
        dx = algebra.unpack(self._mix(3, algebra.pack(*algebra.decompose(c)) * scale[:, None]))
        return x + dx + q * algebra.matmul(dx, dx)
