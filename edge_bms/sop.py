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
voltage limit is found by bisection (vectorised over cells); the SOC-dependent parameters
along the path are refreshed by a short fixed-point iteration. Power is ``I * v_N``.

Currents and powers are returned as non-negative magnitudes in both directions (the
field name says which), so ``i_charge_a = 3`` means a 3 A charge (a current of -3 A).

A series string (:func:`pack_power_limits`) takes its weakest cell's current; its power
is that current times the sum of every cell's end voltage *at that current*.
"""

from __future__ import annotations

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
_BISECTIONS = 30  # the bracket shrinks to 1e-9 of its width: far below any sensor
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


def _ocv_rows(cell: CellModel, t: FloatArray) -> FloatArray:
    """OCV over the SOC grid at each cell's temperature: [n, n_soc] (linear in T, clamped)."""
    ocv = cell.tables[..., 0]
    gt = cell.temperature_c
    if gt.size == 1:
        return np.broadcast_to(ocv[0], (t.size, ocv.shape[1])).copy()
    tc = np.clip(t, gt[0], gt[-1])
    j = np.clip(np.searchsorted(gt, tc, side="right") - 1, 0, gt.size - 2)
    w = ((tc - gt[j]) / (gt[j + 1] - gt[j]))[:, None]
    rows: FloatArray = ocv[j] * (1 - w) + ocv[j + 1] * w
    return rows


def _ocv_at(cell: CellModel, rows: FloatArray, soc: FloatArray) -> FloatArray:
    """Per-cell OCV rows ([n, n_soc]) at ``soc`` ([n, m]), clamped to the grid (as lookup)."""
    g = cell.soc
    sc = np.clip(soc, g[0], g[-1])
    i = np.clip(np.searchsorted(g, sc, side="right") - 1, 0, g.size - 2)
    w = (sc - g[i]) / (g[i + 1] - g[i])
    lo = np.take_along_axis(rows, i, axis=1)
    hi = np.take_along_axis(rows, i + 1, axis=1)
    out: FloatArray = lo + (hi - lo) * w
    return out


class _Path(NamedTuple):
    """Linear-in-current pieces of v_j along a fixed parameter path ([n, N+1] each)."""

    r_eff: FloatArray  # v_j = OCV(soc_j) - I * r_eff_j - free_j
    free: FloatArray


def _path(cell: CellModel, x: _Inputs, i_signed: FloatArray, n_steps: int, dt: float) -> _Path:
    """Parameters looked up along the SOC path of ``i_signed`` and folded into the
    effective resistance and free response of each step."""
    j = np.arange(n_steps + 1)
    soc = x.soc[:, None] - i_signed[:, None] * j * dt / (3600.0 * x.cap[:, None])
    p = cell.lookup(soc, x.t[:, None])
    a1 = np.exp(-dt / p.tau1)
    a2 = np.exp(-dt / p.tau2)
    r_eff = np.empty_like(soc)
    free = np.empty_like(soc)
    # v1_j = A1_j * v1_0 + B1_j * I: the recursion over the horizon's steps (not cells)
    a1c = np.ones(x.n)
    b1c = np.zeros(x.n)
    a2c = np.ones(x.n)
    b2c = np.zeros(x.n)
    for k in range(n_steps + 1):
        r_eff[:, k] = p.r0[:, k] * x.r0_scale + b1c + b2c
        free[:, k] = a1c * x.v1 + a2c * x.v2
        a1c, b1c = a1[:, k] * a1c, a1[:, k] * b1c + p.r1[:, k] * (1 - a1[:, k])
        a2c, b2c = a2[:, k] * a2c, a2[:, k] * b2c + p.r2[:, k] * (1 - a2[:, k])
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
    path = _path(cell, x, i, n_steps, dt_s)
    soc_j = x.soc[:, None] - i[:, None] * np.arange(n_steps + 1) * dt_s / (3600 * x.cap[:, None])
    v: FloatArray = _ocv_at(cell, _ocv_rows(cell, x.t), soc_j) - i[:, None] * path.r_eff - path.free
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

    def margin(i_mag: FloatArray, path: _Path) -> FloatArray:
        i_s = sign * i_mag
        v = _ocv_at(cell, rows, x.soc[:, None] - i_s[:, None] * c)
        v = v - i_s[:, None] * path.r_eff - path.free
        worst: FloatArray = (sign * (v - v_lim)).min(axis=1)
        return worst

    i_est = np.zeros(x.n)
    bound = np.full(x.n, BINDING.index("voltage"), dtype=np.int64)
    for _ in range(_REFRESH):
        path = _path(cell, x, sign * i_est, n_steps, dt)
        lo = np.zeros(x.n)
        hi = i_cap.copy()
        ok_hi = margin(hi, path) >= 0
        ok_lo = margin(lo, path) >= 0
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            ok = margin(mid, path) >= 0
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        i_est = np.where(ok_hi, i_cap, np.where(ok_lo, lo, 0.0))
        bound = np.where(ok_hi, -1, BINDING.index("voltage"))
    path = _path(cell, x, sign * i_est, n_steps, dt)
    v_end = _ocv_at(cell, rows, x.soc[:, None] - sign * i_est[:, None] * c[:, -1:])[:, 0]
    v_end = v_end - sign * i_est * path.r_eff[:, -1] - path.free[:, -1]
    return i_est, v_end, bound, i_est * v_end


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
    lim = cell.limits if limits is None else limits
    x = _inputs(cell, soc, temperature_c, v1, v2, r0_scale, capacity_ah)
    n_steps = _steps(horizon_s, dt_s)
    rows = _ocv_rows(cell, x.t)
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
    cells = cell_power_limits(
        cell,
        soc,
        temperature_c,
        horizon_s,
        v1=v1,
        v2=v2,
        r0_scale=r0_scale,
        capacity_ah=capacity_ah,
        limits=limits,
        derating=derating,
        dt_s=dt_s,
    )
    wd = int(np.argmin(cells.i_discharge_a))
    wc = int(np.argmin(cells.i_charge_a))
    i_d = float(cells.i_discharge_a[wd])
    i_c = float(cells.i_charge_a[wc])
    v_d, v_c = (
        simulate_constant_current(
            cell,
            soc,
            temperature_c,
            i,
            horizon_s,
            v1=v1,
            v2=v2,
            r0_scale=r0_scale,
            capacity_ah=capacity_ah,
            dt_s=dt_s,
        )[:, -1]
        for i in (i_d, -i_c)
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
