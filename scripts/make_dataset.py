"""Build the training and held-out data for the shipped model ``ala2-water-gfn2``.

Level of theory everywhere: GFN2-xTB (tblite, semi-empirical tight binding; not DFT quality).
Conformations come from classical MD (OpenMM, amber14 / TIP3P, no constraints) at several
temperatures and are relabelled with GFN2-xTB; held-out sets include frames from dynamics driven by
GFN2-xTB itself. Every step is seeded, so the files are reproducible.

    pip install tblite==0.8.0        # the only extra need (pip install '.[data]')
    .venv/bin/python scripts/make_dataset.py --out data/ala2-water-gfn2 [--workers 2]

Writes (see tensornet_openmm.data for the format):
    train.npz            alanine dipeptide 300/400/500 K, water clusters, periodic water boxes
    test_ala2_ff.npz     alanine dipeptide from independent classical MD (other seed, 350 K)
    test_ala2_xtb.npz    alanine dipeptide from GFN2-xTB-driven MD at 300 K
    test_water_ff.npz    water clusters and periodic boxes from independent classical MD
    test_water_xtb.npz   a water cluster from GFN2-xTB-driven MD at 300 K
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tblite: one thread per process is fastest here

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tensornet_openmm.data import concatenate, make_dataset, write_dataset  # noqa: E402

HARTREE_EV = 27.211386245988  # CODATA 2018
BOHR_A = 0.529177210903
WATER_EDGE_NM = 0.986  # 32 TIP3P waters at 0.997 g/cm^3


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def gfn2(frame: dict) -> dict:
    """GFN2-xTB energy (eV) and forces (eV/A) of one frame."""
    from tblite.interface import Calculator

    z = np.asarray(frame["atomic_numbers"])
    pos = np.asarray(frame["positions"]) / BOHR_A
    box = frame.get("box")
    kwargs = {}
    if box is not None:
        kwargs = {"lattice": np.asarray(box) / BOHR_A, "periodic": np.array([True] * 3)}
    calc = Calculator("GFN2-xTB", z, pos, charge=float(frame.get("total_charge", 0.0)), **kwargs)
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    out = dict(frame)
    out["energy"] = result.get("energy") * HARTREE_EV
    out["forces"] = -result.get("gradient") * HARTREE_EV / BOHR_A
    return out


def label(frames: list[dict], workers: int) -> list[dict]:
    with Pool(workers) as pool:
        return pool.map(gfn2, frames, chunksize=max(1, len(frames) // (8 * workers)))


def classical_md(system, topology, positions, temperature, n_frames, interval, seed, box=None):
    """Frames (positions in A) from Langevin MD with an MM System on the CPU platform."""
    import openmm
    import openmm.unit as u

    integrator = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin, 1 / u.picosecond, 1 * u.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(temperature * u.kelvin, seed)
    integrator.step(5000)  # 5 ps equilibration
    z = [a.element.atomic_number for a in topology.atoms()]
    frames = []
    for _ in range(n_frames):
        integrator.step(interval)
        state = context.getState(getPositions=True, enforcePeriodicBox=box is not None)
        pos = state.getPositions(asNumpy=True).value_in_unit(u.angstrom)
        frames.append({"atomic_numbers": z, "positions": np.asarray(pos), "box": box})
    return frames


def ala2_frames(temperature: float, n_frames: int, seed: int) -> list[dict]:
    ts = _quiet(importlib.import_module, "openmmtools.testsystems")
    test = _quiet(ts.AlanineDipeptideVacuum, constraints=None)
    return classical_md(
        test.system, test.topology, test.positions, temperature, n_frames, 200, seed
    )


def water_box_md(temperature: float, n_frames: int, seed: int, edge_nm: float = WATER_EDGE_NM):
    """Periodic TIP3P boxes (flexible water: no constraints), box in A."""
    import openmm.unit as u

    ts = _quiet(importlib.import_module, "openmmtools.testsystems")
    test = _quiet(
        ts.WaterBox, box_edge=edge_nm * u.nanometer, cutoff=0.45 * u.nanometer, constrained=False
    )
    box = np.array(
        [v.value_in_unit(u.angstrom) for v in test.system.getDefaultPeriodicBoxVectors()]
    )
    return classical_md(
        test.system, test.topology, test.positions, temperature, n_frames, 500, seed, box
    )


def carve_clusters(box_frames: list[dict], sizes, rng) -> list[dict]:
    """Water clusters: the n molecules nearest a random point of a periodic frame, made whole."""

    def image(d, box):
        return d - np.round(d / np.diag(box)) * np.diag(box)  # cubic boxes

    clusters = []
    for frame, n in zip(box_frames, sizes, strict=False):
        pos, box = frame["positions"], frame["box"]
        z = np.asarray(frame["atomic_numbers"])
        oxygens = np.nonzero(z == 8)[0]  # TIP3P order: O, H, H
        centre = rng.uniform(0, 1, 3) @ box
        d = image(pos[oxygens] - centre, box)
        atoms, coords = [], []
        for o in oxygens[np.argsort((d * d).sum(1))[:n]]:
            oxygen = image(pos[o] - centre, box)
            coords += [oxygen] + [oxygen + image(pos[h] - pos[o], box) for h in (o + 1, o + 2)]
            atoms += [int(z[o]), int(z[o + 1]), int(z[o + 2])]
        clusters.append({"atomic_numbers": atoms, "positions": np.array(coords), "box": None})
    return clusters


def xtb_md(frame: dict, temperature: float, n_frames: int, interval: int, seed: int) -> list[dict]:
    """Frames from Langevin dynamics driven by GFN2-xTB (BAOAB, 0.5 fs, friction 1/ps)."""
    masses_amu = {1: 1.008, 6: 12.011, 7: 14.007, 8: 15.999}
    rng = np.random.default_rng(seed)
    z = np.asarray(frame["atomic_numbers"])
    m = np.array([masses_amu[int(v)] for v in z])[:, None]  # amu
    kt = 8.617333262e-5 * temperature  # eV
    dt = 0.5 * 0.09822694788464063  # 0.5 fs in units of A sqrt(amu/eV)
    gamma = 1.0e-3 / 0.09822694788464063  # 1/ps in the same time unit
    x = np.array(frame["positions"], dtype=np.float64)
    v = rng.normal(size=x.shape) * np.sqrt(kt / m)
    current = gfn2({**frame, "positions": x})
    out = []
    c1, c2 = np.exp(-gamma * dt), np.sqrt(1 - np.exp(-2 * gamma * dt))
    for step in range(n_frames * interval + 2000):
        v += 0.5 * dt * current["forces"] / m
        x += 0.5 * dt * v
        v = c1 * v + c2 * np.sqrt(kt / m) * rng.normal(size=x.shape)
        x += 0.5 * dt * v
        current = gfn2({**frame, "positions": x.copy()})
        v += 0.5 * dt * current["forces"] / m
        if step >= 2000 and (step - 2000) % interval == interval - 1:  # after 1 ps
            out.append(current)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/ala2-water-gfn2"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every frame count")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n = lambda k: max(2, int(round(k * args.scale)))  # noqa: E731
    rng = np.random.default_rng(2026)
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:7.1f} s] {message}", flush=True)

    ala_train = [f for t, s in ((300, 1), (400, 2), (500, 3)) for f in ala2_frames(t, n(400), s)]
    ala_test_ff = ala2_frames(350, n(200), 11)
    log(f"alanine dipeptide: {len(ala_train)} training and {len(ala_test_ff)} test frames")
    boxes = water_box_md(300, n(80), 4) + water_box_md(400, n(40), 5)
    boxes_test = water_box_md(330, n(30), 12)
    sizes = rng.integers(4, 25, size=len(boxes) * 4)
    clusters = carve_clusters(boxes * 4, sizes, rng)
    clusters_test = carve_clusters(
        boxes_test * 4, rng.integers(4, 25, size=len(boxes_test) * 4), rng
    )
    log(f"water: {len(boxes)} periodic boxes, {len(clusters)} clusters (+ test sets)")

    labelled = {}
    for name, frames in (
        ("ala_train", ala_train), ("ala_test_ff", ala_test_ff), ("clusters", clusters),
        ("clusters_test", clusters_test), ("boxes", boxes), ("boxes_test", boxes_test),
    ):  # fmt: skip
        labelled[name] = make_dataset(label(frames, args.workers), name)
        log(f"labelled {name}: {len(frames)} frames with GFN2-xTB")

    ala_xtb = xtb_md(ala_test_ff[0], 300, n(100), 20, 21)
    log(f"GFN2-xTB-driven alanine dipeptide MD: {len(ala_xtb)} frames")
    water_xtb = xtb_md(carve_clusters(boxes_test[:1], [16], rng)[0], 300, n(100), 20, 22)
    log(f"GFN2-xTB-driven water cluster MD: {len(water_xtb)} frames")

    write_dataset(
        concatenate([labelled["ala_train"], labelled["clusters"], labelled["boxes"]]),
        args.out / "train.npz",
    )
    write_dataset(labelled["ala_test_ff"], args.out / "test_ala2_ff.npz")
    write_dataset(make_dataset(ala_xtb), args.out / "test_ala2_xtb.npz")
    write_dataset(
        concatenate([labelled["clusters_test"], labelled["boxes_test"]]),
        args.out / "test_water_ff.npz",
    )
    write_dataset(make_dataset(water_xtb), args.out / "test_water_xtb.npz")
    log(f"wrote {sorted(p.name for p in args.out.glob('*.npz'))} to {args.out}")


if __name__ == "__main__":
    main()
