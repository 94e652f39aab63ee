"""The MD benchmark compares like with like: every ML route computes the same energy."""

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_md = pytest.importorskip("bench_md")
pytest.importorskip("torchmdnet")


@pytest.mark.parametrize("system", ["ala2", "water-150"])
def test_reference_route_computes_our_energy(tmp_path, system):
    import openmm
    import openmm.unit as u

    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    topology, positions, mm_system, ml_atoms = bench_md.build_system(system)
    energies = {}
    for route in ("ours", "reference"):
        spec = {"checkpoint": str(checkpoint), "graphs": "-"}
        routed = bench_md.route_system(route, spec, topology, positions, mm_system, ml_atoms)
        # a periodic box stays periodic whichever force says so (the reference route once lost it)
        assert routed.usesPeriodicBoundaryConditions() == (
            topology.getPeriodicBoxVectors() is not None
        )
        context = openmm.Context(
            routed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
        )
        context.setPositions(positions)
        state = context.getState(getEnergy=True)
        energies[route] = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    assert energies["reference"] == pytest.approx(energies["ours"], rel=1e-5, abs=1e-3)


def test_rounds_give_the_median_and_its_spread():
    case = {"system": "ala2", "route": "ours"}
    runs = [{"ms_per_step": ms, "peak_mb": mb, "e0_kj_per_mol": -1.0}
            for ms, mb in ((10.0, 300.0), (8.0, 320.0), (12.0, 310.0))]  # fmt: skip
    row = bench_md.combine_rounds(case, [*runs, {"error": "time limit (900 s)"}])
    assert row["ms_per_step"] == 10.0 and row["rounds"] == 3
    assert row["spread_pct"] == pytest.approx(40.0)
    assert row["peak_mb"] == 320.0
    assert row["ns_per_day"] == pytest.approx(86.4 / 10.0)
    failed = bench_md.combine_rounds(case, [{"error": "out of memory: killed"}])
    assert failed["error"] == "out of memory: killed" and "ms_per_step" not in failed


def test_block_by_block_ratios_pair_the_routes_blocks():
    """x ref/blk: the reference's time over ours block by block, median and quartiles. A slow
    stretch of the machine that slows both routes' block 1 leaves that block's ratio alone, where
    the ratio of the two medians moves with it."""
    where = {"platform": "CPU", "system": "ala2-water", "graphs": "-", "allocator": "tuned",
             "spin": "short"}  # fmt: skip
    blocks = {"ours": [10.0, 20.0, 11.0], "reference": [20.0, 40.0, 23.0]}
    rows = [
        bench_md.combine_rounds(
            {**where, "route": route},
            [{"ms_per_step": ms, "peak_mb": 1.0, "e0_kj_per_mol": 0.0} for ms in times],
        )
        for route, times in blocks.items()
    ]
    bench_md.speedups(rows)
    ours = rows[0]
    assert ours["vs_reference"] == pytest.approx(23.0 / 11.0)  # the ratio of the medians
    assert ours["vs_reference_blocks"] == pytest.approx(2.0)
    assert ours["vs_reference_quartiles"] == "2.00-2.05"
    assert math.isnan(ours["vs_pythonforce_blocks"]) and ours["vs_pythonforce_quartiles"] == ""
    # a block that failed leaves no pairing (which blocks would match is unknown)
    broken = bench_md.combine_rounds({**where, "route": "ours"}, [
        {"ms_per_step": 10.0, "peak_mb": 1.0, "e0_kj_per_mol": 0.0}, {"error": "killed"},
        {"ms_per_step": 11.0, "peak_mb": 1.0, "e0_kj_per_mol": 0.0}])  # fmt: skip
    assert "blocks_ms" not in broken
    assert bench_md.paired_ratios(broken, rows[1]) == (pytest.approx(math.nan, nan_ok=True), "")


def test_best_graphs_run_each_route_as_it_runs_best_and_compare_with_the_fastest(tmp_path):
    """--graphs best (the lease's compare stage, where device minutes are few): ours decides by
    size as create_force does by default ("auto"), the reference runs with graphs, PythonForce
    as always; an ours row with "auto" is compared with the reference's fastest row."""
    import argparse

    import openmmtorch

    args = argparse.Namespace(allocator="tuned", omp_spin="short", systems=["ala2"],
                              water_sizes=[], routes=["ours", "ours-tables", "reference",
                              "pythonforce"], graphs="best")  # fmt: skip
    settings = {c["route"]: c["graphs"] for c in bench_md.cases(args, ["CUDA"])}
    assert settings == {"ours": "auto", "ours-tables": "auto", "reference": "on",
                        "pythonforce": "-"}  # fmt: skip
    assert {c["graphs"] for c in bench_md.cases(args, ["CPU"])} == {"-"}
    # "auto" is create_force's default: graphs for a 22-atom molecule
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    topology, positions, mm_system, ml_atoms = bench_md.build_system("ala2")
    for route, graphs, captured in (("ours", "auto", "true"), ("ours", "off", "false"),
                                    ("reference", "on", "true")):  # fmt: skip
        spec = {"checkpoint": str(checkpoint), "graphs": graphs}
        system = bench_md.route_system(route, spec, topology, positions, mm_system, ml_atoms)
        (force,) = [openmmtorch.TorchForce.cast(f) for f in system.getForces()
                    if openmmtorch.TorchForce.isinstance(f)]  # fmt: skip
        assert force.getProperties()["useCUDAGraphs"] == captured, (route, graphs)

    where = {"platform": "CUDA", "system": "ala2", "allocator": "tuned", "spin": "short"}
    rows = [{**where, "route": route, "graphs": graphs, "ms_per_step": ms}
            for route, graphs, ms in (("ours", "auto", 0.5), ("ours", "on", 0.6),
                                      ("reference", "on", 1.5), ("reference", "off", 20.0),
                                      ("pythonforce", "-", 2.0))]  # fmt: skip
    bench_md.speedups(rows)
    assert rows[0]["vs_reference"] == pytest.approx(3.0)  # the reference's fastest: on
    assert rows[1]["vs_reference"] == pytest.approx(2.5)  # like with like
    assert rows[0]["vs_pythonforce"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--rounds", "0"], "'0' rounds: give a whole number of at least 1"),
     (["--omp-spin", "fast"], "use short, default, both or a count such as 3000"),
     (["--gpu-memory-gb", "0"], "'0' GB: give a positive number, such as 80"),
     (["--interleave", "4", "--rounds", "3"], "--interleave and --rounds: give one"),
     (["--gpu-memory-gb", "lots"], "'lots' GB: give a positive number, such as 80"),
     (["--water-sizes", "0"], "'0' atoms: give a water box's size, a whole number of at least 3"),
     (["--checkpoint", "missing.ckpt", "--systems", "ala2", "--platforms", "CPU"],
      "--checkpoint missing.ckpt: no such file; give a TorchMD-Net TensorNet checkpoint")],
)  # fmt: skip
def test_bad_options_are_named_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_md.main(argv)
    assert message in capsys.readouterr().err


def test_kernel_counts_cover_every_route(tmp_path, capsys):
    """benchmarks/kernels.py (on the CPU: the launches a GPU would make) reports every route it
    is asked for."""
    kernels = pytest.importorskip("kernels")
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    kernels.main(["--checkpoint", str(checkpoint), "--systems", "ala2", "--platform", "CPU",
                  "--routes", "ours", "ours-lowmem", "ours-tables", "ours-dynamic-tables",
                  "reference", "--calls", "2"])  # fmt: skip
    out = capsys.readouterr().out
    routes = ("ours", "ours-lowmem", "ours-tables", "ours-dynamic-tables", "reference")
    for route in routes:
        assert f"ala2 {route}: " in out
    counts = {
        line.split(": ")[0].split()[1]: float(line.split(": ")[1].split()[0])
        for line in out.splitlines()
        if line.startswith("ala2 ") and ": " in line
    }
    # (a floor that an empty count fails: a 1-layer model launches some 35)
    assert set(counts) == set(routes) and min(counts.values()) > 20
    # the launches a GPU would make: no views or allocations; mlp and radial_networks as their
    # ATen calls, or where a GPU runs a network as one small-network kernel each way (up to
    # 2,048 rows: all of alanine dipeptide's), one launch each way
    import torch

    events = {}
    for route, module, pos, box in kernels.modules(
        "ala2", checkpoint, torch.device("cpu"), ["ours", "ours-tables", "ours-dynamic-tables"]
    ):
        events[route] = kernels.profile_calls(module, pos, box, torch.device("cpu"), 1)
        assert not set(events[route]) & kernels.NO_LAUNCH
    if "tensornet_openmm::geometry" in events["ours"]:  # the fused kernels were built
        small, back = "tensornet_openmm::small_network", "tensornet_openmm::small_network_backward"
        for route in ("ours", "ours-tables"):
            assert "tensornet_openmm::mlp" not in events[route]
            assert events[route][small][0] == events[route][back][0]
        # every radial network (one operator) and the two per-atom networks; tables: no radial
        # networks, each layer's table read instead
        assert events["ours"][small][0] == 3 and events["ours-tables"][small][0] == 2
        assert "tensornet_openmm::radial_table" in events["ours-tables"]
        # the dynamic list's tables: the pair search each call, and no network over the pairs
        dynamic = events["ours-dynamic-tables"]
        assert "tensornet_openmm::pair_search" in dynamic and dynamic[small][0] == 2
        assert "tensornet_openmm::pair_search" not in events["ours-tables"]


def test_kernels_by_operator_count_what_each_operator_launched():
    """kernels.py --by-operator: the operators of the CPU count, each with the kernels that it
    and the operators under it launched and their device time (on a GPU: which operator a
    cuBLAS kernel serves). Fake profiler events: an operator of ours, an autograd node of ours
    whose ATen product launches a gemm and a reduction, a view that launches nothing."""
    from types import SimpleNamespace

    kernels = pytest.importorskip("kernels")

    def event(name, kernels_=0, device_us=0.0, children=()):
        e = SimpleNamespace(name=name, kernels=[object()] * kernels_, cpu_parent=None,
                            cpu_children=list(children), device_time_total=device_us)  # fmt: skip
        for child in children:
            child.cpu_parent = e
        return e

    mm = event("aten::mm", kernels_=2, device_us=30.0)
    backward = event("torch::autograd::CppNode<(anonymous namespace)::Mlp>", 0, 30.0, [mm])
    ours = event("tensornet_openmm::geometry", kernels_=1, device_us=8.0)
    view = event("aten::view")
    found = kernels.operator_kernels([ours, backward, mm, view], calls=2)
    assert dict(found) == {"tensornet_openmm::geometry": [0.5, 0.004], "aten::mm": [1.0, 0.015]}


def test_interleaved_routes_take_turns_in_one_run(tmp_path, capsys):
    """--interleave: the routes of a system set up side by side and time their blocks in turns;
    each row is the median over its blocks, with the same energy as a plain run. Blocks this
    short (0.1 s) get a warning that names the --seconds to give."""
    import csv

    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    out = tmp_path / "md.csv"
    common = ["--checkpoint", str(checkpoint), "--systems", "ala2", "--platforms", "CPU",
              "--seconds", "0.3", "--warmup", "2"]  # fmt: skip
    bench_md.main([*common, "--routes", "ours", "ours-tables", "mm", "--interleave", "3",
                   "--csv", str(out)])  # fmt: skip
    warning = capsys.readouterr().err
    assert "0.1 s per timed block" in warning and "give --seconds 6 or more" in warning
    with out.open() as handle:
        rows = {row["route"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"ours", "ours-tables", "mm"}
    assert float(rows["ours-tables"]["e0_kj_per_mol"]) == pytest.approx(
        float(rows["ours"]["e0_kj_per_mol"]), rel=1e-5
    )
    for row in rows.values():
        assert row["error"] == "" and row["finite"] == "True"
        assert row["rounds"] == "3" and float(row["ms_per_step"]) > 0
    plain = tmp_path / "plain.csv"
    bench_md.main([*common, "--routes", "ours", "--csv", str(plain)])
    with plain.open() as handle:
        (single,) = list(csv.DictReader(handle))
    assert float(rows["ours"]["e0_kj_per_mol"]) == pytest.approx(float(single["e0_kj_per_mol"]))


def test_a_serving_worker_past_its_time_limit_is_stopped():
    """--interleave's wait for a worker's answer: a worker that says nothing in time is killed
    and its row names the limit (lines that are not answers, such as banners, are skipped)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; print('a banner', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    bench_md._relay_stderr(proc)
    bench_md._read_lines(proc)
    assert bench_md._answer(proc, 1.0) == {"error": "time limit (1 s)"}
    assert proc.poll() is not None  # killed, not left running


def test_progress_says_how_far_a_case_got_before_its_time_limit(tmp_path, capsys):
    """--progress: a case's stages reach our stderr as they happen, so that a case stopped by
    its time limit (here in a warm-up too long for it) still says how far it got; its row names
    the limit, and the CSV keeps it."""
    import csv

    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    out = tmp_path / "md.csv"
    bench_md.main(["--checkpoint", str(checkpoint), "--systems", "ala2", "--platforms", "CPU",
                   "--routes", "ours", "--warmup", "10000000", "--timeout", "40", "--progress",
                   "--csv", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    said = [line.removeprefix(bench_md.PROGRESS) for line in err.splitlines()
            if line.startswith(bench_md.PROGRESS)]  # fmt: skip
    stages = ["building the system", "22 atoms built", "route's System made", "Context made",
              "first energy"]  # fmt: skip
    assert len(said) == len(stages), err
    for line, stage in zip(said, stages, strict=True):
        assert line.startswith(f"ala2 ours graphs -: {stage}"), line
        assert re.search(r"\(\d+\.\d s\)$", line), line  # seconds since the worker started
    assert "FAILED: time limit (40 s)" in err
    with out.open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["error"] == "time limit (40 s)"


def test_interleaved_water_boxes_skip_a_route_after_it_failed(tmp_path, monkeypatch):
    """--interleave, like --rounds: a route that failed on a water box (out of memory, say) is
    not run on the larger ones; its rows say why."""
    import csv

    calls = []

    def fake(specs, blocks, timeout):
        calls.append([spec["system"] for spec in specs])
        return [{"error": "out of memory: fake"} for _ in specs]

    monkeypatch.setattr(bench_md, "run_interleaved", fake)
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    out = tmp_path / "md.csv"
    bench_md.main(["--checkpoint", str(checkpoint), "--systems", "water", "--water-sizes", "300",
                   "600", "--platforms", "CPU", "--routes", "ours", "--interleave", "2",
                   "--csv", str(out)])  # fmt: skip
    assert calls == [["water-300"]]
    with out.open() as handle:
        errors = {row["system"]: row["error"] for row in csv.DictReader(handle)}
    assert errors == {"water-300": "out of memory: fake",
                      "water-600": "skipped: a smaller box failed"}  # fmt: skip


def test_csv_keeps_the_rows_of_a_run_stopped_midway(tmp_path, monkeypatch):
    """--csv is written after every system (interleaved) or run (rounds), through a rename: a
    run stopped by a time limit (the device checks' `timeout`) keeps the rows it had."""
    import csv

    def fake(specs, blocks, timeout):
        if specs[0]["system"] == "ala2-water":
            raise KeyboardInterrupt  # the time limit, in the second system
        return [{"error": "fake"} for _ in specs]

    monkeypatch.setattr(bench_md, "run_interleaved", fake)
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    out = tmp_path / "md.csv"
    with pytest.raises(KeyboardInterrupt):
        bench_md.main(["--checkpoint", str(checkpoint), "--systems", "ala2", "ala2-water",
                       "--platforms", "CPU", "--routes", "ours", "reference", "--interleave",
                       "2", "--csv", str(out)])  # fmt: skip
    with out.open() as handle:
        rows = [(row["system"], row["route"], row["error"]) for row in csv.DictReader(handle)]
    assert rows == [("ala2", "ours", "fake"), ("ala2", "reference", "fake")]
    assert not (tmp_path / "md.csv.partial").exists()
    runs = []

    def run_case(spec, timeout):  # --rounds: the second round is stopped
        runs.append(spec["route"])
        if len(runs) > 1:
            raise KeyboardInterrupt
        return {"error": "first round"}

    monkeypatch.setattr(bench_md, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        bench_md.main(["--checkpoint", str(checkpoint), "--systems", "ala2", "--platforms", "CPU",
                       "--routes", "ours", "--rounds", "2", "--csv", str(out)])  # fmt: skip
    with out.open() as handle:
        assert [row["error"] for row in csv.DictReader(handle)] == ["first round"]


def test_a_tiled_water_box_is_the_small_box_copied_with_its_bonds_and_system():
    """Boxes above TILE_ABOVE atoms are a small openmmtools box repeated k^3 times: every copy's
    atoms, bonds and positions are the small box's (shifted by whole box edges), the MM System
    (TIP3P, rigid water) only when asked for."""
    import numpy as np
    import openmm.unit as u

    size = bench_md.TILE_ABOVE + 1000  # two copies a side
    topology, positions, system, ml_atoms = bench_md.build_system(f"water-{size}")
    small, small_positions, _, _ = bench_md.build_system(f"water-{size // 8}")
    n = small.getNumAtoms()
    assert ml_atoms is None and topology.getNumAtoms() == 8 * n
    assert topology.getNumBonds() == 8 * small.getNumBonds() == 8 * 2 * n // 3
    for a, b in topology.bonds():  # each water's O-H bonds, within its residue and copy
        assert a.residue is b.residue and {a.element.symbol, b.element.symbol} == {"O", "H"}
        assert a.index // n == b.index // n
    names = [(a.name, a.residue.name) for a in topology.atoms()]
    assert names == 8 * [(a.name, a.residue.name) for a in small.atoms()]
    xyz = np.asarray(positions.value_in_unit(u.nanometer)).reshape(8, n, 3)
    base = np.asarray(small_positions.value_in_unit(u.nanometer))
    edge = np.asarray(small.getPeriodicBoxVectors().value_in_unit(u.nanometer)).diagonal()
    shifts = (xyz - base) / edge
    assert np.allclose(shifts, np.round(shifts), atol=1e-9)
    assert {tuple(s) for s in np.round(shifts[:, 0]).astype(int)} == {
        (i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)
    }
    big_edge = topology.getPeriodicBoxVectors().value_in_unit(u.nanometer)
    assert np.allclose(np.asarray(big_edge).diagonal(), 2 * edge)
    assert system.getNumParticles() == 8 * n and system.getNumConstraints() == 8 * n
    assert bench_md.build_system(f"water-{size}", mm=False)[2] is None


def test_graph_nodes_reads_a_cuda_graph_dump():
    """profile_step's summary of a CUDA graph's DOT dump: node count and kernel names (cut at
    their template arguments; anonymous namespaces kept)."""
    profile_step = pytest.importorskip("profile_step")
    node = '"graph_1_node_{}"[style="solid" shape="rectangle" label="{}\nvoid {}(int)\n"];\n'
    kernels = ["at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float> >",
               "tn_cuda::(anonymous namespace)::messages_kernel<float>",
               "at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >",
               "gemv2T_kernel_val"]  # fmt: skip
    dot = "digraph dot {\n" + "".join(node.format(i, i, k) for i, k in enumerate(kernels)) + "}"
    assert profile_step.graph_nodes(dot) == (
        "4 nodes; kernels: at::native::vectorized_elementwise_kernel x2, "
        "tn_cuda::(anonymous namespace)::messages_kernel x1, gemv2T_kernel_val x1"
    )
    assert profile_step.graph_nodes("digraph dot {}") == "0 nodes; kernels: names not found"


def test_profile_step_times_a_force_group_right_after_the_other(monkeypatch):
    """The in-context columns (ml|mm, mm|ml) time the second call alone, each one right after
    the first: what a step's turns cost."""
    profile_step = pytest.importorskip("profile_step")
    calls, now = [], [0.0]
    monkeypatch.setattr(profile_step.time, "perf_counter", lambda: now[0])

    def first():
        calls.append("first")
        now[0] += 1.0  # first's own second, never counted

    def then():
        calls.append("then")
        now[0] += 0.003

    assert profile_step._after_ms(first, then, 4) == pytest.approx(3.0)
    assert calls == ["first", "then"] * 5


def test_memory_table_gives_each_route_its_peak_per_atom(tmp_path, capsys):
    """benchmarks/memory.py: a row per route and size with the peak of a force call, its rate
    per added atom and the box it allows; low_memory keeps less than autograd."""
    memory = pytest.importorskip("memory")
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=32, layers=2, rbf=8, cutoff=5.0)
    memory.main(["--checkpoint", str(checkpoint), "--sizes", "300", "650", "--platform", "CPU",
                 "--routes", "ours", "ours-lowmem"])  # fmt: skip
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        fields = line.split()
        if fields and fields[0] in ("ours", "ours-lowmem"):
            rows[fields[0], int(fields[1].replace(",", ""))] = fields[2:]
    assert len(rows) == 4
    (small, large) = sorted({atoms for _, atoms in rows})
    assert len(rows["ours", large]) == 4 and len(rows["ours", small]) == 2  # marginal, box
    assert float(rows["ours-lowmem", large][0]) < float(rows["ours", large][0])
    assert float(rows["ours-lowmem", large][2]) < float(rows["ours", large][2])
    with pytest.raises(SystemExit):
        memory.main(["--checkpoint", str(checkpoint), "--sizes", "many"])
    assert "'many' atoms: give a water box's size" in capsys.readouterr().err


def test_cpu_memory_cap_fails_a_case_as_out_of_memory(tmp_path, monkeypatch):
    """--cpu-memory-gb reaches every case, and a case past it fails as out of memory (torch's
    allocation refused) instead of waking the kernel's out-of-memory killer."""
    import subprocess

    specs = []

    def fake(specs_, blocks, timeout):
        specs.extend(specs_)
        return [{"error": "out of memory: fake"} for _ in specs_]

    monkeypatch.setattr(bench_md, "run_interleaved", fake)
    checkpoint, _ = bench_md.make_checkpoint(tmp_path, channels=16, layers=1, rbf=8, cutoff=5.0)
    bench_md.main(["--checkpoint", str(checkpoint), "--systems", "water", "--water-sizes", "300",
                   "--platforms", "CPU", "--routes", "ours", "--interleave", "2",
                   "--cpu-memory-gb", "2.5"])  # fmt: skip
    assert [spec["cpu_memory_gb"] for spec in specs] == [2.5]

    code = (  # a cap 0.3 GB above what the process holds, then a 1 GB tensor
        f"import sys; sys.path.insert(0, {str(Path(bench_md.__file__).parent)!r}); "
        "import re, torch, bench_md; "
        "held = int(re.search(r'VmData:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024; "
        "bench_md.cap_process_memory((held + 3e8) / 1e9); "
        "torch.ones(250_000_000)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert bench_md._failure(done.stderr, done.returncode)["error"].startswith("out of memory: ")
    # a C++ exception's message comes before its stack's frames: the row names the message
    cpp = "RuntimeError: DefaultCPUAllocator: not enough memory\nframe #0: f\nframe #1: _start\n"
    assert bench_md._failure(cpp, 1) == {
        "error": "out of memory: RuntimeError: DefaultCPUAllocator: not enough memory"
    }


ROOT = Path(__file__).resolve().parents[1]
DEVICE_CHECKS = ROOT / "scripts" / "device" / "checks.sh"


def device_check_commands() -> list[tuple[str, list[str]]]:
    """(stage, words) of every ``python3`` command of the device checks, the shell's line
    continuations joined, ``"${bench[@]}"`` expanded, ``$out`` and ``$PLATFORMS`` as a lease
    sets them, and the words cut at the first redirection."""
    import shlex

    text = re.sub(r"\\\n\s*", " ", DEVICE_CHECKS.read_text())
    bench = re.search(r"^bench=\((.*?)\)\s*$", text, re.M | re.S)
    assert bench is not None, "checks.sh has no bench=(...) array"
    expanded = " ".join(bench.group(1).split())
    commands, stage = [], None
    for line in text.splitlines():
        label = re.fullmatch(r"(\w+|\*)\)", line.strip())
        if label:
            stage = label.group(1)
            continue
        line = line.strip().replace('"${bench[@]}"', expanded)
        if line.startswith("#") or "python3" not in line or stage is None:
            continue
        line = line.replace("${PLATFORMS:-CUDA}", "CUDA").replace("$out", "/tmp/out")
        words = shlex.split(line, comments=True)
        words = words[words.index("python3") + 1 :]
        for end, word in enumerate(words):
            if word[:1] in "<>|;&" or word[:2] in ("1>", "2>"):
                words = words[:end]
                break
        commands.append((stage, words))
    return commands


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` with the namespace it parsed."""


def test_device_checks_commands_take_their_arguments(monkeypatch, capsys):
    """Every command of scripts/device/checks.sh parses its arguments with the script it runs
    (its parser stops it before anything runs), its tests and files exist, and its inline Python
    runs here: a lease has minutes, and an option renamed since the last one would spend them on
    an argparse error. Unknown systems are argparse errors in the benchmarks too."""
    import argparse
    import importlib

    commands = device_check_commands()
    stages = {stage for stage, _ in commands}
    assert {"tests", "compare", "box", "scan", "profile", "networks", "sums"} <= stages, stages
    usage = re.search(r"usage: bash scripts/device/checks.sh ([\w|]+)", DEVICE_CHECKS.read_text())
    assert usage is not None and set(usage.group(1).split("|")) == stages - {"*"}
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    scripts = set()
    for stage, words in commands:
        where = f"stage {stage}: python3 {' '.join(words)}"
        if words[:1] == ["-c"]:  # the kernels' build: it runs here on the CPU build
            exec(compile(words[1], where, "exec"), {})
            assert "kernels:" in capsys.readouterr().out, where
            continue
        if words[:2] == ["-m", "pytest"]:
            paths = [w.split("::")[0] for w in words if w.startswith("tests/")]
            assert paths and all((ROOT / p).is_file() for p in paths), where
            continue
        script = Path(words[0])
        assert script.parent == Path("benchmarks") and (ROOT / script).is_file(), where
        module = importlib.import_module(script.stem)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        try:
            module.main(words[1:])
        except _Parsed:
            scripts.add(script.stem)
        except SystemExit:
            pytest.fail(f"{where}\n{capsys.readouterr().err}")
        else:
            pytest.fail(f"{where}: its main ran without parsing arguments")
        finally:
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    assert scripts == {"bench_md", "kernels", "profile_step", "memory"}


@pytest.mark.parametrize("script", ["bench_md", "kernels", "profile_step"])
def test_an_unknown_system_is_an_argument_error(script, capsys):
    module = pytest.importorskip(script)
    argv = ["--systems", "ala2", "water5000"]
    if script == "kernels":
        argv += ["--checkpoint", "x.ckpt"]
    with pytest.raises(SystemExit):
        module.main(argv)
    assert "unknown system 'water5000': give ala2, ala2-water or water-N" in capsys.readouterr().err
