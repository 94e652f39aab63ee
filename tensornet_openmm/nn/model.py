"""The TensorNet energy model: representation, output head, reference energies, mean and std."""

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from . import algebra
from .kernels import MLP_ACTIVATIONS, MLP_LINEAR_LAST
from .layers import ACTIVATIONS, Interaction, TensorEmbedding, pair_block
from .radial import RADIAL_BASES, cosine_cutoff


class TensorNet(nn.Module):
    """TensorNet (Simeon & De Fabritiis, NeurIPS 2023) as an energy model.

    Computes exactly what the reference implementation (TorchMD-Net) computes, from a pair list
    supplied by the caller. The keyword arguments are the fields of
    :class:`~tensornet_openmm.config.ModelConfig`; ``dtype`` is the parameter dtype.

    Units: positions and displacement vectors in Angstrom, energies in eV.

    Parameters
    ----------
    hidden_channels, num_layers, num_rbf, rbf_type, trainable_rbf, activation, cutoff_lower,
    cutoff_upper, max_z, equivariance_invariance_group, reduce_op, atomref_size
        See :class:`~tensornet_openmm.config.ModelConfig`.
    dtype : torch.dtype
        float32 or float64. ``model.double()`` converts later.
    """

    # Plain-Python metadata, not part of the scripted model.
    __jit_unused_properties__ = ["config"]
    __jit_ignored_attributes__ = ["_config", "metadata"]

    def __init__(
        self,
        hidden_channels: int = 128,
        num_layers: int = 2,
        num_rbf: int = 32,
        rbf_type: str = "expnorm",
        trainable_rbf: bool = False,
        activation: str = "silu",
        cutoff_lower: float = 0.0,
        cutoff_upper: float = 4.5,
        max_z: int = 128,
        equivariance_invariance_group: str = "O(3)",
        reduce_op: str = "sum",
        atomref_size: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        cfg = ModelConfig(
            hidden_channels=hidden_channels,
            num_layers=num_layers,
            num_rbf=num_rbf,
            rbf_type=rbf_type,
            trainable_rbf=trainable_rbf,
            activation=activation,
            cutoff_lower=cutoff_lower,
            cutoff_upper=cutoff_upper,
            max_z=max_z,
            equivariance_invariance_group=equivariance_invariance_group,
            reduce_op=reduce_op,
            atomref_size=atomref_size,
        )
        self._config = cfg
        self.metadata: dict = {}
        """Plain data carried with the model (saved by save_model); ``"elements"`` lists the
        atomic numbers it was trained on, which create_force checks against the System."""
        self.cutoff_lower = cfg.cutoff_lower
        self.cutoff_upper = cfg.cutoff_upper
        self.max_z = cfg.max_z
        self.reduce_mean = cfg.reduce_op == "mean"
        self.use_atomref = cfg.atomref_size > 0
        f = cfg.hidden_channels
        self.distance_expansion = RADIAL_BASES[cfg.rbf_type](
            cfg.cutoff_lower, cfg.cutoff_upper, cfg.num_rbf, cfg.trainable_rbf, dtype
        )
        self.tensor_embedding = TensorEmbedding(
            f, cfg.num_rbf, cfg.activation, cfg.cutoff_lower, cfg.cutoff_upper, cfg.max_z, dtype
        )
        self.layers = nn.ModuleList(
            Interaction(
                cfg.num_rbf,
                f,
                cfg.activation,
                cfg.cutoff_lower,
                cfg.cutoff_upper,
                cfg.equivariance_invariance_group,
                dtype,
            )
            for _ in range(cfg.num_layers)
        )
        self.algebra = algebra.PackedAlgebra(dtype)
        self.out_norm = nn.LayerNorm(3 * f, dtype=dtype)
        self.linear = nn.Linear(3 * f, f, dtype=dtype)
        self.act = ACTIVATIONS[cfg.activation]()
        self.mlp_activation = MLP_ACTIVATIONS.get(cfg.activation, -1)  # -1: not in the kernel
        # the output head's code: no activation after its last (the energy's) linear
        self.head_activation = self.mlp_activation + MLP_LINEAR_LAST
        self.output_network = nn.Sequential(
            nn.Linear(f, f // 2, dtype=dtype),
            ACTIVATIONS[cfg.activation](),
            nn.Linear(f // 2, 1, dtype=dtype),
        )
        self.register_buffer("atomref", torch.zeros(max(cfg.atomref_size, 1), dtype=dtype))
        self.register_buffer("mean", torch.zeros((), dtype=dtype))
        self.register_buffer("std", torch.ones((), dtype=dtype))
        self.std_folded = False  # std folded into the output network (store_energy_scale)
        self.zero_mean_dropped = False  # a zero mean no longer added (store_energy_scale)
        # r = 0 of the self pairs, and their radial basis once store_self_pair_terms made it
        self.register_buffer("zero_distance", torch.zeros(1, dtype=dtype), persistent=False)
        self.register_buffer("self_basis", torch.zeros((0, 0), dtype=dtype), persistent=False)
        # the first linears of every pair network, one matrix (store_self_pair_terms)
        self.register_buffer(
            "stored_first_weight", torch.zeros((0, cfg.num_rbf), dtype=dtype), persistent=False
        )
        self.register_buffer("stored_first_bias", torch.zeros(0, dtype=dtype), persistent=False)

    @property
    def config(self) -> ModelConfig:
        """The hyperparameters this model was built with."""
        return self._config

    @torch.jit.unused
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.jit.unused
    def store_self_pair_terms(self) -> None:
        """Compute the self pairs' radial terms (r = 0: the basis and every layer's radial
        functions, which depend on the weights alone) once and keep them as buffers, for a copy
        that only runs inference: the OpenMM forces do this. ``torch.jit.freeze`` does not fold
        them, so every force call would repeat them: seven linears, three cosines and their
        elementwise operators, on a GPU as many kernels. Also kept: the embedding's distance
        projections concatenated, and the first linears of every pair network as one matrix
        (:meth:`radial_networks`). The buffers are not saved with the
        weights; they go stale if the weights change (:meth:`clear_self_pair_terms`)."""
        self.clear_self_pair_terms()
        emb = self.tensor_embedding
        with torch.no_grad():
            basis = self._self_basis()
            for layer in [emb, *self.layers]:
                layer.self_radial = layer.self_radial_functions(basis)
            self.self_basis = basis
            emb.stored_weight, emb.stored_bias = emb._projection()
            firsts = [layer.linears_scalar[0] for layer in self.layers]
            self.stored_first_weight = torch.cat([emb.stored_weight] + [f.weight for f in firsts])
            self.stored_first_bias = torch.cat([emb.stored_bias] + [f.bias for f in firsts])

    @torch.jit.unused
    def store_species_terms(self, z: Tensor) -> None:
        """Compute the embedding's species terms of the atoms ``z`` and their self pairs' terms
        (they depend on the weights and the atomic numbers alone) once, for a copy that only ever
        evaluates these atoms, as an OpenMM force does: six operators fewer per call (on a GPU,
        kernels). Another number of atoms is then an error; cleared by
        :meth:`clear_self_pair_terms`."""
        emb = self.tensor_embedding
        size = emb.emb.num_embeddings
        outside = sorted({int(v) for v in z.tolist() if not 0 <= int(v) < size})
        if outside:
            raise ValueError(
                f"atomic numbers {outside} are outside this model's range 0..{size - 1}"
            )
        emb.stored_species = emb.stored_species[:, :0]  # computed below, not read
        with torch.no_grad():
            z_recv, z_send = emb.species_terms(z)
            self_terms = emb.self_pair_terms(z_recv, z_send, self._self_basis())
            emb.stored_species = torch.stack((z_recv, z_send, self_terms))

    @torch.jit.unused
    def store_energy_scale(self, factor: float) -> None:
        """Fold the energy's standard deviation and a unit ``factor`` into the weights of the
        output network's last linear (and ``factor`` into the atom references and the mean), so
        that the model gives energies times ``factor`` with no multiplication of its own: for a
        copy that only runs inference, as the OpenMM forces do (eV to kJ/mol), two operators
        fewer each way per call (on a GPU, kernels). The same energy up to rounding; the
        weights are changed in place, so a model meant for anything else must not be given. A
        mean of zero is then no longer added (the same numbers, one operator fewer)."""
        if self.std_folded:
            raise RuntimeError(
                "this model's energy scale is folded already: fold it into a fresh copy once"
            )
        last = self.output_network[2]
        with torch.no_grad():
            scale = self.std * factor
            last.weight.mul_(scale)
            last.bias.mul_(scale)
            self.atomref.mul_(factor)
            self.mean.mul_(factor)
            self.std.fill_(1.0)
        self.std_folded = True
        # adding a mean of zero changes no energy (not even its last bit): one operator fewer
        self.zero_mean_dropped = bool(self.mean.item() == 0.0)

    @torch.jit.unused
    def clear_self_pair_terms(self) -> None:
        """Compute the self pairs' terms at every call again (undoes
        :meth:`store_self_pair_terms`)."""
        self.self_basis = self.self_basis.new_zeros((0, 0))
        for layer in [self.tensor_embedding, *self.layers]:
            layer.self_radial = layer.self_radial.new_zeros((0, 3, 0))
        emb = self.tensor_embedding
        emb.stored_weight, emb.stored_bias = emb.stored_weight[:0], emb.stored_bias[:0]
        self.stored_first_weight = self.stored_first_weight[:0]
        self.stored_first_bias = self.stored_first_bias[:0]
        emb.stored_species = emb.stored_species[:, :0]

    def _self_basis(self) -> Tensor:
        """The radial basis at r = 0 of the self pairs, (1, K): stored, or computed."""
        if self.self_basis.numel() > 0:
            return self.self_basis
        return self.distance_expansion(self.zero_distance)

    def atomic_energies(
        self,
        z: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        charge_factor: Optional[Tensor],
        half: bool = False,
    ) -> Tensor:
        """Per-atom energies (eV, shape (n_atoms,)) before reduction and mean.

        ``charge_factor`` (n_atoms,) is 1 + 0.1 q with q the total charge of each atom's molecule;
        None when every molecule is neutral (a factor of exactly 1, whose products are skipped).
        ``half``: the pairs are listed once each (see :meth:`forward`).
        """
        src, dst = edge_index[0], edge_index[1]
        self_basis = self._self_basis()  # (1, K)
        kernels = self.tensor_embedding.pair_kernels
        radial: list[Tensor] = []
        if kernels.applies(edge_vec):  # fused kernels: cutoff, geometry and basis in one pass
            if self._one_operator(edge_vec) and kernels.tangent_networks(edge_vec):
                # ... and the networks, differentiated forward, in the same operator
                cut, geom, radial = self._tangent_radial(edge_vec)
                basis = edge_vec.new_empty((edge_vec.shape[0], 0))  # (made and used inside)
            else:
                cut, geom, basis = self._fused_geometry(edge_vec)
                radial = self.radial_networks(cut, basis)
            x = self.tensor_embedding(
                z, src, dst, cut, geom.narrow(1, 1, 3), basis, self_basis, half, geom, edge_vec,
                radial[0] if len(radial) > 0 else None,
            )  # fmt: skip
        else:
            cut, rhat, basis = self._geometry(edge_vec)
            x = self.tensor_embedding(
                z, src, dst, cut, rhat, basis, self_basis, half, None, edge_vec
            )
        for k, layer in enumerate(self.layers):
            filters = radial[k + 1] if len(radial) > 0 else None
            x = layer(x, src, dst, cut, basis, self_basis, charge_factor, half, edge_vec, filters)
        return self._head(x, z)

    def _one_operator(self, edge_vec: Tensor) -> bool:
        """Whether every pair network runs as one operator (:meth:`radial_networks`): the fused
        kernels with the weights stored (:meth:`store_self_pair_terms`, a force's copy), the
        networks run (no radial tables), none with weights to train (the fused kernels have no
        gradients for them) and the pairs one block (a small molecule, or any system on a
        GPU)."""
        emb = self.tensor_embedding
        pairs = edge_vec.shape[0]
        if (
            self.stored_first_bias.numel() == 0
            or self.mlp_activation < 0
            or emb.radial_table.numel() > 0
            or pair_block(pairs, emb.hidden_channels, edge_vec.device, True) < pairs
            or not emb.pair_kernels.applies(edge_vec)
        ):
            return False
        for layer in self.layers:
            if layer.radial_table.numel() > 0 or layer.linears_scalar[1].weight.requires_grad:
                return False
        return True

    def _network_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        """The layers' pair networks' further weights and biases, in order (the one-operator
        networks' lists)."""
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        for layer in self.layers:
            lin = layer.linears_scalar
            weights.append(lin[1].weight)
            weights.append(lin[2].weight)
            biases.append(lin[1].bias)
            biases.append(lin[2].bias)
        return weights, biases

    def radial_networks(self, cut: Tensor, basis: Tensor) -> list[Tensor]:
        """Every pair's radial functions for the embedding and each layer, (P, 3, F) each, from
        one operator (:meth:`PairKernels.radial_networks`: the networks' first linears, which
        share the basis as input, one matrix product each way) where that applies
        (:meth:`_one_operator`); else an empty list: each layer runs its own network."""
        f = self.tensor_embedding.hidden_channels
        out: list[Tensor] = []
        if not self._one_operator(basis):
            return out
        weights, biases = self._network_weights()
        made = self.tensor_embedding.pair_kernels.radial_networks(
            basis, cut, self.stored_first_weight, self.stored_first_bias, 3 * f,
            len(self.layers), weights, biases, self.mlp_activation,
        )  # fmt: skip
        for radial in made:
            out.append(radial.reshape(basis.shape[0], 3, f))
        return out

    def _tangent_radial(self, edge_vec: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The cutoff (P,), the packed geometry (P, 10) and :meth:`radial_networks`' functions
        of the pair vectors from one operator, the networks differentiated forward in r
        (:meth:`PairKernels.tangent_radial_networks`), where :meth:`_one_operator` applies."""
        f = self.tensor_embedding.hidden_channels
        kind, centers, widths, alpha, basis_lower = self.distance_expansion.fused_parameters()
        weights, biases = self._network_weights()
        made = self.tensor_embedding.pair_kernels.tangent_radial_networks(
            edge_vec, centers, widths, kind, alpha, basis_lower, self.cutoff_lower,
            self.cutoff_upper, self.stored_first_weight, self.stored_first_bias, 3 * f,
            len(self.layers), weights, biases, self.mlp_activation,
        )  # fmt: skip
        out: list[Tensor] = []
        for radial in made[2:]:
            out.append(radial.reshape(edge_vec.shape[0], 3, f))
        return made[0], made[1], out

    def _tabulated(self) -> bool:
        """Whether the embedding and every layer have radial tables
        (:func:`tensornet_openmm.nn.tables.tabulate_radial`)."""
        if self.tensor_embedding.radial_table.numel() == 0:
            return False
        for layer in self.layers:
            if layer.radial_table.numel() == 0:
                return False
        return True

    def _head_and_adjoint(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The molecule's energy from the last X (made without a graph) and its gradient with
        respect to that X."""
        x = x.requires_grad_()
        energy = self._head(x, z).sum()
        if self.reduce_mean:
            energy = energy / z.shape[0]
        if not self.zero_mean_dropped:
            energy = energy + self.mean
        return energy, _grads([energy], [x], [torch.ones_like(energy)], False)[0]

    def _fused_geometry(self, edge_vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine cutoff (P,), packed geometry (P, 10) and radial basis (P, K) of pair vectors
        in one operator (the fused kernels); no basis where every layer reads a table."""
        kind, centers, widths, alpha, basis_lower = self.distance_expansion.fused_parameters()
        if self._tabulated():  # the layers read tables: no basis functions needed
            centers, widths = centers[:0], widths[:0]
        return self.tensor_embedding.pair_kernels.geometry(
            edge_vec, centers, widths, kind, alpha, basis_lower, self.cutoff_lower,
            self.cutoff_upper,
        )  # fmt: skip

    def _geometry(self, edge_vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine cutoff (P,), unit vectors (P, 3) and radial basis (P, K) of pair vectors; the
        cutoff is the same in every layer, so it is computed once here."""
        r = torch.sqrt((edge_vec * edge_vec).sum(-1))
        cut = cosine_cutoff(r, self.cutoff_lower, self.cutoff_upper)
        return cut, edge_vec / r.unsqueeze(1), self.distance_expansion(r)

    def _head(self, x: Tensor, z: Tensor) -> Tensor:
        """Per-atom energies from the final X."""
        kernels = self.tensor_embedding.pair_kernels
        feats = kernels.part_norms(x).reshape(x.shape[0], -1)  # (n, 3F)
        h = self.out_norm(feats)
        if self.mlp_activation >= 0 and kernels.applies(h):  # one operator each way, see _gates
            # (the energy's linear too: no activation after it)
            lin, first, last = self.linear, self.output_network[0], self.output_network[2]
            energy = kernels.mlp(
                h, h.new_empty(0), [lin.weight, first.weight, last.weight],
                [lin.bias, first.bias, last.bias], self.head_activation,
            )  # fmt: skip
        else:
            energy = self.output_network(self.act(self.linear(h)))
        if not self.std_folded:
            energy = energy * self.std
        if self.use_atomref:
            energy = energy + self.atomref.unsqueeze(1).index_select(0, z)
        # (n, 1) -> (n,) last, by reshape: a squeeze before the addition made two operators in a
        # row that TorchScript's executor runs as an autodiff subgraph, at a cost per call
        return energy.reshape(-1)

    @torch.jit.export
    def energy_and_gradient(
        self,
        z: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        total_charge: Optional[Tensor] = None,
        half: bool = False,
        block: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Energy (eV) of one molecule and its gradient with respect to ``edge_vec`` (P, 3),
        keeping nothing pair-sized but the pairs themselves and that gradient.

        Same numbers as ``forward`` and autograd, with a fraction of the memory: autograd keeps
        every pair's radial-network activations and messages (about 2 MB per atom of liquid
        water at 128 channels) until the backward pass. Here the pair sums are computed without
        a graph, the per-atom part of the model is differentiated one layer at a time with those
        sums as leaves, and each layer's pair terms are recomputed, ``block`` pairs at a time (0:
        see :func:`low_memory_block`), to take their vector-Jacobian products. That costs one
        more pass over the pairs. Forces: minus the gradient, carried from the pair vectors to the
        positions (``r_ij = pos_i - pos_j``). Not for training: no parameter gradients.

        With the fused kernels (:meth:`_fused_energy_and_gradient`) the pair sums and their
        backward are one operator per block each way, and the per-atom algebra is
        differentiated a chunk of atoms at a time (``block`` atoms where ``block`` is given);
        each block's sums add in place onto atom-sized tensors: what stays is about six
        atom-sized (n, 10, F) tensors and the pairs, about 40 KB per atom of water at 128
        channels in float32.
        """
        src, dst = edge_index[0], edge_index[1]
        vec = no_history(edge_vec)
        n = z.shape[0]
        charge_factor: Optional[Tensor] = None  # neutral: a factor of exactly 1
        if total_charge is not None:
            charge_factor = torch.ones(n, dtype=vec.dtype, device=vec.device) * (
                1.0 + 0.1 * total_charge.to(vec.dtype)
            )
        if self.tensor_embedding.pair_kernels.applies(vec):
            result = self._fused_energy_and_gradient(z, src, dst, vec, charge_factor, half, block)
        else:  # one return: TorchScript cannot script a return before the ``with`` blocks
            result = self._plain_energy_and_gradient(z, src, dst, vec, charge_factor, half, block)
        return result

    def _plain_energy_and_gradient(
        self,
        z: Tensor,
        src: Tensor,
        dst: Tensor,
        vec: Tensor,
        charge_factor: Optional[Tensor],
        half: bool,
        block: int,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`energy_and_gradient` with PyTorch's operators: the pair terms of a block as
        (block, 10, F) tensors, the per-atom algebra on full 3x3 matrices."""
        if block <= 0:
            block = low_memory_block(self.tensor_embedding.hidden_channels, vec.device)
        emb = self.tensor_embedding
        i_blocks, j_blocks, v_blocks = src.split(block), dst.split(block), vec.split(block)
        # 1. forward without a graph, keeping each layer's input X and pair sums (per atom)
        inputs: list[Tensor] = []
        msgs: list[list[Tensor]] = []
        with torch.no_grad():
            self_basis = self._self_basis()
            z_recv, z_send = emb.species_terms(z)
            sums = emb.new_sums(z_recv)
            for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
                cut, rhat, basis = self._geometry(v)
                emb.add_block(sums, i, j, cut, rhat, basis, z_recv, z_send, half, v)
            x = emb.finish(z_recv, z_send, sums, self_basis)
            for layer in self.layers:
                inputs.append(x)
                x, parts = layer.prepare(x)
                msg = [torch.zeros_like(p) for p in parts]
                for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
                    cut, _, basis = self._geometry(v)
                    layer.add_block(msg, i, j, cut, basis, parts, half, v)
                msgs.append(msg)
                x = layer.finish(x, parts, msg, self_basis, charge_factor)
        # 2. the head: the energy and its gradient with respect to the last X
        energy, adj_x = self._head_and_adjoint(x, z)
        # 3. backwards, one layer's per-atom graph at a time: the adjoint of its pair sums, then
        # its pair terms recomputed block by block for their products with that adjoint
        grad_vec = torch.zeros_like(vec)
        for k in range(len(inputs) - 1, -1, -1):
            for index, interaction in enumerate(self.layers):  # TorchScript: ModuleList by loop
                if index == k:
                    x_in = inputs[k].requires_grad_()
                    x_norm, parts = interaction.prepare(x_in)
                    leaves = [t.requires_grad_() for t in msgs[k]]
                    x_out = interaction.finish(x_norm, parts, leaves, self_basis, charge_factor)
                    adj = _grads([x_out], leaves, [adj_x], True)
                    fixed = [no_history(p) for p in parts]
                    d_parts = [torch.zeros_like(p) for p in fixed]
                    start = 0
                    for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
                        v = no_history(v).requires_grad_()
                        cut, _, basis = self._geometry(v)
                        rows_j = [p.index_select(0, j).requires_grad_() for p in fixed]
                        rows_i = rows_j  # the senders i of the reversed pairs: half lists only
                        wrt = [v] + rows_j
                        if half:
                            rows_i = [p.index_select(0, i).requires_grad_() for p in fixed]
                            wrt = wrt + rows_i
                        dot = interaction.block_dot(adj, i, j, cut, basis, rows_j, rows_i, half, v)
                        g = _grads([dot], wrt, [torch.ones_like(dot)], False)
                        grad_vec[start : start + v.shape[0]] += g[0]
                        for c in range(3):
                            d_parts[c].index_add_(0, j, g[1 + c])
                            if half:
                                d_parts[c].index_add_(0, i, g[4 + c])
                        start += v.shape[0]
                    adj_x = _grads([x_out] + parts, [x_in], [adj_x] + d_parts, False)[0]
        # 4. the embedding: the adjoint of its pair sums, then its pair terms block by block
        leaves = [t.requires_grad_() for t in sums]
        x0 = emb.finish(z_recv, z_send, leaves, self_basis)
        adj = _grads([x0], leaves, [adj_x], False)
        start = 0
        for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
            v = no_history(v).requires_grad_()
            cut, rhat, basis = self._geometry(v)
            dot = emb.block_dot(adj, i, j, cut, rhat, basis, z_recv, z_send, half, v)
            grad_vec[start : start + v.shape[0]] += _grads(
                [dot], [v], [torch.ones_like(dot)], False
            )[0]
            start += v.shape[0]
        return no_history(energy), grad_vec

    def _fused_energy_and_gradient(
        self,
        z: Tensor,
        src: Tensor,
        dst: Tensor,
        vec: Tensor,
        charge_factor: Optional[Tensor],
        half: bool,
        block: int,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`energy_and_gradient` with the fused kernels: the pair sums of a block are one
        operator each way (no (block, 10, F) tensors), so blocks are larger
        (:func:`fused_low_memory_block`), and the per-atom algebra is packed throughout."""
        n = z.shape[0]
        # atoms per chunk of the per-atom algebra's gradients: ``block`` where it is given
        chunk = block if block > 0 else atom_chunk(self.tensor_embedding.hidden_channels,
                                                   vec.device)  # fmt: skip
        if block <= 0:
            block = fused_low_memory_block(self.tensor_embedding.hidden_channels, vec.device)
        emb = self.tensor_embedding
        i_blocks, j_blocks, v_blocks = src.split(block), dst.split(block), vec.split(block)
        inputs: list[Tensor] = []
        sums: list[Tensor] = []
        with torch.no_grad():
            self_basis = self._self_basis()
            z_recv, z_send = emb.species_terms(z)
        first = z_recv.new_zeros(0)  # the embedding's pair sums: made at the first layer's turn
        # 1. forward without a graph (_fused_forward_keeping), keeping each layer's input X and
        # its pair sums, but the first layer's input; 2. the head: the energy and its gradient
        # with respect to the last X. No name here holds the forward's temporaries or that X,
        # so they are freed as soon as they are used
        energy, adj_x = self._head_and_adjoint(
            self._fused_forward_keeping(
                i_blocks, j_blocks, v_blocks, z_recv, z_send, self_basis, charge_factor, half,
                chunk, inputs, sums,
            ),
            z,
        )  # fmt: skip
        # 3. backwards, one layer at a time. The per-atom algebra acts on each atom alone, so it
        # is differentiated a chunk of atoms at a time: the adjoints of the layer's pair sums and
        # of Y; then the pairs' terms again, block by block, for the vector-Jacobian products
        # of the message sums (their operator's backward: to Y and to the filters); then the
        # adjoint of X through the normalisation and Y = W X (the new X is the normalised X
        # plus terms of Y and the messages alone, so that path is the identity)
        grad_vec = torch.zeros_like(vec)
        for k in range(len(inputs) - 1, -1, -1):
            for index, interaction in enumerate(self.layers):  # TorchScript: ModuleList by loop
                if index == k:
                    with torch.no_grad():
                        if k == 0:  # the embedding's pair sums and X again
                            first = self._first_sums(
                                i_blocks, j_blocks, v_blocks, z_recv, z_send, half
                            )
                            inputs[0] = self._embedding_x(z_recv, z_send, first, self_basis, chunk)
                        y_all = torch.empty_like(inputs[k])
                    adj_sum = torch.empty_like(inputs[k])
                    adj_y = torch.empty_like(inputs[k])
                    for a0 in range(0, n, chunk):
                        m = min(chunk, n - a0)
                        with torch.no_grad():
                            x_norm, y = interaction.fused_prepare(inputs[k].narrow(0, a0, m))
                            y_all.narrow(0, a0, m).copy_(y)
                        y_leaf = y.requires_grad_()
                        sum_leaf = no_history(sums[k].narrow(0, a0, m)).requires_grad_()
                        msg = interaction.fused_self_messages(y_leaf, self_basis) + sum_leaf
                        x_out = interaction.fused_finish(
                            x_norm, y_leaf, msg, _rows(charge_factor, a0, m)
                        )
                        adj = _grads([x_out], [sum_leaf, y_leaf], [adj_x.narrow(0, a0, m)], False)
                        adj_sum.narrow(0, a0, m).copy_(adj[0])
                        adj_y.narrow(0, a0, m).copy_(adj[1])
                    sums[k] = y_all.new_zeros(0)  # the layer's pair sums are done with
                    start = 0
                    for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
                        v = no_history(v).requires_grad_()
                        cut, _, basis = self._fused_geometry(v)
                        filters, g_filters = interaction.fused_messages_backward(
                            adj_sum, y_all, i, j, cut, basis, half, adj_y, v
                        )
                        grad_vec[start : start + v.shape[0]] += _grads(
                            [filters], [v], [g_filters], False
                        )[0]
                        start += v.shape[0]
                    for a0 in range(0, n, chunk):
                        m = min(chunk, n - a0)
                        x_in = no_history(inputs[k].narrow(0, a0, m)).requires_grad_()
                        x_norm, y = interaction.fused_prepare(x_in)
                        seeds = [adj_x.narrow(0, a0, m), adj_y.narrow(0, a0, m)]
                        # adj_x's rows are read before they are overwritten
                        adj_x.narrow(0, a0, m).copy_(_grads([x_norm, y], [x_in], seeds, False)[0])
                    inputs[k] = adj_x.new_zeros(0)  # done with
        # 4. the embedding: the adjoint of its pair sums, a chunk of atoms at a time, then its
        # pair terms block by block
        adj_first = torch.empty_like(first)
        for a0 in range(0, n, chunk):
            m = min(chunk, n - a0)
            leaf = no_history(first.narrow(0, a0, m)).requires_grad_()
            x0 = emb.fused_finish(z_recv.narrow(0, a0, m), z_send.narrow(0, a0, m), leaf,
                                  self_basis)  # fmt: skip
            adj_first.narrow(0, a0, m).copy_(
                _grads([x0], [leaf], [adj_x.narrow(0, a0, m)], False)[0]
            )
        start = 0
        for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
            v = no_history(v).requires_grad_()
            cut, geom, basis = self._fused_geometry(v)
            radial, g_radial, g_geom = emb.fused_sums_backward(
                adj_first, i, j, cut, basis, geom, z_recv, z_send, half, v
            )
            grad_vec[start : start + v.shape[0]] += _grads(
                [radial, geom], [v], [g_radial, g_geom], False
            )[0]
            start += v.shape[0]
        return no_history(energy), grad_vec

    def _fused_forward_keeping(
        self,
        i_blocks: list[Tensor],
        j_blocks: list[Tensor],
        v_blocks: list[Tensor],
        z_recv: Tensor,
        z_send: Tensor,
        self_basis: Tensor,
        charge_factor: Optional[Tensor],
        half: bool,
        chunk: int,
        inputs: list[Tensor],
        sums: list[Tensor],
    ) -> Tensor:
        """The last X without a graph (fused kernels), appending each layer's input X (an
        empty tensor for the first layer's) to ``inputs`` and its pair sums to ``sums``. The
        per-atom algebra runs ``chunk`` atoms at a time, so that its temporaries stay small:
        what is whole is X, Y, the pair sums and the next X."""
        with torch.no_grad():
            n = z_recv.shape[0]
            x = self._embedding_x(
                z_recv, z_send, self._first_sums(i_blocks, j_blocks, v_blocks, z_recv, z_send,
                                                 half), self_basis, chunk,
            )  # fmt: skip
            for layer in self.layers:
                inputs.append(x if len(inputs) > 0 else x.new_zeros(0))
                y = torch.empty_like(x)
                for a0 in range(0, n, chunk):
                    m = min(chunk, n - a0)
                    y.narrow(0, a0, m).copy_(layer.fused_prepare(x.narrow(0, a0, m))[1])
                pair_sum = torch.zeros_like(y)
                for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
                    cut, _, basis = self._fused_geometry(v)
                    layer.fused_messages_add(pair_sum, y, i, j, cut, basis, half, v)
                sums.append(pair_sum)
                x_next = torch.empty_like(x)
                for a0 in range(0, n, chunk):
                    m = min(chunk, n - a0)
                    # normalised again (one cheap operator) rather than kept whole
                    x_norm = layer.pair_kernels.normalize(x.narrow(0, a0, m))
                    y_rows = y.narrow(0, a0, m)
                    msg = layer.fused_self_messages(y_rows, self_basis) + pair_sum.narrow(0, a0, m)
                    x_next.narrow(0, a0, m).copy_(
                        layer.fused_finish(x_norm, y_rows, msg, _rows(charge_factor, a0, m))
                    )
                x = x_next
        return x

    def _embedding_x(
        self, z_recv: Tensor, z_send: Tensor, first: Tensor, self_basis: Tensor, chunk: int
    ) -> Tensor:
        """The embedding's X from its pair sums ``first`` (n, 10, F), ``chunk`` atoms at a
        time (no graph)."""
        emb = self.tensor_embedding
        n = first.shape[0]
        x = torch.empty_like(first)
        with torch.no_grad():
            for a0 in range(0, n, chunk):
                m = min(chunk, n - a0)
                x.narrow(0, a0, m).copy_(emb.fused_finish(
                    z_recv.narrow(0, a0, m), z_send.narrow(0, a0, m), first.narrow(0, a0, m),
                    self_basis,
                ))  # fmt: skip
        return x

    def _first_sums(
        self,
        i_blocks: list[Tensor],
        j_blocks: list[Tensor],
        v_blocks: list[Tensor],
        z_recv: Tensor,
        z_send: Tensor,
        half: bool,
    ) -> Tensor:
        """The embedding's pair sums (n, 10, F) with the fused kernels, block by block."""
        emb = self.tensor_embedding
        first = z_recv.new_zeros((z_recv.shape[0], 10, emb.hidden_channels))
        for i, j, v in zip(i_blocks, j_blocks, v_blocks):  # noqa: B905
            cut, geom, basis = self._fused_geometry(v)
            emb.fused_sums_add(first, i, j, cut, basis, geom, z_recv, z_send, half, v)
        return first

    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor | None = None,
        batch: Tensor | None = None,
        total_charge: Tensor | None = None,
        num_molecules: int = 0,
        half: bool = False,
    ) -> Tensor:
        """Energy of each molecule.

        Parameters
        ----------
        z : Tensor, shape (n_atoms,), int64
            Atomic numbers, each in [0, max_z).
        pos : Tensor, shape (n_atoms, 3), Angstrom
            Positions; used for the displacement vectors when ``edge_vec`` is None.
        edge_index : Tensor, shape (2, n_pairs), int64
            Ordered pairs (i, j), i != j, both directions (once each if ``half``). Self pairs
            are added by the model.
            A pair with distance >= cutoff_upper contributes exactly zero (use it for padding).
        edge_vec : Tensor, shape (n_pairs, 3), Angstrom, optional
            r_ij = pos[i] - pos[j] (minimum image in periodic systems). Default: from ``pos``.
        batch : Tensor, shape (n_atoms,), int64, optional
            Molecule index of each atom (default: one molecule).
        total_charge : Tensor, shape (n_molecules,), optional
            Total charge of each molecule, in e (default 0).
        num_molecules : int
            Number of molecules; 0 infers it from ``batch`` (one host synchronisation).
        half : bool
            ``edge_index`` lists each pair once (either direction, for example i < j, as
            ``neighbor_pairs(..., half=True)`` returns) instead of in both directions. Same
            energy; the radial networks, most of the cost, run on half as many pairs.

        Returns
        -------
        Tensor, shape (n_molecules,), eV
        """
        if edge_vec is None:
            edge_vec = pos[edge_index[0]] - pos[edge_index[1]]
        if batch is not None and num_molecules <= 0:
            num_molecules = int(batch.max()) + 1
        charge_factor: Optional[Tensor] = None  # neutral: a factor of exactly 1
        if total_charge is not None:
            index = torch.zeros_like(z) if batch is None else batch
            charge_factor = 1.0 + 0.1 * total_charge.to(edge_vec.dtype)[index]
        e_atom = self.atomic_energies(z, edge_index, edge_vec, charge_factor, half)
        if batch is None:  # one molecule (a force call): a plain sum, no batch index to scatter by
            energy = e_atom.sum(0, keepdim=True)
            if self.reduce_mean:
                energy = energy / z.shape[0]
            if self.zero_mean_dropped:
                return energy
            return energy + self.mean
        energy = torch.zeros(num_molecules, dtype=e_atom.dtype, device=e_atom.device)
        energy = energy.index_add(0, batch, e_atom)
        if self.reduce_mean:
            counts = torch.zeros_like(energy).index_add(0, batch, torch.ones_like(e_atom))
            energy = energy / counts
        return energy + self.mean


def no_history(t: Tensor) -> Tensor:
    """A copy of ``t`` without autograd history. ``detach()`` will not do: openmm-torch freezes
    the module (``torch.jit.freeze``), and frozen graphs drop ``aten::detach``."""
    with torch.no_grad():
        return t.clone()


def low_memory_block(channels: int, device: torch.device) -> int:
    """Pairs per block in :meth:`TensorNet.energy_and_gradient`: about 2^20 (CPU, cache-sized)
    or 2^24 (GPU, few launches) elements per (block, 10, channels) tensor."""
    return _rows_of(1 << 20, 1 << 24, channels, device)


def _rows_of(cpu_elements: int, gpu_elements: int, channels: int, device: torch.device) -> int:
    """Rows of (rows, 10, channels) tensors that hold about ``cpu_elements`` (on the CPU) or
    ``gpu_elements`` (elsewhere) elements, at least one."""
    elements = cpu_elements if device.type == "cpu" else gpu_elements
    return max(elements // (10 * channels), 1)


def atom_chunk(channels: int, device: torch.device) -> int:
    """Atoms per chunk of the per-atom algebra's gradients in the low-memory forces with the
    fused kernels: about 2^18 (CPU) or 2^24 (GPU) elements per (chunk, 10, channels) tensor, of
    which a chunk's graph keeps about twenty."""
    return _rows_of(1 << 18, 1 << 24, channels, device)


def fused_low_memory_block(channels: int, device: torch.device) -> int:
    """Pairs per block in :meth:`TensorNet.energy_and_gradient` with the fused kernels: about
    2^23 (CPU, cache-sized) or 2^26 (GPU, few launches) elements per (block, 10, channels), the
    size of a block's radial networks with their activations. The sums add onto atom-sized
    tensors in place (``messages_add``), so a block costs nothing per atom, whatever the box."""
    return _rows_of(1 << 23, 1 << 26, channels, device)


def _rows(t: Optional[Tensor], start: int, length: int) -> Optional[Tensor]:
    """Rows ``start`` to ``start + length`` of ``t``; None stays None."""
    if t is None:
        return None
    return t.narrow(0, start, length)


def _grads(
    outputs: list[Tensor], inputs: list[Tensor], seeds: list[Tensor], retain: bool
) -> list[Tensor]:
    """torch.autograd.grad of ``outputs`` weighted by ``seeds``, with zeros for inputs that the
    outputs do not reach."""
    grad_outputs: list[Optional[Tensor]] = []
    for seed in seeds:
        grad_outputs.append(seed)
    found = torch.autograd.grad(
        outputs, inputs, grad_outputs, retain_graph=retain, allow_unused=True
    )
    result: list[Tensor] = []
    for g, x in zip(found, inputs):  # noqa: B905
        result.append(torch.zeros_like(x) if g is None else g)
    return result
