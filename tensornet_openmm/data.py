"""Data sets of structures with energies and forces: the on-disk format and its reader.

A data set is one ``.npz`` file (NumPy, ``np.savez_compressed``) holding F frames with N_f atoms
each, concatenated:

==================  ============  ======  ===============================================
key                 shape         dtype   meaning
==================  ============  ======  ===============================================
``n_atoms``         (F,)          int     atoms in each frame
``atomic_numbers``  (sum N_f,)    int     atomic numbers, frame after frame
``positions``       (sum N_f, 3)  float   Angstrom
``energy``          (F,)          float   eV (total energy of the frame)
``forces``          (sum N_f, 3)  float   eV/Angstrom
``box``             (F, 3, 3)     float   optional: rows a, b, c in Angstrom (OpenMM's reduced
                                          form); all zeros for a frame without a box
``total_charge``    (F,)          float   optional: e (default 0)
==================  ============  ======  ===============================================

:func:`write_dataset` writes it (through a temporary file), :func:`read_dataset` reads and checks
it. This module imports neither OpenMM nor openmm-torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED = ("n_atoms", "atomic_numbers", "positions", "energy", "forces")
OPTIONAL = ("box", "total_charge")


@dataclass
class Dataset:
    """Frames of a data set, as NumPy arrays in the file's layout (see the module docstring)."""

    n_atoms: np.ndarray
    atomic_numbers: np.ndarray
    positions: np.ndarray
    energy: np.ndarray
    forces: np.ndarray
    box: np.ndarray
    total_charge: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return len(self.n_atoms)

    @property
    def offsets(self) -> np.ndarray:
        """Index of the first atom of each frame, plus the total at the end: (F + 1,)."""
        return np.concatenate([[0], np.cumsum(self.n_atoms)])

    def frame(self, k: int) -> dict[str, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        box = self.box[k]
        return {
            "atomic_numbers": self.atomic_numbers[a:b],
            "positions": self.positions[a:b],
            "energy": self.energy[k],
            "forces": self.forces[a:b],
            "box": None if not box.any() else box,
            "total_charge": self.total_charge[k],
        }

    def subset(self, frames) -> Dataset:
        frames = np.asarray(frames, dtype=np.int64)
        offsets = self.offsets
        atoms = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in frames])
        return Dataset(
            self.n_atoms[frames], self.atomic_numbers[atoms], self.positions[atoms],
            self.energy[frames], self.forces[atoms], self.box[frames], self.total_charge[frames],
            self.name,
        )  # fmt: skip

    @property
    def elements(self) -> list[int]:
        return sorted(int(z) for z in np.unique(self.atomic_numbers))


def concatenate(parts: list[Dataset], name: str = "") -> Dataset:
    return Dataset(
        n_atoms=np.concatenate([p.n_atoms for p in parts]),
        atomic_numbers=np.concatenate([p.atomic_numbers for p in parts]),
        positions=np.concatenate([p.positions for p in parts]),
        energy=np.concatenate([p.energy for p in parts]),
        forces=np.concatenate([p.forces for p in parts]),
        box=np.concatenate([p.box for p in parts]),
        total_charge=np.concatenate([p.total_charge for p in parts]),
        name=name,
    )


def make_dataset(frames: list[dict], name: str = "") -> Dataset:
    """A Dataset from dicts with the keys of :meth:`Dataset.frame` (box and charge optional)."""
    if not frames:
        raise ValueError("no frames")
    box = [np.zeros((3, 3)) if f.get("box") is None else np.asarray(f["box"]) for f in frames]
    return Dataset(
        n_atoms=np.array([len(f["atomic_numbers"]) for f in frames]),
        atomic_numbers=np.concatenate([np.asarray(f["atomic_numbers"]) for f in frames]),
        positions=np.concatenate([np.asarray(f["positions"], np.float64) for f in frames]),
        energy=np.array([float(f["energy"]) for f in frames]),
        forces=np.concatenate([np.asarray(f["forces"], np.float64) for f in frames]),
        box=np.stack(box).astype(np.float64),
        total_charge=np.array([float(f.get("total_charge", 0.0)) for f in frames]),
        name=name,
    )


def write_dataset(data: Dataset, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp, n_atoms=data.n_atoms, atomic_numbers=data.atomic_numbers, positions=data.positions,
        energy=data.energy, forces=data.forces, box=data.box, total_charge=data.total_charge,
    )  # fmt: skip
    tmp.replace(path)


def read_dataset(path: str | Path) -> Dataset:
    """Read and check a data set file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data set {str(path)!r} does not exist")
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a NumPy .npz data set: {err}") from err
    with raw:
        missing = [k for k in REQUIRED if k not in raw.files]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}; a data set needs {list(REQUIRED)} "
                f"(optional {list(OPTIONAL)}); see tensornet_openmm.data"
            )
        arrays = {k: raw[k] for k in raw.files}
    n = arrays["n_atoms"].astype(np.int64)
    frames, atoms = len(n), int(n.sum())
    box = arrays.get("box", np.zeros((frames, 3, 3)))
    charge = arrays.get("total_charge", np.zeros(frames))
    shapes = {
        "atomic_numbers": (atoms,), "positions": (atoms, 3), "energy": (frames,),
        "forces": (atoms, 3), "box": (frames, 3, 3), "total_charge": (frames,),
    }  # fmt: skip
    values = {**arrays, "box": box, "total_charge": charge}
    for key, shape in shapes.items():
        if values[key].shape != shape:
            raise ValueError(
                f"{path}: {key} has shape {values[key].shape}, expected {shape} "
                f"({frames} frames, {atoms} atoms in all)"
            )
    for key in ("positions", "energy", "forces", "box"):
        if not np.isfinite(values[key]).all():
            raise ValueError(f"{path}: {key} contains NaN or infinite values")
    return Dataset(
        n, values["atomic_numbers"].astype(np.int64), values["positions"].astype(np.float64),
        values["energy"].astype(np.float64), values["forces"].astype(np.float64),
        box.astype(np.float64), charge.astype(np.float64), path.stem,
    )  # fmt: skip
