"""Validation report of a model: accuracy on held-out sets, MD stability and NVE drift.

    .venv/bin/python scripts/validate_model.py [--model ala2-water-gfn2] [--ps 10]
        [--data data/ala2-water-gfn2] [--report docs/validation-ala2-water-gfn2.md]

Accuracy: energy (meV/atom) and force (meV/A) MAE and RMSE on every ``test_*.npz`` of the data
folder, against the reference method the data were labelled with, next to the force MAE of
predicting zero. Stability: the repository's periodic water box (pure ML) and alanine dipeptide in
water (ML/MM) for ``--ps`` picoseconds each at 300 K through the runner. Energy conservation:
velocity Verlet on pure-ML alanine dipeptide in vacuum, drift per ns.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensornet_openmm import load_model  # noqa: E402
from tensornet_openmm.data import read_dataset  # noqa: E402
from tensornet_openmm.runner import load_config, run  # noqa: E402
from tensornet_openmm.training import _Frames, evaluate  # noqa: E402


def accuracy(model, folder: Path) -> list[dict]:
    rows = []
    dtype = next(model.parameters()).dtype
    for path in sorted(folder.glob("test_*.npz")):
        data = read_dataset(path)
        frames = _Frames(data, model.cutoff_upper, dtype, "cpu")
        errors = evaluate(model, frames)
        zero = 1e3 * np.abs(data.forces).mean()
        rows.append({"set": path.stem, "frames": len(data), "zero_force_mae": zero, **errors})
    return rows


def stability(model_name: str, simulation: str, ps: float, out: Path) -> dict:
    config = load_config(ROOT / "simulations" / f"{simulation}.yaml")
    steps = int(round(ps * 1000 / config["integrator"]["timestep_fs"]))
    overrides = [{"model": model_name, "production_steps": steps, "output": str(out),
                  "progress": False, "report_interval": max(1, steps // 100),
                  "checkpoint_interval": steps, "platform": "CPU",
                  "ml": {"cuda_graphs": False},  # CPU: the exact dynamic pair list
                  "minimize": {"max_iterations": 200}}]  # fmt: skip
    config = load_config(ROOT / "simulations" / f"{simulation}.yaml", overrides)
    start = time.time()
    summary = run(config, log=lambda m: print(f"  {simulation}: {m}", flush=True))
    table = np.genfromtxt(out / "energies.csv", delimiter=",", names=True)
    import mdtraj

    traj = mdtraj.load(str(next(out.glob("trajectory.*"))), top=str(out / "topology.pdb"))
    ml = traj.topology.select("not water") if simulation == "ala2-water" else None
    sub = traj.atom_slice(ml) if ml is not None else traj
    pairs = np.array([(i, j) for i in range(sub.n_atoms) for j in range(i + 1, sub.n_atoms)])
    closest = 10 * mdtraj.compute_distances(sub, pairs, periodic=sub.unitcell_vectors is not None)
    return {
        "simulation": simulation, "ps": ps, "steps": steps, "frames": summary["frames"],
        "mean_temperature_k": float(table["temperature_k"].mean()),
        "potential_first_last": [float(table["potential_kj_per_mol"][0]),
                                 float(table["potential_kj_per_mol"][-1])],
        "closest_ml_pair_a": float(closest.min()), "finite": bool(np.isfinite(traj.xyz).all()),
        "ns_per_day": summary["ns_per_day"], "wall_s": time.time() - start,
    }  # fmt: skip


def nve_drift(model, ps: float, dt_fs: float = 0.5) -> dict:
    import openmm
    import openmm.app as app
    import openmm.unit as u

    from tensornet_openmm import create_ml_system

    pdb = app.PDBFile(str(ROOT / "simulations" / "alanine-dipeptide.pdb"))
    system = create_ml_system(pdb.topology, model, positions=pdb.positions, remove_cmm_motion=False)
    integrator = openmm.VerletIntegrator(dt_fs * u.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(300 * u.kelvin, 7)
    steps_per_sample = 20
    samples = int(ps * 1000 / dt_fs / steps_per_sample)
    totals = []
    for _ in range(samples):
        integrator.step(steps_per_sample)
        state = context.getState(getEnergy=True)
        totals.append((state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(
            u.kilojoule_per_mole))  # fmt: skip
    totals = np.array(totals)
    t_ns = np.arange(samples) * steps_per_sample * dt_fs * 1e-6
    slope = float(np.polyfit(t_ns, totals, 1)[0])
    finite = bool(np.isfinite(totals).all())
    return {"ps": ps, "dt_fs": dt_fs, "drift_kj_per_mol_per_ns": slope,
            "std_kj_per_mol": float(totals.std()), "finite": finite}  # fmt: skip


def report(name: str, model, acc, stab, nve, command: str) -> str:
    meta = model.metadata
    lines = [
        f"# Validation: {name}",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Model: {model.config.hidden_channels} channels, {model.config.num_layers} layers, "
        f"{model.config.num_rbf} radial functions, cutoff {model.cutoff_upper} A, "
        f"{model.num_parameters():,} parameters, elements {meta.get('elements')}.",
        f"Reference method: {meta.get('level_of_theory', 'not recorded')}. All errors below are "
        "against that method, not against experiment or higher-level theory.",
        "",
        "## Accuracy on held-out sets",
        "",
        "| set | frames | E MAE (meV/atom) | E RMSE (meV/atom) | F MAE (meV/A) | F RMSE (meV/A) "
        "| F MAE of zero forces |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in acc:
        lines.append(
            f"| {r['set']} | {r['frames']} | {r['energy_mae_mev_per_atom']:.2f} | "
            f"{r['energy_rmse_mev_per_atom']:.2f} | {r['force_mae_mev_per_a']:.1f} | "
            f"{r['force_rmse_mev_per_a']:.1f} | {r['zero_force_mae']:.0f} |"
        )
    lines += [
        "",
        "Sets: `ff` = conformations from independent classical MD (other seeds and temperatures "
        "than training), `xtb` = frames from dynamics driven by the reference method itself.",
        "",
        "## Stability (CPU platform, Langevin 300 K, 1/ps)",
        "",
        "| simulation | length | steps | mean T (K) | first / last potential (kJ/mol) | "
        "closest ML atom pair (A) | finite | ns/day |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in stab:
        lines.append(
            f"| {s['simulation']} | {s['ps']} ps | {s['steps']} | {s['mean_temperature_k']:.1f} | "
            f"{s['potential_first_last'][0]:.1f} / {s['potential_first_last'][1]:.1f} | "
            f"{s['closest_ml_pair_a']:.2f} | {s['finite']} | {s['ns_per_day']:.2f} |"
        )
    lines += [
        "",
        "ns/day is the wall-clock speed of these runs on the machine that made the report, with "
        "whatever else it was running at the time; `benchmarks/bench_md.py` measures speed.",
        "",
        "## Energy conservation (NVE)",
        "",
        f"Pure-ML alanine dipeptide in vacuum, velocity Verlet {nve['dt_fs']} fs, {nve['ps']} ps "
        f"after minimisation, 300 K start: drift {nve['drift_kj_per_mol_per_ns']:.2f} kJ/mol/ns, "
        f"total-energy standard deviation {nve['std_kj_per_mol']:.3f} kJ/mol, finite: "
        f"{nve['finite']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ala2-water-gfn2")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "ala2-water-gfn2")
    parser.add_argument("--ps", type=float, default=10.0, help="length of each stability run")
    parser.add_argument("--ps-water", type=float, help="override --ps for the water box")
    parser.add_argument("--nve-ps", type=float, default=5.0)
    parser.add_argument(
        "--report", type=Path, default=ROOT / "docs" / "validation-ala2-water-gfn2.md"
    )
    args = parser.parse_args(argv)
    model = load_model(args.model)
    acc = accuracy(model, args.data)
    for r in acc:
        print(json.dumps(r))
    with tempfile.TemporaryDirectory() as tmp:
        stab = [stability(args.model, "ala2-water", args.ps, Path(tmp) / "ala2-water")]
        water_ps = args.ps if args.ps_water is None else args.ps_water
        stab.append(stability(args.model, "water-box", water_ps, Path(tmp) / "water-box"))
    for s in stab:
        print(json.dumps(s))
    nve = nve_drift(model, args.nve_ps)
    print(json.dumps(nve))
    command = "python scripts/validate_model.py " + " ".join(argv or sys.argv[1:])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(args.model, model, acc, stab, nve, command.strip()))
    (args.report.with_suffix(".json")).write_text(
        json.dumps({"accuracy": acc, "stability": stab, "nve": nve}, indent=1)
    )
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
