"""The reference implementation (TorchMD-Net 3.1.0) as a test oracle.

Builds reference TensorNet models with random weights, writes them as Lightning-style
checkpoints (new or old gate layout) and evaluates them. Test-only: never imported by the package.
"""

from __future__ import annotations

import warnings

import pytest
import torch

tmn_model = pytest.importorskip("torchmdnet.models.model", reason="torchmd-net not installed")


def reference_hparams(**overrides):
    hp = dict(
        model="tensornet",
        embedding_dimension=16,
        num_layers=2,
        num_rbf=12,
        rbf_type="expnorm",
        trainable_rbf=False,
        activation="silu",
        cutoff_lower=0.0,
        cutoff_upper=4.5,
        max_z=20,
        max_num_neighbors=64,
        precision=64,
        equivariance_invariance_group="O(3)",
        static_shapes=False,
        derivative=True,
        atom_filter=-1,
        prior_model=None,
        prior_args=None,
        output_model="Scalar",
        reduce_op="add",
        remove_ref_energy=False,
    )
    hp.update(overrides)
    return hp


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "norm" in name:  # LayerNorms start at weight 1, bias 0: make them non-trivial
                p.add_(0.2 * noise)
            elif "atomref" in name:
                p.copy_(noise)
        model.mean.fill_(0.37)
        model.std.fill_(1.7)


def make_reference(tmp_path, seed=0, old_layout=False, **overrides):
    """A random reference model, written to a checkpoint; returns (model, checkpoint path)."""
    hp = reference_hparams(**overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tmn_model.create_model(dict(hp))
    _perturb(model, seed)
    state = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    if old_layout:
        hp["check_errors"] = True
        f = hp["embedding_dimension"]
        gates = ["tensor_embedding.linears_scalar.1"]
        gates += [f"layers.{i}.linears_scalar.2" for i in range(hp["num_layers"])]
        for gate in gates:
            for part in ("weight", "bias"):
                key = f"model.representation_model.{gate}.{part}"
                w = state[key]
                state[key] = w.reshape(3, f, -1).transpose(0, 1).reshape(w.shape)
    path = tmp_path / f"reference-{seed}.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hp, "epoch": 0}, path)
    return path


def load_reference(path, pure: bool = True):
    """Load a reference checkpoint with the reference's own loader.

    ``pure=True`` selects the reference's pure-PyTorch TensorNet ops (exact float64 arithmetic).
    ``pure=False`` keeps its default Warp kernels, whose tensor-norm kernel rounds the constant
    1/3 to float32 even in float64 models (relative error 3e-8 in the scalar norm), and which
    store X transposed relative to the pure path.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tmn_model.load_model(str(path)).eval()
    if pure:
        _use_pure_ops(model)
    return model


_PURE_OPS = {
    "compose_tensor": "_compose_tensor",
    "decompose_tensor": "_decompose_tensor",
    "tensor_matmul_o3": "_tensor_matmul_o3",
    "tensor_matmul_so3": "_tensor_matmul_so3",
}


def _use_pure_ops(model) -> None:
    """Switch a loaded reference TensorNet to the reference's pure-PyTorch code path."""
    for module in model.modules():
        if hasattr(module, "opt"):
            module.opt = False
    model._pure_ops = True


class reference_ops:
    """Context manager: the reference module's tensor ops are the pure ones inside it."""

    def __init__(self, pure: bool):
        self.pure = pure

    def __enter__(self):
        import torchmdnet.models.tensornet as tmod

        self.saved = {name: getattr(tmod, name) for name in _PURE_OPS}
        if self.pure:
            for name, pure in _PURE_OPS.items():
                setattr(tmod, name, getattr(tmod, pure))

    def __exit__(self, *exc):
        import torchmdnet.models.tensornet as tmod

        for name, value in self.saved.items():
            setattr(tmod, name, value)


def reference_energy_forces(model, z, pos, batch=None, total_charge=None):
    """Energies (eV) and forces (eV/A) from the reference model."""
    batch = torch.zeros_like(z) if batch is None else batch
    with reference_ops(getattr(model, "_pure_ops", False)):
        energy, forces = model(z, pos.clone(), batch, q=total_charge)
    return energy.detach().reshape(-1), forces.detach()
