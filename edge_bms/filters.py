"""Batched Kalman filters on the 2-RC cell model: one numpy step for a whole pack.

State per cell ``x = [soc, v1, v2]`` (v1, v2: RC-branch voltages), stored as an array
``x[3, n]``; its covariance, symmetric 3x3 per cell, as its six unique entries
``p[6, n]`` in the order (p00, p01, p02, p11, p12, p22). Storing only the unique
entries keeps P exactly symmetric, and element-wise formulas on [n]-arrays are several
times faster than einsum/matmul on [n, 3, 3] for the sizes of a pack (tens to
thousands of cells), where numpy's per-call overhead dominates.

Model (signs as DESIGN.md: positive current discharges), between samples k-1 and k
with the current of sample k-1 held over the interval (Plett's convention; it is what
a sample-and-hold current sensor reports):

    soc_k = soc_{k-1} - dt * i_{k-1} / (3600 Q)
    v_j,k = a_j v_j,k-1 + R_j (1 - a_j) i_{k-1},      a_j = exp(-dt / tau_j)
    y_k   = OCV(soc_k, T_k) - i_k R0(soc_k, T_k) - v1_k - v2_k  [+ v_correction]

RC parameters are looked up at the predicted SOC, which is known before any
parameter (it needs only the current), so one table lookup serves the prediction and
the measurement. As in any ECM filter the parameters are treated as exogenous in the
Jacobians (their SOC dependence is slow next to the OCV's).

The EKF redoes a cell's update as an iterated EKF when it moves SOC by more than 2.5
points (:class:`EkfSettings`); the UKF's sigma points already see the OCV curve.

Process noise is given per sqrt(second) (``Q = sigma**2 * dt``), so a step of any
length, a varying sample rate or a long gap gets consistent uncertainty growth.
A step whose voltage is not finite only predicts (a dropout); SOC is clamped to
[-0.05, 1.05] after each update (the state only: P is untouched, it still describes
the uncertainty of the estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from edge_bms.cell import CellModel

FloatArray = npt.NDArray[np.float64]
ArrayOrFloat = FloatArray | float

SOC_CLAMP = (-0.05, 1.05)
# Unique covariance entries (p00, p01, p02, p11, p12, p22) as index pairs (row, col).
P_ROWS = np.array([0, 0, 0, 1, 1, 2])
P_COLS = np.array([0, 1, 2, 1, 2, 2])


class FilterNoise(BaseModel):
    """Noise the filters assume. Process noise is a random walk per sqrt(second).

    The defaults suit a 5 Ah cell sampled at about 1 Hz whose model error (a few mV)
    is larger than the voltage sensor's noise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    soc_per_sqrt_s: float = Field(default=2e-5, ge=0, description="SOC random walk, 1/sqrt(s)")
    v1_v_per_sqrt_s: float = Field(
        default=2e-4, ge=0, description="RC branch 1 random walk, V/sqrt(s)"
    )
    # Branch 2 (tau2 of minutes) may also take up the model's slow voltage error. Chosen
    # by scripts/validate_bms_noise.py (leave one training temperature out, with SOH and
    # the capacity consider term, never the held-out set): flat from 5e-5 to 4e-4 at the
    # shipped x256 inflation (pooled SOC RMSE 1.20-1.22 %), 5e-5 by its fixed tie-break
    # (lowest pooled max error); decisions 0019, 0020.
    v2_v_per_sqrt_s: float = Field(
        default=5e-5, ge=0, description="RC branch 2 random walk, V/sqrt(s)"
    )
    voltage_v: float = Field(
        default=3e-3, gt=0, description="terminal-voltage measurement noise, V"
    )
    current_a: float = Field(
        default=0.0,
        ge=0,
        description="white noise of each current sample, A; held over dt it adds "
        "(dt * sigma / (3600 Q))**2 to the SOC variance",
    )


class UkfSettings(BaseModel):
    """Scaled sigma points (van der Merwe): 2*3+1 = 7 points for the 3 states."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=2.0, ge=0)
    kappa: float = 0.0

    def weights(self) -> tuple[float, float, float, float]:
        """(gamma, wm0, wc0, wi): spread sqrt(n + lambda) and the mean/cov weights."""
        n = 3
        lam = self.alpha**2 * (n + self.kappa) - n
        wm0 = lam / (n + lam)
        wc0 = wm0 + 1.0 - self.alpha**2 + self.beta
        return math.sqrt(n + lam), wm0, wc0, 0.5 / (n + lam)


class EkfSettings(BaseModel):
    """Iterated update where one update moves SOC far from where OCV was linearised.

    When a cell's update moves its SOC by more than ``iterate_dsoc`` (e.g. the first
    sample after an initial SOC 30 points wrong, or after a long gap), its update is
    redone as an iterated EKF: Gauss-Newton on prior + measurement, relinearising OCV at
    each iterate, up to ``max_iterations`` times. A plain EKF takes that step with the
    slope of the wrong place, lands off, and with its covariance collapsed crawls back
    at the pace of the process noise. In steady state an update moves SOC by 1e-4 to
    1e-3, so the iteration costs nothing there; the threshold (2.5 points, half an OCV
    table segment of a 21-point grid) keeps a model error spike of tens of mV from
    triggering it. ``max_iterations=0`` gives the plain EKF.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterate_dsoc: float = Field(default=0.025, gt=0)
    max_iterations: int = Field(default=4, ge=0, le=20)


_EKF_DEFAULT = EkfSettings()
_UKF_DEFAULT = UkfSettings()


@dataclass(frozen=True, slots=True)
class FilterState:
    """Estimates of n cells. Arrays are never modified in place by the step functions.

    ``current_a`` is the last sample's current (0-d for a series string, or [n]): the
    next step integrates it over its interval.
    """

    x: FloatArray  # [3, n]: soc, v1, v2
    p: FloatArray  # [6, n]: p00, p01, p02, p11, p12, p22
    current_a: FloatArray  # 0-d or [n]
    # [3, n]: covariance of x with the standardised capacity error z (a Schmidt
    # "consider" parameter, see :func:`ekf_step`'s ``capacity_sigma_rel``); None: the
    # capacity has been taken as exact so far
    c: FloatArray | None = None
    # [3, n]: covariance of x with the standardised error w of the R0 the filter uses
    # (a consider parameter of the measurement, see ``ekf_step``'s ``r0_sigma_rel``)
    cr: FloatArray | None = None

    @classmethod
    def initial(
        cls,
        soc: npt.ArrayLike,
        soc_sigma: npt.ArrayLike,
        *,
        v_sigma: float = 0.01,
        current_a: npt.ArrayLike = 0.0,
    ) -> FilterState:
        """Cells at ``soc`` (RC branches relaxed), diagonal covariance."""
        s = np.array(soc, dtype=float, ndmin=1)
        n = s.size
        x = np.zeros((3, n))
        x[0] = s
        p = np.zeros((6, n))
        p[0] = np.broadcast_to(np.square(soc_sigma), (n,))
        p[3] = p[5] = v_sigma**2
        return cls(x, p, np.array(current_a, dtype=float))

    @property
    def n_cells(self) -> int:
        return int(self.x.shape[1])

    @property
    def soc(self) -> FloatArray:
        soc: FloatArray = self.x[0]
        return soc

    def covariance(self) -> FloatArray:
        """The full covariance, [n, 3, 3] (for tests and diagnostics; not the hot path)."""
        full = np.empty((self.n_cells, 3, 3))
        full[:, P_ROWS, P_COLS] = self.p.T
        full[:, P_COLS, P_ROWS] = self.p.T
        return full


class StepResult(NamedTuple):
    """One step of n cells. ``innovation`` is NaN where the voltage was missing."""

    state: FilterState
    soc: FloatArray  # [n], clamped to SOC_CLAMP
    soc_sigma: FloatArray  # [n]
    v_pred: FloatArray  # [n], predicted terminal voltage (prior, correction included)
    innovation: FloatArray  # [n], measured - predicted
    innovation_var: FloatArray  # [n], S = H P H^T + R (its sigma-point version in the UKF)
    r0_table_ohm: FloatArray  # [n], the table's R0 at the SOC prior (before r0_scale)


def _predict(
    model: CellModel,
    state: FilterState,
    dt: ArrayOrFloat,
    noise: FilterNoise,
    capacity_ah: ArrayOrFloat | None,
    x: FloatArray,
    p: FloatArray,
) -> None:
    """The SOC prior into ``x[0]`` and the predicted p00 into ``p[0]`` (both need no table
    lookup; ``x`` [3, n] and ``p`` [6, n] are the new prior's arrays)."""
    q = model.capacity_ah if capacity_ah is None else capacity_ah
    if isinstance(dt, float | int) and isinstance(q, float | int):
        k: Any = dt / (3600.0 * q)  # what np.divide gives, without its call
    else:
        k = np.divide(dt, 3600.0 * q)
    i = state.current_a
    # a series string's 0-d current as a float: a Python product, not a numpy call
    np.subtract(state.x[0], k * (float(i) if np.ndim(i) == 0 else i), out=x[0])
    q0 = noise.soc_per_sqrt_s**2 * dt
    if noise.current_a > 0:
        q0 = q0 + np.square(k * noise.current_a)
    np.add(state.p[0], q0, out=p[0])


def _predict_rc(
    rows: FloatArray, state: FilterState, dt: ArrayOrFloat, noise: FilterNoise, p: FloatArray
) -> FloatArray:
    """RC voltages and the covariance prior, given the parameter rows at the SOC prior:
    ``p[1:]`` is written (``p[0]`` is :func:`_predict`'s); returns ``a`` [2, n].

    A = diag(1, a1, a2), Q = diag(q0, q1, q2): P' = A P A^T + Q element by element.
    """
    # the factors of p01, p02, p11, p12, p22 stacked (a1, a2, a1 a1, a1 a2, a2 a2): one
    # [5, n] product scales them all
    f = np.empty((5, p.shape[1]))
    a = f[0:2]
    np.exp(np.divide(-dt, rows[4:6]), out=a)  # [2, n]: a1, a2
    np.multiply(a[0], a, out=f[2:4])
    np.multiply(a[1], a[1], out=f[4])
    np.multiply(state.p[1:6], f, out=p[1:6])
    p[3] += noise.v1_v_per_sqrt_s**2 * dt
    p[5] += noise.v2_v_per_sqrt_s**2 * dt
    return a


def _predict_v(rows: FloatArray, state: FilterState, a: FloatArray, v: FloatArray) -> FloatArray:
    """RC voltages a v + R (1 - a) i into ``v`` [2, n] (the prior's x[1:3])."""
    ri = rows[2:4] * state.current_a  # R_j i_{k-1}
    np.subtract(state.x[1:3], ri, out=v)
    v *= a
    v += ri
    return v


def _consider_soc(
    state: FilterState, x_prior: FloatArray, sigma_rel: ArrayOrFloat, p: FloatArray
) -> FloatArray:
    """The capacity error's share of the SOC prior's variance (Schmidt-Kalman consider
    parameter); returns g for :func:`_consider_rc`.

    The true capacity is Q (1 + sigma_rel z), z ~ N(0, 1) not estimated here (the SOH
    estimator does that); to first order SOC then moves by d (1 - sigma_rel z), d the
    coulomb-counted decrement, so dsoc'/dz = g = d sigma_rel. With c = cov(x, z):
    P' = F P F^T + Q + F c G^T + G c^T F^T + G G^T (G = [g, 0, 0]) and c' = F c + G.
    This adds 2 g c0 + g^2 to ``p[0]``. Keeping the covariance with the *standardised* z
    keeps their correlation when the SOH estimate's sigma changes between steps (it
    assumes the new capacity error is the old one rescaled).
    """
    g: FloatArray = state.x[0] - x_prior[0]  # d: the SOC decrement of this interval
    g *= sigma_rel
    c = state.c
    t = g * g if c is None else (c[0] + c[0] + g) * g
    p[0] += t
    return g


def _consider_rc(state: FilterState, g: FloatArray, a: FloatArray, p: FloatArray) -> FloatArray:
    """c' = F c + G, and F c G^T's share of p01, p02 (after :func:`_predict_rc` wrote
    them); ``a`` [2, n]: the RC decay factors."""
    c = np.empty((3, g.shape[0]))
    c0 = state.c
    if c0 is None:
        c[0] = g
        c[1:3] = 0.0
        return c
    np.multiply(a, c0[1:3], out=c[1:3])
    p[1:3] += c[1:3] * g
    np.add(c0[0], g, out=c[0])
    return c


def _h_dot(h: FloatArray, c: FloatArray) -> FloatArray:
    """H c for H = [h, -1, -1] and c [3, n] (a new [n] array)."""
    hc: FloatArray = h * c[0]
    hc -= c[1]
    hc -= c[2]
    return hc


def _consider_update(c: FloatArray, gain: FloatArray, cov_yz: FloatArray) -> FloatArray:
    """cov(x, z) of a consider parameter z after a measurement with gain K:
    c - K cov(y, z), as a new array (z itself is not updated). cov(y, z) is H c, plus D
    when z enters the measurement (the R0 error)."""
    out: FloatArray = gain * cov_yz
    np.subtract(c, out, out=out)
    return out


def _consider_r0_predict(state: FilterState, a: FloatArray, n: int) -> FloatArray:
    """cov(x, w) after the prediction: F c_w with F = diag(1, a1, a2) (w, the R0 error,
    is constant and not in the dynamics); zeros before the first R0-aware step."""
    cr = np.zeros((3, n))
    c0 = state.cr
    if c0 is not None:
        cr[0] = c0[0]
        np.multiply(a, c0[1:3], out=cr[1:3])
    return cr


def _consider_r0_terms(
    u: FloatArray, s: FloatArray, cr: FloatArray, d: FloatArray, h: FloatArray
) -> FloatArray:
    """Add the R0 consider parameter to u = P H^T and S (in place): the measurement is
    h(x) + D w + v with D = -i R0 sigma_r, so cov(x, y) = P H^T + c_w D and
    S = H P H^T + 2 D H c_w + D^2 + R. Returns H c_w + D = cov(y, w)."""
    hc = _h_dot(h, cr)
    u += cr * d
    s += d * (hc + hc + d)
    hc += d
    return hc


def _gain_terms(
    p: FloatArray, h: FloatArray, r: float | FloatArray
) -> tuple[FloatArray, FloatArray]:
    """u = P H^T and S = H P H^T + R for H = [h, -1, -1], row by row (no gathers)."""
    u = p[0:3] * h  # u_r = p_r0 h - p_r1 - p_r2
    u[0] -= p[1]
    u[0] -= p[2]
    u[1:3] -= p[3:5]  # u1 -= p11, u2 -= p12
    u[1:3] -= p[4:6]  # u1 -= p12, u2 -= p22
    s = u[0] * h
    s -= u[1]
    s -= u[2]
    s += r
    return u, s


def _sub(a: ArrayOrFloat | npt.ArrayLike | None, idx: npt.NDArray[np.intp]) -> Any:
    """``a`` at cells ``idx`` if it is per cell, else as it is (scalar or None)."""
    return a[idx] if isinstance(a, np.ndarray) and a.ndim else a


def _downdate(p: FloatArray, gain: FloatArray, u: FloatArray) -> FloatArray:
    """P - K u^T on the six unique entries, as a new array (``p`` is left as it was):
    (p00, p01, p02) - k0 u, (p11, p12) - k1 (u1, u2), p22 - k2 u2."""
    t = np.empty(p.shape)
    np.multiply(gain[0], u, out=t[0:3])
    np.multiply(gain[1:3], u[1:3], out=t[3:6:2])  # k1 u1, k2 u2
    np.multiply(gain[1], u[2], out=t[4])
    np.subtract(p, t, out=t)  # one [6, n] subtraction
    return t


def _update(
    x_prior: FloatArray,
    p: FloatArray,
    h: FloatArray,
    v_pred: FloatArray,
    s_extra: FloatArray | None,
    voltage_v: npt.ArrayLike,
    r: float | FloatArray,
    current_a: FloatArray,
    r0_table: FloatArray,
    c_prior: FloatArray | None = None,
    r0_consider: tuple[FloatArray, FloatArray] | None = None,
) -> StepResult:
    """Measurement update with H = [h, -1, -1] of the prior ``x_prior``, ``p`` (neither
    is modified); ``s_extra`` is added to S (UKF). Row by row: no gathers, no [n, 3, 3]
    products. ``c_prior``: cov(x, z) of a consider parameter z, updated as c - K H c
    (z itself is not). ``r0_consider``: cov(x, w) of the R0 error w and its measurement
    sensitivity D (see :func:`_consider_r0_terms`)."""
    u, s = _gain_terms(p, h, r)
    cov_yw = None if r0_consider is None else _consider_r0_terms(u, s, *r0_consider, h)
    if s_extra is not None:
        s += s_extra
        # sigma-point weights with alpha << 1 have a negative centre weight and can
        # push the spread below zero; S < R would claim more than the sensor gives
        np.maximum(s, r, out=s)
    y = np.subtract(voltage_v, v_pred)
    gain = u / s  # K = P H^T / S
    # y . y is finite iff every y is (a dot product is cheaper than isfinite().all())
    if math.isfinite(y.dot(y)):
        innovation = y
    else:  # dropout: no update for those cells (K = 0 leaves x and P at the prior)
        finite = np.isfinite(y)
        innovation = np.where(finite, y, np.nan)
        y = np.where(finite, y, 0.0)
        gain *= finite
    x = gain * y
    x += x_prior
    # P - K S K^T = P - K u^T, the optimal-gain form of Joseph's update. Only the six
    # unique entries are updated, so P stays exactly symmetric; it stays positive
    # definite because S >= R > 0 (P_new^-1 = P^-1 + H^T H / R).
    p_post = _downdate(p, gain, u)
    np.minimum(np.maximum(x[0], SOC_CLAMP[0], out=x[0]), SOC_CLAMP[1], out=x[0])
    c_post = None if c_prior is None else _consider_update(c_prior, gain, _h_dot(h, c_prior))
    cr_post = None
    if r0_consider is not None and cov_yw is not None:
        cr_post = _consider_update(r0_consider[0], gain, cov_yw)
    return StepResult(
        FilterState(x, p_post, current_a, c_post, cr_post),
        x[0],
        np.sqrt(p_post[0]),
        v_pred,
        innovation,
        s,
        r0_table,
    )


def ekf_step(
    model: CellModel,
    state: FilterState,
    current_a: npt.ArrayLike,
    voltage_v: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    dt_s: ArrayOrFloat,
    noise: FilterNoise,
    v_correction: FloatArray | None = None,
    *,
    capacity_ah: ArrayOrFloat | None = None,
    r0_scale: ArrayOrFloat | None = None,
    measurement_var: FloatArray | None = None,
    settings: EkfSettings | None = None,
    capacity_sigma_rel: ArrayOrFloat | None = None,
    r0_sigma_rel: ArrayOrFloat | None = None,
) -> StepResult:
    """One extended-Kalman step (predict over ``dt_s``, update with this sample).

    ``current_a`` and ``temperature_c``: scalar or [n]; ``voltage_v``: [n], NaN where a
    cell's voltage is missing. ``v_correction`` ([n]) is added to the predicted terminal
    voltage (a learned model correction). ``capacity_ah`` and ``r0_scale`` (scalar or
    [n]) override the model's capacity and scale its R0 (an SOH estimate);
    ``measurement_var`` ([n], V^2, finite and > 0) replaces ``noise.voltage_v**2`` per
    cell (a learned noise model). ``settings``: the iterated update (:class:`EkfSettings`).
    ``capacity_sigma_rel`` (scalar or [n], e.g. an SOH estimate's sigma over its value):
    the capacity's relative uncertainty, carried as a Schmidt consider parameter, so SOC
    variance grows with the charge counted through an uncertain capacity (a bias that
    white process noise cannot describe) and the voltage weighs more while it is large;
    the cross-covariance lives in ``state.c``. None: the capacity is taken as exact.
    ``r0_sigma_rel`` (scalar or [n]): the relative uncertainty of the R0 used (table and
    scale), carried the same way on the measurement side (``state.cr``): under current
    the voltage then tells the filter less about SOC, as far as R0 is unknown, and a
    bias from a wrong R0 is not read as SOC again at every sample. None: R0 exact.
    Inputs are not validated here (:class:`edge_bms.estimator.PackEstimator` does that).
    """
    i = np.asarray(current_a, dtype=float)
    x_prior = np.empty(state.x.shape)  # float64 whatever the state holds
    p = np.empty(state.p.shape)
    _predict(model, state, dt_s, noise, capacity_ah, x_prior, p)
    gz = (
        None if capacity_sigma_rel is None else _consider_soc(state, x_prior, capacity_sigma_rel, p)
    )
    soc = x_prior[0]
    rows = model.lookup_rows(soc, temperature_c)  # [7, n]: ocv r0 r1 r2 tau1 tau2 docv
    a = _predict_rc(rows, state, dt_s, noise, p)
    c = None if gz is None else _consider_rc(state, gz, a, p)
    v = _predict_v(rows, state, a, x_prior[1:3])
    r0 = rows[1] if r0_scale is None else rows[1] * r0_scale
    v_pred = rows[0] - i * r0
    v_pred -= v[0]
    v_pred -= v[1]
    if v_correction is not None:
        v_pred += v_correction
    r = noise.voltage_v**2 if measurement_var is None else measurement_var
    settings = settings or _EKF_DEFAULT
    rc = None
    if r0_sigma_rel is not None:
        rc = (_consider_r0_predict(state, a, soc.shape[0]), -(i * r0) * r0_sigma_rel)
    res = _update(x_prior, p, rows[6], v_pred, None, voltage_v, r, i, rows[1], c, rc)
    if settings.max_iterations > 0:
        # |SOC move| beyond the threshold anywhere? (fmax skips NaN, as > does)
        moved = res.state.x[0] - soc
        np.abs(moved, out=moved)
        if np.fmax.reduce(moved) > settings.iterate_dsoc:
            # (a clamped dropout cell moves too, but has nothing to iterate on)
            far = moved > settings.iterate_dsoc
            far &= np.isfinite(res.innovation)
            if far.any():
                _iterate(
                    model,
                    res,
                    np.flatnonzero(far),
                    x_prior,
                    p,
                    i,
                    np.asarray(voltage_v, dtype=float),
                    temperature_c,
                    r0_scale,
                    v_correction,
                    r,
                    settings.max_iterations,
                    c,
                    None if rc is None else rc[0],
                    r0_sigma_rel,
                )
    return res


def _iterate(
    model: CellModel,
    res: StepResult,
    idx: npt.NDArray[np.intp],
    x_prior: FloatArray,
    p_prior: FloatArray,
    current_a: FloatArray,
    voltage_v: FloatArray,
    temperature_c: npt.ArrayLike,
    r0_scale: ArrayOrFloat | None,
    v_correction: FloatArray | None,
    r: float | FloatArray,
    max_iterations: int,
    c_prior: FloatArray | None = None,
    cr_prior: FloatArray | None = None,
    r0_sigma_rel: ArrayOrFloat | None = None,
) -> None:
    """Iterated-EKF update of cells ``idx``, written into ``res`` (its arrays are new).

    Gauss-Newton on |x - x_prior|^2_P^-1 + (z - h(x))^2 / R: relinearise at the iterate
    x_j, then x_{j+1} = x_prior + K_j (z - h(x_j) - H_j (x_prior - x_j)); the covariance
    comes from the last linearisation. ``res`` holds the plain EKF's result (x_1).
    """
    xb = x_prior[:, idx]
    pb = p_prior[:, idx]
    x = res.state.x[:, idx]
    z = voltage_v[idx]
    i = _sub(current_a, idx)
    t_all = np.asarray(temperature_c, dtype=float)
    t = t_all[idx] if t_all.ndim else t_all
    r0s = _sub(r0_scale, idx)
    corr = _sub(v_correction, idx)
    rr = _sub(r, idx)
    active = np.ones(idx.size, dtype=bool)
    gain = u = np.zeros_like(x)
    h_last = np.zeros(idx.size)
    crb = None if cr_prior is None else cr_prior[:, idx]
    srel = _sub(r0_sigma_rel, idx)
    hcr_last = np.zeros(idx.size)
    for _ in range(max_iterations):
        rows = model.lookup_rows(x[0], t)
        h = rows[6]
        r0 = rows[1] if r0s is None else rows[1] * r0s
        hx = rows[0] - i * r0 - x[1] - x[2]
        if corr is not None:
            hx += corr
        dx = xb - x
        innov = z - hx - (h * dx[0] - dx[1] - dx[2])
        u_j, s = _gain_terms(pb, h, rr)
        hcr = None
        if crb is not None:
            hcr = _consider_r0_terms(u_j, s, crb, -(i * r0) * srel, h)
        gain_j = u_j / s
        x_new = xb + gain_j * innov
        np.minimum(np.maximum(x_new[0], SOC_CLAMP[0], out=x_new[0]), SOC_CLAMP[1], out=x_new[0])
        # a cell stops once its iterate stands still, independently of the others (so a
        # batch gives what each cell alone would)
        moved = np.abs(x_new[0] - x[0])
        x = np.where(active, x_new, x)
        gain = np.where(active, gain_j, gain)
        u = np.where(active, u_j, u)
        h_last = np.where(active, h, h_last)
        if hcr is not None:
            hcr_last = np.where(active, hcr, hcr_last)
        active &= moved >= 1e-9
        if not active.any():
            break
    pb[0:3] -= gain[0] * u
    pb[3:5] -= gain[1] * u[1:3]
    pb[5] -= gain[2] * u[2]
    res.state.x[:, idx] = x
    res.state.p[:, idx] = pb
    res.soc_sigma[idx] = np.sqrt(pb[0])
    if c_prior is not None:  # with the last linearisation (res.state.c is then set)
        assert res.state.c is not None
        cb = c_prior[:, idx]
        res.state.c[:, idx] = _consider_update(cb, gain, _h_dot(h_last, cb))
    if crb is not None:  # cov(x, w) with the last linearisation
        assert res.state.cr is not None
        res.state.cr[:, idx] = _consider_update(crb, gain, hcr_last)


def ukf_step(
    model: CellModel,
    state: FilterState,
    current_a: npt.ArrayLike,
    voltage_v: npt.ArrayLike,
    temperature_c: npt.ArrayLike,
    dt_s: ArrayOrFloat,
    noise: FilterNoise,
    v_correction: FloatArray | None = None,
    *,
    capacity_ah: ArrayOrFloat | None = None,
    r0_scale: ArrayOrFloat | None = None,
    measurement_var: FloatArray | None = None,
    settings: UkfSettings | None = None,
    capacity_sigma_rel: ArrayOrFloat | None = None,
    r0_sigma_rel: ArrayOrFloat | None = None,
) -> StepResult:
    """One unscented-Kalman step (scaled sigma points, 7 per cell); same arguments.

    With the RC parameters taken at the mean SOC prior (as in :func:`ekf_step`) the
    process is linear in the state, so the unscented transform of the prediction is
    exact and is done in closed form. The measurement is nonlinear only in SOC
    (OCV and R0) and linear in v1, v2; with sigma points drawn from the predicted
    covariance (Cholesky factor L, spread gamma) only the pair along L's first column
    moves SOC, by +-gamma*sqrt(p00). So 3 lookups per cell (soc, soc +- d) give the
    exact 7-point transform:

        g(s)   = OCV(s) - i R0(s);  g0, g+, g- at soc, soc + d, soc - d
        z      = wm0 g0 + wi (g+ + g- + 4 g0) - v1 - v2
        P_xz   = P H^T with H = [(g+ - g-) / 2d, -1, -1]     (L L^T = P, 2 wi gamma^2 = 1)
        S      = P_zz + R, the EKF's S with p00 h^2 replaced by the sigma-point spread
                 wc0 e0^2 + wi (e+^2 + e-^2 + 4 e0^2),  e = g - (z + v1 + v2)

    It agrees with filterpy's UnscentedKalmanFilter (MerweScaledSigmaPoints) to
    round-off; see tests/edge_bms/test_filters.py.
    """
    gamma, wm0, wc0, wi = (settings or _UKF_DEFAULT).weights()
    i = np.asarray(current_a, dtype=float)
    x_prior = np.empty(state.x.shape)  # float64 whatever the state holds
    p = np.empty(state.p.shape)
    _predict(model, state, dt_s, noise, capacity_ah, x_prior, p)
    gz = (
        None if capacity_sigma_rel is None else _consider_soc(state, x_prior, capacity_sigma_rel, p)
    )
    soc = x_prior[0]
    # p00 > 0 unless every SOC noise is zero and the filter has fully converged
    d = np.sqrt(p[0])
    d *= gamma
    np.maximum(d, 1e-12, out=d)
    s3 = np.empty((3, soc.shape[0]))  # soc, soc + d, soc - d
    s3[0] = soc
    np.add(soc, d, out=s3[1])
    np.subtract(soc, d, out=s3[2])
    rows = model.lookup_rows(s3, temperature_c)  # [7, 3, n]
    a = _predict_rc(rows[:, 0], state, dt_s, noise, p)
    c = None if gz is None else _consider_rc(state, gz, a, p)
    v = _predict_v(rows[:, 0], state, a, x_prior[1:3])
    r0 = rows[1] if r0_scale is None else rows[1] * r0_scale
    g = rows[0] - i * r0  # [3, n]
    g0, gp, gm = g
    h = gp - gm
    h /= 2.0 * d
    gbar = gp + gm
    gbar += 4.0 * g0
    gbar *= wi
    gbar += wm0 * g0
    e = g - gbar
    e *= e  # e0^2, e+^2, e-^2
    spread = e[0]
    spread *= wc0 + 4.0 * wi
    e2 = e[1] + e[2]
    e2 *= wi
    spread += e2
    spread -= p[0] * h * h  # _update adds the EKF's p00 h^2
    v_pred = gbar - v[0]
    v_pred -= v[1]
    if v_correction is not None:
        v_pred += v_correction
    r = noise.voltage_v**2 if measurement_var is None else measurement_var
    rc = None
    if r0_sigma_rel is not None:  # D at the mean SOC (the R0 error scales R0 there)
        rc = (_consider_r0_predict(state, a, soc.shape[0]), -(i * r0[0]) * r0_sigma_rel)
    return _update(x_prior, p, h, v_pred, spread, voltage_v, r, i, rows[1, 0], c, rc)
