"""Energy + forces per call: our TensorNet against the reference (TorchMD-Net 3.1.0).

Same weights (the reference model is written to a checkpoint and loaded by both), float32,
TensorNet 128 channels, 2 layers, 32 radial functions, 4.5 A cutoff, no periodic box.
Both include their neighbour search: the reference its own, ours an O(N^2) torch search.
Calls are interleaved (ours, reference, ours, ...) and the median is reported.

    .venv/bin/python benchmarks/bench_model.py [--threads 2] [--device cpu] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tensornet_openmm import load_model

try:
    from systems import alanine_dipeptide, water_cluster
except ImportError:  # run as a module from the repository root
    from benchmarks.systems import alanine_dipeptide, water_cluster

CUTOFF = 4.5


def reference_checkpoint(folder: Path) -> Path:
    from torchmdnet.models.model import create_model

    hp = dict(
        model="tensornet", embedding_dimension=128, num_layers=2, num_rbf=32, rbf_type="expnorm",
        trainable_rbf=False, activation="silu", cutoff_lower=0.0, cutoff_upper=CUTOFF, max_z=100,
        max_num_neighbors=128, precision=32, equivariance_invariance_group="O(3)",
        static_shapes=False, derivative=True, atom_filter=-1, prior_model=None,
        output_model="Scalar", reduce_op="add",
    )  # fmt: skip
    torch.manual_seed(0)
    model = create_model(dict(hp))
    path = folder / "reference.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)
    return path


def pairs_within(pos: torch.Tensor, cutoff: float) -> torch.Tensor:
    """All ordered pairs closer than ``cutoff``: O(N^2) search, shape (2, n_pairs)."""
    d = torch.cdist(pos.detach(), pos.detach())
    d.fill_diagonal_(float("inf"))
    return (d < cutoff).nonzero().T


def ours_call(model, z, pos):
    pos = pos.detach().requires_grad_(True)
    energy = model(z, pos, pairs_within(pos, CUTOFF))
    (grad,) = torch.autograd.grad(energy.sum(), pos)
    return energy.detach(), -grad


def reference_call(model, z, pos):
    energy, forces = model(z, pos.detach().clone(), torch.zeros_like(z))
    return energy.detach(), forces.detach()


def time_calls(fns, repeats):
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchmdnet.models.model import load_model as load_reference

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = reference_checkpoint(Path(tmp))
        reference = load_reference(str(ckpt)).eval().to(args.device)
        ours = load_model(ckpt, trust_pickle=True).to(args.device)

    systems = [("alanine dipeptide", *alanine_dipeptide())]
    systems += [(f"water cluster ~{n}", *water_cluster(n)) for n in args.sizes]
    rows = []
    for name, z_np, pos_np in systems:
        z = torch.tensor(z_np, device=args.device)
        pos = torch.tensor(pos_np, dtype=torch.float32, device=args.device)
        e_ours, f_ours = ours_call(ours, z, pos)
        e_ref, f_ref = reference_call(reference, z, pos)  # also compiles Warp kernels
        fdiff = float((f_ours - f_ref).abs().max())
        repeats = 20 if len(z) < 500 else 5
        calls = {
            "ours": lambda z=z, pos=pos: ours_call(ours, z, pos),
            "ref": lambda z=z, pos=pos: reference_call(reference, z, pos),
        }
        ms = time_calls(calls, repeats)
        rows.append((name, len(z), ms["ours"], ms["ref"], ms["ref"] / ms["ours"], fdiff))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device}, threads: {args.threads}, float32, F=128 L=2 K=32 cutoff {CUTOFF} A")
    header = f"{'system':24s} {'atoms':>6s} {'ours ms':>9s} {'ref ms':>9s} {'speed-up':>9s}"
    print(header + f" {'max |dF| eV/A':>14s}")
    for name, n, t_ours, t_ref, ratio, fdiff in rows:
        print(f"{name:24s} {n:6d} {t_ours:9.2f} {t_ref:9.2f} {ratio:8.2f}x {fdiff:14.2e}")
    if args.csv:
        with open(args.csv, "w") as handle:
            handle.write("system,atoms,ours_ms,reference_ms,speedup,max_force_diff\n")
            for row in rows:
                handle.write(",".join(str(x) for x in row) + "\n")


if __name__ == "__main__":
    main()
