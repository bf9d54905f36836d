"""State of power: the largest constant charge and discharge current (and power) a cell can
take for the next 10 s or 30 s, from the 2-RC model, vectorised over cells.

For a constant current ``I`` held from now for ``H = N * dt`` seconds the model gives, at
every step ``j = 0..N`` (``j = 0``: the instant the current is applied),

    soc_j = soc_0 - I * j * dt / (3600 Q)
    v_j   = OCV(soc_j, T) - I * R0_j * r0_scale - v1_j - v2_j
    v1_{j+1} = a1_j * v1_j + R1_j * (1 - a1_j) * I,     a1_j = exp(-dt / tau1_j)

with every parameter looked up at ``(soc_j, T)`` (temperature held over the horizon). The
discharge limit is the largest ``I >= 0`` such that, over the whole horizon,

* ``v_j >= v_min`` for every ``j`` (not only the last step: a cell relaxing from a heavier
  load can be at its lowest voltage at ``j = 0``),
* ``soc_N >= soc_min``,
* ``I <= i_discharge_max_a * derating(T)``;

the charge limit likewise with ``v_j <= v_max``, ``soc_N <= soc_max`` and the charge
current limit. Every ``v_j`` falls monotonically with a larger discharge current, so the
voltage limit is found by bracketed false position (vectorised over cells); the
SOC-dependent parameters along the path are refreshed by a short fixed-point iteration.
Power is ``I * v_N``.

Currents and powers are returned as non-negative magnitudes in both directions (the
field name says which), so ``i_charge_a = 3`` means a 3 A charge (a current of -3 A).

A series string (:func:`pack_power_limits`) takes its weakest cell's current; its power
is that current times the sum of every cell's end voltage *at that current*.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from edge_bms.cell import CellModel, Limits
from edge_bms.errors import InputError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

HORIZONS_S = (10.0, 30.0)
# what bounds the limit: index into BINDING
BINDING = ("voltage", "soc", "current")
# root finding of the voltage limit: stop when the bracket is 1e-9 of the current (far
# below any sensor) or the feasible end's margin is under a nanovolt
_ROOT_XTOL = 1e-9
_ROOT_FTOL = 1e-9
_ROOT_ITERATIONS = 40  # bound only; typically 4-8 (bisection took 30 for this width)
_REFRESH = 2  # fixed-point refreshes of the SOC-dependent parameters along the path


@dataclass(frozen=True)
class Derating:
    """Current-limit factor vs temperature, piecewise linear, 0 outside the end points.

    Defaults for the LG M50 (datasheet: charge 0..45 degC, discharge -20..60 degC): the
    full charge current from 15 to 40 degC, ramping to zero at 0 and 45 degC (lithium
    plating at low temperature, ageing at high); the full discharge current from -10 to
    50 degC, ramping to zero at -20 and 60 degC.
    """

    charge_t_c: tuple[float, ...] = (0.0, 15.0, 40.0, 45.0)
    charge_factor: tuple[float, ...] = (0.0, 1.0, 1.0, 0.0)
    discharge_t_c: tuple[float, ...] = (-20.0, -10.0, 50.0, 60.0)
    discharge_factor: tuple[float, ...] = (0.0, 1.0, 1.0, 0.0)

    def __post_init__(self) -> None:
        for which in ("charge", "discharge"):
            t = np.asarray(getattr(self, f"{which}_t_c"), dtype=float)
            f = np.asarray(getattr(self, f"{which}_factor"), dtype=float)
            if t.shape != f.shape or t.size < 2:
                raise InputError(f"{which}_t_c and {which}_factor need the same length >= 2")
            if np.any(np.diff(t) <= 0):
                raise InputError(f"{which}_t_c must be strictly increasing, got {t.tolist()}")
            if np.any(f < 0) or np.any(f > 1):
                raise InputError(f"{which}_factor must be in [0, 1], got {f.tolist()}")

    def charge(self, temperature_c: npt.ArrayLike) -> FloatArray:
        t = np.asarray(temperature_c, dtype=float)
        out: FloatArray = np.interp(t, self.charge_t_c, self.charge_factor, left=0.0, right=0.0)
        return out

    def discharge(self, temperature_c: npt.ArrayLike) -> FloatArray:
        t = np.asarray(temperature_c, dtype=float)
        out: FloatArray = np.interp(
            t, self.discharge_t_c, self.discharge_factor, left=0.0, right=0.0
        )
        return out


NO_DERATING = Derating((-1e3, 1e3), (1.0, 1.0), (-1e3, 1e3), (1.0, 1.0))


class PowerLimits(NamedTuple):
    """Per-cell limits over one horizon (magnitudes, >= 0)."""

    horizon_s: float
    i_discharge_a: FloatArray
    i_charge_a: FloatArray
    p_discharge_w: FloatArray
    p_charge_w: FloatArray
    v_discharge_end: FloatArray  # terminal voltage at the end of the horizon at the limit
    v_charge_end: FloatArray
    bound_discharge: IntArray  # index into BINDING
    bound_charge: IntArray


class PackPowerLimits(NamedTuple):
    """A series string's limits over one horizon (magnitudes, >= 0)."""

    horizon_s: float
    i_discharge_a: float
    i_charge_a: float
    p_discharge_w: float
    p_charge_w: float
    weakest_discharge: int  # the cell whose limit is the string's
    weakest_charge: int
    cells: PowerLimits


@dataclass
class _Inputs:
    soc: FloatArray
    t: FloatArray
    v1: FloatArray
    v2: FloatArray
    r0_scale: FloatArray
    cap: FloatArray
    n: int


def _inputs(
    cell: CellModel,
    soc: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    v1: npt.ArrayLike,
    v2: npt.ArrayLike,
    r0_scale: npt.ArrayLike,
    capacity_ah: npt.ArrayLike | None,
) -> _Inputs:
    s = np.atleast_1d(np.asarray(soc, dtype=float))
    cap = cell.capacity_ah if capacity_ah is None else capacity_ah
    named = {
        "temperature_c": temperature_c,
        "v1": v1,
        "v2": v2,
        "r0_scale": r0_scale,
        "capacity_ah": cap,
    }
    try:
        arrays = np.broadcast_arrays(s, *(np.asarray(v, dtype=float) for v in named.values()))
    except ValueError as exc:
        shapes = {k: list(np.shape(v)) for k, v in named.items()}
        raise InputError(
            f"inputs do not broadcast to soc's shape {list(s.shape)}: {shapes}"
        ) from exc
    if arrays[0].ndim != 1:
        raise InputError(f"soc must be one value per cell (1-D), got shape {list(s.shape)}")
    for (name, _), a in zip((("soc", s), *named.items()), arrays, strict=True):
        if not np.all(np.isfinite(a)):
            raise InputError(f"{name} holds a non-finite value")
    if np.any(arrays[4] <= 0) or np.any(arrays[5] <= 0):
        raise InputError("r0_scale and capacity_ah must be > 0")
    s1, t1, v11, v21, r01, cap1 = (np.array(a, dtype=float) for a in arrays)
    return _Inputs(s1, t1, v11, v21, r01, cap1, n=s1.size)


def _along(cell: CellModel, rows: FloatArray, soc: FloatArray) -> FloatArray:
    """Per-cell rows ([n, n_soc] or [n, n_soc, k]) at ``soc`` ([n, m]), clamped to the
    grid (as lookup): [n, m] or [n, m, k]."""
    g = cell.soc
    sc = np.clip(soc, g[0], g[-1])
    i = cell.soc_segment(sc)
    w = (sc - g[i]) / (g[i + 1] - g[i])
    # flat indexing: a row offset per cell instead of take_along_axis (its index
    # bookkeeping cost more than the arithmetic at these sizes)
    n, n_soc = rows.shape[:2]
    flat = rows.reshape(n * n_soc, *rows.shape[2:])
    k = i + (np.arange(n) * n_soc)[:, None]
    lo = flat[k]
    if rows.ndim == 3:
        w = w[..., None]
    out: FloatArray = lo + (flat[k + 1] - lo) * w
    return out


class _Path(NamedTuple):
    """Linear-in-current pieces of v_j along a fixed parameter path ([n, N+1] each)."""

    r_eff: FloatArray  # v_j = OCV(soc_j) - I * r_eff_j - free_j
    free: FloatArray


def _path(
    cell: CellModel, x: _Inputs, rows: FloatArray, i_signed: FloatArray, n_steps: int, dt: float
) -> _Path:
    """Parameters looked up along the SOC path of ``i_signed`` and folded into the
    effective resistance and free response of each step."""
    j = np.arange(n_steps + 1)
    soc = x.soc[:, None] - i_signed[:, None] * j * dt / (3600.0 * x.cap[:, None])
    p = _along(cell, rows, soc)  # [n, N+1, 6]: ocv, r0, r1, tau1, r2, tau2
    r0, r1, r2 = p[..., 1], p[..., 2], p[..., 4]
    a1 = np.exp(-dt / p[..., 3])
    a2 = np.exp(-dt / p[..., 5])
    r_eff = np.empty_like(soc)
    free = np.empty_like(soc)
    # v1_j = A1_j * v1_0 + B1_j * I: the recursion over the horizon's steps (not cells)
    a1c = np.ones(x.n)
    b1c = np.zeros(x.n)
    a2c = np.ones(x.n)
    b2c = np.zeros(x.n)
    for k in range(n_steps + 1):
        r_eff[:, k] = r0[:, k] * x.r0_scale + b1c + b2c
        free[:, k] = a1c * x.v1 + a2c * x.v2
        a1c, b1c = a1[:, k] * a1c, a1[:, k] * b1c + r1[:, k] * (1 - a1[:, k])
        a2c, b2c = a2[:, k] * a2c, a2[:, k] * b2c + r2[:, k] * (1 - a2[:, k])
    return _Path(r_eff, free)


def simulate_constant_current(
    cell: CellModel,
    soc: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    current_a: npt.ArrayLike,
    horizon_s: float,
    *,
    v1: npt.ArrayLike = 0.0,
    v2: npt.ArrayLike = 0.0,
    r0_scale: npt.ArrayLike = 1.0,
    capacity_ah: npt.ArrayLike | None = None,
    dt_s: float = 1.0,
) -> FloatArray:
    """Terminal voltage [n, N+1] of each cell under a constant (signed) current."""
    x = _inputs(cell, soc, temperature_c, v1, v2, r0_scale, capacity_ah)
    n_steps = _steps(horizon_s, dt_s)
    i = np.broadcast_to(np.asarray(current_a, dtype=float), (x.n,)).copy()
    return _simulate(cell, x, cell.rows_at(x.t), i, n_steps, dt_s)


def _simulate(
    cell: CellModel, x: _Inputs, rows: FloatArray, i: FloatArray, n_steps: int, dt_s: float
) -> FloatArray:
    path = _path(cell, x, rows, i, n_steps, dt_s)
    soc_j = x.soc[:, None] - i[:, None] * np.arange(n_steps + 1) * dt_s / (3600 * x.cap[:, None])
    v: FloatArray = _along(cell, rows[..., 0], soc_j) - i[:, None] * path.r_eff - path.free
    return v


def _steps(horizon_s: float, dt_s: float) -> int:
    if not (horizon_s > 0 and dt_s > 0):
        raise InputError(f"horizon_s ({horizon_s}) and dt_s ({dt_s}) must be > 0")
    n = round(horizon_s / dt_s)
    if n < 1 or abs(n * dt_s - horizon_s) > 1e-9 * horizon_s:
        raise InputError(f"horizon_s ({horizon_s}) must be a multiple of dt_s ({dt_s})")
    return int(n)


def _direction(
    cell: CellModel,
    x: _Inputs,
    rows: FloatArray,
    sign: float,
    i_cap: FloatArray,
    v_lim: float,
    n_steps: int,
    dt: float,
) -> tuple[FloatArray, FloatArray, IntArray, FloatArray]:
    """Largest magnitude I <= i_cap keeping sign*(v_j - v_lim) >= 0 for all j."""
    j = np.arange(n_steps + 1)
    c = j * dt / (3600.0 * x.cap[:, None])  # SOC moved per ampere at step j
    ocv = np.ascontiguousarray(rows[..., 0])

    def margin(i_mag: FloatArray, path: _Path) -> FloatArray:
        i_s = sign * i_mag
        v = _along(cell, ocv, x.soc[:, None] - i_s[:, None] * c)
        v = v - i_s[:, None] * path.r_eff - path.free
        worst: FloatArray = (sign * (v - v_lim)).min(axis=1)
        return worst

    i_est = np.zeros(x.n)
    bound = np.full(x.n, BINDING.index("voltage"), dtype=np.int64)
    for _ in range(_REFRESH):
        path = _path(cell, x, rows, sign * i_est, n_steps, dt)
        lo = np.zeros(x.n)
        hi = i_cap.copy()
        m_hi = margin(hi, path)
        m_lo = margin(lo, path)
        ok_hi = m_hi >= 0
        ok_lo = m_lo >= 0
        lo = _root(functools.partial(margin, path=path), lo, hi, m_lo, m_hi, ok_lo & ~ok_hi)
        i_est = np.where(ok_hi, i_cap, np.where(ok_lo, lo, 0.0))
        bound = np.where(ok_hi, -1, BINDING.index("voltage"))
    path = _path(cell, x, rows, sign * i_est, n_steps, dt)
    v_end = _along(cell, ocv, x.soc[:, None] - sign * i_est[:, None] * c[:, -1:])[:, 0]
    v_end = v_end - sign * i_est * path.r_eff[:, -1] - path.free[:, -1]
    return i_est, v_end, bound, i_est * v_end


def _root(
    f: Callable[[FloatArray], FloatArray],
    lo: FloatArray,
    hi: FloatArray,
    f_lo: FloatArray,
    f_hi: FloatArray,
    active: npt.NDArray[np.bool_],
) -> FloatArray:
    """Largest x in [lo, hi] with f(x) >= 0, for a non-increasing f with f(lo) >= 0 > f(hi)
    where ``active`` (elsewhere ``lo`` comes back unchanged).

    Illinois false position, bracketed: the margin is piecewise linear in the current
    (linear OCV segments), so false position lands on the root of the segment holding it
    in a few steps where bisection needs ~30 to reach the same width; halving the stale
    end's value (Illinois) keeps one end from sticking. Returns the feasible end, so a
    limit is never above the true one.
    """
    lo, hi, f_lo, f_hi = lo.copy(), hi.copy(), f_lo.copy(), f_hi.copy()
    f_lo_true = f_lo.copy()
    side = np.zeros(lo.shape, dtype=np.int8)  # +1: lo moved last, -1: hi moved last
    tol = _ROOT_XTOL * np.maximum(np.abs(hi), 1.0)
    for _ in range(_ROOT_ITERATIONS):
        active = active & (hi - lo > tol) & (f_lo_true > _ROOT_FTOL)
        if not active.any():
            break
        x = lo + f_lo * (hi - lo) / np.where(active, f_lo - f_hi, 1.0)
        x = np.where((x > lo) & (x < hi), x, 0.5 * (lo + hi))
        fx = f(x)
        up = active & (fx >= 0)  # x is feasible: it becomes lo
        down = active & (fx < 0)
        f_hi = np.where(up & (side == 1), 0.5 * f_hi, f_hi)
        f_lo = np.where(down & (side == -1), 0.5 * f_lo, f_lo)
        lo = np.where(up, x, lo)
        f_lo = np.where(up, fx, f_lo)
        f_lo_true = np.where(up, fx, f_lo_true)
        hi = np.where(down, x, hi)
        f_hi = np.where(down, fx, f_hi)
        side = np.where(up, 1, np.where(down, -1, side)).astype(np.int8)
    return lo


def cell_power_limits(
    cell: CellModel,
    soc: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    horizon_s: float,
    *,
    v1: npt.ArrayLike = 0.0,
    v2: npt.ArrayLike = 0.0,
    r0_scale: npt.ArrayLike = 1.0,
    capacity_ah: npt.ArrayLike | None = None,
    limits: Limits | None = None,
    derating: Derating = Derating(),
    dt_s: float = 1.0,
) -> PowerLimits:
    """Charge and discharge current/power limits of each cell over ``horizon_s``.

    ``soc``, ``v1``, ``v2`` (RC branch voltages, V) are the filter's state; ``r0_scale`` and
    ``capacity_ah`` are SOH's (R0 of the table times the scale; the cell's capacity when
    None). ``limits`` defaults to the cell's.
    """
    x = _inputs(cell, soc, temperature_c, v1, v2, r0_scale, capacity_ah)
    return _cell_limits(cell, x, cell.rows_at(x.t), horizon_s, limits, derating, dt_s)


def _cell_limits(
    cell: CellModel,
    x: _Inputs,
    rows: FloatArray,
    horizon_s: float,
    limits: Limits | None,
    derating: Derating,
    dt_s: float,
) -> PowerLimits:
    lim = cell.limits if limits is None else limits
    n_steps = _steps(horizon_s, dt_s)
    per_amp = horizon_s / (3600.0 * x.cap)  # SOC moved per ampere over the horizon
    out: dict[str, tuple[FloatArray, FloatArray, IntArray, FloatArray]] = {}
    for name, sign, i_max, soc_room, v_lim in (
        (
            "discharge",
            1.0,
            lim.i_discharge_max_a * derating.discharge(x.t),
            x.soc - lim.soc_min,
            lim.v_min,
        ),
        ("charge", -1.0, lim.i_charge_max_a * derating.charge(x.t), lim.soc_max - x.soc, lim.v_max),
    ):
        i_soc = np.maximum(soc_room, 0.0) / per_amp
        i_cap = np.minimum(i_max, i_soc)
        cap_bound = np.where(i_soc < i_max, BINDING.index("soc"), BINDING.index("current"))
        i, v_end, bound, p = _direction(cell, x, rows, sign, i_cap, v_lim, n_steps, dt_s)
        out[name] = (i, v_end, np.where(bound < 0, cap_bound, bound).astype(np.int64), p)
    d, c = out["discharge"], out["charge"]
    return PowerLimits(float(horizon_s), d[0], c[0], d[3], c[3], d[1], c[1], d[2], c[2])


def power_limits(
    cell: CellModel,
    soc: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    *,
    horizons_s: tuple[float, ...] = HORIZONS_S,
    v1: npt.ArrayLike = 0.0,
    v2: npt.ArrayLike = 0.0,
    r0_scale: npt.ArrayLike = 1.0,
    capacity_ah: npt.ArrayLike | None = None,
    limits: Limits | None = None,
    derating: Derating = Derating(),
    dt_s: float = 1.0,
) -> dict[float, PowerLimits]:
    """:func:`cell_power_limits` for each horizon (10 s and 30 s by default)."""
    return {
        h: cell_power_limits(
            cell,
            soc,
            temperature_c,
            h,
            v1=v1,
            v2=v2,
            r0_scale=r0_scale,
            capacity_ah=capacity_ah,
            limits=limits,
            derating=derating,
            dt_s=dt_s,
        )
        for h in horizons_s
    }


def pack_power_limits(
    cell: CellModel,
    soc: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    horizon_s: float,
    *,
    v1: npt.ArrayLike = 0.0,
    v2: npt.ArrayLike = 0.0,
    r0_scale: npt.ArrayLike = 1.0,
    capacity_ah: npt.ArrayLike | None = None,
    limits: Limits | None = None,
    derating: Derating = Derating(),
    dt_s: float = 1.0,
) -> PackPowerLimits:
    """Limits of a series string of the given cells: the weakest cell's current, and the
    power it gives summed over every cell's end voltage at that current."""
    x = _inputs(cell, soc, temperature_c, v1, v2, r0_scale, capacity_ah)
    rows = cell.rows_at(x.t)
    cells = _cell_limits(cell, x, rows, horizon_s, limits, derating, dt_s)
    wd = int(np.argmin(cells.i_discharge_a))
    wc = int(np.argmin(cells.i_charge_a))
    i_d = float(cells.i_discharge_a[wd])
    i_c = float(cells.i_charge_a[wc])
    n_steps = _steps(horizon_s, dt_s)
    v_d, v_c = (
        _simulate(cell, x, rows, np.full(x.n, i), n_steps, dt_s)[:, -1] for i in (i_d, -i_c)
    )
    return PackPowerLimits(
        float(horizon_s),
        i_d,
        i_c,
        i_d * float(v_d.sum()),
        i_c * float(v_c.sum()),
        wd,
        wc,
        cells,
    )
