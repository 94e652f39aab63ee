"""Fused kernels for the pair sums, the radial networks and the per-atom algebra, and the
PyTorch they replace.

On the CPU a small molecule's force call is mostly operator overhead: the pair sums (gather each
pair's sender rows, multiply them by the pair's filters, add them onto the receivers), the radial
networks and the per-atom tensor algebra, forwards and backwards, as thousands of small operators
and hundreds of OpenMP parallel regions. ``csrc/pair_ops.cpp`` has the operators that the
model calls, each one pass (one parallel region at most) with its backward written out:
``geometry`` (cutoff, packed (1, u, u u^T) and radial basis of the pair vectors),
``embedding_sums`` and ``embedding_prepare`` (the embedding's pair sums, and its X and |X|^2 from
them), ``messages_self`` and ``messages`` (an interaction layer's message sums, with the self
pair's, and those of further blocks of pairs), ``mlp`` (small networks: the radial filters of a
block of pairs, the per-atom networks), ``radial_table`` (the same filters read from a table,
:mod:`tensornet_openmm.nn.tables`), ``packed_normalize``, ``packed_product_normalize`` and
``packed_square_add`` (the per-atom steps of an interaction layer), ``packed_part_norms`` (the
output head's features), ``packed_product``,
``pair_difference`` (pair vectors straight from OpenMM's positions) and ``pair_search`` (the pair
list: :meth:`FusedPairKernels.neighbor_pairs`, the same pairs as
:func:`tensornet_openmm.neighbors.neighbor_pairs` without a tensor per candidate). The
channel mixing is one batched matrix product (:meth:`FusedPairKernels.mix`; ``component_mix``
on a GPU); ``packed_mix``, the operator that did it before, stays registered for modules
exported by earlier versions. On a GPU the same holds for kernel launches and memory
traffic: ``csrc/pair_ops_cuda.cu`` has CUDA kernels for each of them but ``mlp`` and
``component_mix``, which call ATen's (one kernel each way instead of a gather, a product and a
scatter of pair-sized tensors, or an unpacking, a batched product and a decomposition, or the
half dozen elementwise operators of a step of the per-atom algebra).
They are compiled with the compilers PyTorch uses for extensions the first time they are asked
for (:func:`load`: about 20 s for the CPU, a minute more with CUDA; the build is cached per
torch and Python version and sources) and registered as ``torch.ops.tensornet_openmm``.

The model does not need them: :class:`PairKernels` is the same arithmetic in PyTorch, what the
model runs by default. :func:`use_fused_kernels` switches a model's layers to
:class:`FusedPairKernels`, which run the compiled kernels where they have them and fall back to
PyTorch elsewhere. They are first-order only (no forces in a training loss), which is why only
the OpenMM forces use them.

Set ``TENSORNET_OPENMM_FUSED=0`` to never build or use them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..neighbors import (
    PairList,
    candidate_ranges,
    minimum_image_of,
    neighbor_pairs,
    searched_pairs,
)
from .algebra import PackedAlgebra, matmul, packed_geometry
from .radial import cosine_cutoff, exp_normal, gaussian
from .tables import interpolate

ENVIRONMENT_SWITCH = "TENSORNET_OPENMM_FUSED"
SOURCES = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = SOURCES / "pair_ops.cpp"
CUDA_SOURCE = SOURCES / "pair_ops_cuda.cu"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

GROUP = (0, 1, 1, 1, 2, 2, 2, 2, 2, 2)
"""Part (I, A, S) of each packed component, whose filter it takes."""
MLP_ACTIVATIONS = {"silu": 0, "tanh": 1}
"""Activations that :meth:`PairKernels.mlp` runs (code 2: none)."""
MLP_LINEAR_LAST = 4
"""Added to :meth:`PairKernels.mlp`'s activation code: no activation after the last layer."""
REVERSED_SIGN = (1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""Sign of each packed component of (1, u, u u^T) when the unit vector u is reversed."""


def build_directory(cuda: bool = False) -> Path:
    """Where the compiled kernels are cached: one folder per torch and Python version, sources
    (``csrc/``, headers included) and CPU-only or CPU and CUDA build."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".cpp", ".cu", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = (
        f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
        f"-{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:12]}"
    )
    return root / "tensornet_openmm" / "kernels" / tag.replace("+", "_")


def disabled() -> bool:
    """True when ``TENSORNET_OPENMM_FUSED`` is 0, false, no or off; False when it is unset or
    1, true, yes or on. Any other value is an error (a typo must not silently pick one)."""
    value = os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return True
    if value in ("1", "true", "yes", "on", ""):
        return False
    raise ValueError(
        f"{ENVIRONMENT_SWITCH}={os.environ[ENVIRONMENT_SWITCH]!r} is not a switch: set it to 0 "
        "(no fused kernels) or 1 (use them where they apply), or unset it"
    )


def available() -> bool:
    """Whether ``torch.ops.tensornet_openmm`` has the kernels (loaded in this process)."""
    try:
        torch.ops.tensornet_openmm.messages  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def cuda_available() -> bool:
    """Whether the loaded kernels include the CUDA ones (``csrc/pair_ops_cuda.cu``)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "tensornet_openmm::messages", "CUDA"
    )


def _cuda_compiler() -> str | None:
    """Why the CUDA kernels cannot be built here (None when they can): they need a CUDA device
    and the CUDA compiler torch finds (``CUDA_HOME`` or ``nvcc`` on PATH)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "no CUDA compiler (nvcc) found: set CUDA_HOME or put nvcc on PATH"
    return None


def load(verbose: bool = False) -> bool:
    """Build (once) and load the fused kernels; True when they are ready.

    On a machine with a CUDA device and the CUDA compiler, the CUDA kernels are built with the
    CPU ones (about a minute the first time); without the compiler, or if that build fails, the
    CPU ones alone, with a warning that the GPU runs PyTorch. False, with a warning naming the
    reason, when they cannot be built at all (no C++ compiler, no ninja); everything then runs
    in PyTorch, only slower. False without building when ``TENSORNET_OPENMM_FUSED=0``. Call it
    before deserializing a System whose TorchForce was made with the kernels in another process.
    """
    if disabled():
        return False
    with _LOCK:
        if "ok" in _STATE:
            return bool(_STATE["ok"])
        if available():  # loaded by someone else in this process
            _STATE["ok"] = True
            return True
        no_cuda = _cuda_compiler()
        if no_cuda is None:
            try:
                _build(True, verbose)
            except Exception as error:  # nvcc or CUDA headers broken: the CPU kernels alone
                no_cuda = f"their build failed ({error!s:.300})"
        if no_cuda is not None and torch.cuda.is_available():
            warnings.warn(
                f"tensornet_openmm: no fused CUDA kernels ({no_cuda}); forces on the GPU run in "
                f"plain PyTorch, slower. Set {ENVIRONMENT_SWITCH}=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        try:
            if no_cuda is not None:
                _build(False, verbose)
            _STATE["ok"] = available()
        except Exception as error:  # compiler, ninja or headers missing: PyTorch instead
            _STATE["ok"] = False
            warnings.warn(
                f"tensornet_openmm: the fused CPU kernels could not be built ({error!s:.300}); "
                "forces on the CPU run in plain PyTorch, about 1.5x slower for small molecules. "
                "Install a C++ compiler and ninja (pip install ninja) to build them, or set "
                f"{ENVIRONMENT_SWITCH}=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return bool(_STATE["ok"])


def _build(cuda: bool, verbose: bool) -> None:
    """Compile (or find in the cache) and load the kernels: CPU and CUDA, or CPU only."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    path = os.environ.get("PATH")
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU-only builds
    try:
        from torch.utils import cpp_extension

        folder = build_directory(cuda)
        folder.mkdir(parents=True, exist_ok=True)
        wait_for_other_build(folder)
        _put_ninja_on_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No CUDA runtime is found" and the like
            cpp_extension.load(
                name="tensornet_openmm_pair_ops" + ("_cuda" if cuda else ""),
                sources=[str(SOURCE)] + ([str(CUDA_SOURCE)] if cuda else []),
                extra_cflags=["-O3", "-fopenmp"] + (["-DTN_WITH_CUDA"] if cuda else []),
                extra_cuda_cflags=["-O3"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                with_cuda=cuda,
                is_python_module=False,
                verbose=verbose,
            )
    finally:
        quiet.setLevel(level)
        if path is None:  # PATH as it was: ninja was needed for the build only
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


STALE_LOCK_SECONDS = 900.0
"""A build's lock file older than this (15 min; a build takes one to three) was left by a build
that was interrupted: :func:`wait_for_other_build` removes it."""


def wait_for_other_build(folder: Path, poll: float = 1.0) -> None:
    """Wait while another process builds the kernels in ``folder`` (its ``lock`` file exists),
    saying so once. torch waits for that file without end, so a build that was interrupted
    (Ctrl-C, a killed job) would hang every later start: a lock older than
    :data:`STALE_LOCK_SECONDS` is removed, with a warning, and the build starts again."""
    lock = folder / "lock"
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            warnings.warn(
                f"tensornet_openmm: removed {lock}, {age / 60:.0f} min old, left by an "
                "interrupted build of the fused kernels; building them again",
                RuntimeWarning,
                stacklevel=3,
            )
            lock.unlink(missing_ok=True)
            return
        if not told:
            warnings.warn(
                f"tensornet_openmm: waiting for another process building the fused kernels "
                f"({lock} is {age:.0f} s old). If none is running, delete that file; it is "
                f"removed by itself once {STALE_LOCK_SECONDS / 60:.0f} min old.",
                RuntimeWarning,
                stacklevel=3,
            )
            told = True
        time.sleep(poll)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's (a dependency) sits beside this Python,
    which is not on PATH when the environment is used without being activated."""
    folders = [str(Path(sys.executable).parent)]
    try:
        import ninja

        folders.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([f for f in folders if f not in path] + path)


def charged(t: Tensor, charge_factor: Optional[Tensor]) -> Tensor:
    """``t`` (n, 10, F) times each atom's charge factor 1 + 0.1 q (None: every molecule neutral,
    a factor of exactly 1, so the product is skipped)."""
    if charge_factor is None:
        return t
    return t * charge_factor.reshape(-1, 1, 1)


def _constant(factor: Optional[Tensor]) -> bool:
    """Whether the fused per-atom steps take these charge factors: they give no gradient for
    them (inputs of a force, never differentiated there)."""
    return factor is None or not factor.requires_grad


def _factors(like: Tensor, factor: Optional[Tensor]) -> Tensor:
    """The operators' charge factors: (n,) contiguous in ``like``'s dtype, or empty for none."""
    if factor is None:
        return like.new_empty(0)
    return factor.reshape(-1).to(like.dtype).contiguous()


class PairKernels(nn.Module):
    """The pair sums in PyTorch (any device, any order of derivatives).

    Packed per-atom tensors (n, 10, F) and pairs p = (src[p], dst[p]) sending dst -> src, and
    also src -> dst when ``half`` (see :mod:`.layers`).
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.algebra = PackedAlgebra(dtype)  # made in the model's dtype: 1/3 is not exact
        self.register_buffer("group", torch.tensor(GROUP), persistent=False)
        self.register_buffer("sign", torch.tensor(REVERSED_SIGN), persistent=False)
        self.linear_last = MLP_LINEAR_LAST  # (TorchScript reads no module-level int)

    def applies(self, like: Tensor) -> bool:
        """Whether the layers should take the fused path for tensors like ``like``."""
        return False

    def messages(self, y: Tensor, filters: Tensor, src: Tensor, dst: Tensor, half: bool) -> Tensor:
        """out[src] += filters[:, GROUP] * y[dst] (and out[dst] += ... y[src] when half):
        y (n, 10, F), filters (P, 3, F) -> (n, 10, F)."""
        w = filters.index_select(1, self.group)
        out = torch.zeros_like(y).index_add(0, src, w * y.index_select(0, dst))
        if half:
            out = out.index_add(0, dst, w * y.index_select(0, src))
        return out

    def messages_self(
        self,
        y: Tensor,
        filters: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
        self_filters: Tensor,
    ) -> Tensor:
        """:meth:`messages` plus the self pair's messages self_filters[GROUP] * y, self_filters
        (3, F) the filters at distance 0: an interaction layer's whole message sum (the first
        block's, when the pairs come in blocks)."""
        return y * self_filters.index_select(0, self.group) + self.messages(
            y, filters, src, dst, half
        )

    def messages_add(
        self, out: Tensor, y: Tensor, filters: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> None:
        """out += :meth:`messages` (no autograd): the low-memory forces' sums over blocks of
        pairs, which the operator adds without an atom-sized result per block."""
        out.add_(self.messages(y, filters, src, dst, half))

    def message_filter_grad(
        self, grad: Tensor, y: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> Tensor:
        """The gradient of :meth:`messages` with respect to its filters, for the gradient
        ``grad`` (n, 10, F) of its sums: (P, 3, F), part k summing the components of part k of
        grad[src] * y[dst] (+ grad[dst] * y[src] when half)."""
        terms = grad.index_select(0, src) * y.index_select(0, dst)
        if half:
            terms = terms + grad.index_select(0, dst) * y.index_select(0, src)
        out = terms.new_zeros((terms.shape[0], 3, terms.shape[2]))
        return out.index_add(1, self.group, terms)

    def embedding_sums(
        self,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> Tensor:
        """out[src] += radial[:, GROUP] (z_recv[src] + z_send[dst]) geom (and the reversed pair
        onto dst, with the A components of geom negated): radial (P, 3, F), species terms
        (n, F), geom (P, 10) = (1, u, packed u u^T) -> (n, 10, F)."""
        w = radial.index_select(1, self.group)
        out = radial.new_zeros((z_recv.shape[0], 10, radial.shape[2]))
        species = z_recv.index_select(0, src) + z_send.index_select(0, dst)
        out = out.index_add(0, src, w * species.unsqueeze(1) * geom.unsqueeze(2))
        if half:
            species = z_recv.index_select(0, dst) + z_send.index_select(0, src)
            reversed_geom = geom * self.sign.to(geom.dtype)
            out = out.index_add(0, dst, w * species.unsqueeze(1) * reversed_geom.unsqueeze(2))
        return out

    def embedding_sums_add(
        self,
        out: Tensor,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> None:
        """out += :meth:`embedding_sums` (no autograd), as :meth:`messages_add`."""
        out.add_(self.embedding_sums(radial, z_recv, z_send, geom, src, dst, half))

    def message_blocks(
        self,
        y: Tensor,
        filters: list[Tensor],
        src: Tensor,
        dst: Tensor,
        half: bool,
        self_filters: Tensor,
        taps: list[Tensor],
    ) -> Tensor:
        """:meth:`messages_self` of pairs in blocks, block b's filters ``filters[b]`` for the
        next ``filters[b].shape[0]`` pairs of ``src`` and ``dst``: one sum over every block (the
        self pair's messages once), a layer's whole message sum. ``taps``: none, or each block's
        :meth:`message_filter_tap`, through which the operator's filter gradients flow (PyTorch
        differentiates the filters here, whatever the taps)."""
        out = y * self_filters.index_select(0, self.group)
        start = 0
        for block in filters:
            rows = block.shape[0]
            out = out + self.messages(
                y, block, src.narrow(0, start, rows), dst.narrow(0, start, rows), half
            )
            start += rows
        return out

    def embedding_blocks(
        self,
        radial: list[Tensor],
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
        taps: list[Tensor],
    ) -> Tensor:
        """:meth:`embedding_sums` of pairs in blocks (as :meth:`message_blocks`; ``geom`` that of
        every pair, ``taps`` :meth:`embedding_tap`), summed over the blocks."""
        out = z_recv.new_zeros((z_recv.shape[0], 10, z_recv.shape[1]))
        start = 0
        for block in radial:
            rows = block.shape[0]
            out = out + self.embedding_sums(
                block, z_recv, z_send, geom.narrow(0, start, rows), src.narrow(0, start, rows),
                dst.narrow(0, start, rows), half,
            )  # fmt: skip
            start += rows
        return out

    def message_filter_tap(
        self, filters: Tensor, y: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> Tensor:
        """A block's tap for :meth:`message_blocks` (``filters``, ``src`` and ``dst`` the
        block's), made right after the block's filters: an atom-sized tensor of stride 0 whose
        gradient, the sums', the operator's tap turns into the block's filter gradient when
        autograd reaches it, one block's at a time. Here nothing to tap."""
        return y.new_zeros((1, 1, 1)).expand(y.shape)

    def embedding_tap(
        self,
        radial: Tensor,
        geom: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> Tensor:
        """:meth:`message_filter_tap` for :meth:`embedding_blocks` (a block's radial functions
        and geometry)."""
        return radial.new_zeros((1, 1, 1)).expand(z_recv.shape[0], 10, radial.shape[2])

    def embedding_pair_grads(
        self,
        grad: Tensor,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> tuple[Tensor, Tensor]:
        """The gradients of :meth:`embedding_sums` with respect to ``radial`` and ``geom`` for
        the gradient ``grad`` (n, 10, F) of its sums: per pair, the products' components summed
        over the channels (geom) or per part (radial), of both directions when ``half``."""
        w = radial.index_select(1, self.group)  # (P, 10, F)
        species = z_recv.index_select(0, src) + z_send.index_select(0, dst)
        h = grad.index_select(0, src) * species.unsqueeze(1)  # d out[src] / d (w geom)
        if half:
            back = grad.index_select(0, dst) * (
                z_recv.index_select(0, dst) + z_send.index_select(0, src)
            ).unsqueeze(1)
            h = h + back * self.sign.to(h.dtype).unsqueeze(1)
        g_geom = (h * w).sum(2)
        g_w = h * geom.unsqueeze(2)
        g_radial = g_w.new_zeros((g_w.shape[0], 3, g_w.shape[2])).index_add(1, self.group, g_w)
        return g_radial, g_geom

    def product(self, a: Tensor, b: Tensor, symmetric: bool = False) -> Tensor:
        """packed(A B), or packed(A B + B A) if ``symmetric``: 3x3 products of packed
        (n, 10, F) tensors, per atom and channel."""
        return self._torch_product(a, b, symmetric)

    def normalize(self, p: Tensor) -> Tensor:
        """X / (|X|^2 + 1) of packed (n, 10, F) tensors, |X| the Frobenius norm per channel."""
        return self._torch_normalize(p)

    def part_norms(self, p: Tensor) -> Tensor:
        """3 I^2, |A|^2 and |S|^2 of packed (n, 10, F) tensors, (n, 3, F): the output head's
        features."""
        return self.algebra.part_norms(p)

    def embedding_prepare(self, sums: Tensor, self_terms: Tensor) -> tuple[Tensor, Tensor]:
        """The embedding's packed X and |X|^2, (n, 10, F) and (n, F), from its pair sums
        (n, 10, F) and each atom's self pair term (n, F): the term added to I, S made
        traceless."""
        iso = sums.select(1, 0) + self_terms
        diag = sums.narrow(1, 4, 3)
        diag = diag - diag.mean(1, keepdim=True)  # make S traceless
        x = torch.cat((iso.unsqueeze(1), sums.narrow(1, 1, 3), diag, sums.narrow(1, 7, 3)), 1)
        return x, self.algebra.squared_norm(x).squeeze(1)

    def product_normalize(
        self, a: Tensor, b: Tensor, symmetric: bool, factor: Optional[Tensor]
    ) -> Tensor:
        """normalize(product(a, b, symmetric) q): q the atoms' charge factors (n,), None for
        none (no multiplication). The interaction layer's step from the messages to what its
        second channel mixing takes."""
        return self._torch_product_normalize(a, b, symmetric, factor)

    def square_add(self, x: Tensor, d: Tensor, factor: Optional[Tensor]) -> Tensor:
        """x + d + product(d, d) q, q as in :meth:`product_normalize`: the interaction layer's
        new X."""
        return self._torch_square_add(x, d, factor)

    def mix(self, p: Tensor, w: Tensor) -> Tensor:
        """Channel mixing of a packed (n, 10, F) tensor, weight w[k] (F, F) for part k (I, A, S):
        out[:, c] = p[:, c] @ w[GROUP[c]]^T."""
        return self._torch_mix(p, w)

    def gated_mix(self, p: Tensor, w: Tensor, gates: Tensor) -> Tensor:
        """:meth:`mix` times gates (n, 3, F) part by part: out[:, c] = (p[:, c] @
        w[GROUP[c]]^T) * gates[:, GROUP[c]] (the embedding's last step)."""
        return self._torch_mix(p, w) * gates.index_select(1, self.group)

    def mlp(
        self, x: Tensor, scale: Tensor, weights: list[Tensor], biases: list[Tensor], act: int
    ) -> Tensor:
        """act(L_n(... act(L_1(x)))) * scale: linears with bias (weights (out, in)) on rows x
        (N, K), each followed by the activation act (0 SiLU, 1 tanh, 2 none,
        :data:`MLP_ACTIVATIONS`; plus :data:`MLP_LINEAR_LAST`: none after the last layer), then
        each row times scale (N,) (radial filters: the cutoff); an empty scale scales nothing
        (the per-atom networks)."""
        return self._torch_mlp(x, scale, weights, biases, act)

    def geometry(
        self,
        vec: Tensor,
        centers: Tensor,
        widths: Tensor,
        kind: int,
        alpha: float,
        basis_lower: float,
        lower: float,
        upper: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine cutoff (P,), packed geometry (P, 10) = (1, u, [xx, yy, zz, xy, xz, yz] of
        u u^T) and radial basis (P, K) of pair vectors vec (P, 3), u = vec / |vec|: the basis of
        :mod:`.radial` given by ``fused_parameters()`` (kind, centers, widths, alpha,
        basis_lower), the cutoff between ``lower`` and ``upper``."""
        r = torch.sqrt((vec * vec).sum(-1))
        u = vec / r.unsqueeze(1)
        if kind == 0:  # exp-normal (radial.py)
            basis = exp_normal(r.unsqueeze(-1), centers, widths, alpha, basis_lower, upper)
        else:
            basis = gaussian(r.unsqueeze(-1), centers, widths)
        return cosine_cutoff(r, lower, upper), packed_geometry(u), basis

    def radial_table(
        self,
        vec: Tensor,
        table: Tensor,
        a: float,
        alpha: float,
        c: float,
        inv_h: float,
        lower: float,
        upper: float,
    ) -> Tensor:
        """cut(r) g(r) of pair vectors (P, 3) from a radial table (intervals, 4, width)
        (:mod:`tensornet_openmm.nn.tables`)."""
        return interpolate(vec, table, a, alpha, c, inv_h, lower, upper)

    def radial_networks(
        self,
        basis: Tensor,
        cut: Tensor,
        first_weight: Tensor,
        first_bias: Tensor,
        projection: int,
        networks: int,
        weights: list[Tensor],
        biases: list[Tensor],
        act: int,
    ) -> list[Tensor]:
        """Every pair network at once, each output times the cutoff ``cut`` (P,): the first
        ``projection`` rows of the first linear (first_weight, first_bias) on the basis
        (P, K) without an activation (the embedding's projection), then ``networks`` networks
        (activation ``act`` after every layer): each the next rows of the first linear, then
        its share of ``weights`` and ``biases``, in order. Returns the projection's (P,
        projection) and each network's output."""
        return self._torch_radial_networks(
            basis, cut, first_weight, first_bias, projection, networks, weights, biases, act
        )

    def tangent_networks(self, like: Tensor) -> bool:
        """Whether the radial networks of pairs on ``like``'s device run differentiated forward
        (:meth:`tangent_radial_networks`); here (PyTorch) never."""
        return False

    def tangent_radial_networks(
        self,
        vec: Tensor,
        centers: Tensor,
        widths: Tensor,
        kind: int,
        alpha: float,
        basis_lower: float,
        lower: float,
        upper: float,
        first_weight: Tensor,
        first_bias: Tensor,
        projection: int,
        networks: int,
        weights: list[Tensor],
        biases: list[Tensor],
        act: int,
    ) -> list[Tensor]:
        """[cut, geom] + :meth:`radial_networks` of the pair vectors (P, 3): the cutoff and the
        geometry as :meth:`geometry` makes them (``centers`` ... ``upper`` its arguments), then
        the networks of its basis."""
        cut, geom, basis = self.geometry(
            vec, centers, widths, kind, alpha, basis_lower, lower, upper
        )
        return [cut, geom] + self._torch_radial_networks(
            basis, cut, first_weight, first_bias, projection, networks, weights, biases, act
        )

    def _torch_radial_networks(
        self,
        basis: Tensor,
        cut: Tensor,
        first_weight: Tensor,
        first_bias: Tensor,
        projection: int,
        networks: int,
        weights: list[Tensor],
        biases: list[Tensor],
        act: int,
    ) -> list[Tensor]:
        z = nn.functional.linear(basis, first_weight, first_bias)
        out = [z.narrow(1, 0, projection) * cut.unsqueeze(1)]
        width = (first_weight.shape[0] - projection) // networks
        depth = len(weights) // networks
        for n in range(networks):
            h = z.narrow(1, projection + n * width, width)
            h = nn.functional.silu(h) if act == 0 else torch.tanh(h)
            first, last = n * depth, (n + 1) * depth
            out.append(self._torch_mlp(h, cut, weights[first:last], biases[first:last], act))
        return out

    def pair_difference(
        self,
        pos: Tensor,
        src: Tensor,
        dst: Tensor,
        scale: float,
        box: Optional[Tensor] = None,
        min_width: float = 0.0,
    ) -> Tensor:
        """scale (pos[src] - pos[dst]), (P, 3): pair vectors straight from positions (OpenMM's,
        in nm, with ``scale`` 10 for A), at their minimum image in ``box`` (3, 3), reduced
        triclinic, in the units of ``pos`` (scaled as well), if given; differentiable in
        ``pos``. A box whose smallest width (scaled) is below ``min_width`` (0: no check) makes
        every vector and every position's gradient NaN: the step fails loudly, without a host
        synchronisation."""
        return self._torch_pair_difference(pos, src, dst, scale, box, min_width)

    def neighbor_pairs(
        self,
        positions: Tensor,
        cutoff: float,
        box: Optional[Tensor],
        capacity: int,
        strategy: str,
        cell_capacity: int,
        half: bool,
    ) -> PairList:
        """:func:`tensornet_openmm.neighbors.neighbor_pairs` (the same arguments and pairs)."""
        return neighbor_pairs(positions, cutoff, box, capacity, strategy, cell_capacity, half)

    def _torch_pair_difference(
        self,
        pos: Tensor,
        src: Tensor,
        dst: Tensor,
        scale: float,
        box: Optional[Tensor],
        min_width: float,
    ) -> Tensor:
        d = (pos.index_select(0, src) - pos.index_select(0, dst)) * scale
        if box is None:
            return d
        scaled = box * scale
        d = minimum_image_of(d, scaled)
        if min_width > 0.0:  # NaN or zero times every coordinate's sum: all NaN on failure
            nan_or_zero = torch.where(scaled.diagonal().min() < min_width, math.nan, 0.0)
            d = d + nan_or_zero.to(d.dtype) * pos.sum()
        return d

    def _torch_mlp(
        self, x: Tensor, scale: Tensor, weights: list[Tensor], biases: list[Tensor], act: int
    ) -> Tensor:
        h = x
        base = act % self.linear_last
        for k in range(len(weights)):
            h = nn.functional.linear(h, weights[k], biases[k])
            if act >= self.linear_last and k == len(weights) - 1:
                break
            if base == 0:
                h = nn.functional.silu(h)
            elif base == 1:
                h = torch.tanh(h)
        if scale.numel() == 0:
            return h
        return h * scale.unsqueeze(1)

    def _torch_product(self, a: Tensor, b: Tensor, symmetric: bool) -> Tensor:
        x, y = self.algebra.full(a), self.algebra.full(b)
        if symmetric:
            return self.algebra.packed(matmul(x, y) + matmul(y, x))
        return self.algebra.packed(matmul(x, y))

    def _torch_normalize(self, p: Tensor) -> Tensor:
        return p / (self.algebra.squared_norm(p) + 1.0)

    def _torch_product_normalize(
        self, a: Tensor, b: Tensor, symmetric: bool, factor: Optional[Tensor]
    ) -> Tensor:
        return self._torch_normalize(charged(self._torch_product(a, b, symmetric), factor))

    def _torch_square_add(self, x: Tensor, d: Tensor, factor: Optional[Tensor]) -> Tensor:
        return x + d + charged(self._torch_product(d, d, False), factor)

    def _torch_mix(self, p: Tensor, w: Tensor) -> Tensor:
        iso, vec, sym = torch.split(p, [1, 3, 6], dim=1)
        return torch.cat(
            (
                nn.functional.linear(iso.squeeze(1), w[0]).unsqueeze(1),
                nn.functional.linear(vec.contiguous(), w[1]),
                nn.functional.linear(sym.contiguous(), w[2]),
            ),
            dim=1,
        )


class FusedPairKernels(PairKernels):
    """The compiled kernels (first derivatives only) on CPU tensors, and on CUDA tensors where
    the CUDA kernels were built (:func:`cuda_available`; there ``mlp`` runs ATen's CUDA
    operators from C++, with its own backward); PyTorch elsewhere. The channel mixing is one
    batched product on both (:meth:`_batched_mix`).

    Made only after :func:`load` succeeded (scripting it needs the registered operators).
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype)
        self.cuda_kernels = cuda_available()
        self.strided_mix = False  # the GPU's channel mixing on the CPU too (see _batched_mix)

    def applies(self, like: Tensor) -> bool:
        return like.device.type == "cpu" or (self.cuda_kernels and like.device.type == "cuda")

    def messages(self, y: Tensor, filters: Tensor, src: Tensor, dst: Tensor, half: bool) -> Tensor:
        return torch.ops.tensornet_openmm.messages(y, filters, src, dst, half)

    def messages_self(
        self,
        y: Tensor,
        filters: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
        self_filters: Tensor,
    ) -> Tensor:
        return torch.ops.tensornet_openmm.messages_self(y, filters, src, dst, half, self_filters)

    def messages_add(
        self, out: Tensor, y: Tensor, filters: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> None:
        torch.ops.tensornet_openmm.messages_add(out, y, filters, src, dst, half)

    def message_filter_grad(
        self, grad: Tensor, y: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> Tensor:
        return torch.ops.tensornet_openmm.message_filter_grad(grad, y, src, dst, half)

    def embedding_sums(
        self,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> Tensor:
        return torch.ops.tensornet_openmm.embedding_sums(
            radial, z_recv, z_send, geom, src, dst, half
        )

    def embedding_sums_add(
        self,
        out: Tensor,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> None:
        torch.ops.tensornet_openmm.embedding_sums_add(
            out, radial, z_recv, z_send, geom, src, dst, half
        )

    def message_blocks(
        self,
        y: Tensor,
        filters: list[Tensor],
        src: Tensor,
        dst: Tensor,
        half: bool,
        self_filters: Tensor,
        taps: list[Tensor],
    ) -> Tensor:
        return torch.ops.tensornet_openmm.message_blocks(
            y, filters, src, dst, half, self_filters, taps
        )

    def message_filter_tap(
        self, filters: Tensor, y: Tensor, src: Tensor, dst: Tensor, half: bool
    ) -> Tensor:
        return torch.ops.tensornet_openmm.message_filter_tap(filters, y, src, dst, half)

    def embedding_tap(
        self,
        radial: Tensor,
        geom: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> Tensor:
        return torch.ops.tensornet_openmm.embedding_tap(
            radial, geom, z_recv, z_send, src, dst, half
        )

    def embedding_blocks(
        self,
        radial: list[Tensor],
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
        taps: list[Tensor],
    ) -> Tensor:
        return torch.ops.tensornet_openmm.embedding_blocks(
            radial, z_recv, z_send, geom, src, dst, half, taps
        )

    def embedding_pair_grads(
        self,
        grad: Tensor,
        radial: Tensor,
        z_recv: Tensor,
        z_send: Tensor,
        geom: Tensor,
        src: Tensor,
        dst: Tensor,
        half: bool,
    ) -> tuple[Tensor, Tensor]:
        return torch.ops.tensornet_openmm.embedding_pair_grads(
            grad, radial, z_recv, z_send, geom, src, dst, half
        )

    def product(self, a: Tensor, b: Tensor, symmetric: bool = False) -> Tensor:
        if self.applies(a):
            return torch.ops.tensornet_openmm.packed_product(a, b, symmetric)
        return self._torch_product(a, b, symmetric)

    def normalize(self, p: Tensor) -> Tensor:
        if self.applies(p):
            return torch.ops.tensornet_openmm.packed_normalize(p)
        return self._torch_normalize(p)

    def part_norms(self, p: Tensor) -> Tensor:
        """One operator each way (``packed_part_norms``), where PyTorch squares and multiplies
        by the parts' weights (two operators forward, three back)."""
        if self.applies(p):
            return torch.ops.tensornet_openmm.packed_part_norms(p)
        return self.algebra.part_norms(p)

    def embedding_prepare(self, sums: Tensor, self_terms: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.tensornet_openmm.embedding_prepare(sums, self_terms)

    def product_normalize(
        self, a: Tensor, b: Tensor, symmetric: bool, factor: Optional[Tensor]
    ) -> Tensor:
        if self.applies(a) and _constant(factor):
            return torch.ops.tensornet_openmm.packed_product_normalize(
                a, b, symmetric, _factors(a, factor)
            )
        return self._torch_product_normalize(a, b, symmetric, factor)

    def square_add(self, x: Tensor, d: Tensor, factor: Optional[Tensor]) -> Tensor:
        if self.applies(x) and _constant(factor):
            return torch.ops.tensornet_openmm.packed_square_add(x, d, _factors(x, factor))
        return self._torch_square_add(x, d, factor)

    def mlp(
        self, x: Tensor, scale: Tensor, weights: list[Tensor], biases: list[Tensor], act: int
    ) -> Tensor:
        if self.applies(x):  # CUDA too: its backward is one kernel per layer and step, where
            # TorchScript's autodiff of SiLU is half a dozen
            return torch.ops.tensornet_openmm.mlp(x, scale, weights, biases, act)
        return self._torch_mlp(x, scale, weights, biases, act)

    def mix(self, p: Tensor, w: Tensor) -> Tensor:
        if self.applies(p):
            return self._batched_mix(p, w)
        return self._torch_mix(p, w)

    def gated_mix(self, p: Tensor, w: Tensor, gates: Tensor) -> Tensor:
        """One ``gated_mix`` operator each way (the ``component_mix`` product with the gates
        in it; on a GPU up to 512 atoms one kernel each way, and one more for the gates'
        gradient), where the product and its two gradients took three more."""
        if self.applies(p):
            return torch.ops.tensornet_openmm.gated_mix(p, self._component_weights(w), gates)
        return self._torch_mix(p, w) * gates.index_select(1, self.group)

    def _component_weights(self, w: Tensor) -> Tensor:
        """The part weights w (3, F, F) per packed component, transposed: (10, F, F), entry c
        W[GROUP[c]]^T (the component_mix and gated_mix operators' weights)."""
        return w.index_select(0, self.group).transpose(1, 2)

    def _batched_mix(self, p: Tensor, w: Tensor) -> Tensor:
        """:meth:`mix` as one batched matrix product over the 10 components, each with its
        part's weight (the expanded weights are a constant once frozen). On a GPU the
        ``component_mix`` operator reads and writes the atom-major tensors through strided
        views, one cuBLAS call each way, where ``bmm`` and a copy back to atom-major order took
        two kernels (and plain PyTorch two copies, three products and a concatenation). On the
        CPU ATen's ``bmm`` into such a view is slower than the copy (forward, 128 channels,
        2 threads: 22 atoms 134 against 84 us), so the CPU copies (``strided_mix``: as on a
        GPU, for :mod:`benchmarks.kernels`' count). MKL's batched product splits the components
        between the threads, which beats splitting the atoms between them (the ``packed_mix``
        operator, used before); the same values to the last bit either way."""
        weights = self._component_weights(w)
        if p.is_cuda or self.strided_mix:
            return torch.ops.tensornet_openmm.component_mix(p, weights)
        return torch.bmm(p.transpose(0, 1), weights).transpose(0, 1).contiguous()

    def geometry(
        self,
        vec: Tensor,
        centers: Tensor,
        widths: Tensor,
        kind: int,
        alpha: float,
        basis_lower: float,
        lower: float,
        upper: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # only called where the kernels apply (TensorNet.atomic_energies), as messages
        return torch.ops.tensornet_openmm.geometry(
            vec, centers, widths, kind, alpha, basis_lower, lower, upper
        )

    def radial_networks(
        self,
        basis: Tensor,
        cut: Tensor,
        first_weight: Tensor,
        first_bias: Tensor,
        projection: int,
        networks: int,
        weights: list[Tensor],
        biases: list[Tensor],
        act: int,
    ) -> list[Tensor]:
        """One operator each way (the ``radial_networks`` kernel): the first linears one matrix
        product forward and one back to the basis, where each network took its own (and
        autograd added up their gradients of the basis and the cutoff)."""
        if self.applies(basis):
            return torch.ops.tensornet_openmm.radial_networks(
                basis, cut, first_weight, first_bias, projection, networks, weights, biases, act
            )
        return self._torch_radial_networks(
            basis, cut, first_weight, first_bias, projection, networks, weights, biases, act
        )

    def tangent_networks(self, like: Tensor) -> bool:
        """On a GPU up to 2,048 pairs (the small-network kernels), unless
        ``TENSORNET_OPENMM_TANGENT_NETWORKS=0``; with ``=1`` for more pairs and on the CPU too
        (the ``tangent_networks`` operator reads it at each call)."""
        return self.applies(like) and torch.ops.tensornet_openmm.tangent_networks(like)

    def tangent_radial_networks(
        self,
        vec: Tensor,
        centers: Tensor,
        widths: Tensor,
        kind: int,
        alpha: float,
        basis_lower: float,
        lower: float,
        upper: float,
        first_weight: Tensor,
        first_bias: Tensor,
        projection: int,
        networks: int,
        weights: list[Tensor],
        biases: list[Tensor],
        act: int,
    ) -> list[Tensor]:
        """One operator (``tangent_radial_networks``) in :meth:`geometry`'s place and
        :meth:`radial_networks`': the cutoff, the geometry, the basis and every network, with
        each value's derivative d/dr made alongside (forward mode); the backward is one kernel
        for every output, the networks' part one sum per pair (dE/dr = sum of g . dout/dr),
        where reverse mode takes every layer back. On a small molecule's GPU step: the
        small-network kernel with the derivatives as more rows of its tiles, and no backward
        kernel through the layers."""
        return torch.ops.tensornet_openmm.tangent_radial_networks(
            vec, centers, widths, kind, alpha, basis_lower, lower, upper, first_weight,
            first_bias, projection, networks, weights, biases, act,
        )  # fmt: skip

    def pair_difference(
        self,
        pos: Tensor,
        src: Tensor,
        dst: Tensor,
        scale: float,
        box: Optional[Tensor] = None,
        min_width: float = 0.0,
    ) -> Tensor:
        """One operator each way (the ``pair_difference`` kernel): forward one pass over the
        pairs, the minimum image and the box's check included, backward a fill and one
        scatter, where PyTorch takes two gathers, a difference and a scale (and a dozen
        elementwise operators for the minimum image, a handful for the check), and backward
        five or six kernels (GPU)."""
        if self.applies(pos):
            periodic = pos.new_empty(0) if box is None else box
            return torch.ops.tensornet_openmm.pair_difference(
                pos, src, dst, scale, periodic, min_width
            )
        return self._torch_pair_difference(pos, src, dst, scale, box, min_width)

    def neighbor_pairs(
        self,
        positions: Tensor,
        cutoff: float,
        box: Optional[Tensor],
        capacity: int,
        strategy: str,
        cell_capacity: int,
        half: bool,
    ) -> PairList:
        """The same pairs, in the same order, from the ``pair_search`` kernel (brute force or
        cell list; torch-cluster's stays PyTorch's): the candidates laid out as ranges (a few
        operators per atom, :func:`~tensornet_openmm.neighbors.candidate_ranges`) and searched in
        two passes, where PyTorch makes tensors of every candidate (27 cells x the fullest cell
        per atom) and compacts them. A cell list then searches every atom of every cell, so
        ``cell_capacity`` is not needed: only the pair capacity can overflow. Other strategies
        (and their errors) are the PyTorch search's."""
        if strategy not in ["auto", "brute", "cell"] or not self.applies(positions):
            return neighbor_pairs(positions, cutoff, box, capacity, strategy, cell_capacity, half)
        if capacity >= 0 and positions.shape[0] == 0:
            raise ValueError(
                "a fixed-capacity search needs at least one atom (padding uses atom 0)"
            )
        fixed = positions.detach()
        order, start, end = candidate_ranges(fixed, cutoff, box, strategy, half)
        periodic = fixed.new_empty(0) if box is None else box.detach()
        pairs, shift, count = torch.ops.tensornet_openmm.pair_search(
            fixed, order, start, end, cutoff, periodic, capacity, half
        )
        # a dynamic list without a box has zero shifts (a fixed capacity's padding slots have
        # shifts past the cutoff): no addition then, nor TorchScript's autodiff subgraph of the
        # difference and it, a cost per call
        zero_shifts = box is None and capacity < 0
        return searched_pairs(positions, pairs, None if zero_shifts else shift, count)

    def radial_table(
        self,
        vec: Tensor,
        table: Tensor,
        a: float,
        alpha: float,
        c: float,
        inv_h: float,
        lower: float,
        upper: float,
    ) -> Tensor:
        if self.applies(vec):
            return torch.ops.tensornet_openmm.radial_table(
                vec, table, a, alpha, c, inv_h, lower, upper
            )
        return interpolate(vec, table, a, alpha, c, inv_h, lower, upper)


def wanted() -> bool:
    """The default of ``create_force(fused_kernels=None)``: on, unless
    ``TENSORNET_OPENMM_FUSED=0``. On a machine with a CUDA device they include the CUDA kernels
    where the CUDA compiler is found (see :func:`load`)."""
    return not disabled()


def description() -> str:
    """Which fused kernels this process has loaded, for logs: "fused CPU and CUDA kernels",
    "fused CPU kernels" or "" (none)."""
    if not available():
        return ""
    return "fused CPU and CUDA kernels" if cuda_available() else "fused CPU kernels"


def jit_load(source: str | Path | bytes) -> torch.jit.ScriptModule:
    """``torch.jit.load`` that first loads the fused kernels if the module calls them."""

    def read():
        return torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source))

    try:
        return read()
    except RuntimeError as error:
        if "tensornet_openmm::" not in str(error):
            raise
        if not load():
            raise RuntimeError(
                "this TorchScript module was made with tensornet_openmm's fused CPU kernels, which "
                "cannot be built or loaded here (see the warning above; or "
                f"{ENVIRONMENT_SWITCH}=0 is set): make it again without them, with "
                "create_force(..., fused_kernels=False) / create_ml_system(..., "
                "fused_kernels=False) for a System, or tensornet-openmm export without "
                "--fused-kernels for a file"
            ) from error
        return read()


def use_fused_kernels(model: nn.Module, enabled: bool = True) -> bool:
    """Switch ``model``'s TensorNet layers (in place) to the fused CPU kernels, building them if
    needed; True when they are in use. ``enabled=False`` switches back to PyTorch."""
    fused = enabled and load()
    reference = next(iter(model.parameters()), None)
    for module in model.modules():
        if hasattr(module, "pair_kernels"):
            dtype = torch.float32 if reference is None else reference.dtype
            kernels = FusedPairKernels(dtype) if fused else PairKernels(dtype)
            if reference is not None:
                kernels.to(device=reference.device)
            module.pair_kernels = kernels
    return fused
