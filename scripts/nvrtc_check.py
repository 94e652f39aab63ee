"""Compile the CUDA kernels of ``tensornet_openmm/csrc/pair_ops_cuda.cu`` without nvcc or a GPU:
a check of the device code before a lease, and each kernel's registers and spills.

NVRTC (CUDA's run-time compiler, a pip wheel) compiles the part of the .cu that the CPU
emulation runs (between its markers: every kernel and device function, with their host-side
sizing helpers), for sm_90a, with the network kernels instantiated as the launchers do; the
launchers themselves (ATen, c10) are left out. With ``--ptxas``, ptxas (another wheel) turns
the PTX into code for the chip and prints each kernel's registers and spills: a kernel that uses
more registers than its block's threads leave fails to launch, and registers decide how many
blocks share a multiprocessor.

    python -m pip download --no-deps -d /tmp/cu nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12
    (cd /tmp/cu && for w in *.whl; do unzip -qo $w; done)
    python scripts/nvrtc_check.py --nvrtc /tmp/cu/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \\
        --ptxas /tmp/cu/nvidia/cuda_nvcc/bin/ptxas [--source OTHER.cu] [--kernels network]

Exit status 1 when NVRTC or ptxas fails (the log says why). Only a compile check, and of code
only for the kernels that are not templates and the network kernels (the other templates are
parsed, not instantiated): the kernels' values are checked by tests/test_cuda_emulation.py here
and tests/test_gpu.py on a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "tensornet_openmm" / "csrc"
BEGIN = "// ---- emulated on the CPU by tests/test_cuda_emulation.py: from here ----"
END = "// ---- emulated on the CPU by tests/test_cuda_emulation.py: to here ----"

# NVRTC has no C++ library: the few names the kernels take from it
SHIMS = {
    "cstdint": """#pragma once
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
namespace std { using ::int64_t; using ::uint64_t; using ::int32_t; using ::uint32_t; }
""",
    "cmath": """#pragma once
namespace std { using ::cos; using ::exp; using ::floor; using ::sin; using ::sqrt;
using ::fabs; using ::log; using ::tanh; using ::isnan; using ::ceil; using ::pow; }
""",
}
PRELUDE = """#define CUDA_KERNEL_ASSERT(x) do { if (!(x)) __trap(); } while (0)
typedef unsigned long size_t;
"""


def marked_parts(cu: str) -> list[str]:
    """The code between the .cu's emulation markers, in order (tests/test_cuda_emulation.py
    emulates the same)."""
    parts, rest = [], cu
    while BEGIN in rest:
        start = rest.index(BEGIN) + len(BEGIN)
        stop = rest.index(END, start)
        parts.append(rest[start:stop])
        rest = rest[stop + len(END) :]
    return parts


def device_source(cu: str, math: str) -> str:
    """The .cu's marked parts after packed_math.h, in the kernels' namespace, with the network
    kernels instantiated for every row count and tile the launchers use (the tangent forward
    too), and the small mix and the tangent forward's gradient."""
    parts = marked_parts(cu)
    if not parts:
        raise SystemExit(f"no '{BEGIN}' marker in the source")
    instances = []
    for t, size in (("float", 4), ("double", 8)):
        for r in (1, 2, 4, 8):
            instances.append(f"template __global__ void network_backward_kernel<{t}, {r}>"
                             f"(NetArgs<{t}>);")  # fmt: skip
            for tile in (64, 128):  # the forward's tile widths (bytes of a row)
                instances.append(f"template __global__ void network_forward_kernel<{t}, {r}, "
                                 f"{tile // size}>(NetArgs<{t}>);")  # fmt: skip
                if r <= 4:  # the tangent forward (tangent_radial_networks): 2 r rows a block
                    instances.append(f"template __global__ void network_forward_kernel<{t}, "
                                     f"{r}, {tile // size}, true>(NetArgs<{t}>);")  # fmt: skip
    body = "".join(parts)
    if "network_forward_kernel" not in body:
        instances = []
    if "small_mix_kernel" in body:  # the channel mixing of a few atoms, and its gates' gradient
        for t in ("float", "double"):
            instances.append(f"template __global__ void small_mix_kernel<{t}>(MixArgs<{t}>);")
            if "tangent_grad_kernel" in body:
                instances.append(f"template __global__ void tangent_grad_kernel<{t}>"
                                 f"(TangentArgs<{t}>, tn_math::GeometryParams<{t}>);")  # fmt: skip
            instances.append(f"template __global__ void gate_grad_kernel<{t}>(const {t}*, "
                             f"const {t}*, {t}*, int64_t, int64_t);")  # fmt: skip
    return (PRELUDE + math + "\nnamespace tn_cuda {\n" + body + "\n" + "\n".join(instances)
            + "\n}  // namespace tn_cuda\n")  # fmt: skip


def compile_ptx(nvrtc: Path, source: str, includes: list[Path], arch: str) -> str:
    lib = ctypes.CDLL(str(nvrtc))
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(
        ctypes.byref(program), source.encode(), b"pair_ops_cuda.cu", 0, None, None
    )
    if status != 0:
        raise SystemExit(f"nvrtcCreateProgram: error {status}")
    options = [f"--gpu-architecture=compute_{arch}", "-std=c++17", "-default-device",
               "-diag-suppress=177", *(f"-I{p}" for p in includes)]  # fmt: skip
    array = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    status = lib.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    text = log.value.decode(errors="replace").strip()
    if text:
        print(text)
    if status != 0:
        print(f"nvrtc_check: NVRTC failed (error {status})", file=sys.stderr)
        raise SystemExit(1)
    lib.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(program, ptx)
    return ptx.value.decode()


def kernel_resources(ptxas_output: str) -> list[tuple[str, int, int]]:
    """(kernel, registers, spill-store bytes) from ``ptxas -v``'s report, kernels demangled as
    far as their name and template arguments."""
    rows, name, spills = [], None, 0
    for line in ptxas_output.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            name, spills = entry.group(1), 0
            continue
        spill = re.search(r"(\d+) bytes spill stores", line)
        if spill:
            spills = int(spill.group(1))
        used = re.search(r"Used (\d+) registers", line)
        if used and name is not None:
            rows.append((readable(name), int(used.group(1)), spills))
            name = None
    return rows


def readable(mangled: str) -> str:
    """A kernel's mangled name as its name and template arguments:
    ``_ZN7tn_cuda22network_forward_kernelIfLi4ELi32EEEv...`` -> ``network_forward_kernel<f,4,32>``.
    """
    match = re.match(r"_ZN7tn_cuda(\d+)", mangled)
    if match is None:
        return mangled
    length = int(match.group(1))
    start = match.end()
    name = mangled[start : start + length]
    args = re.match(r"I([fd])((?:L[ib]\d+E)*)E", mangled[start + length :])
    if args is None:
        return name
    numbers = re.findall(r"L[ib](\d+)E", args.group(2))
    return f"{name}<{','.join([args.group(1), *numbers])}>"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", type=Path, required=True, help="libnvrtc.so.12 (or .13)")
    parser.add_argument("--ptxas", type=Path, help="ptxas: also report registers and spills")
    parser.add_argument("--source", type=Path, default=CSRC / "pair_ops_cuda.cu")
    parser.add_argument("--arch", default="90a", help="compute capability (default 90a)")
    parser.add_argument("--kernels", default="", help="report only kernels whose name has this")
    args = parser.parse_args(argv)
    if not args.nvrtc.is_file():
        parser.error(f"--nvrtc {args.nvrtc}: no such file; see the docstring for the wheel")
    if args.ptxas is not None and not args.ptxas.is_file():
        parser.error(f"--ptxas {args.ptxas}: no such file; see the docstring for the wheel")
    source = device_source(args.source.read_text(), (CSRC / "packed_math.h").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        shims = Path(tmp)
        for name, text in SHIMS.items():
            (shims / name).write_text(text)
        ptx = compile_ptx(args.nvrtc, source, [shims, CSRC], args.arch)
        print(f"nvrtc_check: {args.source.name} compiled for compute_{args.arch}")
        if args.ptxas is None:
            return 0
        (shims / "kernels.ptx").write_text(ptx)
        done = subprocess.run(
            [str(args.ptxas), f"-arch=sm_{args.arch}", "-v", "-O3", str(shims / "kernels.ptx"),
             "-o", str(shims / "kernels.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    rows = [r for r in kernel_resources(done.stderr) if args.kernels in r[0]]
    print(f"{'kernel':48} {'registers':>9} {'spill bytes':>11}")
    for name, registers, spills in sorted(rows):
        print(f"{name:48} {registers:9d} {spills:11d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
