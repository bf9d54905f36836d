"""State of health online: R0 by recursive least squares, capacity by total least squares.

Both are batched over the cells of a pack (numpy arrays, no per-cell Python).

**R0.** At a current step the terminal voltage jumps by ``-R0 * dI`` before the RC branches
or the OCV can move, so ``-dV = r0_scale * R0_table(soc, T) * dI`` with one unknown, the
ageing factor ``r0_scale`` (temperature and SOC dependence come from the cell's table, so
a step at -10 degC and one at 25 degC estimate the same number). A scalar RLS with
forgetting ``lambda`` per cell, updated only at steps ``|dI| >= r0_min_step_a`` (forgetting
only at updates, so a pack at rest does not wind its covariance up). ``r0_ohm`` is the
scale times R0 at the reference point (50 % SOC, 25 degC unless given).

**Capacity.** Between two points where the filter's SOC is trusted (sigma below
``max_point_sigma``) at least ``min_delta_soc`` apart, ``x = soc_a - soc_b`` (the filter's
SOC change) and ``y = integral of I dt / 3600`` (ampere-hours, discharge positive) obey
``y = Q x`` with noise on *both*: the SOC estimates err by their sigma, the coulomb count by
the current sensor's noise. Ordinary or weighted least squares (which treat ``x`` as exact)
are then biased low (regression dilution: ``Q * var(x) / (var(x) + sigma_x^2)``); total least
squares is not. We use Plett's approximate weighted TLS (AWTLS, J. Power Sources 196 (2011)
2319), which has a recursive form with forgetting: six running sums per cell, and at each
update the real positive root of a quartic that minimises

    J(u) = [sum (y - u x / K)^2 / sy^2  +  u^2 sum (K y - u x)^2 / sx^2] / (1 + u^2)^2,
    u = K Q,   K^2 = typical sx^2 / sy^2

(exactly the weighted TLS cost ``sum (y - Q x)^2 / (sy^2 + Q^2 sx^2)`` when every point has
the ratio ``K``). The quartics of all cells are solved at once as eigenvalues of stacked
companion matrices. The sums are stored unscaled so ``K`` is taken from the data at solve
time. A WLS estimate from the same points is kept beside it (``capacity_ah_wls``) to show
the difference. The prior (nominal capacity, ``capacity_prior_sigma_ah``) enters as one
pseudo-point ``(x=1, y=Q_nom)``.

The caveat of any SOC-difference method: if the filter's SOC is mostly coulomb counting
with the capacity it was given, ``x`` carries that capacity back. Points should come from
where the voltage pins the SOC (rest, or a converged filter on a steep OCV region), which
is what the sigma gate selects. A filter's sigma can claim trust too early (right after an
OCV start, while the estimate still moves towards the truth), so a point whose own
capacity ``y / x`` is outside ``[capacity_min_factor, capacity_max_factor]`` times the
nominal (0.5 and 1.5) is dropped and its segment restarted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edge_bms.cell import CellModel
from edge_bms.errors import InputError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

STATE_FORMAT = "edge_bms.soh/1"
_SCALE_RANGE = (0.1, 20.0)  # r0_scale is clipped here: a sensor glitch must not run away


def _f(name: str, value: npt.ArrayLike, n: int, copy: bool = False) -> FloatArray:
    """``value`` as [n] float64, possibly the caller's array (the per-step inputs are only
    read); ``copy=True`` for what the estimator keeps."""
    a = np.asarray(value, dtype=float)
    if a.ndim == 0:
        return np.full(n, float(a))
    if a.shape != (n,):
        raise InputError(f"{name} must be a scalar or have {n} values, got shape {list(a.shape)}")
    return a.copy() if copy else a


# the state arrays, in state_dict order
_ARRAYS = (
    "r0_scale",
    "r0_var",
    "r0_updates",
    "prev_i",
    "prev_v",
    "q_awtls",
    "q_sigma",
    "q_wls",
    "q_wls_sigma",
    "s_x2_y",  # sum x^2 / sy^2
    "s_xy_y",  # sum x y / sy^2
    "s_y2_y",  # sum y^2 / sy^2
    "s_x2_x",  # sum x^2 / sx^2
    "s_xy_x",  # sum x y / sx^2
    "s_y2_x",  # sum y^2 / sx^2
    "s_vx",  # sum sx^2 (forgotten like the others), for K
    "s_vy",  # sum sy^2
    "prior_w",  # the prior's remaining weight (forgotten like the data)
    "n_points",
    "seg_soc",  # the segment's start point: SOC, its variance
    "seg_var",
    "seg_ah",  # ampere-hours and their variance since the start point
    "seg_ah_var",
)


class SohEstimator:
    """Online R0 scale and capacity of ``n_cells`` cells."""

    def __init__(
        self,
        n_cells: int,
        capacity_ah: npt.ArrayLike,
        *,
        r0_ref_ohm: npt.ArrayLike = 1.0,
        cell: CellModel | None = None,
        r0_forgetting: float = 0.95,
        r0_min_step_a: float = 0.5,
        r0_max_dt_s: float = 2.0,
        voltage_sigma_v: float = 0.002,
        r0_prior_sigma: float = 0.5,
        capacity_forgetting: float = 0.98,
        capacity_prior_sigma_ah: float | None = None,
        current_sigma_a: float = 0.02,
        min_delta_soc: float = 0.1,
        max_point_sigma: float = 0.02,
        capacity_min_factor: float = 0.5,
        capacity_max_factor: float = 1.5,
        r0_min_updates: int = 50,
        capacity_min_points: int = 1,
    ) -> None:
        if n_cells < 1:
            raise InputError(f"n_cells must be >= 1, got {n_cells}")
        for name, lam in (
            ("r0_forgetting", r0_forgetting),
            ("capacity_forgetting", capacity_forgetting),
        ):
            if not 0.5 < lam <= 1.0:
                raise InputError(f"{name} must be in (0.5, 1], got {lam}")
        self.n = n_cells
        self.cell = cell
        self.q_nominal = _f("capacity_ah", capacity_ah, n_cells, copy=True)
        if np.any(self.q_nominal <= 0):
            raise InputError("capacity_ah must be > 0")
        if cell is not None:
            r0_ref_ohm = float(cell.lookup(0.5, 25.0).r0)
        self.r0_ref = _f("r0_ref_ohm", r0_ref_ohm, n_cells, copy=True)
        self.options: dict[str, float] = {
            "r0_forgetting": r0_forgetting,
            "r0_min_step_a": r0_min_step_a,
            "r0_max_dt_s": r0_max_dt_s,
            "voltage_sigma_v": voltage_sigma_v,
            "r0_prior_sigma": r0_prior_sigma,
            "capacity_forgetting": capacity_forgetting,
            "capacity_prior_sigma_ah": (
                0.1 * float(self.q_nominal.mean())
                if capacity_prior_sigma_ah is None
                else capacity_prior_sigma_ah
            ),
            "current_sigma_a": current_sigma_a,
            "min_delta_soc": min_delta_soc,
            "max_point_sigma": max_point_sigma,
            "capacity_min_factor": capacity_min_factor,
            "capacity_max_factor": capacity_max_factor,
            "r0_min_updates": r0_min_updates,
            "capacity_min_points": capacity_min_points,
        }
        n = n_cells
        self.r0_scale = np.ones(n)
        self.r0_var = np.full(n, r0_prior_sigma**2)
        self.r0_updates = np.zeros(n)
        self.prev_i = np.full(n, np.nan)
        self.prev_v = np.full(n, np.nan)
        # capacity: data sums start empty; the prior (x = 1, y = Q_nom) is added at solve
        # time with the data's own sx/sy ratio K, so the AWTLS weights it exactly as
        # 1 / sigma_prior^2 (a prior with another ratio would be mis-weighted by the
        # approximation, and bias the estimate towards the nominal). It fades with the
        # same forgetting as the data.
        sq = self.options["capacity_prior_sigma_ah"]
        self.prior_w = np.ones(n)
        self.s_x2_y = np.zeros(n)
        self.s_xy_y = np.zeros(n)
        self.s_y2_y = np.zeros(n)
        self.s_x2_x = np.zeros(n)
        self.s_xy_x = np.zeros(n)
        self.s_y2_x = np.zeros(n)
        self.s_vx = np.zeros(n)
        self.s_vy = np.zeros(n)
        self.n_points = np.zeros(n)
        self.q_awtls = self.q_nominal.copy()
        self.q_sigma = np.full(n, sq)
        self.q_wls = self.q_nominal.copy()
        self.q_wls_sigma = np.full(n, sq)
        self.seg_soc = np.full(n, np.nan)
        self.seg_var = np.full(n, np.nan)
        self.seg_ah = np.zeros(n)
        self.seg_ah_var = np.zeros(n)
        # bumped whenever the capacity estimate may have changed, so a reader (the pack
        # estimator) re-reads capacity and sigma only then, not on every step
        self.capacity_version = 0

    # -- results ----------------------------------------------------------------------
    @property
    def capacity_ah(self) -> FloatArray:
        """AWTLS capacity estimate per cell (Ah)."""
        return self.q_awtls.copy()

    @property
    def capacity_sigma(self) -> FloatArray:
        """Its standard deviation (Ah), from the cost's curvature."""
        return self.q_sigma.copy()

    @property
    def capacity_ah_wls(self) -> FloatArray:
        """The weighted least squares estimate from the same points (x taken as exact)."""
        return self.q_wls.copy()

    @property
    def r0_ohm(self) -> FloatArray:
        """R0 at the reference point (Ohm): ``r0_scale * r0_ref_ohm``."""
        out: FloatArray = self.r0_scale * self.r0_ref
        return out

    @property
    def r0_scale_trusted(self) -> FloatArray:
        """``r0_scale`` where at least ``r0_min_updates`` current steps made it, else 1.

        What a filter should use. One step says little about ageing: the 1 s voltage
        jump mixes R0 with whatever the circuit misses at that point (the only step of a
        CC-CV charge, from rest at 10 % SOC and 10 degC, read 1.39x a fresh cell's R0 and,
        fed back, pulled that cell's SOC 3 points low). Many steps over a drive average
        those errors out."""
        out: FloatArray = np.where(
            self.r0_updates >= self.options["r0_min_updates"], self.r0_scale, 1.0
        )
        return out

    @property
    def capacity_ah_trusted(self) -> FloatArray:
        """``capacity_ah`` where at least ``capacity_min_points`` points made it, else the
        nominal capacity."""
        out: FloatArray = np.where(
            self.n_points >= self.options["capacity_min_points"], self.q_awtls, self.q_nominal
        )
        return out

    @property
    def capacity_sigma_trusted(self) -> FloatArray:
        """The standard deviation (Ah) of :attr:`capacity_ah_trusted`: ``capacity_sigma``
        where the estimate is used, else the prior's sigma around the nominal."""
        out: FloatArray = np.where(
            self.n_points >= self.options["capacity_min_points"],
            self.q_sigma,
            self.options["capacity_prior_sigma_ah"],
        )
        return out

    @property
    def r0_sigma(self) -> FloatArray:
        """Standard deviation of ``r0_scale``."""
        out: FloatArray = np.sqrt(self.r0_var)
        return out

    # -- R0 ---------------------------------------------------------------------------
    def update_r0(
        self,
        d_current_a: npt.ArrayLike,
        d_voltage_v: npt.ArrayLike,
        r0_table_ohm: npt.ArrayLike | None = None,
        mask: npt.ArrayLike | None = None,
    ) -> BoolArray:
        """One RLS step on each cell where ``|dI| >= r0_min_step_a`` (and ``mask``).

        ``r0_table_ohm`` is the table's R0 at each cell's (SOC, T), so the estimate is the
        ageing scale; without it, ``r0_ref_ohm``. Returns which cells were updated.
        """
        di = _f("d_current_a", d_current_a, self.n)
        dv = _f("d_voltage_v", d_voltage_v, self.n)
        r0t = self.r0_ref if r0_table_ohm is None else _f("r0_table_ohm", r0_table_ohm, self.n)
        use = np.isfinite(di) & np.isfinite(dv) & np.isfinite(r0t)
        use &= np.abs(np.where(np.isfinite(di), di, 0.0)) >= self.options["r0_min_step_a"]
        if mask is not None:
            use &= np.broadcast_to(np.asarray(mask, dtype=bool), (self.n,))
        if not use.any():
            return use
        lam = self.options["r0_forgetting"]
        sv = np.sqrt(2.0) * self.options["voltage_sigma_v"]  # dV: two noisy samples
        phi = np.where(use, di * r0t / sv, 0.0)
        y = np.where(use, -dv / sv, 0.0)
        e = y - phi * self.r0_scale
        gain = self.r0_var * phi / (lam + phi * phi * self.r0_var)
        scale = np.clip(self.r0_scale + gain * e, *_SCALE_RANGE)
        var = (1.0 - gain * phi) * self.r0_var / lam
        self.r0_scale = np.where(use, scale, self.r0_scale)
        self.r0_var = np.where(use, var, self.r0_var)
        self.r0_updates += use
        return use

    # -- capacity ---------------------------------------------------------------------
    def update_capacity(
        self,
        delta_soc: npt.ArrayLike,
        ah: npt.ArrayLike,
        var_delta_soc: npt.ArrayLike,
        var_ah: npt.ArrayLike,
        mask: npt.ArrayLike | None = None,
    ) -> BoolArray:
        """Add one (x, y) point per cell where ``mask`` (all when None): ``delta_soc`` =
        SOC at the start minus SOC at the end, ``ah`` = discharged Ah in between."""
        x = _f("delta_soc", delta_soc, self.n)
        y = _f("ah", ah, self.n)
        vx = _f("var_delta_soc", var_delta_soc, self.n)
        vy = _f("var_ah", var_ah, self.n)
        use = np.isfinite(x) & np.isfinite(y) & (vx > 0) & (vy > 0)
        if mask is not None:
            use &= np.broadcast_to(np.asarray(mask, dtype=bool), (self.n,))
        if not use.any():
            return use
        g = np.where(use, self.options["capacity_forgetting"], 1.0)
        x0 = np.where(use, x, 0.0)
        y0 = np.where(use, y, 0.0)
        vx1 = np.where(use, vx, 1.0)
        vy1 = np.where(use, vy, 1.0)
        self.s_x2_y = g * self.s_x2_y + x0 * x0 / vy1
        self.s_xy_y = g * self.s_xy_y + x0 * y0 / vy1
        self.s_y2_y = g * self.s_y2_y + y0 * y0 / vy1
        self.s_x2_x = g * self.s_x2_x + x0 * x0 / vx1
        self.s_xy_x = g * self.s_xy_x + x0 * y0 / vx1
        self.s_y2_x = g * self.s_y2_x + y0 * y0 / vx1
        self.s_vx = g * self.s_vx + np.where(use, vx, 0.0)
        self.s_vy = g * self.s_vy + np.where(use, vy, 0.0)
        # floored: after ~35000 points at 0.98 it would underflow to 0 (a division by 0)
        self.prior_w = np.maximum(g * self.prior_w, 1e-200)
        self.n_points += use
        self._solve()
        self.capacity_version += 1
        return use

    def _solve(self) -> None:
        have = self.s_vy > 0
        k2 = np.where(have, self.s_vx / np.where(have, self.s_vy, 1.0), 1.0 / self.q_nominal**2)
        # the prior point: weight 1 / (vy0 (1 + K^2 Q^2)) = prior_w / sigma^2 at Q_nom
        sq2 = self.options["capacity_prior_sigma_ah"] ** 2
        vy0 = sq2 * (1 + k2 * self.q_nominal**2) / self.prior_w
        vx0 = k2 * vy0
        q0 = self.q_nominal
        sums = (
            self.s_x2_y + 1 / vy0,
            self.s_xy_y + q0 / vy0,
            self.s_y2_y + q0**2 / vy0,
            self.s_x2_x + 1 / vx0,
            self.s_xy_x + q0 / vx0,
            self.s_y2_x + q0**2 / vx0,
        )
        # WLS: x exact, weights 1 / sy^2 (the prior as a plain measurement of Q)
        w_data = self.s_x2_y + self.prior_w / sq2
        self.q_wls = (self.s_xy_y + self.prior_w * q0 / sq2) / w_data
        self.q_wls_sigma = 1.0 / np.sqrt(w_data)
        q, sigma = awtls_solve(*sums, np.sqrt(k2), self.q_awtls)
        self.q_awtls = q
        self.q_sigma = sigma

    # -- the per-step driver --------------------------------------------------------------
    def update(
        self,
        current_a: npt.ArrayLike,
        voltage_v: npt.ArrayLike,
        dt_s: float,
        *,
        soc: npt.ArrayLike | None = None,
        soc_sigma: npt.ArrayLike | None = None,
        temperature_c: npt.ArrayLike | None = None,
        r0_table_ohm: npt.ArrayLike | None = None,
    ) -> None:
        """One measurement step of the pack.

        ``current_a`` (scalar for a series string), ``voltage_v`` per cell, ``dt_s`` since
        the previous step. With the filter's ``soc`` and ``soc_sigma``, capacity points are
        closed where the SOC is trusted and has moved ``min_delta_soc`` since the last one.
        R0 uses ``r0_table_ohm`` if given, else the cell model's table at ``soc`` and
        ``temperature_c`` if both and a cell were given, else ``r0_ref_ohm``.
        """
        i = _f("current_a", current_a, self.n)
        v = _f("voltage_v", voltage_v, self.n)
        if not (np.isfinite(dt_s) and dt_s > 0):
            raise InputError(f"dt_s must be > 0, got {dt_s}")
        if (
            r0_table_ohm is None
            and self.cell is not None
            and soc is not None
            and temperature_c is not None
        ):
            r0_table_ohm = self.cell.lookup(
                _f("soc", soc, self.n), _f("temperature_c", temperature_c, self.n)
            ).r0
        if dt_s <= self.options["r0_max_dt_s"]:
            self.update_r0(i - self.prev_i, v - self.prev_v, r0_table_ohm)
        self.prev_i = np.where(np.isfinite(i), i, np.nan)
        self.prev_v = np.where(np.isfinite(v), v, np.nan)

        # coulomb count of the open segment; the current's sample holds over dt (ZOH)
        ok_i = np.isfinite(i)
        self.seg_ah += np.where(ok_i, i, 0.0) * dt_s / 3600.0
        self.seg_ah_var += (self.options["current_sigma_a"] * dt_s / 3600.0) ** 2
        if soc is None or soc_sigma is None:
            return
        s = _f("soc", soc, self.n)
        sv = _f("soc_sigma", soc_sigma, self.n) ** 2
        trusted = np.isfinite(s) & np.isfinite(sv) & (sv <= self.options["max_point_sigma"] ** 2)
        started = np.isfinite(self.seg_soc)
        close = trusted & started & (np.abs(self.seg_soc - s) >= self.options["min_delta_soc"])
        if close.any():
            # A point whose own capacity (Ah / SOC change) is implausible comes from a SOC
            # that moved for another reason than charge (a filter still converging while
            # its sigma already claims trust): dropped, its segment restarted. Without
            # this gate one such point (0.83 Ah on a 4.1 Ah cell, the first point after an
            # OCV start at 0 degC, held-out udds_aged80_0C with an earlier lg-m50 model),
            # fed back into the filter, ran the capacity to +47 %.
            with np.errstate(divide="ignore", invalid="ignore"):
                q_point = self.seg_ah / (self.seg_soc - s)
            plausible = (q_point >= self.options["capacity_min_factor"] * self.q_nominal) & (
                q_point <= self.options["capacity_max_factor"] * self.q_nominal
            )
            self.update_capacity(
                self.seg_soc - s,
                self.seg_ah,
                self.seg_var + sv,
                self.seg_ah_var,
                close & plausible,
            )
        restart = close | (trusted & ~started)
        if not restart.any():  # the usual step: every segment stays open
            return
        self.seg_soc = np.where(restart, s, self.seg_soc)
        self.seg_var = np.where(restart, sv, self.seg_var)
        self.seg_ah = np.where(restart, 0.0, self.seg_ah)
        self.seg_ah_var = np.where(restart, 0.0, self.seg_ah_var)

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able (NaN written as null)."""
        return {
            "format": STATE_FORMAT,
            "n_cells": self.n,
            "capacity_nominal_ah": self.q_nominal.tolist(),
            "r0_ref_ohm": self.r0_ref.tolist(),
            "options": dict(self.options),
            "arrays": {
                k: [None if not np.isfinite(x) else float(x) for x in getattr(self, k)]
                for k in _ARRAYS
            },
        }

    @classmethod
    def from_state_dict(cls, data: dict[str, Any], cell: CellModel | None = None) -> SohEstimator:
        if data.get("format") != STATE_FORMAT:
            raise InputError(f"format must be {STATE_FORMAT!r}, got {data.get('format')!r}")
        try:
            n = int(data["n_cells"])
            opts = dict(data["options"])
            est = cls(
                n,
                data["capacity_nominal_ah"],
                r0_ref_ohm=data["r0_ref_ohm"],
                **opts,
            )
            est.cell = cell
            est.r0_ref = _f("r0_ref_ohm", data["r0_ref_ohm"], n, copy=True)
            for k in _ARRAYS:
                values = data["arrays"][k]
                a = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
                if a.shape != (n,):
                    raise InputError(f"arrays.{k} must have {n} values, got {a.size}")
                setattr(est, k, a)
        except (KeyError, TypeError) as exc:
            raise InputError(f"invalid SOH state: missing or malformed {exc}") from exc
        return est


def awtls_solve(
    s_x2_y: FloatArray,
    s_xy_y: FloatArray,
    s_y2_y: FloatArray,
    s_x2_x: FloatArray,
    s_xy_x: FloatArray,
    s_y2_x: FloatArray,
    k: FloatArray,
    fallback: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Minimise the AWTLS cost for every cell at once; returns (Q, sigma_Q).

    With ``u = K Q`` the sums scale as ``a1 = s_x2_y / K^2, a2 = s_xy_y / K, a3 = s_y2_y``,
    ``b1 = s_x2_x, b2 = K s_xy_x, b3 = K^2 s_y2_x``; the cost is
    ``N(u) / (1 + u^2)^2`` with ``N = b1 u^4 - 2 b2 u^3 + (a1 + b3) u^2 - 2 a2 u + a3`` and
    its stationary points are the roots of
    ``b2 u^4 + (2 b1 - a1 - b3) u^3 + 3 (a2 - b2) u^2 + (a1 + b3 - 2 a3) u - a2``.
    Cells with no real positive root keep ``fallback``.
    """
    a1 = s_x2_y / k**2
    a2 = s_xy_y / k
    a3 = s_y2_y
    b1 = s_x2_x
    b2 = k * s_xy_x
    b3 = k**2 * s_y2_x
    coef = np.stack([b2, 2 * b1 - a1 - b3, 3 * (a2 - b2), a1 + b3 - 2 * a3, -a2], axis=-1)
    n = coef.shape[0]
    lead = coef[:, 0]
    good = np.abs(lead) > 1e-300
    lead_safe = np.where(good, lead, 1.0)
    comp = np.zeros((n, 4, 4))
    comp[:, 0, :] = -coef[:, 1:] / lead_safe[:, None]
    comp[:, 1, 0] = comp[:, 2, 1] = comp[:, 3, 2] = 1.0
    roots = np.linalg.eigvals(comp)  # [n, 4]
    re = roots.real
    real = np.abs(roots.imag) <= 1e-9 * np.maximum(np.abs(re), 1e-12)
    cand = real & (re > 0) & good[:, None]

    def cost(u: FloatArray) -> FloatArray:
        num = (
            b1[:, None] * u**4
            - 2 * b2[:, None] * u**3
            + (a1 + b3)[:, None] * u**2
            - 2 * a2[:, None] * u
            + a3[:, None]
        )
        out: FloatArray = num / (1 + u**2) ** 2
        return out

    j = np.where(cand, cost(np.where(cand, re, 1.0)), np.inf)
    best = np.argmin(j, axis=1)
    u = np.take_along_axis(re, best[:, None], axis=1)[:, 0]
    found = np.isfinite(np.take_along_axis(j, best[:, None], axis=1)[:, 0])
    # curvature of J at u, by central differences on the exact rational cost
    h = 1e-4 * np.maximum(np.abs(u), 1e-6)
    jj = cost(np.stack([u - h, u, u + h], axis=-1))
    d2u = (jj[:, 0] - 2 * jj[:, 1] + jj[:, 2]) / h**2
    q = np.where(found, u / k, fallback)
    # J is a chi-square: var(u) = 2 / J''(u), and Q = u / K
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(found & (d2u > 0), np.sqrt(2.0 / d2u) / k, np.nan)
    return q, sigma
