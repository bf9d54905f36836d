"""Equivalent-circuit parameters from HPPC pulse data (numpy only).

A pulse test records the terminal voltage while a current pulse is applied to a cell at
rest and while the cell relaxes afterwards. With the current held constant between
samples (how a cycler's data log samples a CC step), a series resistance ``R0`` plus one
RC pair (``R1``, ``tau1``) plus a slow term proportional to the charge moved (the
open-circuit voltage's slope and slow diffusion, which over a minute-long pulse are
both linear in the charge) give, for sample ``k`` at time ``t_k`` with current ``I_k``
(positive = discharge)::

    x_k = a_k x_{k-1} + (1 - a_k) I_k        a_k = exp(-(t_k - t_{k-1}) / tau1)
    q_k = q_{k-1} + I_k (t_k - t_{k-1})
    V_k = E - R0 I_k - R1 x_k - kappa q_k

The zero-order-hold update is exact for a current that is constant between samples, so
the model does not depend on the sampling period. For a fixed ``tau1`` the model is
linear in ``(E, R0, R1, kappa)``; :func:`fit_pulse` solves that least-squares problem on
a logarithmic grid of ``tau1`` and refines the best one (variable projection).
:func:`instantaneous_r0` is the quick estimate from the voltage step at the pulse's
leading edge, extrapolated to the edge from the first two samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


class PulseFitError(ValueError):
    """The data cannot identify the parameters (too few samples, no current step)."""


@dataclass(frozen=True)
class PulseFit:
    """One RC equivalent circuit identified from one pulse (SI units)."""

    r0_ohm: float
    r1_ohm: float
    tau1_s: float
    c1_f: float
    ocv_v: float  # the intercept E: the voltage the cell relaxes to without the pulse
    kappa_v_per_as: float  # slow drift per ampere-second moved
    rmse_v: float
    n_points: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arrays(
    time_s: Sequence[float] | FloatArray,
    voltage_v: Sequence[float] | FloatArray,
    current_a: Sequence[float] | FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    t = np.asarray(time_s, dtype=np.float64)
    v = np.asarray(voltage_v, dtype=np.float64)
    i = np.asarray(current_a, dtype=np.float64)
    if not (t.shape == v.shape == i.shape) or t.ndim != 1:
        raise PulseFitError(
            f"time_s, voltage_v, current_a: need three 1-D arrays of one length, "
            f"got shapes {t.shape}, {v.shape}, {i.shape}"
        )
    if t.size == 0:
        raise PulseFitError("time_s, voltage_v, current_a: no samples")
    if not (np.isfinite(t).all() and np.isfinite(v).all() and np.isfinite(i).all()):
        raise PulseFitError("time_s, voltage_v, current_a: must be finite")
    # Duplicate time stamps (a periodic row and a step-end row at one instant) carry
    # no information about the dynamics: keep the last of each.
    if np.any(np.diff(t) < 0):
        raise PulseFitError("time_s: must be increasing")
    keep = np.append(np.diff(t) > 0, True)
    return t[keep], v[keep], i[keep]


def _regressors(t: FloatArray, i: FloatArray, tau: float, initial: bool) -> FloatArray:
    dt = np.diff(t, prepend=t[0])
    a = np.exp(-dt / tau)
    x = np.empty_like(i)
    acc = 0.0
    for k in range(i.shape[0]):  # a recursion over ~100 samples: cheap
        acc = a[k] * acc + (1.0 - a[k]) * i[k]
        x[k] = acc
    q = np.cumsum(i * dt)
    columns = [np.ones_like(i), -i, -x, -q]
    if initial:
        # Polarisation left over from before the record (a pulse soon after another
        # one): the RC pair's initial voltage decays with tau, slower pairs drift.
        columns += [-np.exp(-(t - t[0]) / tau), -(t - t[0])]
    return np.stack(columns, axis=1)


def _solve(
    t: FloatArray, v: FloatArray, i: FloatArray, tau: float, initial: bool = False
) -> tuple[FloatArray, float]:
    a = _regressors(t, i, tau, initial)
    coef = np.asarray(np.linalg.lstsq(a, v, rcond=None)[0], dtype=np.float64)
    resid = v - a @ coef
    return coef, float(resid @ resid)


def fit_pulse(
    time_s: Sequence[float] | FloatArray,
    voltage_v: Sequence[float] | FloatArray,
    current_a: Sequence[float] | FloatArray,
    *,
    tau_bounds_s: tuple[float, float] | None = None,
    initial_polarisation: bool = False,
) -> PulseFit:
    """Fit ``R0`` + one RC pair to a pulse and its relaxation.

    The samples should start at rest (current 0, relaxed) just before the pulse and run
    through the pulse and at least a few ``tau1`` of the rest after it; earlier pulses
    in the window are fine (the model follows them). With ``initial_polarisation`` the
    record may start polarised (two more terms: a decay with ``tau1`` and a linear
    drift), at some cost in accuracy. ``tau_bounds_s`` defaults to (2 x the sampling
    period, 3 x the record's length).
    """
    t, v, i = _arrays(time_s, voltage_v, current_a)
    if t.shape[0] < 6:
        raise PulseFitError(f"need at least 6 samples, got {t.shape[0]}")
    if np.ptp(i) < 1e-6:
        raise PulseFitError("current_a: no current step in the data")
    dt_min = float(np.min(np.diff(t)))
    lo, hi = tau_bounds_s or (2.0 * dt_min, 3.0 * float(t[-1] - t[0]))
    if not 0 < lo < hi:
        raise PulseFitError(f"tau_bounds_s: need 0 < low < high, got {(lo, hi)}")
    grid = np.geomspace(lo, hi, 48)
    sse = np.array([_solve(t, v, i, float(tau), initial_polarisation)[1] for tau in grid])
    best = int(np.argmin(sse))
    # Golden-section refinement on log(tau) between the best point's neighbours.
    a_log = math.log(grid[max(best - 1, 0)])
    b_log = math.log(grid[min(best + 1, grid.shape[0] - 1)])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c_log, d_log = b_log - g * (b_log - a_log), a_log + g * (b_log - a_log)
    fc = _solve(t, v, i, math.exp(c_log), initial_polarisation)[1]
    fd = _solve(t, v, i, math.exp(d_log), initial_polarisation)[1]
    for _ in range(40):
        if fc < fd:
            b_log, d_log, fd = d_log, c_log, fc
            c_log = b_log - g * (b_log - a_log)
            fc = _solve(t, v, i, math.exp(c_log), initial_polarisation)[1]
        else:
            a_log, c_log, fc = c_log, d_log, fd
            d_log = a_log + g * (b_log - a_log)
            fd = _solve(t, v, i, math.exp(d_log), initial_polarisation)[1]
    tau = math.exp((a_log + b_log) / 2.0)
    coef, sse_best = _solve(t, v, i, tau, initial_polarisation)
    e, r0, r1, kappa = (float(c) for c in coef[:4])
    return PulseFit(
        r0_ohm=r0,
        r1_ohm=r1,
        tau1_s=tau,
        c1_f=tau / r1 if r1 > 0 else math.inf,
        ocv_v=e,
        kappa_v_per_as=kappa,
        rmse_v=math.sqrt(sse_best / t.shape[0]),
        n_points=int(t.shape[0]),
    )


def instantaneous_r0(
    time_s: Sequence[float] | FloatArray,
    voltage_v: Sequence[float] | FloatArray,
    current_a: Sequence[float] | FloatArray,
) -> float:
    """R0 from the voltage step at the first current edge, in ohm.

    ``dV/dI`` between the last sample before the edge and the first two after it,
    extrapolated linearly back to the edge (which removes most of the RC pair's
    contribution within the first sample).
    """
    t, v, i = _arrays(time_s, voltage_v, current_a)
    edge = np.flatnonzero(np.abs(np.diff(i)) > 1e-6)
    if edge.size == 0 or edge[0] + 2 >= t.shape[0]:
        raise PulseFitError("current_a: need a current step followed by two samples")
    k = int(edge[0])
    di = i[k + 1] - i[k]
    if abs(i[k + 2] - i[k + 1]) > 1e-3 * abs(di):
        raise PulseFitError("current_a: the current changes again right after the edge")
    t0 = t[k]
    r1 = (v[k] - v[k + 1]) / di
    r2 = (v[k] - v[k + 2]) / di
    s1, s2 = t[k + 1] - t0, t[k + 2] - t0
    return float(r1 - s1 * (r2 - r1) / (s2 - s1))
