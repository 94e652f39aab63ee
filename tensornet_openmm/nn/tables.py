"""Radial functions as tables: a faster, approximate TensorNet for MD.

Every pair's radial functions, the embedding's distance projection and each interaction layer's
filter network, depend on the pair distance r alone: a layer's filters are
act(L3(act(L2(act(L1(basis(r))))))) x cut(r), three matrix products per pair (135,000
multiply-adds at 128 channels, and as many again for the forces), a third of a small molecule's
force call on the CPU. Tabulated once, they cost four multiply-adds per value, eight for the
forces.

:func:`tabulate_radial` samples each function g (without the cosine cutoff, which stays exact)
in float64 at knots evenly spaced in

    v(r) = a (1 - exp(-alpha r)) + c r

(for the exp-normal basis a = 1, alpha the basis' alpha, c = 0.03 alpha: fine steps at short
range, where the basis functions are narrow, and still a fair density near the cutoff; for the
Gaussian basis, evenly in r), with the derivative dg/dv at each knot, and stores the cubic
Hermite polynomial of each interval as its four coefficients (knot values would do with half
the memory, but float32 rounds the derivative made from them, a difference of nearly equal
numbers, to a few 1e-6). It doubles the intervals until the values and the derivatives dg/dr,
at five points inside every interval, are within ``tolerance`` of the exact ones, relative to
the largest value (or derivative) of that function. About 1,000 intervals reach 1e-6 for a
5 A, 32-function model; a table then takes 6 MB at 128 channels in float32.

The result is no longer the reference's arithmetic to the last digit: at the default tolerance
the forces differ from the exact model's by less than float32 rounding moves them (alanine
dipeptide: 5e-7 relative, against 3e-6 for float32; see ``tests/test_tables.py`` and the README,
"Radial tables"). It is opt-in
(``create_force(..., radial_tables=True)``). The layers read a table wherever the model passes
them the pair vectors (``TensorNet.forward`` and ``energy_and_gradient``, with or without the
fused kernels); training never makes tables.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .radial import cosine_cutoff

DEFAULT_TOLERANCE = 1e-6
"""Relative error of the tabulated values and derivatives that :func:`tabulate_radial` accepts."""
FIRST_INTERVALS = 256
MAX_INTERVALS = 1 << 15
_TEST_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)  # within each interval
_CHUNK = 1024  # distances evaluated at once


@dataclass(frozen=True)
class TableReport:
    """What :func:`tabulate_radial` made for one radial function."""

    name: str
    intervals: int
    value_error: float
    derivative_error: float
    megabytes: float


def grid_parameters(model: nn.Module) -> tuple[float, float, float]:
    """(a, alpha, c) of the knot variable v(r) = a (1 - exp(-alpha r)) + c r for ``model``'s
    radial basis."""
    kind, _, _, alpha, _ = model.distance_expansion.fused_parameters()
    if kind == 0:  # exp-normal: narrow in r at short range, wide near the cutoff
        return 1.0, float(alpha), 0.03 * float(alpha)
    return 0.0, 0.0, 1.0  # Gaussian: evenly spaced, equal widths


def knot_variable(r: Tensor, a: float, alpha: float, c: float) -> Tensor:
    """v(r) = a (1 - exp(-alpha r)) + c r."""
    return a * (1.0 - torch.exp(-alpha * r)) + c * r


def interpolate(
    vec: Tensor,
    table: Tensor,
    a: float,
    alpha: float,
    c: float,
    inv_h: float,
    lower: float,
    upper: float,
) -> Tensor:
    """cut(r) g(r) of pair vectors ``vec`` (P, 3) from ``table`` (intervals, 4, width): the
    ``radial_table`` kernel's arithmetic in PyTorch (differentiable)."""
    r = torch.sqrt((vec * vec).sum(1))
    x = knot_variable(r, a, alpha, c) * inv_h  # in intervals
    k = torch.clamp(torch.floor(x.detach()), 0.0, float(table.shape[0] - 1))
    u = torch.clamp(x - k, 0.0, 1.0).unsqueeze(1)
    coefficients = table.index_select(0, k.to(torch.long))  # (P, 4, width)
    g = coefficients[:, 0] + u * (
        coefficients[:, 1] + u * (coefficients[:, 2] + u * coefficients[:, 3])
    )
    return g * cosine_cutoff(r, lower, upper).unsqueeze(1)


def _invert(v: Tensor, a: float, alpha: float, c: float, upper: float) -> Tensor:
    """r with v(r) = ``v`` on [0, upper] (bisection, float64, to the last bit)."""
    lo, hi = torch.zeros_like(v), torch.full_like(v, upper)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = knot_variable(mid, a, alpha, c) > v
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _radial_functions(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """(name, module, g) for each radial function: g maps distances r (P,) to the module's
    filters without the cutoff, (P, width)."""
    basis = model.distance_expansion

    def embedding(r: Tensor) -> Tensor:
        return model.tensor_embedding._project(basis(r)).reshape(r.shape[0], -1)

    functions = [("tensor_embedding", model.tensor_embedding, embedding)]
    for index, layer in enumerate(model.layers):

        def filters(r: Tensor, layer: nn.Module = layer) -> Tensor:
            return layer._network(torch.ones_like(r), basis(r)).reshape(r.shape[0], -1)

        functions.append((f"layers.{index}", layer, filters))
    return functions


def _with_cutoff(g, lower: float, upper: float):
    return lambda r: g(r) * cosine_cutoff(r, lower, upper).unsqueeze(1)


def _spacing(grid: tuple[float, float, float], upper: float, intervals: int) -> float:
    """h, the knots' spacing in v (float64: the knots must lie exactly where the kernels look)."""
    return float(knot_variable(torch.tensor(upper, dtype=torch.float64), *grid)) / intervals


def _with_slopes(f, r: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(r, f(r), df/dr) in chunks of ``r``: f maps each distance to its own row, and a chunk's
    activations stay small (a whole table's would take hundreds of MB)."""
    for part in r.split(_CHUNK):
        value, slope = torch.func.jvp(f, (part,), (torch.ones_like(part),))
        yield part, value.detach(), slope.detach()


def _build(g, grid: tuple[float, float, float], upper: float, intervals: int) -> Tensor:
    """The cubic of each interval (intervals, 4, width), float64: the Hermite cubic through the
    values and derivatives of g at the interval's ends, as coefficients of powers of u."""
    a, alpha, c = grid
    h = _spacing(grid, upper, intervals)
    v = torch.arange(intervals + 1, dtype=torch.float64) * h
    values, slopes = [], []
    for r, value, slope in _with_slopes(g, _invert(v, a, alpha, c, upper)):
        values.append(value)
        slopes.append(h * slope / (a * alpha * torch.exp(-alpha * r) + c).unsqueeze(1))  # dg/du
    value, m = torch.cat(values), torch.cat(slopes)
    g0, g1, m0, m1 = value[:-1], value[1:], m[:-1], m[1:]
    rise = g1 - g0
    return torch.stack((g0, m0, 3.0 * rise - 2.0 * m0 - m1, m0 + m1 - 2.0 * rise), dim=1)


def _errors(
    g, table: Tensor, grid: tuple[float, float, float], lower: float, upper: float
) -> tuple[float, float]:
    """Largest errors of cut(r) g(r) and of its derivative at points inside every interval,
    relative to the largest exact value and derivative."""
    a, alpha, c = grid
    intervals = table.shape[0]
    h = _spacing(grid, upper, intervals)
    offsets = torch.tensor(_TEST_POINTS, dtype=torch.float64)
    v = ((torch.arange(intervals, dtype=torch.float64).unsqueeze(1) + offsets) * h).reshape(-1)

    def tabulated(d: Tensor) -> Tensor:
        vec = torch.stack((d, torch.zeros_like(d), torch.zeros_like(d)), dim=1)
        return interpolate(vec, table, a, alpha, c, 1.0 / h, lower, upper)

    largest = torch.zeros(4, dtype=torch.float64)  # |value|, |slope|, value error, slope error
    r = _invert(v, a, alpha, c, upper)
    exact_parts = _with_slopes(_with_cutoff(g, lower, upper), r)
    for (_, value, slope), (_, t_value, t_slope) in zip(
        exact_parts, _with_slopes(tabulated, r), strict=True
    ):
        found = torch.stack(
            [x.abs().max() for x in (value, slope, t_value - value, t_slope - slope)]
        )
        largest = torch.maximum(largest, found)
    scale = largest[:2].clamp_min(1e-300)
    return float(largest[2] / scale[0]), float(largest[3] / scale[1])


def requested_tolerance(radial_tables: bool | float | None) -> float | None:
    """The tolerance that a ``radial_tables`` option asks for: None (off) for False, None or 0;
    :data:`DEFAULT_TOLERANCE` for True; else the number, which must lie in (0, 1)."""
    if radial_tables is None or radial_tables is False:
        return None
    if radial_tables is True:
        return DEFAULT_TOLERANCE
    try:
        tolerance = float(radial_tables)
    except (TypeError, ValueError):
        raise ValueError(
            f"radial_tables={radial_tables!r}: give true, false or a tolerance such as "
            f"{DEFAULT_TOLERANCE:g}"
        ) from None
    if tolerance == 0.0:
        return None
    if not (0.0 < tolerance < 1.0):
        raise ValueError(
            f"radial table tolerance {tolerance!r} must lie between 0 and 1 (a relative error; "
            f"the default is {DEFAULT_TOLERANCE:g})"
        )
    return tolerance


def tabulate_radial(model: nn.Module, tolerance: float = DEFAULT_TOLERANCE) -> list[TableReport]:
    """Give each radial function of ``model`` (a TensorNet, changed in place) a table that its
    layers read instead of running the network; returns what was made, per function.

    The model's weights must not change afterwards (the tables would not follow them): tabulate
    a copy that only runs MD, as :func:`tensornet_openmm.create_force` does.
    """
    tolerance = requested_tolerance(float(tolerance))
    if tolerance is None:
        raise ValueError("radial table tolerance 0: give a relative error between 0 and 1")
    reference = next(model.parameters())
    exact = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    grid = grid_parameters(exact)
    lower, upper = float(exact.cutoff_lower), float(exact.cutoff_upper)
    reports, tables = [], []
    with torch.no_grad():
        for name, _, g in _radial_functions(exact):
            intervals = FIRST_INTERVALS
            while True:
                table = _build(g, grid, upper, intervals)
                value_error, slope_error = _errors(g, table, grid, lower, upper)
                if max(value_error, slope_error) <= tolerance or intervals >= MAX_INTERVALS:
                    break
                intervals *= 2
            if max(value_error, slope_error) > tolerance:
                raise ValueError(
                    f"the radial functions of {name} cannot be tabulated to {tolerance:g} with "
                    f"{MAX_INTERVALS} intervals (reached {value_error:.2g} in the values, "
                    f"{slope_error:.2g} in the derivatives): ask for a larger tolerance, or run "
                    "without radial tables"
                )
            tables.append(table)
            size = table.numel() * reference.element_size() / 1e6
            reports.append(TableReport(name, intervals, value_error, slope_error, size))
    for (_, module, _), table in zip(_radial_functions(model), tables, strict=True):
        h = _spacing(grid, upper, table.shape[0])
        module.radial_table = table.to(device=reference.device, dtype=reference.dtype)
        module.table_grid = [grid[0], grid[1], grid[2], 1.0 / h]
    return reports


def untabulate(model: nn.Module) -> None:
    """Drop the tables of :func:`tabulate_radial` (in place): the networks run again."""
    for _, module, _ in _radial_functions(model):
        module.radial_table = module.radial_table.new_zeros((0, 4, 0))


def describe(reports: list[TableReport]) -> str:
    """One line for logs."""
    if not reports:
        return ""
    worst = max(max(r.value_error, r.derivative_error) for r in reports)
    size = sum(r.megabytes for r in reports)
    knots = "/".join(str(r.intervals) for r in reports)
    return f"radial tables: {knots} intervals, {size:.1f} MB, error {worst:.1g}"


__all__ = [
    "DEFAULT_TOLERANCE",
    "TableReport",
    "describe",
    "grid_parameters",
    "interpolate",
    "knot_variable",
    "requested_tolerance",
    "tabulate_radial",
    "untabulate",
]
