"""What one force evaluation launches: kernels (CUDA) or operators (CPU) per call, and the top ones.

For a GPU step under CUDA graphs the time is the sum of the kernels the graph replays, so their
number and their longest members say where fusion or less padding would pay. For each system this
runs the force module as the TorchForce does (scripted and frozen; its forces output, or for a
module that returns an energy alone openmm-torch's backward, copy and zeroing of the positions'
gradient), after warm-up, under torch.profiler:

- ``ours``: our module with the fixed pair capacity it gets under CUDA graphs (``create_force``'s
  sizing from the starting positions); ``ours-dynamic``: the exact dynamic pair list, as without
  graphs; ``ours-lowmem``: fixed capacity with ``low_memory=True``; ``ours-pytorch``: fixed
  capacity without the fused kernels (plain PyTorch); ``ours-tables``: fixed capacity with radial
  tables (``radial_tables=True``); ``ours-dynamic-tables``: the dynamic list with radial tables
  (as a large box runs them, without graphs);
- ``reference``: TorchMD-Net 3.1.0's TensorNet (static shapes, 64 slots), if it is installed.

    python benchmarks/kernels.py --checkpoint CKPT [--systems ala2 water-5000] [--platform CUDA]
        [--by-operator]  # on CUDA also: each operator of the CPU count, with its kernels' time

On the CPU it counts the launches a GPU would make, for work on a machine without one: the
operators called from the module or from autograd (not those inside another operator), less the
views and allocations, which launch nothing; our fused operators count one each, but ``mlp``
and ``radial_networks``, which run ATen's kernels on CUDA, count their ATen calls, except where a
GPU runs the whole network as one small-network kernel each way (up to 2,048 rows: the CPU
marks those networks with a ``small_network`` scope, counted once); the backward of one of our
operators whose CPU code calls no operator counts once (since session 19: before, such backward
passes counted nothing, 12 launches fewer for alanine dipeptide). A proxy, not
the CUDA count: cuBLAS or a reduction may take more than one kernel, and the CPU takes a few
paths of its own. It runs on one thread (the CPU kernels split larger work between threads,
the GPU's do not) with float32 positions (OpenMM's mixed precision), and with the channel mixing
a GPU runs (``strided_mix``). Alanine dipeptide, bench model, per force call: ours 252 launches
at 9116dcb, 198 at e3f7821, 137 the session after, 107 after session 16, 84 after session 17, 77
after session 18 and 42 after session 19's small-network kernels (with the CUDA-graph pair list;
55 with the dynamic one, 48 with radial tables; in water, ML/MM, 303, 218, 157, 132, 84, 77 and
42), all by the old rule; by the new, 54 (67, 62; in water 54). On an H100 the code of 137
launched 203 kernels: cuBLAS's helpers, zero fills and
multi-kernel ATen operators are what the CPU count misses. The reference's count is of its
pure-PyTorch path, not of the Warp kernels it runs on a GPU.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch  # before openmm: the openmm-torch plugin needs libtorch loaded

try:
    from bench_md import build_system, known_system, reference_module
except ImportError:  # run as a module from the repository root
    from benchmarks.bench_md import build_system, known_system, reference_module


def modules(system_name: str, checkpoint: Path, device: torch.device, routes: list[str]):
    """(route, frozen module, positions nm, box nm or None) for the system's ML atoms."""
    import openmm.unit as u

    import tensornet_openmm as tn
    from tensornet_openmm.export import TensorNetForce, pair_capacity, script
    from tensornet_openmm.nn.kernels import wanted

    topology, positions, _, ml_atoms = build_system(system_name, mm=False)
    atoms = list(ml_atoms) if ml_atoms is not None else list(range(topology.getNumAtoms()))
    z_all = [a.element.atomic_number for a in topology.atoms()]
    z = [z_all[i] for i in atoms]
    pos = torch.tensor(positions.value_in_unit(u.nanometer), dtype=torch.float64)[atoms]
    vectors = topology.getPeriodicBoxVectors()
    box = None if vectors is None else torch.tensor(vectors.value_in_unit(u.nanometer))
    model = tn.load_model(checkpoint, trust_pickle=True)
    box_a = None if box is None else box.numpy() * 10
    capacity, cell_capacity, strategy = pair_capacity(model, len(z), pos.numpy() * 10, box_a)
    periodic = box is not None
    for route in routes:
        if route == "reference":
            try:
                module = reference_module(checkpoint, z, None, periodic)
            except ImportError:
                continue
        else:
            fixed = route not in ("ours-dynamic", "ours-dynamic-tables")
            module = script(
                TensorNetForce(
                    model, z, periodic=periodic, capacity=capacity if fixed else -1,
                    strategy=strategy, cell_capacity=cell_capacity if fixed else -1,
                    fixed_on_cpu=fixed, low_memory=route == "ours-lowmem",
                    outputs_forces=True,  # as create_force
                    fused_kernels=wanted() and route != "ours-pytorch",  # as create_force
                    radial_tables=1e-6 if route.endswith("-tables") else None,
                )
            )  # fmt: skip
        if device.type == "cpu":  # the channel mixing as a GPU runs it (FusedPairKernels.mix)
            for sub in module.modules():
                if hasattr(sub, "strided_mix"):
                    sub.strided_mix = True
        # moved, then frozen, as openmm-torch does (freezing makes the weights constants, which
        # a later move would leave behind)
        frozen = torch.jit.freeze(module.to(device).eval())
        yield route, frozen, pos.to(device), None if box is None else box.to(device)


# operators that launch no kernel: views, allocations, metadata (the CPU count)
NO_LAUNCH = {
    "aten::view",
    "aten::slice",
    "aten::as_strided",
    "aten::narrow",
    "aten::transpose",
    "aten::expand",
    "aten::expand_as",
    "aten::reshape",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::t",
    "aten::detach",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::alias",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::to",
    "aten::contiguous",
    "aten::split_with_sizes",
    "aten::split",
    "aten::unbind",
    "aten::permute",
    "aten::linear",
    "aten::matmul",
    "aten::resize_",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::chunk",
    "aten::_reshape_alias",
    "aten::unsafe_split",
    "aten::is_nonzero",
    "aten::size",
    "aten::numel",
    "aten::dim",
    "aten::mT",
    "aten::_unsafe_view",
    "aten::flatten",
    "aten::unflatten",
    "aten::view_as",
    "aten::type_as",
    "aten::requires_grad_",
    "tensornet_openmm::tangent_networks",  # (a question of the device and a setting, on the host)
}


# our operators that run ATen's operators (one launch each) rather than kernels of their own
COMPOSITE = {"tensornet_openmm::mlp", "tensornet_openmm::radial_networks"}
# the autograd nodes of our operators' backward passes (csrc/pair_ops.cpp's classes)
OWN_BACKWARD = "torch::autograd::CppNode<"


def _launches(events) -> list:
    """The events a GPU would launch a kernel for (see the module docstring)."""
    found = []

    def walk(e, inside: bool) -> None:
        op = e.name.startswith(("aten::", "tensornet_openmm::"))
        if e.name in COMPOSITE:  # ATen's kernels on CUDA too
            for child in e.cpu_children:
                walk(child, False)
            return
        if e.name.startswith(OWN_BACKWARD) and not inside:
            # the backward of one of our operators calls its kernels directly (no operator
            # under it to count): at least one launch
            before = len(found)
            for child in e.cpu_children:
                walk(child, False)
            if len(found) == before:
                found.append(e)
            return
        if op and not inside and e.name not in NO_LAUNCH:
            found.append(e)
        # what a launching operator calls runs inside its launch; what linear, matmul, to and
        # the other dispatchers (NO_LAUNCH) call is counted on its own
        inner = inside or (op and e.name not in NO_LAUNCH)
        for child in e.cpu_children:
            walk(child, inner)

    for e in events:
        if e.cpu_parent is None:
            walk(e, False)
    return found


def _kernels_under(e) -> int:
    """The device kernels ``e`` and the operators under it launched."""
    return len(e.kernels) + sum(_kernels_under(child) for child in e.cpu_children)


def operator_kernels(events, calls: int) -> dict[str, list[float]]:
    """{operator: (kernels, device ms)} per call, from the CPU events of a profile that also
    recorded CUDA: each operator of the CPU count (:func:`_launches`) with the kernels that it
    and the operators under it launched."""
    found: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in _launches(events):
        found[e.name][0] += _kernels_under(e) / calls
        found[e.name][1] += e.device_time_total / 1e3 / calls
    return found


def profile_calls(module, pos, box, device, calls: int, by_operator: bool = False):
    """Per call: events (kernels on CUDA; on the CPU the operators that would launch one, see
    the module docstring) as {name: (count, ms)}. ``by_operator`` on CUDA: the operators of
    the CPU count instead, each with the kernels it and the operators under it launched, and
    their device time (where cuBLAS's and ATen's kernels come from: which operator a
    ``gemm`` serves)."""
    from torch.profiler import ProfilerActivity, profile

    x = pos.to(torch.float32).requires_grad_(True)  # as OpenMM's mixed precision passes them

    def call():
        out = module(x) if box is None else module(x, box)
        if isinstance(out, tuple):  # the module returns the forces (ours, as create_force makes it)
            return
        # an energy alone: openmm-torch's backward into the positions' gradient, its copy and
        # its zeroing for the next step
        out.backward()
        assert x.grad is not None
        x.grad.clone()
        x.grad.zero_()

    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:  # one thread: the CPU kernels would split larger work between threads
        torch.set_num_threads(1)
    for _ in range(5):  # profiling runs and optimisation of the TorchScript executor
        call()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda and by_operator:
        activities.append(ProfilerActivity.CPU)
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    torch.set_num_threads(threads)
    events: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if cuda and by_operator:
        return operator_kernels([e for e in prof.events() if e.device_type.name == "CPU"], calls)
    if cuda:
        chosen = [e for e in prof.events() if e.device_type.name == "CUDA"]
    else:
        chosen = _launches(prof.events())
    for e in chosen:
        time_us = e.device_time_total if cuda else e.cpu_time_total
        events[e.name][0] += 1 / calls
        events[e.name][1] += time_us / 1e3 / calls
    return events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--systems", nargs="+", type=known_system, default=["ala2", "water-5000"])
    parser.add_argument("--routes", nargs="+", default=["ours", "ours-dynamic", "reference"],
                        choices=["ours", "ours-dynamic", "ours-lowmem", "ours-pytorch",
                                 "ours-tables", "ours-dynamic-tables", "reference"],
                        )  # fmt: skip
    parser.add_argument("--platform", default="CUDA" if torch.cuda.is_available() else "CPU")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--by-operator",
        action="store_true",
        help="on CUDA also: each operator's kernels and their device time",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.platform == "CUDA" else "cpu")
    what = "kernels" if device.type == "cuda" else "launches (counted on the CPU)"
    for name in args.systems:
        for route, module, pos, box in modules(name, args.checkpoint, device, args.routes):
            tables = [(what, profile_calls(module, pos, box, device, args.calls))]
            if args.by_operator and device.type == "cuda":
                operators = profile_calls(module, pos, box, device, args.calls, by_operator=True)
                tables.append(("kernels, by the operator that launched them", operators))
            for kind, events in tables:
                count = sum(c for c, _ in events.values())
                total = sum(t for _, t in events.values())
                print(f"\n{name} {route}: {count:.0f} {kind} per call, {total:.3f} ms of them")
                top = sorted(events.items(), key=lambda kv: -kv[1][1])[: args.top]
                for event, (n, ms) in top:
                    print(f"  {ms:8.3f} ms {n:6.1f}x  {event[:100]}")


if __name__ == "__main__":
    main()
