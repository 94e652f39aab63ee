"""The TensorNet energy model: representation, output head, reference energies, mean and std."""

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from . import algebra
from .layers import ACTIVATIONS, Interaction, TensorEmbedding
from .radial import RADIAL_BASES


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
        self.output_network = nn.Sequential(
            nn.Linear(f, f // 2, dtype=dtype),
            ACTIVATIONS[cfg.activation](),
            nn.Linear(f // 2, 1, dtype=dtype),
        )
        self.register_buffer("atomref", torch.zeros(max(cfg.atomref_size, 1), dtype=dtype))
        self.register_buffer("mean", torch.zeros((), dtype=dtype))
        self.register_buffer("std", torch.ones((), dtype=dtype))

    @property
    def config(self) -> ModelConfig:
        """The hyperparameters this model was built with."""
        return self._config

    @torch.jit.unused
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def atomic_energies(
        self,
        z: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        charge_factor: Tensor,
        half: bool = False,
    ) -> Tensor:
        """Per-atom energies (eV, shape (n_atoms,)) before reduction and mean.

        ``charge_factor`` (n_atoms,) is 1 + 0.1 q with q the total charge of each atom's molecule.
        ``half``: the pairs are listed once each (see :meth:`forward`).
        """
        src, dst = edge_index[0], edge_index[1]
        r = torch.sqrt((edge_vec * edge_vec).sum(-1))  # (P,)
        rhat = edge_vec / r[:, None]
        basis = self.distance_expansion(r)  # (P, K)
        self_basis = self.distance_expansion(r.new_zeros(1))  # (1, K)
        x = self.tensor_embedding(z, src, dst, r, rhat, basis, self_basis, half)
        for layer in self.layers:
            x = layer(x, src, dst, r, basis, self_basis, charge_factor, half)
        feats = self.algebra.part_norms(x).reshape(x.shape[0], -1)  # (n, 3F)
        h = self.act(self.linear(self.out_norm(feats)))
        energy = self.output_network(h)[:, 0] * self.std
        if self.use_atomref:
            energy = energy + self.atomref[z]
        return energy

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
        if batch is None:
            batch = torch.zeros_like(z)
            num_molecules = 1
        elif num_molecules <= 0:
            num_molecules = int(batch.max()) + 1
        if total_charge is None:
            charge_factor = torch.ones(z.shape[0], dtype=edge_vec.dtype, device=z.device)
        else:
            charge_factor = 1.0 + 0.1 * total_charge.to(edge_vec.dtype)[batch]
        e_atom = self.atomic_energies(z, edge_index, edge_vec, charge_factor, half)
        energy = torch.zeros(num_molecules, dtype=e_atom.dtype, device=e_atom.device)
        energy = energy.index_add(0, batch, e_atom)
        if self.reduce_mean:
            counts = torch.zeros_like(energy).index_add(0, batch, torch.ones_like(e_atom))
            energy = energy / counts
        return energy + self.mean
