"""Fit a TensorNet to energies and forces (``tensornet-openmm train CONFIG.yaml``).

The configuration is YAML with the fields of :class:`TrainConfig`; data sets use the format of
:mod:`tensornet_openmm.data`. Per-element reference energies are fitted by least squares on the
training energies and stored in the model (``atomref``), so the network learns only the binding
part. The loss is ``energy_weight * MSE(energy per atom) + force_weight * MSE(force components)``
in eV and eV/A. The best model on the validation set is written (weights-only format) as
``best.pt`` in the output folder whenever it improves, ``last.pt`` after every epoch, and the
history as ``history.csv``. This module does not import OpenMM.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import load_model, save_model
from .config import ModelConfig, _from_mapping, read_yaml_mapping
from .data import Dataset, read_dataset
from .neighbors import neighbor_pairs
from .nn import TensorNet


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; ``model`` holds :class:`~tensornet_openmm.config.ModelConfig` fields."""

    train: str
    validation: str | None = None
    validation_fraction: float = 0.1
    test: tuple[str, ...] = ()
    model: dict = field(default_factory=dict)
    init_from: str | None = None
    dtype: str = "float32"
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    lr_factor: float = 0.5
    lr_patience: int = 5
    lr_min: float = 1e-6
    early_stopping_patience: int = 20
    energy_weight: float = 1.0
    force_weight: float = 10.0
    max_minutes: float | None = None
    seed: int = 0
    output: str = "training"
    device: str = "auto"
    metadata: dict = field(default_factory=dict)  # stored with the model, e.g. level_of_theory

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Path | None = None) -> TrainConfig:
        config = _from_mapping(cls, values, "training configuration")
        if base is not None:  # paths are relative to the config file
            resolve = lambda p: str((base / p).resolve()) if p else p  # noqa: E731
            config = dataclasses.replace(
                config, train=resolve(config.train), validation=resolve(config.validation),
                test=tuple(resolve(p) for p in config.test), output=resolve(config.output),
                init_from=config.init_from if not config.init_from or "/" not in config.init_from
                else resolve(config.init_from),
            )  # fmt: skip
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        values = read_yaml_mapping(path, "training configuration")
        values["test"] = tuple(values.get("test", ()))
        return cls.from_dict(values, Path(path).parent)

    def validate(self) -> None:
        if not 0 < self.validation_fraction < 1 and self.validation is None:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in (0, 1)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.energy_weight < 0 or self.force_weight < 0:
            raise ValueError("lr must be positive and the loss weights non-negative")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'float64'")
        ModelConfig.from_dict(self.model)  # unknown or bad model keys fail now


class _Frames:
    """A data set on a device, with half pair lists precomputed once (positions are fixed)."""

    def __init__(self, data: Dataset, cutoff: float, dtype, device) -> None:
        self.data = data
        self.items = []
        for k in range(len(data)):
            f = data.frame(k)
            pos = torch.tensor(f["positions"], dtype=torch.float64)
            box = None if f["box"] is None else torch.tensor(f["box"], dtype=torch.float64)
            pairs = neighbor_pairs(pos, cutoff, box, half=True)
            shift = pairs.vectors - (pos[pairs.edge_index[0]] - pos[pairs.edge_index[1]])
            self.items.append(
                {
                    "z": torch.tensor(f["atomic_numbers"], device=device),
                    "pos": pos.to(dtype=dtype, device=device),
                    "edge_index": pairs.edge_index.to(device),
                    "shift": shift.to(dtype=dtype, device=device),
                    "energy": float(f["energy"]),
                    "forces": torch.tensor(f["forces"], dtype=dtype, device=device),
                    "charge": float(f["total_charge"]),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, frames) -> dict[str, torch.Tensor]:
        items = [self.items[k] for k in frames]
        device = items[0]["pos"].device
        counts = [len(it["z"]) for it in items]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return {
            "z": torch.cat([it["z"] for it in items]),
            "pos": torch.cat([it["pos"] for it in items]),
            "edge_index": torch.cat(
                [it["edge_index"] + int(o) for it, o in zip(items, offsets, strict=True)], dim=1
            ),
            "shift": torch.cat([it["shift"] for it in items]),
            "batch": torch.repeat_interleave(
                torch.arange(len(items), device=device), torch.tensor(counts, device=device)
            ),
            "n_atoms": torch.tensor(counts, device=device),
            "energy": torch.tensor([it["energy"] for it in items], device=device),
            "forces": torch.cat([it["forces"] for it in items]),
            "charge": torch.tensor([it["charge"] for it in items], device=device),
        }


def predict(model: TensorNet, batch: dict[str, torch.Tensor], create_graph: bool):
    """Energies (eV, per frame) and forces (eV/A) for a collated batch."""
    pos = batch["pos"].detach().requires_grad_(True)
    src, dst = batch["edge_index"]
    vectors = pos[src] - pos[dst] + batch["shift"]
    energy = model(
        batch["z"], pos, batch["edge_index"], vectors, batch["batch"],
        batch["charge"].to(pos.dtype), num_molecules=len(batch["n_atoms"]), half=True,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -grad


def fit_reference_energies(data: Dataset, max_z: int) -> np.ndarray:
    """Per-element energies e_z minimising sum_frames (E - sum_atoms e_z)^2 (zeros elsewhere)."""
    elements = data.elements
    counts = np.zeros((len(data), len(elements)))
    frame_of_atom = np.repeat(np.arange(len(data)), data.n_atoms)
    for col, z in enumerate(elements):
        np.add.at(counts[:, col], frame_of_atom[data.atomic_numbers == z], 1.0)
    solution, *_ = np.linalg.lstsq(counts, data.energy, rcond=None)
    atomref = np.zeros(max_z)
    atomref[elements] = solution
    return atomref


def evaluate(model: TensorNet, frames: _Frames, batch_size: int = 32) -> dict[str, float]:
    """Energy errors (meV/atom) and force errors (meV/A) of ``model`` on ``frames``."""
    e_err, f_err = [], []
    for start in range(0, len(frames), batch_size):
        batch = frames.batch(range(start, min(len(frames), start + batch_size)))
        energy, forces = predict(model, batch, create_graph=False)
        e_err.append(((energy.detach() - batch["energy"]) / batch["n_atoms"]).cpu())
        f_err.append((forces.detach() - batch["forces"]).reshape(-1).cpu())
    e, f = torch.cat(e_err).double(), torch.cat(f_err).double()
    return {
        "energy_mae_mev_per_atom": 1e3 * e.abs().mean().item(),
        "energy_rmse_mev_per_atom": 1e3 * e.pow(2).mean().sqrt().item(),
        "force_mae_mev_per_a": 1e3 * f.abs().mean().item(),
        "force_rmse_mev_per_a": 1e3 * f.pow(2).mean().sqrt().item(),
    }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: TrainConfig, log=print) -> Path:
    """Run a training; returns the path of the best checkpoint."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = _device(config.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)

    data = read_dataset(config.train)
    if config.validation is not None:
        train_data, val_data = data, read_dataset(config.validation)
    else:
        order = rng.permutation(len(data))
        n_val = max(1, int(round(config.validation_fraction * len(data))))
        if n_val >= len(data):
            raise ValueError(f"{config.train} has {len(data)} frames: too few to split")
        train_data, val_data = (
            data.subset(np.sort(order[n_val:])),
            data.subset(np.sort(order[:n_val])),
        )

    if config.init_from:
        model = load_model(config.init_from).to(dtype)
        log(f"fine-tuning {config.init_from} (its architecture and reference energies are kept)")
    else:
        hp = ModelConfig.from_dict({**config.model, "atomref_size": config.model.get("max_z", 128)})
        model = TensorNet(**hp.to_dict(), dtype=dtype)
        atomref = fit_reference_energies(train_data, hp.max_z)
        model.atomref.copy_(torch.as_tensor(atomref, dtype=dtype))
        log("reference energies (eV): " + ", ".join(
            f"Z={z}: {atomref[z]:.4f}" for z in train_data.elements
        ))  # fmt: skip
    missing = sorted(set(train_data.elements) - set(range(1, model.max_z)))
    if missing:
        raise ValueError(f"elements {missing} are outside the model's max_z={model.max_z}")
    model.to(device).train()
    cutoff = model.cutoff_upper
    train_frames = _Frames(train_data, cutoff, dtype, device)
    val_frames = _Frames(val_data, cutoff, dtype, device)
    log(f"{len(train_frames)} training and {len(val_frames)} validation frames, "
        f"{model.num_parameters():,} parameters, device {device}")  # fmt: skip

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.lr_factor, patience=config.lr_patience, min_lr=config.lr_min
    )
    metadata = {
        **model.metadata,
        **config.metadata,
        "elements": sorted(set(train_data.elements) | set(model.metadata.get("elements", []))),
        "training": {k: v for k, v in dataclasses.asdict(config).items()},
    }
    best, best_epoch, start = math.inf, -1, time.time()
    history = out / "history.csv"
    fields = ["epoch", "lr", "train_loss", "val_loss", "val_energy_mae_mev_per_atom",
              "val_force_mae_mev_per_a", "seconds"]  # fmt: skip
    with history.open("w", newline="") as handle:
        csv.writer(handle).writerow(fields)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(train_frames))
        losses = []
        for first in range(0, len(order), config.batch_size):
            batch = train_frames.batch(order[first : first + config.batch_size])
            energy, forces = predict(model, batch, create_graph=True)
            loss = (
                config.energy_weight * (((energy - batch["energy"]) / batch["n_atoms"]) ** 2).mean()
                + config.force_weight * ((forces - batch["forces"]) ** 2).mean()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        errors = evaluate(model, val_frames)
        e_rmse, f_rmse = errors["energy_rmse_mev_per_atom"], errors["force_rmse_mev_per_a"]
        val_loss = (
            config.energy_weight * (e_rmse / 1e3) ** 2 + config.force_weight * (f_rmse / 1e3) ** 2
        )
        scheduler.step(val_loss)
        lr = optimizer.param_groups[0]["lr"]
        row = [epoch, lr, float(np.mean(losses)), val_loss, errors["energy_mae_mev_per_atom"],
               errors["force_mae_mev_per_a"], time.time() - start]  # fmt: skip
        with history.open("a", newline="") as handle:
            csv.writer(handle).writerow(row)
        improved = val_loss < best
        if improved:
            best, best_epoch = val_loss, epoch
            save_model(model, out / "best.pt", {**metadata, "epoch": epoch, "validation": errors})
        save_model(model, out / "last.pt", {**metadata, "epoch": epoch, "validation": errors})
        log(f"epoch {epoch:4d}  lr {lr:.2e}  train loss {row[2]:.4g}  val E MAE "
            f"{row[4]:7.2f} meV/atom  F MAE {row[5]:7.2f} meV/A  {row[6]:6.0f} s"
            + ("  *" if improved else ""))  # fmt: skip
        if epoch - best_epoch >= config.early_stopping_patience:
            log(f"early stop: no improvement for {config.early_stopping_patience} epochs")
            break
        if config.max_minutes is not None and time.time() - start > 60 * config.max_minutes:
            log(f"time limit of {config.max_minutes} minutes reached")
            break

    best_model = load_model(out / "best.pt").to(device)
    summary = {"best_epoch": best_epoch, "validation": evaluate(best_model, val_frames)}
    for path in config.test:
        frames = _Frames(read_dataset(path), cutoff, dtype, device)
        summary[Path(path).stem] = evaluate(best_model.to(dtype), frames)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"best epoch {best_epoch}; results in {out / 'summary.json'}")
    for name, errors in summary.items():
        if isinstance(errors, dict):
            log(f"  {name:24s} E MAE {errors['energy_mae_mev_per_atom']:7.2f} meV/atom  "
                f"F MAE {errors['force_mae_mev_per_a']:7.2f} meV/A")  # fmt: skip
    return out / "best.pt"
