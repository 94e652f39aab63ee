"""Where one MD step of our route goes: pair search, model forward, backward, and OpenMM.

For each system the ML force's work is timed piece by piece with the same scripted code that the
TorchForce runs (half pair list: dynamic on the CPU; on CUDA, or with ``--fixed``, padded to the
fixed capacity that ``create_force`` gives it for CUDA graphs), then a whole LangevinMiddle step
of the OpenMM System is timed; the remainder is OpenMM's share (integration, MM forces, the
TorchForce's copies and calling overhead). Then the System's forces are timed by force group in
that context (our force, then the MM forces), each after itself and each right after the other,
as a step runs them: on a small CPU each pays for the caches and idle threads the other leaves.
On CUDA the forward and backward are also captured in
a CUDA graph of PyTorch's own and replayed (column ``graph``): against ``forward + backward``, what
replaying costs outside OpenMM. Medians over ``--repeats`` calls.

    GOMP_SPINCOUNT=15000 .venv/bin/python benchmarks/profile_step.py [--systems ala2 ala2-water
        water-648] [--platform CPU] [--threads 2] [--repeats 20] [--fixed]

(``GOMP_SPINCOUNT=15000``: torch's OpenMP threads spin as briefly as in the runner, see
:mod:`tensornet_openmm.openmp`.)
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch  # before openmm: the openmm-torch plugin needs libtorch loaded

try:
    from bench_md import (
        MODEL_DEFAULTS,
        build_system,
        given_checkpoint,
        known_system,
        make_checkpoint,
    )
except ImportError:  # run as a module from the repository root
    from benchmarks.bench_md import (
        MODEL_DEFAULTS,
        build_system,
        given_checkpoint,
        known_system,
        make_checkpoint,
    )

from tensornet_openmm.allocator import keep_freed_memory
from tensornet_openmm.neighbors import neighbor_pairs


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _after_ms(first, then, repeats: int) -> float:
    """Median ms of ``then`` run right after ``first``, each time (``first`` not timed)."""
    first()
    then()
    times = []
    for _ in range(repeats):
        first()
        start = time.perf_counter()
        then()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _graph_ms(fn, repeats: int) -> tuple[float, str]:
    """fn captured in a CUDA graph (after warm-up on a side stream, as PyTorch asks), replayed:
    median ms, and what the graph holds (:func:`graph_nodes`, from CUDA's DOT dump of it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()  # keeps the graph for debug_dump
    with torch.cuda.graph(graph):
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "graph.dot"
        try:
            graph.debug_dump(str(dump))
            nodes = graph_nodes(dump.read_text())
        except (RuntimeError, OSError) as error:
            nodes = f"no DOT dump ({error!s:.80})"
    return _median_ms(graph.replay, repeats, torch.cuda.synchronize), nodes


def graph_nodes(dot: str, top: int = 12) -> str:
    """Nodes of a CUDA graph from its DOT dump (cudaGraphDebugDotPrint): their number and the
    kernels that occur most often (names cut at their template arguments), best effort."""
    count = len(re.findall(r'"graph_\d+_node_\d+"\s*\[', dot))
    names = Counter(re.findall(r"void ([^\n<]+?)(?:<|\((?!anonymous))", dot))
    listed = ", ".join(f"{n} x{c}" for n, c in names.most_common(top))
    return f"{count} nodes; kernels: {listed or 'names not found'}"


def profile(
    system_name: str, checkpoint: Path, platform: str, repeats: int, fixed: bool = False
) -> dict:
    import openmm
    import openmm.unit as u

    import tensornet_openmm as tn
    from tensornet_openmm.export import TensorNetForce, pair_capacity
    from tensornet_openmm.nn.kernels import wanted

    topology, positions, mm_system, ml_atoms = build_system(system_name)
    model = tn.load_model(checkpoint, trust_pickle=True)
    device = torch.device("cuda" if platform == "CUDA" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    atoms = list(ml_atoms) if ml_atoms is not None else list(range(topology.getNumAtoms()))
    z_all = [a.element.atomic_number for a in topology.atoms()]
    pos_nm = torch.tensor(positions.value_in_unit(u.nanometer), dtype=torch.float64)
    box = topology.getPeriodicBoxVectors()
    periodic = box is not None
    box_a = None
    if periodic:
        box_a = torch.tensor(box.value_in_unit(u.angstrom), dtype=torch.float32, device=device)
    module = TensorNetForce(model, [z_all[i] for i in atoms], periodic=periodic,
                            fused_kernels=wanted())  # as create_force  # fmt: skip
    core = module.model.to(device)
    z = module.z.to(device)
    pos = (pos_nm[atoms] * 10.0).to(torch.float32).to(device)
    cutoff = core.cutoff_upper
    # the search the force runs: the fused kernels' pair_search where they apply, else PyTorch's
    search = core.tensor_embedding.pair_kernels.neighbor_pairs
    if not core.tensor_embedding.pair_kernels.applies(pos):
        search = torch.jit.script(neighbor_pairs)
    scripted = torch.jit.script(core)
    capacity, cell_capacity, strategy = -1, -1, "auto"
    if fixed or device.type == "cuda":  # as create_force sizes it for CUDA graphs
        capacity, cell_capacity, strategy = pair_capacity(
            core, len(atoms), pos.cpu().numpy(), None if box_a is None else box_a.cpu().numpy()
        )

    def find():
        return search(pos, cutoff, box_a, capacity, strategy, cell_capacity, True)

    pairs = find()

    def forward():
        x = pos.detach().requires_grad_(True)
        p = x[pairs.edge_index[0]] - x[pairs.edge_index[1]]
        if box_a is not None:
            from tensornet_openmm.neighbors import minimum_image

            p = minimum_image(p, box_a)
        return x, scripted(z, x, pairs.edge_index, p, None, None, 1, True)

    def backward():
        x, energy = forward()
        torch.autograd.grad(energy.sum(), x)

    nl_ms = _median_ms(find, repeats, sync)
    fwd_ms = _median_ms(forward, repeats, sync)
    fwd_bwd_ms = _median_ms(backward, repeats, sync)
    graph_ms, nodes = float("nan"), ""
    if device.type == "cuda":
        graph_ms, nodes = _graph_ms(backward, repeats)

    if ml_atoms is None:
        system = tn.create_ml_system(topology, model, positions=positions)
    else:
        system = tn.create_mixed_system(topology, mm_system, ml_atoms, model, positions=positions)
    for force in system.getForces():  # group 1: our force; 0: the MM forces (if any)
        force.setForceGroup(1 if force.getName() == "TensorNet" else 0)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.001)
    properties = {"Threads": str(torch.get_num_threads())} if platform == "CPU" else {}
    context = openmm.Context(
        system, integrator, openmm.Platform.getPlatformByName(platform), properties
    )
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    integrator.step(15)  # warm-up (and CUDA-graph capture)

    def step():
        integrator.step(1)
        context.getState(getPositions=True)

    step_ms = _median_ms(step, repeats, lambda: None)

    def group(index: int):
        return lambda: context.getState(getForces=True, groups={index})

    ml_ms = _median_ms(group(1), repeats, lambda: None)
    mm_ms = _median_ms(group(0), repeats, lambda: None)
    return {
        "system": system_name, "atoms": topology.getNumAtoms(), "ml_atoms": len(atoms),
        "pairs": int(pairs.num_pairs), "slots": int(pairs.edge_index.shape[1]), "search": nl_ms,
        "forward": fwd_ms, "backward": fwd_bwd_ms - fwd_ms, "graph": graph_ms,
        "openmm": step_ms - nl_ms - fwd_bwd_ms, "step": step_ms, "nodes": nodes,
        "ml": ml_ms, "ml|mm": _after_ms(group(0), group(1), repeats),
        "mm": mm_ms, "mm|ml": _after_ms(group(1), group(0), repeats),
    }  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--systems", nargs="+", type=known_system, default=["ala2", "ala2-water", "water-648"]
    )
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fixed", action="store_true",
                        help="pad the pairs to the CUDA-graph capacity on the CPU too")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a TorchMD-Net TensorNet checkpoint (its size overrides the model "
                             "options); without it the bench model is made, which needs "
                             "torchmd-net")  # fmt: skip
    for key, value in MODEL_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the runner and bench_md do
    torch.set_num_threads(args.threads)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is not None:
            checkpoint, n_params = given_checkpoint(args.checkpoint, args)
        else:
            checkpoint, n_params = make_checkpoint(
                Path(tmp), args.channels, args.layers, args.rbf, args.cutoff
            )
        rows = [
            profile(name, checkpoint, args.platform, args.repeats, args.fixed)
            for name in args.systems
        ]
    print(f"platform {args.platform}, threads {args.threads}; TensorNet {args.channels} channels, "
          f"{args.layers} layers, {args.rbf} rbf, cutoff {args.cutoff} A, float32; "
          "ms per step (median), half pair list")  # fmt: skip
    keys = ["search", "forward", "backward", "graph", "openmm", "step"]
    keys += ["ml", "ml|mm", "mm", "mm|ml"]
    print(f"{'system':12s} {'atoms':>6s} {'ML':>5s} {'pairs':>7s} {'slots':>7s} "
          + " ".join(f"{k:>9s}" for k in keys))  # fmt: skip
    for r in rows:
        cells = " ".join(f"{r[k]:9.2f}" for k in keys)
        print(f"{r['system']:12s} {r['atoms']:6d} {r['ml_atoms']:5d} {r['pairs']:7d} "
              f"{r['slots']:7d} {cells}")  # fmt: skip
    print("search + forward + backward: the ML force (eager); graph: forward + backward replayed "
          "from a CUDA graph (CUDA only); openmm: the rest of the step. In the OpenMM context, "
          "forces by force group (getState): ml, our force after itself; ml|mm, right after the "
          "MM forces; mm, the MM forces after themselves; mm|ml, right after ours: the step "
          "runs them in turn, so ml|mm + mm|ml against ml + mm is what the turns cost")  # fmt: skip
    for r in rows:
        if r["nodes"]:
            print(f"{r['system']} graph: {r['nodes']}")


if __name__ == "__main__":
    main()
