#!/usr/bin/env bash
# Pack what a GPU machine of the team's device tool needs into .dev/ (ignored by git), in parts
# that each fit one call's 64 MiB: run here, where pip reaches the registries.
#
#   bash scripts/device/pack.sh
#
# .dev/base   OpenMM 8.6.1 + openmm-torch 1.5 (CUDA 13 plugins), openmmtools (its code and the
#             data of the systems we use), openmm-ml, their compiled dependencies, and the
#             benchmark's TorchMD-Net checkpoint (128 channels, 2 layers, random weights)
# .dev/warp1, .dev/warp2, .dev/warp3
#             warp-lang 1.19.0 (without its CPU code generator, tests and examples) as xz parts,
#             and in warp3 torchmd-net 3.1.0 and ase: the reference route, and openmm-ml's
#
# On the GPU machine, scripts/device/stack.sh installs what has arrived; scripts/device/checks.sh
# runs the checks, one stage per call. The wheels are for the
# machine's Python 3.12; warp and torchmd-net are pure Python apart from warp's own library.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >>.git/info/exclude
py=.venv/bin/python
site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .dev && mkdir -p .dev/base .dev/warp1 .dev/warp2 .dev/warp3 .dev/tmp
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d "$@"
}
download .dev/base openmm==8.6.1 openmm-cuda-13==8.6.1 openmmtorch==1.5 openmm-torch-cuda-13==1.5 \
    netcdf4==1.7.5.1.post1 cftime==1.6.6.1 mdtraj==1.11.1.post2 numexpr==2.14.2 pymbar==4.0.3 \
    mpiplus==0.0.3
download .dev/warp3 ase==3.29.0
# openmmtools without the data of the systems we never build; openmm-ml as installed here
tar -C "$site" -cJf .dev/base/site.tar.xz --exclude='__pycache__' --exclude='openmmtools/tests' \
    --exclude='openmmtools/data/*' openmmtools openmmtools-0.27.0.dist-info openmmml \
    openmmml-1.8.dist-info
tar -C "$site" -rf .dev/tmp/data.tar openmmtools/data/alanine-dipeptide-explicit \
    openmmtools/data/alanine-dipeptide-gbsa openmmtools/data/waterbox
xz -T2 .dev/tmp/data.tar && mv .dev/tmp/data.tar.xz .dev/base/data.tar.xz
tar -C "$site" -cJf .dev/warp3/torchmdnet.tar.xz --exclude='__pycache__' torchmdnet \
    torchmd_net-3.1.0.dist-info
$py - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_md
bench_md.make_checkpoint(Path(".dev/base"), 128, 2, 32, 5.0)
PY
tar -C "$site" -cf .dev/tmp/warp.tar --exclude='warp/bin/warp-clang.so' --exclude='__pycache__' \
    --exclude='warp/tests' --exclude='warp/examples' warp warp_lang-1.19.0.dist-info
xz -9e -T2 .dev/tmp/warp.tar
# part 1 rides with the base, part 2 alone, part 3 (the rest) with torchmd-net
split -b 14M -d -a 2 .dev/tmp/warp.tar.xz .dev/tmp/warp.part.
mv .dev/tmp/warp.part.00 .dev/warp1/
mv .dev/tmp/warp.part.01 .dev/tmp/warp.part.02 .dev/tmp/warp.part.03 .dev/warp2/
mv .dev/tmp/warp.part.0[4-9] .dev/warp3/
sha256sum .dev/tmp/warp.tar.xz | cut -d' ' -f1 >.dev/warp3/warp.sha256
rm -rf .dev/tmp
du -sh .dev/*
