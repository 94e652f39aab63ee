"""Typed settings. Frozen dataclasses; an unknown key is an error that names the allowed keys.

Imports neither torch nor openmm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ACTIVATIONS = ("silu", "tanh", "sigmoid", "mish", "ssp")
RADIAL_BASES = ("expnorm", "gauss")
GROUPS = ("O(3)", "SO(3)")
REDUCE_OPS = ("sum", "mean")


def _from_mapping(cls, data: Mapping[str, Any], what: str):
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {what} key(s) {unknown}; allowed keys are {allowed}. "
            "Check the spelling or remove them."
        )
    return cls(**dict(data))


def read_yaml_mapping(path, what: str) -> dict:
    """The top-level mapping of a YAML file; clear errors for a missing, unparsable or non-mapping
    file (``what`` names the file's role, e.g. "run configuration")."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping of settings")
    return values


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a :class:`~tensornet_openmm.TensorNet` energy model.

    Lengths in Angstrom. ``atomref_size`` is the number of per-element reference energies stored
    (0: none); it is normally max_z.
    """

    hidden_channels: int = 128
    num_layers: int = 2
    num_rbf: int = 32
    rbf_type: str = "expnorm"
    trainable_rbf: bool = False
    activation: str = "silu"
    cutoff_lower: float = 0.0
    cutoff_upper: float = 4.5
    max_z: int = 128
    equivariance_invariance_group: str = "O(3)"
    reduce_op: str = "sum"
    atomref_size: int = 0

    def __post_init__(self) -> None:
        _check_positive_int("hidden_channels", self.hidden_channels, 2)
        _check_positive_int("num_layers", self.num_layers, 0)
        _check_positive_int("num_rbf", self.num_rbf, 2)
        _check_positive_int("max_z", self.max_z, 1)
        _check_positive_int("atomref_size", self.atomref_size, 0)
        _check_choice("rbf_type", self.rbf_type, RADIAL_BASES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("equivariance_invariance_group", self.equivariance_invariance_group, GROUPS)
        _check_choice("reduce_op", self.reduce_op, REDUCE_OPS)
        lower, upper = float(self.cutoff_lower), float(self.cutoff_upper)
        if not (0.0 <= lower < upper):
            raise ValueError(
                f"cutoffs must satisfy 0 <= cutoff_lower < cutoff_upper (Angstrom); "
                f"got cutoff_lower={self.cutoff_lower!r}, cutoff_upper={self.cutoff_upper!r}"
            )
        object.__setattr__(self, "cutoff_lower", lower)
        object.__setattr__(self, "cutoff_upper", upper)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from plain data; unknown keys are an error."""
        return _from_mapping(cls, data, "model config")

    def to_dict(self) -> dict:
        """Plain-data form (what checkpoints store)."""
        return dataclasses.asdict(self)
