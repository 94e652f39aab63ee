"""The fused operators with their CUDA code, built for the CPU.

``pair_ops.cpp`` and the whole of ``pair_ops_cuda.cu`` (kernels and launchers) compiled as one
C++ extension in which CPU tensors take the CUDA route: every ``is_cuda()`` reads ``is_cpu()``,
``cuda_host.h`` stands in for the CUDA runtime and c10's CUDA headers, and each
``kernel<<<grid, block, shared, stream>>>(args)`` becomes ``emu::cuda_launch``, which runs the
kernel's CUDA threads through ``emulate.h``. Loaded (``torch.ops.load_library``) in a process of
its own, it registers ``torch.ops.tensornet_openmm`` as the GPU build does, so that tests written
for the CPU kernels check the launchers (grid sizes, shared memory, the tensors they allocate and
the order of their arguments) and the kernels behind them, with no GPU. tests/conftest.py loads
it when ``TENSORNET_OPENMM_EMULATED_CUDA`` names the library; tests/test_cuda_emulation.py builds
it and runs the operator tests that way.

Run as a script, it builds the library (cached by the sources' digest) and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
CSRC = HERE.parent.parent / "tensornet_openmm" / "csrc"

SHARED = re.compile(r"extern __shared__ (__align__\(\d+\) )?unsigned char shared_bytes\[\];")
"""A kernel's dynamic shared memory, which emulate.h gives per block."""

SHARED_EMULATED = "unsigned char* shared_bytes = emu::shared();"
STATIC_SHARED = re.compile(r"__shared__ (\w+) (\w+)\[(\w+)\];")
"""A static shared array, ``__shared__ T name[n];``."""


def emulated_shared(code: str) -> str:
    """``code`` with its shared memory as emulate.h gives it: the dynamic (``emu::shared()``)
    and each static array (``emu::static_shared``)."""
    code = SHARED.sub(SHARED_EMULATED, code)
    return STATIC_SHARED.sub(r"\1* \2 = emu::static_shared<\1>(\3);", code)


CUDA_INCLUDES = re.compile(r"#include <(cuda_runtime\.h|c10/cuda/[A-Za-z]+\.h)>\n")
GATHER_WORK = "constexpr int64_t kGatherWork = int64_t(1) << 21;"
BARRIERS = ("__syncthreads", "__syncwarp", "__shfl", "__ballot", "shared_bytes")


def closing(text: str, start: int, opening: str, closing_: str) -> int:
    """The index of the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing_:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"no {closing_!r} closes the {opening!r} at {start}")


def device_functions(text: str) -> dict[str, str]:
    """Every ``__global__`` and ``__device__`` function's body, by name (overloads joined)."""
    bodies: dict[str, str] = {}
    for match in re.finditer(
        r"__(?:global|device)__[^;{(]*?(?:__launch_bounds__\s*\([^)]*\)\s*)?\b(\w+)\s*\(", text
    ):
        close = closing(text, match.end() - 1, "(", ")")
        rest = text[close + 1 :]
        head = re.match(r"\s*(const\s*)?\{", rest)
        if head is None:  # a declaration or a call
            continue
        start = close + 1 + head.end() - 1
        bodies[match.group(1)] = (
            bodies.get(match.group(1), "") + text[start : closing(text, start, "{", "}") + 1]
        )
    return bodies


def kernel_names(text: str) -> set[str]:
    """The ``__global__`` functions of a .cu."""
    return set(
        re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text)
    )


def barrier_kernels(text: str) -> set[str]:
    """The device functions that use a barrier, a shuffle or shared memory, or call one that
    does: emulate.h runs their kernels one thread per CUDA thread, block by block."""
    bodies = device_functions(text)
    found = {name for name, body in bodies.items() if any(b in body for b in BARRIERS)}
    while True:
        more = {
            name
            for name, body in bodies.items()
            if name not in found and any(re.search(rf"\b{f}\b", body) for f in found)
        }
        if not more:
            return found
        found |= more


def split_top(text: str) -> list[str]:
    """``text`` split at its commas outside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def emulated_launches(text: str, barriers: set[str]) -> tuple[str, int]:
    """``text`` with every ``kernel<<<...>>>(args)`` made an ``emu::cuda_launch``; and how many."""
    out, pos, count = [], 0, 0
    while (i := text.find("<<<", pos)) >= 0:
        k = i
        if text[k - 1] == ">":  # template arguments
            depth = 0
            while True:
                k -= 1
                depth += {">": 1, "<": -1}.get(text[k], 0)
                if depth == 0:
                    break
        name = re.search(r"(\w+)$", text[:k])
        if name is None:
            raise ValueError(f"no kernel name before the launch at {i}")
        begin = name.start(1)
        kernel = text[begin:i]
        end = text.index(">>>", i)
        config = split_top(text[i + 3 : end])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"launch configuration {config} at {i}")
        config += ["0", "c10::cuda::getCurrentCUDAStream()"][len(config) - 2 :]
        paren = end + 3 + (len(text[end + 3 :]) - len(text[end + 3 :].lstrip()))
        if text[paren] != "(":
            raise ValueError(f"no arguments after the launch at {i}")
        close = closing(text, paren, "(", ")")
        args = text[paren + 1 : close].strip()
        flag = "true" if name.group(1) in barriers else "false"
        call = f'emu::cuda_launch(&{kernel}, "{name.group(1)}", {flag}, {", ".join(config)}'
        out.append(text[pos:begin] + call + (f", {args})" if args else ")"))
        pos = close + 1
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def emulated_sources() -> dict[str, str]:
    """The extension's files, by name: the two sources rewritten, and the headers."""
    cu = (CSRC / "pair_ops_cuda.cu").read_text()
    cpp = (CSRC / "pair_ops.cpp").read_text()
    barriers = barrier_kernels(cu)
    cu, launches = emulated_launches(cu, barriers)
    if launches < 25 or "<<<" in cu:
        raise ValueError(f"{launches} launches rewritten; the .cu's launch syntax changed")
    cu, includes = CUDA_INCLUDES.subn("", cu)
    if includes != 4 or GATHER_WORK not in cu:
        raise ValueError(
            "pair_ops_cuda.cu's CUDA includes or kGatherWork changed: mend operators.py"
        )
    cu = cu.replace(GATHER_WORK, "#define kGatherWork (emu::gather_work(int64_t(1) << 21))")
    cu = '#include "cuda_host.h"\n' + emulated_shared(cu)
    cu += '\nextern "C" const char* tn_emulated_launches() { return emu::launch_report(); }\n'
    return {
        "pair_ops.cpp": cpp.replace(".is_cuda()", ".is_cpu()"),
        "pair_ops_cuda_emulated.cpp": cu.replace(".is_cuda()", ".is_cpu()"),
        "packed_math.h": (CSRC / "packed_math.h").read_text(),
        "emulate.h": (HERE / "emulate.h").read_text(),
        "cuda_host.h": (HERE / "cuda_host.h").read_text(),
    }


FLAGS = ["-O1", "-fopenmp", "-pthread", "-std=c++20", "-DTN_WITH_CUDA"]


def build(verbose: bool = False) -> Path:
    """Compile (or find in the cache) the emulated library; its path."""
    import torch
    from torch.utils import cpp_extension

    from tensornet_openmm.nn import kernels

    files = emulated_sources()
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = f"torch-{torch.__version__}-emulated-cuda-{digest.hexdigest()[:12]}".replace("+", "_")
    folder = root / "tensornet_openmm" / "kernels" / tag
    library = folder / "tensornet_openmm_emulated_cuda.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    kernels._put_ninja_on_path()  # as the package's own build: ninja beside this Python
    cpp_extension.load(
        name="tensornet_openmm_emulated_cuda",
        sources=[str(folder / "pair_ops.cpp"), str(folder / "pair_ops_cuda_emulated.cpp")],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp", "-pthread"],
        build_directory=str(folder),
        with_cuda=False,
        is_python_module=False,
        verbose=verbose,
    )
    return library


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv[1:]))
