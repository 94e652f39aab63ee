"""Memory of one force evaluation per atom, and the largest box it allows: a table.

The largest system that runs on a GPU is bounded by what one energy + forces call of the ML force
keeps at its peak. This runs the force module as the TorchForce does without CUDA graphs (scripted,
frozen, exact dynamic pair list, energy and backward to the positions) on periodic water boxes of
the given sizes and reports, per route:

- ``peak MB``: the most memory in use during the call beyond what was in use before it. On CUDA
  torch's peak allocation (exact). On the CPU glibc's heap in use (``mallinfo2``) sampled every
  0.2 ms by a second thread: a lower bound that misses spikes shorter than that, and leaves out
  what the heap's fragmentation adds to the process (``bench_md.py`` reports the process's peak);
- ``KB/atom``: that peak over the atoms, and ``marginal``: the growth from the previous size of
  the same route over the atoms added, which leaves out what does not grow with the box;
- ``atoms in N GB``: the marginal rate extrapolated to ``--memory-gb`` (default 80).

Routes: ``ours`` (autograd), ``ours-lowmem`` (``low_memory=True``), ``reference`` (TorchMD-Net
3.1.0's TensorNet with static shapes, if installed; its memory grows with the slots per atom).

    python benchmarks/memory.py --checkpoint CKPT [--sizes 1500 3000] [--platform CUDA]
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from pathlib import Path

import torch  # before openmm: the openmm-torch plugin needs libtorch loaded

try:
    from bench_md import build_system, reference_module, water_atoms
except ImportError:  # run as a module from the repository root
    from benchmarks.bench_md import build_system, reference_module, water_atoms


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        .split()
    ]  # fmt: skip


def _heap_in_use():
    """A function returning glibc's heap bytes in use, or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def peak_bytes(call, device: torch.device) -> int:
    """Most bytes in use during ``call()`` beyond those in use before (see the module's doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    in_use = _heap_in_use()
    if in_use is None:
        raise SystemExit("the CPU figures need glibc (mallinfo2)")
    before = in_use()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], in_use()) - before


def force_module(route: str, model, checkpoint: Path, z: list[int], periodic: bool):
    """The frozen module of ``route`` (without CUDA graphs: the exact dynamic pair list)."""
    from tensornet_openmm.export import TensorNetForce, script
    from tensornet_openmm.nn.kernels import wanted

    if route == "reference":
        return reference_module(checkpoint, z, None, periodic)
    module = TensorNetForce(model, z, periodic=periodic, low_memory=route == "ours-lowmem",
                            fused_kernels=wanted())  # fmt: skip
    return script(module)


def measure(size: int, routes: list[str], checkpoint: Path, device: torch.device, calls: int):
    """[(route, atoms, peak bytes)] for a water box of about ``size`` atoms."""
    import openmm.unit as u

    import tensornet_openmm as tn

    topology, positions, _, _ = build_system(f"water-{size}", mm=False)
    z = [a.element.atomic_number for a in topology.atoms()]
    pos = torch.tensor(positions.value_in_unit(u.nanometer), dtype=torch.float32, device=device)
    vectors = topology.getPeriodicBoxVectors().value_in_unit(u.nanometer)
    box = torch.tensor(vectors, dtype=torch.float32, device=device)
    model = tn.load_model(checkpoint, trust_pickle=True)
    rows = []
    for route in routes:
        try:
            module = force_module(route, model, checkpoint, z, True)
        except ImportError:
            print(f"  {route}: not installed, skipped")
            continue
        frozen = torch.jit.freeze(module.to(device).eval())  # as openmm-torch: moved, frozen

        def call(frozen=frozen):
            x = pos.clone().requires_grad_(True)
            out = frozen(x, box)
            energy = out[0] if isinstance(out, tuple) else out
            energy.backward()

        for _ in range(2):  # the profiling executor's runs
            call()
        peak = max(peak_bytes(call, device) for _ in range(calls))
        rows.append((route, len(z), peak))
        del frozen, module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--sizes", type=water_atoms, nargs="+", default=[1500, 3000],
                        help="water boxes of about this many atoms, smallest first")  # fmt: skip
    parser.add_argument("--routes", nargs="+", default=["ours", "ours-lowmem", "reference"],
                        choices=["ours", "ours-lowmem", "reference"])  # fmt: skip
    parser.add_argument("--platform", default="CUDA" if torch.cuda.is_available() else "CPU")
    parser.add_argument("--calls", type=int, default=2, help="measured calls (the most is kept)")
    parser.add_argument("--memory-gb", type=float, default=80.0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.platform == "CUDA" else "cpu")
    how = "torch's peak allocation" if device.type == "cuda" else "glibc heap in use, sampled"
    print(f"platform {args.platform}, float32, one energy + forces call ({how})")
    results: list[tuple[str, int, int]] = []
    for size in sorted(args.sizes):
        results += measure(size, args.routes, args.checkpoint, device, args.calls)
    gb = args.memory_gb
    print(f"{'route':12} {'atoms':>9} {'peak MB':>9} {'KB/atom':>8} {'marginal':>9} "
          f"{f'atoms in {gb:g} GB':>16}")  # fmt: skip
    previous: dict[str, tuple[int, int]] = {}
    for route, atoms, peak in sorted(results, key=lambda r: (r[0], r[1])):
        marginal, fits = "", ""
        if route in previous and atoms > previous[route][0]:
            rate = (peak - previous[route][1]) / (atoms - previous[route][0])
            marginal = f"{rate / 1024:.1f}"
            if rate > 0:
                fits = f"{atoms + (gb * 2**30 - peak) / rate:,.0f}"
        previous[route] = (atoms, peak)
        print(f"{route:12} {atoms:9,d} {peak / 2**20:9.1f} {peak / atoms / 1024:8.1f} "
              f"{marginal:>9} {fits:>16}")  # fmt: skip


if __name__ == "__main__":
    main()
