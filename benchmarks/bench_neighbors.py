"""Pair search: time and peak memory per search, each strategy, water at liquid density.

Systems are tiled equilibrated water boxes (benchmarks/systems.py) of about 1k, 10k and 100k atoms,
5 A cutoff. Rows:

- brute / cell, periodic box, dynamic mode (eager use) and fixed capacity (the CUDA-graph mode,
  capacity = 1.2 x pairs, cell_capacity = 1.5 x the fullest cell);
- cell / cluster (torch-cluster radius_graph), the same atoms without a box.

Each case runs in a fresh process so that its peak memory is its own: on CPU the growth of the
peak resident set (Linux VmHWM, reset first) during the first search, on CUDA torch's peak
allocation. The time is the
median of ``--repeats`` searches after one warm-up. The last column fits time ~ N^k over the sizes.

    .venv/bin/python benchmarks/bench_neighbors.py [--sizes 1000 10000 100000] [--device cpu]
        [--threads 2] [--max-brute 20000] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tensornet_openmm.neighbors import neighbor_pairs

CASES = [  # strategy, periodic, fixed capacity
    ("brute", True, False),
    ("brute", True, True),
    ("cell", True, False),
    ("cell", True, True),
    ("cell", False, False),
    ("cluster", False, False),
]


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    data = np.load(spec["data"])
    pos = torch.tensor(data["pos"], dtype=torch.float32, device=device)
    box = (
        torch.tensor(data["box"], dtype=torch.float32, device=device) if spec["periodic"] else None
    )
    capacity, cell_capacity = spec["capacity"], spec["cell_capacity"]

    def search():
        found = neighbor_pairs(pos, spec["cutoff"], box, capacity, spec["strategy"], cell_capacity)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return found

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set
        base = _status_kb("VmRSS") * 1024
    found = search()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        search()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20,
            "pairs": int(found.num_pairs)}  # fmt: skip


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fixed_sizes(pos: np.ndarray, box: np.ndarray, cutoff: float) -> tuple[int, int]:
    """Capacity and cell capacity as a caller building a CUDA graph would set them."""
    from tensornet_openmm.neighbors import _cells

    p, b = torch.tensor(pos), torch.tensor(box)
    pairs = int(neighbor_pairs(p, cutoff, b, strategy="cell").num_pairs)
    cell_id = _cells(p, cutoff, b)[0]
    fullest = int(torch.bincount(cell_id).max())
    return math.ceil(1.2 * pairs), math.ceil(1.5 * fullest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-brute",
        type=int,
        default=20000,
        help="skip brute force above this many atoms (its time grows as N^2)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    try:
        from systems import tiled_water_box
    except ImportError:  # run as a module from the repository root
        from benchmarks.systems import tiled_water_box

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            _, pos, box = tiled_water_box(size)
            data = Path(tmp) / f"water{size}.npz"
            np.savez(data, pos=pos, box=box)
            capacity, cell_capacity = fixed_sizes(pos, box, args.cutoff)
            for strategy, periodic, fixed in CASES:
                row = {"strategy": strategy, "box": "periodic" if periodic else "none",
                       "mode": "fixed" if fixed else "dynamic", "atoms": len(pos)}  # fmt: skip
                if strategy == "brute" and len(pos) > args.max_brute:
                    row["error"] = f"skipped (> --max-brute {args.max_brute})"
                else:
                    spec = dict(data=str(data), device=args.device, threads=args.threads,
                                repeats=args.repeats, cutoff=args.cutoff, strategy=strategy,
                                periodic=periodic, capacity=capacity if fixed else -1,
                                cell_capacity=cell_capacity if fixed else -1)  # fmt: skip
                    row.update(run_case(spec))
                rows.append(row)
                print(_format(row), flush=True)

    print(f"\n{args.device}, {args.threads} threads, float32, cutoff {args.cutoff} A; "
          "scaling exponent k of time ~ N^k over the measured sizes:")  # fmt: skip
    for strategy, periodic, fixed in CASES:
        name = (strategy, "periodic" if periodic else "none", "fixed" if fixed else "dynamic")
        pts = [(r["atoms"], r["ms"]) for r in rows
               if (r["strategy"], r["box"], r["mode"]) == name and "ms" in r]  # fmt: skip
        if len(pts) >= 2:
            k = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
            print(f"  {' / '.join(name):28s} k = {k:.2f}  ({len(pts)} sizes)")
    if args.csv:
        import csv

        keys = ["strategy", "box", "mode", "atoms", "pairs", "ms", "peak_mb", "error"]
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def _format(row: dict) -> str:
    head = f"{row['strategy']:8s} {row['box']:9s} {row['mode']:8s} {row['atoms']:>7d}"
    if "error" in row:
        return f"{head}  {row['error']}"
    return f"{head} {row['pairs']:>10d} pairs {row['ms']:>10.1f} ms {row['peak_mb']:>9.1f} MB peak"


if __name__ == "__main__":
    main()
