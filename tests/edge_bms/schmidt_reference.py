"""A dense EKF with the filters' consider parameters, for the tests of the capacity
(``capacity_sigma_rel``) and R0 (``r0_sigma_rel``) consider terms: the state
[soc, v1, v2, z, w] with z the standardised capacity error (in the prediction) and w the
standardised R0 error (in the measurement, D = -i R0 sigma_r), both considered: never
updated, variance kept at 1. Plus the packed filters run on the same inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_bms.cell import CellModel
from edge_bms.filters import SOC_CLAMP, EkfSettings, FilterState, StepResult, ekf_step

from .conftest import FILTER_NOISE, pulse_profile, simulate

NOISE = FILTER_NOISE
PLAIN = EkfSettings(max_iterations=0)
Run = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, P [3x3], cov(x,z), cov(x,w)


def inputs(cell: CellModel, n_steps: int, seed: int) -> tuple[np.ndarray, ...]:
    """Pulses over 5-35 C at 0.5-2 s steps, 20 voltage dropouts: current, voltage,
    temperature, dt."""
    rng = np.random.default_rng(seed)
    current = pulse_profile(rng, n_steps)
    dt = rng.uniform(0.5, 2.0, n_steps)
    temperature = np.linspace(5.0, 35.0, n_steps)
    sim = simulate(
        cell, current, np.array([0.7]), rng, dt=dt, temperature=temperature[:, None], noise=NOISE
    )
    voltage = sim.voltage[:, 0]
    voltage[rng.choice(n_steps, 20, replace=False)] = np.nan
    return sim.current[:, 0], voltage, temperature, dt


def reference(
    cell: CellModel,
    s_cap: float,
    s_r0: float,
    n_steps: int,
    seed: int,
    settings: EkfSettings = PLAIN,
) -> Run:
    """The dense filter over :func:`inputs`. With ``settings.max_iterations`` > 0, an
    update that moves SOC beyond ``iterate_dsoc`` is redone as an iterated EKF
    (Gauss-Newton, relinearised at each iterate, D too), the covariances from the last
    linearisation."""
    current, voltage, temperature, dt = inputs(cell, n_steps, seed)
    x = np.array([0.6, 0.0, 0.0])
    pa = np.zeros((5, 5))
    pa[:3, :3] = np.diag([0.2**2, 0.01**2, 0.01**2])
    pa[3, 3] = pa[4, 4] = 1.0
    out: tuple[list[np.ndarray], ...] = ([], [], [], [])
    i_prev = 0.0

    def meas(k: int, x: np.ndarray) -> tuple[np.ndarray, float]:
        # the filter's own table rows (at a grid node lookup()'s slope is one side's)
        rows = cell.lookup_rows(np.array([x[0]]), temperature[k])[:, 0]
        h = np.array([rows[6], -1.0, -1.0, 0.0, -current[k] * rows[1] * s_r0])
        return h, rows[0] - current[k] * rows[1] - x[1] - x[2]

    def gain_of(pb: np.ndarray, h: np.ndarray) -> np.ndarray:
        g: np.ndarray = pb @ h / (h @ pb @ h + NOISE.voltage_v**2)
        g[3:] = 0.0  # Schmidt: the consider parameters are not updated
        return g

    for k in range(n_steps):
        d_t = dt[k] if k else 0.0
        kq = d_t / (3600 * cell.capacity_ah)
        d = kq * i_prev
        soc = x[0] - d
        _, _, r1, r2, tau1, tau2, _ = cell.lookup_rows(np.array([soc]), temperature[k])[:, 0]
        a1, a2 = np.exp(-d_t / tau1), np.exp(-d_t / tau2)
        x = np.array([soc, a1 * x[1] + r1 * (1 - a1) * i_prev, a2 * x[2] + r2 * (1 - a2) * i_prev])
        fa = np.diag([1.0, a1, a2, 1.0, 1.0])
        fa[0, 3] = d * s_cap  # dsoc'/dz
        qa = np.diag(
            [
                NOISE.soc_per_sqrt_s**2 * d_t + (kq * NOISE.current_a) ** 2,
                NOISE.v1_v_per_sqrt_s**2 * d_t,
                NOISE.v2_v_per_sqrt_s**2 * d_t,
                0.0,
                0.0,
            ]
        )
        pa = fa @ pa @ fa.T + qa
        z = voltage[k]
        if np.isfinite(z):
            xb, pb = x.copy(), pa.copy()
            h, hx = meas(k, x)
            gain = gain_of(pb, h)
            x = xb + gain[:3] * (z - hx)
            x[0] = min(max(x[0], SOC_CLAMP[0]), SOC_CLAMP[1])
            if settings.max_iterations and abs(x[0] - xb[0]) > settings.iterate_dsoc:
                for _ in range(settings.max_iterations):
                    h, hx = meas(k, x)
                    gain = gain_of(pb, h)
                    x_new = xb + gain[:3] * (z - hx - h[:3] @ (xb - x))
                    x_new[0] = min(max(x_new[0], SOC_CLAMP[0]), SOC_CLAMP[1])
                    moved = abs(x_new[0] - x[0])
                    x = x_new
                    if moved < 1e-9:
                        break
            # Joseph's form with the consider entries of K zeroed (exact for any gain)
            ikh = np.eye(5) - np.outer(gain, h)
            pa = ikh @ pb @ ikh.T + np.outer(gain, gain) * NOISE.voltage_v**2
        i_prev = current[k]
        for lst, v in zip(out, (x, pa[:3, :3], pa[:3, 3], pa[:3, 4]), strict=True):
            lst.append(v.copy())
    return tuple(np.array(a) for a in out)  # type: ignore[return-value]


def ours(
    step: Callable[..., StepResult],
    cell: CellModel,
    s_cap: float | None,
    s_r0: float | None,
    n_steps: int,
    seed: int,
    settings: EkfSettings = PLAIN,
) -> Run:
    """The packed filter (``ekf_step`` with ``settings``, or ``ukf_step``) over the same
    inputs; cov(x, z) and cov(x, w) as zeros while the filter has none."""
    current, voltage, temperature, dt = inputs(cell, n_steps, seed)
    state = FilterState.initial(np.array([0.6]), 0.2)
    kw = {"settings": settings} if step is ekf_step else {}
    out: tuple[list[np.ndarray], ...] = ([], [], [], [])
    for k in range(n_steps):
        state = step(
            cell,
            state,
            current[k],
            voltage[k : k + 1],
            temperature[k],
            dt[k] if k else 0.0,
            NOISE,
            capacity_sigma_rel=s_cap,
            r0_sigma_rel=s_r0,
            **kw,
        ).state
        c = np.zeros(3) if state.c is None else state.c[:, 0]
        cr = np.zeros(3) if state.cr is None else state.cr[:, 0]
        for lst, v in zip(out, (state.x[:, 0], state.covariance()[0], c, cr), strict=True):
            lst.append(v.copy())
    return tuple(np.array(a) for a in out)  # type: ignore[return-value]
