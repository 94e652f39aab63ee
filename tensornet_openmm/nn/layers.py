"""TensorNet's embedding and interaction layers, on packed per-atom tensors (n, 10, F).

Per atom, features are kept in the packed 10-component form of :mod:`.algebra` (I, A, S parts);
channel-mixing linears act on each part directly, and the full 3x3 form is built only for the
matrix products. Per pair, the radial networks and the message sums run over blocks of pairs
(:func:`pair_block`): on the CPU the networks' activations and the messages exist one
cache-sized block at a time.

Pairs are given as ``src`` (receiving atom i) and ``dst`` (sending atom j) with the cosine
cutoff ``cut`` of their distances (computed once by the model for every layer) and unit vectors
``rhat`` of r_ij = pos[i] - pos[j]. Self pairs are NOT in the pair list: their
contributions (distance 0, unit vector 0) are added per atom, with the radial functions evaluated
at r = 0 (``self_basis``, shape (1, num_rbf)). A pair at or beyond the upper cutoff contributes
exactly zero, so padded pair slots only need a distance >= cutoff_upper.

Half pair lists (``half=True``): each pair is listed once and its message also flows the other
way, j <- i, with the unit vector reversed. The radial work (filter networks, cutoff), which is
symmetric in i and j and the bulk of the cost, is then done once per pair.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from . import algebra
from .kernels import MLP_ACTIVATIONS, PairKernels, charged
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


def pair_block(num_pairs: int, channels: int, device: torch.device, fused: bool = False) -> int:
    """Pairs per block of the pair loops (radial networks and message sums).

    On the CPU every pair-sized temporary, the radial networks' activations included, stays
    block-sized: blocks of about :func:`_block_elements` elements per (block, 10, channels) tensor
    stay in cache and are reused by the allocator, where one pass over all pairs streams hundreds
    of MB per layer through freshly mapped memory. Each block's gathers also give gradients the
    size of the atoms' features, so there are at most :func:`_max_blocks` blocks. On a GPU one
    block holds every pair (kernel launches, not memory traffic, are what count there).

    ``fused``: the loops of the fused kernels, which make no (block, 10, channels) tensors (their
    largest per-pair ones are the filters and the radial networks' activations, (block, 3
    channels)): blocks 8 times larger (:func:`_fused_block_elements`). Force calls of water
    boxes, CPU, 2 threads (throwaway timings): 624 atoms 203 -> 181 ms, 1,443 atoms 588 -> 467
    ms; with radial tables 91 -> 70 ms and 300 -> 188 ms; larger blocks than that were no
    faster (every pair as one block: 1,443 atoms 460 against 375 ms). The blocks' sums are one
    operator each way (:func:`_summed_blocks`), with no atom-sized result per block.
    """
    if device.type != "cpu":
        return max(num_pairs, 1)
    elements = _fused_block_elements() if fused else _block_elements()
    return max(elements // (10 * channels), -(-num_pairs // _max_blocks()), 1)


def _block_elements() -> int:
    return 1 << 20


def _fused_block_elements() -> int:
    return 1 << 23


def _max_blocks() -> int:
    return 64


def lean_sums(device: torch.device) -> bool:
    """Whether message sums keep only the pair indices for the backward pass (see
    :func:`_add_rows`): on GPUs, whose memory bounds the largest system."""
    return device.type != "cpu"


def _add_rows(out: Tensor, to: Tensor, rows: Tensor) -> None:
    """out[to[b]] += rows[b], in place.

    ``index_add_`` keeps ``rows`` alive for its backward (it needs only its shape): a pair-sized
    tensor per message sum until the forces are done, 41% of the memory of a force call of a
    1,443-atom water box. ``scatter_add_`` over the index broadcast as a view keeps only the
    indices, but runs an MD step of a 624-atom box 13% slower on the CPU (both measured on the
    project's 2-core machine). So the lean sums run where memory is the limit (:func:`lean_sums`).
    """
    if lean_sums(rows.device):
        index = to.reshape([-1] + [1] * (rows.dim() - 1)).expand_as(rows)
        out.scatter_add_(0, index, rows)
    else:
        out.index_add_(0, to, rows)


def _embedding_sums(
    sums: list[Tensor],
    to: Tensor,
    source: Tensor,
    radial: Tensor,
    z_recv: Tensor,
    z_send: Tensor,
    u: Tensor,
    uu: Tensor,
) -> None:
    """sums += (f_I, f_A rhat, f_S rhat rhat^T) onto atoms ``to``, in place, for one block.

    f = radial (B, 3, F) x (z_recv[to] + z_send[source]) (B, F); u (B, 3) unit vectors, uu (B, 6)
    their packed outer products; sums: (n, F), (n, 3, F), (n, 6, F).
    """
    species = z_recv.index_select(0, to) + z_send.index_select(0, source)
    f_i, f_a, f_s = (radial * species.unsqueeze(1)).unbind(1)  # (B, F) each
    _add_rows(sums[0], to, f_i)
    _add_rows(sums[1], to, f_a.unsqueeze(1) * u.unsqueeze(2))
    _add_rows(sums[2], to, f_s.unsqueeze(1) * uu.unsqueeze(2))


def _messages(out: list[Tensor], to: Tensor, filters: Tensor, parts: list[Tensor], source: Tensor):
    """out[k] += f_k(ij) parts[k][j] onto atoms i = ``to`` from j = ``source``, one block.

    filters (B, 3, F): f_I, f_A, f_S of each pair; parts and out: (n, 1, F), (n, 3, F),
    (n, 6, F), out changed in place.
    """
    for k, f_k in enumerate(filters.unbind(1)):
        _add_rows(out[k], to, f_k.unsqueeze(1) * parts[k].index_select(0, source))


def _embedding_dot(
    adj: list[Tensor],
    to: Tensor,
    source: Tensor,
    radial: Tensor,
    z_recv: Tensor,
    z_send: Tensor,
    u: Tensor,
    uu: Tensor,
) -> Tensor:
    """sum over the block of adj[to] . (f_I, f_A u, f_S uu): a scalar whose gradient is the
    vector-Jacobian product of :func:`_embedding_sums` with ``adj`` (no atom-sized buffer)."""
    species = z_recv.index_select(0, to) + z_send.index_select(0, source)
    f_i, f_a, f_s = (radial * species.unsqueeze(1)).unbind(1)  # (B, F) each
    a_i = adj[0].index_select(0, to)
    a_a = (adj[1].index_select(0, to) * u.unsqueeze(2)).sum(1)
    a_s = (adj[2].index_select(0, to) * uu.unsqueeze(2)).sum(1)
    return (a_i * f_i + a_a * f_a + a_s * f_s).sum()


def _message_dot(adj: list[Tensor], to: Tensor, filters: Tensor, rows: list[Tensor]) -> Tensor:
    """sum_k adj_k[to] . f_k rows_k, rows_k = parts[k] of the senders: as :func:`_embedding_dot`,
    the vector-Jacobian product of :func:`_messages` as a scalar."""
    total = filters.new_zeros(())
    for k, f_k in enumerate(filters.unbind(1)):
        total = total + ((adj[k].index_select(0, to) * rows[k]).sum(1) * f_k).sum()
    return total


def _one_block(radial: Optional[Tensor], pairs: int, block: int) -> None:
    """Radial functions made ahead (:meth:`TensorNet.radial_networks`) are for pairs that run as
    one block."""
    if radial is not None and pairs > block:
        raise RuntimeError(
            f"radial functions made ahead for {pairs} pairs, which run in blocks of {block}"
        )


def _chunks(t: Tensor, block: int) -> list[Tensor]:
    """``t`` split into blocks of ``block`` rows; ``[t]`` itself when one block holds it all (a
    small molecule's pairs): no split operator, and no gradient to gather back from the blocks
    (four operators and two autograd nodes per layer at 22 atoms)."""
    if t.shape[0] <= block:
        return [t]
    return t.split(block)


def _summed_blocks(pairs: int, block: int) -> bool:
    """Whether the fused kernels sum every block of pairs with one operator each way
    (``message_blocks``, ``embedding_blocks``, each block with its tap): more than one block,
    and a graph to make. Without a graph each block's sums add in place onto the first's, its
    radial functions freed before the next block's are made. With one, the radial functions are
    kept for the backward pass anyway, and the one operator saves an atom-sized sum per block
    forward and the accumulation of its gradient backward (1,443-atom water box, CPU, 2 threads:
    a force call 395 -> 369 ms, the same peak memory)."""
    return pairs > block and torch.is_grad_enabled()


def _blocks(vec: Optional[Tensor], pairs: int, block: int) -> list[Optional[Tensor]]:
    """The pair vectors split into blocks of ``block`` (None for each block without them)."""
    out: list[Optional[Tensor]] = []
    if vec is not None:
        for v in _chunks(vec, block):
            out.append(v)
        return out
    for _ in range((pairs + block - 1) // block if pairs > 0 else 1):
        out.append(None)
    return out


class _RadialLayer(nn.Module):
    """A layer with radial functions, which :func:`tensornet_openmm.nn.tables.tabulate_radial`
    can give a table: ``radial_table`` (intervals, 4, width), empty while the network runs, and its
    grid ``table_grid`` [a, alpha, c, 1/h]. The table is not saved with the weights. The layers
    read it wherever they are given the pair vectors (every path of :class:`TensorNet`: the fused
    kernels' ``radial_table`` operator, or its PyTorch arithmetic). Subclasses define the
    network the table replaces, ``_network(cut, basis)`` and ``_fused_network(cut, basis)``."""

    def _no_table(self, dtype: torch.dtype) -> None:
        self.register_buffer("radial_table", torch.zeros((0, 4, 0), dtype=dtype), persistent=False)
        self.table_grid = [0.0, 0.0, 0.0, 0.0]
        # the self pair's radial functions, once TensorNet.store_self_pair_terms computed them
        self.register_buffer("self_radial", torch.zeros((0, 3, 0), dtype=dtype), persistent=False)

    def self_radial_functions(self, self_basis: Tensor) -> Tensor:
        """The self pair's radial functions times the cutoff, cut(0) g(0), (1, 3, F): stored
        (:meth:`TensorNet.store_self_pair_terms`), else from the network."""
        if self.self_radial.numel() > 0:
            return self.self_radial
        cut0 = cosine_cutoff(self_basis.new_zeros(1), self.cutoff_lower, self.cutoff_upper)
        return self._network(cut0, self_basis)

    def _pair_radial(
        self, cut: Tensor, basis: Tensor, vec: Optional[Tensor], fused: bool
    ) -> Tensor:
        """A block's radial functions times the cutoff, (B, 3, F): from the table where there is
        one and the pair vectors are given, else from the network (:meth:`_network`), as one
        fused operator when ``fused``."""
        if vec is not None and self.radial_table.numel() > 0:
            return self._tabulated(vec)
        if fused:
            return self._fused_network(cut, basis)
        return self._network(cut, basis)

    def _tabulated(self, pair_vec: Tensor) -> Tensor:
        """cut(r) g(r), (P, 3, F), of pair vectors (P, 3) from the table."""
        grid = self.table_grid
        g = self.pair_kernels.radial_table(
            pair_vec, self.radial_table, grid[0], grid[1], grid[2], grid[3], self.cutoff_lower,
            self.cutoff_upper,
        )  # fmt: skip
        return g.reshape(g.shape[0], 3, self.hidden_channels)


class TensorEmbedding(_RadialLayer):
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
        self.mlp_activation = MLP_ACTIVATIONS.get(activation, -1)  # -1: not in the kernel
        self.algebra = algebra.PackedAlgebra(dtype)
        self.pair_kernels = PairKernels(dtype)  # see kernels.use_fused_kernels
        self._no_table(dtype)
        # constants of an inference copy (TensorNet.store_self_pair_terms, store_species_terms)
        self.register_buffer(  # receiver, sender and self pair terms per atom, (3, n, F)
            "stored_species", torch.zeros((3, 0, f), dtype=dtype), persistent=False
        )
        self.register_buffer(
            "stored_weight", torch.zeros((0, num_rbf), dtype=dtype), persistent=False
        )
        self.register_buffer("stored_bias", torch.zeros(0, dtype=dtype), persistent=False)

    def _projection(self) -> tuple[Tensor, Tensor]:
        """Weight (3F, K) and bias (3F,) of the three distance projections at once: stored
        (:meth:`TensorNet.store_self_pair_terms`), else concatenated (two operators a call,
        which ``torch.jit.freeze`` does not fold)."""
        if self.stored_bias.numel() > 0:
            return self.stored_weight, self.stored_bias
        weight = torch.cat(
            (self.distance_proj1.weight, self.distance_proj2.weight, self.distance_proj3.weight)
        )
        bias = torch.cat(
            (self.distance_proj1.bias, self.distance_proj2.bias, self.distance_proj3.bias)
        )
        return weight, bias

    def _project(self, basis: Tensor) -> Tensor:
        """The three distance projections at once: (P, K) -> (P, 3, F)."""
        weight, bias = self._projection()
        projected = nn.functional.linear(basis, weight, bias)
        return projected.reshape(basis.shape[0], 3, self.hidden_channels)  # also for 0 pairs

    def self_pair_terms(self, z_recv: Tensor, z_send: Tensor, self_basis: Tensor) -> Tensor:
        """Each atom's self pair term of I, (z_i^recv + z_i^send) f_I(0), (n, F): stored with
        the species terms (:meth:`TensorNet.store_species_terms`), else computed. For a chunk of
        the atoms (the low-memory forces' per-atom algebra), whose rows of the species terms
        are given, computed for those rows (the same numbers: elementwise)."""
        if self.stored_species.shape[1] > 0 and self.stored_species.shape[1] == z_recv.shape[0]:
            return self.stored_species[2]  # the atoms' count checked by species_terms
        return (z_recv + z_send) * self.self_radial_functions(self_basis)[0, 0]

    def species_terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Receiver and sender parts of emb2([e_i, e_j]), per atom: (n, F) each; stored for a
        copy that only ever sees one molecule's atoms (:meth:`TensorNet.store_species_terms`)."""
        if self.stored_species.shape[1] > 0:
            if self.stored_species.shape[1] != z.shape[0]:
                raise RuntimeError("this model stored another molecule's species terms")
            return self.stored_species[0], self.stored_species[1]
        f = self.hidden_channels
        species = self.emb(z)  # (n, F)
        # emb2([e_i, e_j]) is linear: split it into a receiver part and a sender part per atom
        w = self.emb2.weight
        z_recv = nn.functional.linear(species, w[:, :f]) + self.emb2.bias
        z_send = nn.functional.linear(species, w[:, f:])
        return z_recv, z_send

    def _network(self, cut: Tensor, basis: Tensor) -> Tensor:
        """The distance projections times the cutoff, (B, 3, F), once per listed pair."""
        return self._project(basis) * cut.reshape(-1, 1, 1)

    def _fused_network(self, cut: Tensor, basis: Tensor) -> Tensor:
        """:meth:`_network` as one operator (:meth:`PairKernels.mlp`, no activation)."""
        weight, bias = self._projection()
        radial = self.pair_kernels.mlp(basis, cut, [weight], [bias], 2)
        return radial.reshape(basis.shape[0], 3, self.hidden_channels)

    def add_block(
        self,
        sums: list[Tensor],
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        rhat: Tensor,
        basis: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> None:
        """sums += the pair terms of one block of pairs (i, j), in place (``vec``: their
        vectors, for a radial table)."""
        radial = self._pair_radial(cut, basis, vec, False)
        uu = algebra.symmetric_outer(rhat)
        _embedding_sums(sums, i, j, radial, z_recv, z_send, rhat, uu)
        if half:  # the reversed pair: species swapped, unit vector reversed
            _embedding_sums(sums, j, i, radial, z_recv, z_send, -rhat, uu)

    def block_dot(
        self,
        adj: list[Tensor],
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        rhat: Tensor,
        basis: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> Tensor:
        """adj . (what :meth:`add_block` adds), a scalar (see :func:`_embedding_dot`)."""
        radial = self._pair_radial(cut, basis, vec, False)
        uu = algebra.symmetric_outer(rhat)
        total = _embedding_dot(adj, i, j, radial, z_recv, z_send, rhat, uu)
        if half:
            total = total + _embedding_dot(adj, j, i, radial, z_recv, z_send, -rhat, uu)
        return total

    def finish(
        self, z_recv: Tensor, z_send: Tensor, sums: list[Tensor], self_basis: Tensor
    ) -> Tensor:
        """X_i from the pair sums: self pair, tracelessness, norms, gates, channel mixing."""
        n, f = z_recv.shape[0], self.hidden_channels
        iso = sums[0] + self.self_pair_terms(z_recv, z_send, self_basis)
        vec = sums[1].contiguous()  # a strided view would take a product per atom in the linear
        diag, offdiag = torch.split(sums[2], [3, 3], dim=1)
        diag = diag - diag.mean(1, keepdim=True)  # make S traceless

        x = torch.cat((iso.unsqueeze(1), vec, diag, offdiag), dim=1)  # packed (n, 10, F)
        gates = self._gates(self.init_norm(self.algebra.squared_norm(x).squeeze(1)))
        g_i, g_a, g_s = gates.reshape(n, 3, f).unbind(1)
        iso = self.linears_tensor[0](iso) * g_i
        vec = self.linears_tensor[1](vec) * g_a.unsqueeze(1)
        sym = self.linears_tensor[2](x.narrow(1, 4, 6).contiguous()) * g_s.unsqueeze(1)  # S of x
        return torch.cat((iso.unsqueeze(1), vec, sym), dim=1)  # packed (n, 10, F)

    def _gates(self, h: Tensor) -> Tensor:
        """act(L2(act(L1(h)))) per atom; with the fused kernels one ``mlp`` operator each way
        (on a GPU, one kernel per layer and way instead of TorchScript's half dozen for SiLU's
        gradient)."""
        lin = self.linears_scalar
        if self.mlp_activation >= 0 and self.pair_kernels.applies(h):
            return self.pair_kernels.mlp(
                h, h.new_empty(0), [lin[0].weight, lin[1].weight], [lin[0].bias, lin[1].bias],
                self.mlp_activation,
            )  # fmt: skip
        for linear in lin:
            h = self.act(linear(h))
        return h

    def fused_sums(
        self,
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        geom: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
        radial: Optional[Tensor] = None,
    ) -> Tensor:
        """The pair sums of one block of pairs with the fused kernels, packed (n, 10, F)
        (``geom``: the pairs' (1, rhat, packed rhat rhat^T); ``radial``: the block's radial
        functions, if already made)."""
        if radial is None:
            radial = self._pair_radial(cut, basis, vec, True)
        return self.pair_kernels.embedding_sums(radial, z_recv, z_send, geom, i, j, half)

    def fused_sums_add(
        self,
        out: Tensor,
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        geom: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> None:
        """out += :meth:`fused_sums` (no graph), without an atom-sized result per block: the
        low-memory forces' pair sums, and the embedding's without a graph."""
        radial = self._pair_radial(cut, basis, vec, True)
        self.pair_kernels.embedding_sums_add(out, radial, z_recv, z_send, geom, i, j, half)

    def fused_sums_backward(
        self,
        adj: Tensor,
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        geom: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The vector-Jacobian product of :meth:`fused_sums` for one block of pairs with the
        gradient ``adj`` (n, 10, F) of its sums, without the sums: the block's radial functions
        (a graph back to ``cut``, ``basis`` and ``vec``) and the gradients to seed them and
        ``geom`` with."""
        radial = self._pair_radial(cut, basis, vec, True)
        with torch.no_grad():
            g_radial, g_geom = self.pair_kernels.embedding_pair_grads(
                adj, radial, z_recv, z_send, geom, i, j, half
            )
        return radial, g_radial, g_geom

    def fused_finish(
        self, z_recv: Tensor, z_send: Tensor, packed: Tensor, self_basis: Tensor
    ) -> Tensor:
        """:meth:`finish` from packed pair sums (n, 10, F): the self pair term, the trace and
        the norm in one operator (:meth:`PairKernels.embedding_prepare`), the gates' network in
        another (:meth:`_gates`: the three parts' gates), the mixing times the gates in a third
        (:meth:`PairKernels.gated_mix`)."""
        kernels = self.pair_kernels
        own = self.self_pair_terms(z_recv, z_send, self_basis)
        x, norm = kernels.embedding_prepare(packed, own)
        lin = self.linears_tensor
        weights = torch.stack((lin[0].weight, lin[1].weight, lin[2].weight))
        gates = self._gates(self.init_norm(norm)).reshape(x.shape[0], 3, self.hidden_channels)
        return kernels.gated_mix(x, weights, gates)

    def new_sums(self, like: Tensor) -> list[Tensor]:
        """Zeroed pair sums for ``like``'s atoms: (n, F), (n, 3, F), (n, 6, F)."""
        n, f = like.shape[0], self.hidden_channels
        return [like.new_zeros((n, f)), like.new_zeros((n, 3, f)), like.new_zeros((n, 6, f))]

    def forward(
        self,
        z: Tensor,
        src: Tensor,
        dst: Tensor,
        cut: Tensor,
        rhat: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        half: bool = False,
        geom: Optional[Tensor] = None,
        vec: Optional[Tensor] = None,
        radial: Optional[Tensor] = None,
    ) -> Tensor:
        """X_i of every atom. ``geom``: the pairs' (1, rhat, packed rhat rhat^T), (P, 10), if
        already made (the fused kernels' ``geometry``; only the fused path takes it); ``vec``:
        the pair vectors (P, 3), for a radial table; ``radial``: every pair's radial functions
        (P, 3, F), if already made (:meth:`TensorNet.radial_networks`: the pairs then are one
        block; the fused path)."""
        z_recv, z_send = self.species_terms(z)
        fused = self.pair_kernels.applies(z_recv)
        block = pair_block(src.shape[0], self.hidden_channels, z_recv.device, fused)
        if fused:  # fused kernels
            _one_block(radial, src.shape[0], block)
            if geom is None:
                geom = algebra.packed_geometry(rhat)
            if _summed_blocks(src.shape[0], block):  # every block at once, one operator each way
                radials: list[Tensor] = []
                taps: list[Tensor] = []
                for i, j, cut_b, basis_b, geom_b, vec_b in zip(  # noqa: B905
                    _chunks(src, block), _chunks(dst, block), _chunks(cut, block),
                    _chunks(basis, block), _chunks(geom, block), _blocks(vec, src.shape[0], block),
                ):  # fmt: skip
                    radial_b = self._pair_radial(cut_b, basis_b, vec_b, True)
                    radials.append(radial_b)  # its tap right after it: see message_filter_tap
                    taps.append(
                        self.pair_kernels.embedding_tap(
                            radial_b, geom_b, z_recv, z_send, i, j, half
                        )
                    )
                packed = self.pair_kernels.embedding_blocks(
                    radials, z_recv, z_send, geom, src, dst, half, taps
                )
                return self.fused_finish(z_recv, z_send, packed, self_basis)
            packed: Optional[Tensor] = None  # the first block's sums start it: no zeros to add
            for i, j, cut_b, basis_b, geom_b, vec_b in zip(  # noqa: B905 (TorchScript's zip...)
                _chunks(src, block), _chunks(dst, block), _chunks(cut, block),
                _chunks(basis, block), _chunks(geom, block), _blocks(vec, src.shape[0], block),
            ):  # fmt: skip
                if packed is None:
                    packed = self.fused_sums(
                        i, j, cut_b, basis_b, geom_b, z_recv, z_send, half, vec_b, radial
                    )
                else:  # no graph (else summed above): added in place
                    self.fused_sums_add(
                        packed, i, j, cut_b, basis_b, geom_b, z_recv, z_send, half, vec_b
                    )
            if packed is None:
                packed = z_recv.new_zeros((z_recv.shape[0], 10, self.hidden_channels))
            return self.fused_finish(z_recv, z_send, packed, self_basis)
        # sum_j f_I, sum_j f_A rhat, sum_j f_S rhat rhat^T (packed; S not yet traceless)
        sums = self.new_sums(z_recv)
        for i, j, cut_b, basis_b, u, vec_b in zip(  # noqa: B905 (TorchScript's zip has no strict)
            _chunks(src, block), _chunks(dst, block), _chunks(cut, block), _chunks(basis, block),
            _chunks(rhat, block), _blocks(vec, src.shape[0], block),
        ):  # fmt: skip
            self.add_block(sums, i, j, cut_b, u, basis_b, z_recv, z_send, half, vec_b)
        return self.finish(z_recv, z_send, sums, self_basis)


class Interaction(_RadialLayer):
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
        self.mlp_activation = MLP_ACTIVATIONS.get(activation, -1)  # -1: not in the kernel
        self.algebra = algebra.PackedAlgebra(dtype)
        self.pair_kernels = PairKernels(dtype)  # see kernels.use_fused_kernels
        self._no_table(dtype)

    def _network(self, cut: Tensor, basis: Tensor) -> Tensor:
        """Radial filters f_I, f_A, f_S: (P, num_rbf) -> (P, 3, F), times the cutoff (P,)."""
        h = basis
        for linear in self.linears_scalar:
            h = self.act(linear(h))
        h = h * cut.unsqueeze(1)
        return h.reshape(h.shape[0], 3, self.hidden_channels)

    def _mix(self, first: int, packed: Tensor) -> list[Tensor]:
        """Channel mixing W_first, W_first+1, W_first+2 of the I, A, S parts of a packed tensor.

        Returns the parts separately: (n, 1, F), (n, 3, F), (n, 6, F).
        """
        lin = self.linears_tensor
        # contiguous parts: a linear on a strided slice runs as one small product per atom
        iso, vec, sym = torch.split(packed, [1, 3, 6], dim=1)  # one view each, one backward
        vec, sym = vec.contiguous(), sym.contiguous()
        iso = iso.squeeze(1)  # (n, F) rows 10 F apart: one matrix product, not one per atom
        if first == 0:
            return [lin[0](iso).unsqueeze(1), lin[1](vec), lin[2](sym)]
        return [lin[3](iso).unsqueeze(1), lin[4](vec), lin[5](sym)]

    def prepare(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Normalised X and the I, A, S parts of Y = W X that the messages carry."""
        x = x / (self.algebra.squared_norm(x) + 1.0)
        return x, self._mix(0, x)

    def add_block(
        self,
        msg: list[Tensor],
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        parts: list[Tensor],
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> None:
        """msg += sum_j f(ij) Y_j for one block of pairs (i, j), in place (``vec``: their
        vectors, for a radial table)."""
        filters = self._pair_radial(cut, basis, vec, False)  # (B, 3, F), once per listed pair
        _messages(msg, i, filters, parts, j)
        if half:  # the filters are symmetric in i and j
            _messages(msg, j, filters, parts, i)

    def block_dot(
        self,
        adj: list[Tensor],
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        rows_j: list[Tensor],
        rows_i: list[Tensor],
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> Tensor:
        """adj . (what :meth:`add_block` adds), a scalar; rows_j (rows_i) are the parts of the
        atoms j (i), gathered (see :func:`_message_dot`)."""
        filters = self._pair_radial(cut, basis, vec, False)
        total = _message_dot(adj, i, filters, rows_j)
        if half:
            total = total + _message_dot(adj, j, filters, rows_i)
        return total

    def forward(
        self,
        x: Tensor,
        src: Tensor,
        dst: Tensor,
        cut: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        charge_factor: Optional[Tensor],
        half: bool = False,
        vec: Optional[Tensor] = None,
        radial: Optional[Tensor] = None,
    ) -> Tensor:
        """The new X. ``vec``: the pair vectors (P, 3), for a radial table; ``radial``: every
        pair's filters (P, 3, F), if already made (see :meth:`TensorEmbedding.forward`)."""
        if self.pair_kernels.applies(x):
            return self._fused_forward(
                x, src, dst, cut, basis, self_basis, charge_factor, half, vec, radial
            )
        block = pair_block(src.shape[0], self.hidden_channels, x.device)
        x, parts = self.prepare(x)
        msg = self.self_messages(parts, self_basis)  # the self pair, then sum_j f(ij) y_j
        for i, j, cut_b, basis_b, vec_b in zip(  # noqa: B905 (TorchScript's zip has no strict)
            _chunks(src, block), _chunks(dst, block), _chunks(cut, block), _chunks(basis, block),
            _blocks(vec, src.shape[0], block),
        ):  # fmt: skip
            self.add_block(msg, i, j, cut_b, basis_b, parts, half, vec_b)
        return self.finish(x, parts, msg, self_basis, charge_factor, False)

    def _mix_weights(self, first: int) -> Tensor:
        """W_first, W_first+1, W_first+2 stacked, (3, F, F) (a constant once frozen)."""
        lin = self.linears_tensor
        if first == 0:
            return torch.stack((lin[0].weight, lin[1].weight, lin[2].weight))
        return torch.stack((lin[3].weight, lin[4].weight, lin[5].weight))

    def _fused_forward(
        self,
        x: Tensor,
        src: Tensor,
        dst: Tensor,
        cut: Tensor,
        basis: Tensor,
        self_basis: Tensor,
        charge_factor: Optional[Tensor],
        half: bool,
        vec: Optional[Tensor] = None,
        radial: Optional[Tensor] = None,
    ) -> Tensor:
        """:meth:`forward` with the fused kernels: packed tensors throughout, the messages,
        channel mixing and 3x3 products each one operator."""
        x, y = self.fused_prepare(x)
        f0 = self.self_radial_functions(self_basis)[0]  # the self pair's filters, (3, F)
        block = pair_block(src.shape[0], self.hidden_channels, x.device, True)
        _one_block(radial, src.shape[0], block)
        if _summed_blocks(src.shape[0], block):  # every block at once, one operator each way
            blocks: list[Tensor] = []
            taps: list[Tensor] = []
            for i, j, cut_b, basis_b, vec_b in zip(  # noqa: B905 (TorchScript's zip has no strict)
                _chunks(src, block), _chunks(dst, block), _chunks(cut, block),
                _chunks(basis, block), _blocks(vec, src.shape[0], block),
            ):  # fmt: skip
                filters_b = self._pair_radial(cut_b, basis_b, vec_b, True)
                blocks.append(filters_b)  # its tap right after it: see message_filter_tap
                taps.append(self.pair_kernels.message_filter_tap(filters_b, y, i, j, half))
            summed = self.pair_kernels.message_blocks(y, blocks, src, dst, half, f0, taps)
            return self.fused_finish(x, y, summed, charge_factor)
        msg: Optional[Tensor] = None
        for i, j, cut_b, basis_b, vec_b in zip(  # noqa: B905 (TorchScript's zip has no strict)
            _chunks(src, block), _chunks(dst, block), _chunks(cut, block), _chunks(basis, block),
            _blocks(vec, src.shape[0], block),
        ):  # fmt: skip
            if msg is None:  # the first block's sums start from the self pair's messages
                filters = radial
                if filters is None:
                    filters = self._pair_radial(cut_b, basis_b, vec_b, True)
                msg = self.pair_kernels.messages_self(y, filters, i, j, half, f0)
            else:  # no graph (else summed above): added in place
                self.fused_messages_add(msg, y, i, j, cut_b, basis_b, half, vec_b)
        if msg is None:  # not reached (_chunks gives one block even of no pairs): for TorchScript
            msg = self.fused_self_messages(y, self_basis)
        return self.fused_finish(x, y, msg, charge_factor)

    def fused_prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`prepare` with the fused kernels: normalised X and Y = W X, both packed."""
        x = self.pair_kernels.normalize(x)
        return x, self.pair_kernels.mix(x, self._mix_weights(0))

    def fused_self_messages(self, y: Tensor, self_basis: Tensor) -> Tensor:
        """The self pair's messages f(0) Y_i, packed."""
        f0 = self.self_radial_functions(self_basis)
        return y * f0.index_select(1, self.pair_kernels.group)

    def fused_messages_add(
        self,
        out: Tensor,
        y: Tensor,
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        half: bool,
        vec: Optional[Tensor] = None,
    ) -> None:
        """out += sum_j f(ij) Y_j over one block of pairs (i, j) (and f(ij) Y_i onto j if
        ``half``), packed (n, 10, F), without a graph or an atom-sized result per block: the
        low-memory forces' pair sums, and the layer's without a graph."""
        filters = self._pair_radial(cut, basis, vec, True)
        self.pair_kernels.messages_add(out, y, filters, i, j, half)

    def fused_messages_backward(
        self,
        adj: Tensor,
        y: Tensor,
        i: Tensor,
        j: Tensor,
        cut: Tensor,
        basis: Tensor,
        half: bool,
        adj_y: Tensor,
        vec: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """The vector-Jacobian products of the message sums of one block of pairs with
        the gradient ``adj`` (n, 10, F) of its sums: the one with respect to Y added onto
        ``adj_y`` (n, 10, F); and the block's filters (B, 3, F) (a graph back to ``cut``,
        ``basis`` and ``vec``) with the gradient to seed them with. The messages' own backward,
        without the sums themselves."""
        filters = self._pair_radial(cut, basis, vec, True)
        kernels = self.pair_kernels
        with torch.no_grad():
            if half:  # the transposed sums: for a half list the same sums, pairs kept in order
                kernels.messages_add(adj_y, adj, filters, i, j, half)
            else:
                kernels.messages_add(adj_y, adj, filters, j, i, half)
            adj_filters = kernels.message_filter_grad(adj, y, i, j, half)
        return filters, adj_filters

    def fused_finish(
        self, x: Tensor, y: Tensor, msg: Tensor, charge_factor: Optional[Tensor]
    ) -> Tensor:
        """The new X from the normalised X, Y and every message (the self pair's included),
        packed: the 3x3 products, normalisation and mixing of :meth:`finish`."""
        kernels = self.pair_kernels
        if self.o3:  # the product, factor and normalisation in one operator
            c = kernels.product_normalize(msg, y, True, charge_factor)
        else:
            c = kernels.normalize(2.0 * kernels.product(y, msg, False))
        dx = kernels.mix(c, self._mix_weights(3))
        return kernels.square_add(x, dx, charge_factor)  # x + dx + dx^2 q in one operator

    def _fused_network(self, cut: Tensor, basis: Tensor) -> Tensor:
        """:meth:`_network` as one operator (:meth:`PairKernels.mlp`) where it can be."""
        if self.mlp_activation < 0:
            return self._network(cut, basis)
        lin = self.linears_scalar
        h = self.pair_kernels.mlp(
            basis, cut, [lin[0].weight, lin[1].weight, lin[2].weight],
            [lin[0].bias, lin[1].bias, lin[2].bias], self.mlp_activation,
        )  # fmt: skip
        return h.reshape(h.shape[0], 3, self.hidden_channels)

    def self_messages(self, parts: list[Tensor], self_basis: Tensor) -> list[Tensor]:
        """The self pair's messages f(0) Y_i."""
        f0 = self.self_radial_functions(self_basis)
        return [f0.select(1, k) * parts[k] for k in range(3)]

    def finish(
        self,
        x: Tensor,
        parts: list[Tensor],
        msg: list[Tensor],
        self_basis: Tensor,
        charge_factor: Optional[Tensor],
        add_self: bool = True,
    ) -> Tensor:
        """The new X from the normalised X, its parts and the messages (the pairs' only, or with
        the self pair's too if not ``add_self``)."""
        if add_self:
            own = self.self_messages(parts, self_basis)
            msg = [msg[k] + own[k] for k in range(3)]
        y = self.algebra.full(torch.cat(parts, dim=1))
        m = self.algebra.full(torch.cat(msg, dim=1))
        if self.o3:
            c = charged(self.algebra.packed(algebra.matmul(m, y) + algebra.matmul(y, m)),
                         charge_factor)  # fmt: skip
        else:
            c = 2.0 * self.algebra.packed(algebra.matmul(y, m))
        c = c / (self.algebra.squared_norm(c) + 1.0)
        dx = torch.cat(self._mix(3, c), dim=1)
        dx_full = self.algebra.full(dx)
        return x + dx + charged(self.algebra.packed(algebra.matmul(dx_full, dx_full)),
                                 charge_factor)  # fmt: skip
