# Source on a GPU machine (Python 3.12, a CUDA 13 build of torch 2.11, no registry access), in
# the repository root, after scripts/device/pack.sh's parts have arrived in .dev/:
#
#   . scripts/device/stack.sh
#
# Installs what has arrived and is not yet installed (parts of one lease accumulate in
# /tmp/tensornet-dev, so the machine may receive .dev/base, .dev/warp1, ... in separate calls),
# then makes openmm-torch 1.5 (built against torch 2.9) load against this torch:
# - libOpenMMTorch.so lists libnvrtc.so.12 as needed but calls nothing in it, and the machine has
#   CUDA 13 only: an empty library with that name stands in.
# - libOpenMMTorchCUDA.so calls c10::cuda::c10_cuda_check_implementation with an int line number;
#   torch 2.11 exports it with an unsigned one: a one-function shim, preloaded, forwards the call.
# Seen on an H200 (2026-11-26): with these two, the CUDA platform runs TorchForce (captured CUDA
# graphs included). openmm-torch's Reference/CPU kernel does not: torch::from_blob compiled against
# torch 2.9 fails under 2.11 ("set_stride is not allowed on a Tensor created from .data or
# .detach()"), so on that machine compare CUDA results with eager PyTorch, not the CPU platform.
# Exports LD_LIBRARY_PATH, LD_PRELOAD and PYTHONPATH (this checkout), and prints OpenMM's
# platforms and plugin load failures. Returns non-zero, with the reason, when OpenMM has no
# working CUDA platform.
_tn_stack() {
    local stash=/tmp/tensornet-dev py=python3 site torchlib part
    mkdir -p "$stash/lib" "$stash/done" || return 1
    for part in .dev/base .dev/warp1 .dev/warp2 .dev/warp3; do
        [ -d "$part" ] && cp -n "$part"/* "$stash"/
    done
    site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    torchlib=$($py -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || return 1
    local wheel name
    for wheel in "$stash"/*.whl; do
        [ -e "$wheel" ] || continue
        name=$(basename "$wheel")
        [ -e "$stash/done/$name" ] && continue
        $py -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
            "$wheel" && touch "$stash/done/$name" || return 1
    done
    for name in site data torchmdnet; do
        if [ -f "$stash/$name.tar.xz" ] && [ ! -e "$stash/done/$name" ]; then
            tar -C "$site" -xJf "$stash/$name.tar.xz" && touch "$stash/done/$name" || return 1
        fi
    done
    if [ -f "$stash/warp.sha256" ] && [ ! -e "$stash/done/warp" ]; then
        if [ "$(cat "$stash"/warp.part.* | sha256sum | cut -d' ' -f1)" = "$(cat "$stash/warp.sha256")" ]; then
            cat "$stash"/warp.part.* | tar -C "$site" -xJ && touch "$stash/done/warp" || return 1
        else
            echo "stack: warp parts incomplete: $(ls "$stash" | grep -c warp.part) of them here"
        fi
    fi
    [ -e "$stash/lib/libnvrtc.so.12" ] ||
        echo 'void tensornet_openmm_nvrtc_placeholder(void) {}' |
        gcc -shared -fPIC -x c - -o "$stash/lib/libnvrtc.so.12" -Wl,-soname,libnvrtc.so.12 || return 1
    local old=_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_ib
    local new=_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb
    local preload=""
    if ! nm -D --defined-only "$torchlib/libc10_cuda.so" | grep -q "$old"; then
        if ! nm -D --defined-only "$torchlib/libc10_cuda.so" | grep -q "$new"; then
            echo "stack: libc10_cuda.so exports neither signature of c10_cuda_check_implementation"
            return 1
        fi
        [ -e "$stash/lib/libc10_cuda_check_int.so" ] || {
            cat >"$stash/lib/shim.cpp" <<'CPP'
#include <cstdint>
namespace c10 { namespace cuda {
void c10_cuda_check_implementation(int32_t, const char*, const char*, uint32_t, bool);
// torch 2.9's signature, as openmm-torch 1.5 calls it
void c10_cuda_check_implementation(int32_t err, const char* file, const char* function, int line,
                                   bool device_assertions) {
    c10_cuda_check_implementation(err, file, function, static_cast<uint32_t>(line),
                                  device_assertions);
}
}}
CPP
            g++ -O2 -shared -fPIC "$stash/lib/shim.cpp" -o "$stash/lib/libc10_cuda_check_int.so" \
                -L"$torchlib" -lc10_cuda -Wl,-rpath,"$torchlib" || return 1
        }
        preload="$stash/lib/libc10_cuda_check_int.so"
    fi
    # OpenMM's CUDA plugins look for cuFFT 12 and NVRTC 13 in the nvidia/cu13 wheels beside it
    export LD_LIBRARY_PATH="$stash/lib:$torchlib:$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ -n "$preload" ] && export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    $py - <<'PY'
import torch  # first: the Torch plugin needs libtorch loaded
import openmm

names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
print("stack: torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("stack: openmm", openmm.__version__, "platforms", names)
failures = openmm.Platform.getPluginLoadFailures()
print("stack: plugin load failures:", *failures, sep="\n  ")
torch_failures = [f for f in failures if "Torch" in f and "OpenCL" not in f]
if "CUDA" not in names or torch_failures:
    raise SystemExit("stack: no working CUDA platform with the Torch plugin")
PY
}
_tn_stack
