#!/usr/bin/env bash
# The GPU checks of the benchmark issue, in stages, one device call each, bringing warp-lang in
# parts (scripts/device/pack.sh made them here). Each call's command, in the repository root:
#
#   . scripts/device/stack.sh > $OUT/stack.log 2>&1 || exit 3; bash scripts/device/checks.sh STAGE
#
#   STAGE    carry                    what it runs                                            about
#   tests    .dev/base .dev/warp1     builds the fused CUDA kernels; the GPU tests; ours on   5 min
#                                     alanine dipeptide and a 5,000-atom box, graphs on/off;
#                                     then the box stage in what is left of the call (until
#                                     UNTIL_S, 540 s unless given)                        +1.5 min
#   (none)   .dev/warp2               a bare call (`true`): warp's second part arrives        0.5 min
#   compare  .dev/warp3               the targets: ours (exact, tables) against the reference 5 min
#                                     and PythonForce, same run, each route as it runs best
#                                     (--graphs best); then, until UNTIL_S, each kernel's
#                                     time in a force call of the 4,866-atom box (kernels.py),
#                                     ours and tables                                        +1 min
#   box      (none)                   ours low_memory on a 600,000-atom box within 80 GB     1.5 min
#                                     (the largest-box target, not yet measured), until
#                                     UNTIL_S; --progress: a box cut short says how far it got
#   -- only with device time left after compare --
#   scan     (none)                   largest water box within 80 GB: ours low_memory at      5 min
#                                     1,000,000 atoms, the reference at 30,000 and 45,000
#   profile  (none)                   the 22- and 4,866-atom steps' pieces and a PyTorch      4 min
#                                     graph replay (profile_step); kernels per force call,
#                                     ours and the reference (kernels.py)
#   networks (none)                   the 22-atom step with the small-network kernels as      4 min
#                                     session 29 left them, with the backward as before,
#                                     with both as before, and without them
#                                     (TENSORNET_OPENMM_SMALL_NETWORKS=0: cuBLAS), and the
#                                     channel mixing through cuBLAS (..._SMALL_MIX=0), and
#                                     the radial networks in reverse mode
#                                     (..._TANGENT_NETWORKS=0), ours and tables, graphs on;
#                                     each setting's kernel times; then the 4,866-atom step
#                                     in forward (=1) and in reverse mode
#   sums     (none)                   the 4,866-atom step with the gathered pair sums and     2 min
#                                     without (TENSORNET_OPENMM_GATHER_SUMS=0: atomic adds),
#                                     ours, graphs off
#
# If a stage's GPU tests fail: TENSORNET_OPENMM_SMALL_NETWORKS=0 runs the networks through
# cuBLAS again (the small-network kernels off, the other fused kernels on),
# TENSORNET_OPENMM_SMALL_MIX=0 a small molecule's channel mixing,
# TENSORNET_OPENMM_TANGENT_NETWORKS=0 the radial networks in reverse mode (radial_networks),
# TENSORNET_OPENMM_GATHER_SUMS=0 the long lists' pair sums through atomic adds again, and
# TENSORNET_OPENMM_FUSED=0 runs plain PyTorch; prefix the later stages' commands with them.
#
# A session has 15 minutes of device time, the machine's start (1-3 minutes) included, so the
# order is what matters most first: tests (with the box), warp2 and compare's targets take
# about 13 minutes with the start (on the H200, 2026-11-28: 390 s for the first call, start
# included, then 7 s, then compare's bench about 240 s). The box's set-up takes about 20 s
# since session 30 (it was about two minutes: the tiled box's bonds and the module's stored
# species terms), so it ends the tests call; a run cut by the call's limit still returns what
# it wrote. Give each call a timeout_s (600 or what is left) and UNTIL_S=<that less 40> before
# `bash` (the stack's set-up comes before this script's clock starts). Call them back to
# back: a machine is given back 30 s after a call ends, and the warp parts collect in its /tmp.
# Logs and CSVs go to $OUT (the device tool's output folder, at most 8 files come back: the
# stages write few).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench=(python3 benchmarks/bench_md.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt
       --platforms "${PLATFORMS:-CUDA}")
stage=${1:-}
until=${UNTIL_S:-540}  # the seconds this script may run (the box stops then)
case "$stage" in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # the kernels' first build (nvcc: about a minute) before anything times itself
    timeout 200 python3 -c "from tensornet_openmm.nn import kernels; kernels.load(verbose=True); \
print('kernels:', kernels.description() or 'none')" >"$out/build.log" 2>&1
    grep -E "^kernels:|Warning|error" "$out/build.log" | tail -5
    # 22 tests took 72 s on the H100 (b7b30d5); of 34, the H200 (5d03531) ran 30 in 170 s, then
    # the full gradcheck did not end: it now runs in fast mode, last. -v: a line per test as
    # it ends, so that a run cut short by the timeout still says which passed
    timeout 170 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py \
        >"$out/gpu_tests.log" 2>&1
    echo "pytest rc=$?"
    grep -E "FAILED|ERROR|passed|failed" "$out/gpu_tests.log" | tail -15
    # ours alone, so that a lease cut short still has our figures (compare repeats them beside
    # the other routes)
    timeout 100 "${bench[@]}" --systems ala2 water --water-sizes 5000 \
        --routes ours --graphs both --seconds 1.5 --timeout 40 \
        --csv "$out/tests.csv" >"$out/tests.log" 2>&1
    grep -E "^CUDA " "$out/tests.log" | cut -c1-120
    # then the largest box, in what is left of this call
    UNTIL_S=$((until - SECONDS)) bash "$0" box
    exit
    ;;
compare)
    grep -i "warp" "$out/stack.log"
    # the targets, each route as it runs best (--graphs best: ours by size as create_force
    # decides, the reference with graphs, PythonForce as it is): 8 cases. With --graphs both
    # the 14 cases had not ended in 300 s on the H100 (2026-11-26); the tests stage timed ours
    # both ways, and both leases timed the reference both ways (graphs won at both sizes)
    timeout 300 "${bench[@]}" --systems ala2 water --water-sizes 5000 \
        --routes ours ours-tables reference pythonforce --graphs best --seconds 1.5 \
        --timeout 80 --csv "$out/compare.csv" >"$out/compare.log" 2>&1
    echo "compare: benchmark rc=$?"
    tail -12 "$out/compare.log" | cut -c1-170
    # then where the 4,866-atom step goes, kernel by kernel and operator by operator (each
    # with the kernels it launched: --by-operator), ours and tables. No lease has timed the
    # box's kernels since the fused ones: on the H200, 2026-11-28, ours took 11.08 ms a step
    # without graphs and 7.73 with radial tables, so 7 ms or more are outside the networks
    left=$((until - SECONDS))
    if [ "$left" -gt 40 ]; then
        timeout "$left" python3 benchmarks/kernels.py --checkpoint \
            /tmp/tensornet-dev/tensornet.ckpt --systems water-5000 --routes ours-dynamic \
            ours-dynamic-tables --top 30 --by-operator >"$out/water_kernels.log" 2>&1
        grep -E "per call" "$out/water_kernels.log"
    fi
    ;;
box)
    # the largest-box target (20x the reference's 28,872 atoms of an earlier lease: 577,440):
    # ours low_memory at 600,000 atoms within 80 GB, until UNTIL_S (on the 2-core CPU of the
    # sessions: built in 4 s, its System in 11 s); each stage of the case in box.log as it
    # happens (--progress: on the H200, 2026-11-28, a box cut short left an empty log)
    left=$((until - SECONDS))
    if [ "$left" -gt 90 ]; then
        timeout "$left" "${bench[@]}" --systems water --water-sizes 600000 \
            --routes ours-lowmem --graphs off --seconds 1 --warmup 2 --timeout 190 --progress \
            --gpu-memory-gb 80 --csv "$out/box.csv" >"$out/box.log" 2>&1
    else
        echo "no time left for the 600,000-atom box ($left s)" >"$out/box.log"
    fi
    ;;
scan)
    # the target: the largest box within 80 GB at least 20x the reference's (28,872 atoms ran
    # for it on an earlier lease, in 71 GB). The fused low-memory forces keep about 44 KB per
    # atom (CPU figure at 96,066 atoms; on the CPU 239,232 atoms ran MD in 12.3 GB), so
    # 600,000 and 1,000,000 atoms should fit; building a box takes about 9 s per 100,000 atoms.
    # First the peak per atom of a force call on the GPU, and the box it extrapolates to
    timeout 80 python3 benchmarks/memory.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt \
        --sizes 5000 20000 --routes ours ours-lowmem >"$out/memory.log" 2>&1
    tail -5 "$out/memory.log"
    timeout 150 "${bench[@]}" --systems water --water-sizes 30000 45000 \
        --routes reference --graphs off --seconds 1 --warmup 2 --timeout 70 \
        --gpu-memory-gb 80 --csv "$out/scan_reference.csv" >"$out/scan_reference.log" 2>&1
    tail -4 "$out/scan_reference.log" | cut -c1-170
    # (600,000 atoms: the box stage)
    timeout 200 "${bench[@]}" --systems water --water-sizes 1000000 \
        --routes ours-lowmem --graphs off --seconds 1 --warmup 2 --timeout 190 --progress \
        --gpu-memory-gb 80 --csv "$out/scan.csv" >"$out/scan.log" 2>&1
    ;;
profile)
    # eager pieces on the padded pair list, PyTorch's own graph replay, and the OpenMM step;
    # for alanine dipeptide whether the 22-atom step is our kernels (about 336) or a floor of
    # OpenMM and openmm-torch
    timeout 140 python3 benchmarks/profile_step.py --systems ala2 water-5000 --platform CUDA \
        --repeats 10 --checkpoint /tmp/tensornet-dev/tensornet.ckpt >"$out/profile.log" 2>&1
    tail -4 "$out/profile.log" | cut -c1-170
    timeout 70 python3 benchmarks/kernels.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt \
        --systems ala2 water-5000 --routes ours ours-tables reference --by-operator \
        >"$out/kernels.log" 2>&1
    grep "per call" "$out/kernels.log"
    ;;
networks)
    # the small-network kernels (session 19) as session 29 left them (the backward in blocks of
    # 1024 threads, the forward's weight tiles 128 bytes of a row: the defaults), the backward
    # in blocks of 256, both as before (256, 64 bytes), and cuBLAS with an activation kernel per
    # layer instead (at b7b30d5 the networks' products and cuBLAS's helpers were 56 of 203
    # kernels, 0.22 ms); on the H200 (2026-11-28) exact and tables differed by 0.18 ms a step at
    # 22 atoms, the radial networks' kernels. Last, the channel mixing through cuBLAS's batched
    # product instead of small_mix_kernel (session 30). Second, the radial networks in reverse
    # mode (radial_networks: session 29's backward kernel) instead of forward mode (session 31's
    # default on a GPU up to 2,048 pairs: the derivatives d/dr in the forward kernel, no
    # backward through the layers). Each setting in a fresh process, one round (five settings: two rounds and the
    # kernel times took more than 6 minutes)
    settings=("TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS=1024"
              "TENSORNET_OPENMM_TANGENT_NETWORKS=0"
              "TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS=256"
              "TENSORNET_OPENMM_NETWORK_BACKWARD_THREADS=256 TENSORNET_OPENMM_NETWORK_TILE_BYTES=64"
              "TENSORNET_OPENMM_SMALL_NETWORKS=0"
              "TENSORNET_OPENMM_SMALL_MIX=0")
    for setting in "${settings[@]}"; do
        echo "== $setting" >>"$out/networks.log"
        # shellcheck disable=SC2086  # (a setting may be two variables)
        env $setting timeout 60 "${bench[@]}" --systems ala2 --routes ours ours-tables \
            --graphs on --seconds 1.5 --timeout 40 >>"$out/networks.log" 2>&1
        grep "^CUDA .*ala2" "$out/networks.log" | tail -2 | cut -c1-120
    done
    # each kernel's own time per force call, by setting (the network kernels' lines)
    for setting in "${settings[@]}"; do
        echo "== $setting" >>"$out/networks_kernels.log"
        # shellcheck disable=SC2086
        env $setting timeout 50 python3 benchmarks/kernels.py \
            --checkpoint /tmp/tensornet-dev/tensornet.ckpt --systems ala2 --routes ours \
            --top 60 >>"$out/networks_kernels.log" 2>&1
    done
    grep -E "^==|per call|network|tangent|gemm|Kernel|mix" "$out/networks_kernels.log" | cut -c1-120
    # forward mode (=1: above 2,048 pairs not the default) against reverse mode at 4,866 atoms
    # (the networks through cuBLAS, the derivatives as a second product per layer), in turns
    for setting in TENSORNET_OPENMM_TANGENT_NETWORKS=1 TENSORNET_OPENMM_TANGENT_NETWORKS=0; do
        echo "== $setting" >>"$out/networks_box.log"
        env "$setting" timeout 60 "${bench[@]}" --systems water --water-sizes 5000 \
            --routes ours --graphs off --seconds 1.5 --timeout 45 >>"$out/networks_box.log" 2>&1
        grep "^CUDA .*water" "$out/networks_box.log" | tail -1 | cut -c1-120
    done
    ;;
sums)
    # session 20's gathered pair sums (no atomic adds, from 2^21 pairs x channels) against the
    # scattered ones, in turns, each setting in fresh processes
    for round in 1 2; do
        for setting in TENSORNET_OPENMM_GATHER_SUMS=1 TENSORNET_OPENMM_GATHER_SUMS=0; do
            echo "== round $round, $setting" >>"$out/sums.log"
            env "$setting" timeout 60 "${bench[@]}" --systems water --water-sizes 5000 \
                --routes ours --graphs off --seconds 1.5 --timeout 45 >>"$out/sums.log" 2>&1
            grep "^CUDA .*water" "$out/sums.log" | tail -1 | cut -c1-120
        done
    done
    ;;
*)
    echo "usage: bash scripts/device/checks.sh tests|compare|box|scan|profile|networks|sums" >&2
    exit 2
    ;;
esac
echo "stage $stage: benchmark rc=$?"
tail -16 "$out/$stage.log" | cut -c1-170
