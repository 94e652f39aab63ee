"""Saving and loading TensorNet models.

Our format is a ``torch.save`` dict of plain data and tensors only, so it loads with
``torch.load(weights_only=True)``: no pickled code runs. :func:`load_model` also reads the
reference implementation's (TorchMD-Net) Lightning checkpoints of TensorNet models.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .nn import TensorNet

FORMAT_NAME = "tensornet_openmm.model"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Reference state-dict keys that carry no model weights (neighbour-list settings, the prior's
# initial values, and the reference's per-pair cache).
_IGNORED_REFERENCE_KEYS = re.compile(
    r"^(representation_model\.distance\..*"
    r"|prior_model\.\d+\.initial_atomref"
    r"|representation_model\.tensor_embedding\.Zij_map)$"
)
_REFERENCE_RENAMES = (
    (re.compile(r"^representation_model\."), ""),
    (re.compile(r"^output_model\.output_network\.(?:layers\.)?([02])\."), r"output_network.\1."),
)


def _dtype_name(model: TensorNet) -> str:
    dtype = next(model.parameters()).dtype
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"cannot save a model with parameter dtype {dtype}; use float32 or float64")


def save_model(
    model: TensorNet, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write ``model`` to ``path`` in the weights-only format.

    Parameters
    ----------
    model : TensorNet
    path : str or Path
        Destination; written to a temporary file first and renamed, so an existing checkpoint
        is never left half-written.
    metadata : mapping, optional
        Plain data (str, numbers, lists, dicts) stored with the model, e.g. training provenance;
        merged over ``model.metadata``. ``"elements"`` (atomic numbers the model was trained on)
        is checked when the model is put into an OpenMM System.
    """
    if not isinstance(model, TensorNet):
        raise TypeError(f"save_model expects a TensorNet, got {type(model).__name__}")
    if model.std_folded:
        raise ValueError(
            "this model's weights give kJ/mol (an OpenMM force's copy, see "
            "TensorNet.store_energy_scale); save the model the force was made from"
        )
    from . import __version__

    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "dtype": _dtype_name(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {**model.metadata, **(metadata or {})},
        "versions": {"tensornet_openmm": __version__, "torch": str(torch.__version__)},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


SHIPPED_MODELS = Path(__file__).parent / "models"


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package (``load_model(name)``)."""
    return sorted(p.stem for p in SHIPPED_MODELS.glob("*.pt"))


def load_model(path: str | Path, trust_pickle: bool = False) -> TensorNet:
    """Load a TensorNet from our format or from a reference (TorchMD-Net) checkpoint.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`save_model`, a TorchMD-Net Lightning ``.ckpt`` of a
        ``tensornet`` model (either gate layout, either output-key style, Atomref priors), or the
        name of a model shipped with the package (see :func:`shipped_models`).
    trust_pickle : bool
        Reference checkpoints are Python pickles and may need arbitrary code to load. Pass True
        only for files from a source you trust; without it such a file is refused.

    Returns
    -------
    TensorNet
        In evaluation mode, in the dtype it was saved with.
    """
    path = Path(path)
    if not path.is_file():
        shipped = SHIPPED_MODELS / f"{path}.pt"
        if path.suffix == "" and len(path.parts) == 1 and shipped.is_file():
            path = shipped
        else:
            raise FileNotFoundError(
                f"model file {str(path)!r} does not exist (models shipped with the package: "
                f"{shipped_models()})"
            )
    payload = _read(path, trust_pickle)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a TensorNet checkpoint (found {type(payload).__name__})")
    if payload.get("format") == FORMAT_NAME:
        model = _from_ours(payload, path)
    elif "hyper_parameters" in payload and "state_dict" in payload:
        model = from_reference(payload["hyper_parameters"], payload["state_dict"])
    else:
        raise ValueError(
            f"{path} is neither a tensornet_openmm model nor a TorchMD-Net checkpoint "
            f"(top-level keys: {sorted(payload)[:10]})"
        )
    return model.eval()


def _read(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ValueError(
                f"{path} contains pickled Python objects, and loading it would run code from "
                "the file. If you trust its source, pass trust_pickle=True (CLI: --trust-pickle)."
            ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} could not be read as a torch checkpoint: {err}") from err
    warnings.warn(
        f"loading {path} with full pickle support: any code inside it runs now", stacklevel=3
    )
    return torch.load(path, map_location="cpu", weights_only=False)


def _from_ours(payload: Mapping[str, Any], path: Path) -> TensorNet:
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this tensornet_openmm reads version "
            f"{FORMAT_VERSION}. Upgrade tensornet_openmm."
        )
    config = ModelConfig.from_dict(payload["config"])
    dtype = _DTYPES[payload["dtype"]]
    model = TensorNet(**config.to_dict(), dtype=dtype)
    model.load_state_dict(payload["state_dict"])
    model.metadata = dict(payload.get("metadata", {}))
    return model


def _reference_config(hp: Mapping[str, Any], atomref_size: int) -> ModelConfig:
    if hp.get("model") != "tensornet":
        raise ValueError(
            f"the checkpoint holds a {hp.get('model')!r} model; only 'tensornet' can be loaded"
        )
    if hp.get("output_model", "Scalar") != "Scalar":
        raise ValueError(
            f"output_model={hp.get('output_model')!r} is not supported; only 'Scalar' (energy)"
        )
    reduce_op = {"add": "sum"}.get(hp.get("reduce_op", "sum"), hp.get("reduce_op", "sum"))
    return ModelConfig(
        hidden_channels=int(hp["embedding_dimension"]),
        num_layers=int(hp["num_layers"]),
        num_rbf=int(hp["num_rbf"]),
        rbf_type=hp.get("rbf_type", "expnorm"),
        trainable_rbf=bool(hp.get("trainable_rbf", False)),
        activation=hp.get("activation", "silu"),
        cutoff_lower=float(hp.get("cutoff_lower", 0.0)),
        cutoff_upper=float(hp["cutoff_upper"]),
        max_z=int(hp["max_z"]),
        equivariance_invariance_group=hp.get("equivariance_invariance_group", "O(3)"),
        reduce_op=reduce_op,
        atomref_size=atomref_size,
    )


def _prior_names(hp: Mapping[str, Any]) -> list[str]:
    priors = hp.get("prior_model")
    if not priors:
        return []
    if not isinstance(priors, list):
        priors = [priors]
    names = []
    for prior in priors:
        names.extend(prior.keys() if isinstance(prior, dict) else [prior])
    return names


def _atomref_enabled(hp: Mapping[str, Any], index: int) -> bool:
    args = hp.get("prior_args")
    if isinstance(args, list):
        args = args[index] if index < len(args) else None
    return bool((args or {}).get("enable", True))


def _interleaved_to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """Reorder the 3F gate outputs from [F, 3] (pre-2026 files) to [3, F]."""
    rows = weight.shape[0]
    return weight.reshape(rows // 3, 3, -1).transpose(0, 1).reshape(weight.shape)


def from_reference(hp: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> TensorNet:
    """Build a :class:`TensorNet` from TorchMD-Net hyper-parameters and a state dict.

    Handles the ``model.`` prefix, both output-network key styles, the interleaved gate layout
    of files that carry ``check_errors`` (written before March 2026), Atomref priors and the
    mean/std buffers. Other priors (ZBL, D2, Coulomb) are refused rather than dropped.
    """
    state = {re.sub(r"^model\.", "", k): v for k, v in state_dict.items()}
    atomref = None
    for index, name in enumerate(_prior_names(hp)):
        if name != "Atomref":
            raise ValueError(
                f"prior model {name!r} is not supported (only Atomref); dropping it would "
                "change the energy"
            )
        if _atomref_enabled(hp, index):
            atomref = state[f"prior_model.{index}.atomref.weight"].reshape(-1)
    config = _reference_config(hp, 0 if atomref is None else atomref.numel())
    dtype = torch.float64 if str(hp.get("precision", 32)) == "64" else torch.float32
    model = TensorNet(**config.to_dict(), dtype=dtype)

    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _IGNORED_REFERENCE_KEYS.match(key) or re.match(r"^prior_model\.", key):
            continue
        for pattern, repl in _REFERENCE_RENAMES:
            key = pattern.sub(repl, key)
        ours[key] = value
    if "check_errors" in hp:
        gates = ["tensor_embedding.linears_scalar.1"]
        gates += [f"layers.{i}.linears_scalar.2" for i in range(config.num_layers)]
        for name in gates:
            for part in ("weight", "bias"):
                ours[f"{name}.{part}"] = _interleaved_to_blocks(ours[f"{name}.{part}"])
    for name in ("mean", "std"):
        ours[name] = ours.get(name, model.state_dict()[name]).reshape(())
    if atomref is not None:
        ours["atomref"] = atomref
    else:
        ours["atomref"] = model.atomref
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match a TensorNet with these hyper-parameters: "
            f"missing {missing}, unexpected {unexpected}"
        )
    return model
