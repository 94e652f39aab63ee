#!/usr/bin/env bash
# The GPU checks of the benchmark issue, in the three device calls that bring warp-lang in parts
# (scripts/device/pack.sh made them here). Each call's command, in the repository root there:
#
#   . scripts/device/stack.sh > $OUT/stack.log 2>&1 || exit 3; bash scripts/device/checks.sh STAGE
#
#   STAGE    carry                    what it runs (about)
#   tests    .dev/base .dev/warp1     builds the fused CUDA kernels; GPU tests; ours with and    7 min
#                                     without radial tables on CUDA; the step's pieces and a PyTorch
#                                     graph replay (profile_step); kernels per force call
#   scan     .dev/warp2               largest water box within 80 GB: low_memory, 600,000 and   7 min
#                                     1,000,000 atoms
#   compare  .dev/warp3               ours (exact, tables) against the reference and PythonForce 8 min
#                                     (5 min); the reference's largest box (30,000, 45,000)
#
# Call them back to back: a device machine is given back 30 s after a call ends, and the warp
# parts collect in its /tmp (a 15-minute lease fits tests and compare with a bare call for
# warp2 between them: `true` instead of the scan). Logs and CSVs go to $OUT (the device tool's
# output folder).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench=(python3 benchmarks/bench_md.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt
       --platforms "${PLATFORMS:-CUDA}")
stage=${1:-}
case "$stage" in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # the kernels' first build (nvcc: about a minute) before anything times itself
    timeout 240 python3 -c "from tensornet_openmm.nn import kernels; kernels.load(verbose=True); \
print('kernels:', kernels.description() or 'none')" >"$out/build.log" 2>&1
    grep -E "^kernels:|Warning|error" "$out/build.log" | tail -5
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
        >"$out/gpu_tests.log" 2>&1
    echo "pytest rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu_tests.log" | tail -15
    timeout 220 "${bench[@]}" --systems ala2 water --water-sizes 5000 \
        --routes ours ours-tables --graphs both --seconds 2 --timeout 50 \
        --csv "$out/tests.csv" >"$out/tests.log" 2>&1
    echo "bench rc=$?"
    # eager pieces on the padded pair list, PyTorch's own graph replay, and the OpenMM step
    timeout 120 python3 benchmarks/profile_step.py --systems water-5000 ala2 --platform CUDA \
        --repeats 10 >"$out/profile.log" 2>&1
    tail -4 "$out/profile.log" | cut -c1-170
    timeout 60 python3 benchmarks/kernels.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt \
        --systems ala2 water-5000 --routes ours ours-tables >"$out/kernels.log" 2>&1
    grep "per call" "$out/kernels.log"
    ;;
scan)
    # the target: the largest box within 80 GB at least 20x the reference's (28,872 atoms ran
    # for it on the last lease, in 71 GB). The fused low-memory forces keep about 44 KB per atom
    # (CPU figure at 96,066 atoms; on the CPU 145,071 atoms ran MD in 7.8 GB), so 600,000 and
    # 1,000,000 atoms should fit; building a box takes about 9 s per 100,000 atoms here
    # (the reference's side of it needs all of warp: the end of compare). First the exact
    # peak per atom of a force call on the GPU, and the box it extrapolates to
    timeout 100 python3 benchmarks/memory.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt \
        --sizes 5000 20000 --routes ours ours-lowmem >"$out/memory.log" 2>&1
    tail -5 "$out/memory.log"
    timeout 400 "${bench[@]}" --systems water --water-sizes 600000 1000000 \
        --routes ours-lowmem --graphs off --seconds 1 --warmup 2 --timeout 200 \
        --gpu-memory-gb 80 --csv "$out/scan.csv" >"$out/scan.log" 2>&1
    ;;
compare)
    grep -i "warp" "$out/stack.log"
    timeout 40 python3 benchmarks/kernels.py --checkpoint /tmp/tensornet-dev/tensornet.ckpt \
        --systems ala2 water-5000 --routes reference >"$out/kernels_reference.log" 2>&1
    grep "per call" "$out/kernels_reference.log"
    timeout 290 "${bench[@]}" --systems ala2 water --water-sizes 5000 \
        --routes ours ours-tables reference pythonforce --graphs both --seconds 1.5 --timeout 80 \
        --csv "$out/compare.csv" >"$out/compare.log" 2>&1
    tail -6 "$out/compare.log" | cut -c1-170
    # the reference's largest water box within 80 GB (for the scan's target)
    timeout 150 "${bench[@]}" --systems water --water-sizes 30000 45000 \
        --routes reference --graphs off --seconds 1 --warmup 2 --timeout 70 \
        --gpu-memory-gb 80 --csv "$out/scan_reference.csv" >"$out/scan_reference.log" 2>&1
    ;;
*)
    echo "usage: bash scripts/device/checks.sh tests|scan|compare" >&2
    exit 2
    ;;
esac
echo "stage $stage: benchmark rc=$?"
tail -16 "$out/$stage.log" | cut -c1-170
