"""The R0's uncertainty carried as a Schmidt consider parameter of the measurement
(``r0_sigma_rel``): against a dense 5-state reference (with the capacity's consider
parameter beside it), neutral when off, and what it is for (a wrong R0 under current is
not read as SOC)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.errors import InputError
from edge_bms.filters import SOC_CLAMP, EkfSettings, FilterState, ekf_step, ukf_step

from .conftest import FILTER_NOISE, pulse_profile, simulate

NOISE = FILTER_NOISE
PLAIN = EkfSettings(max_iterations=0)


def _inputs(cell: CellModel, n_steps: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    current = pulse_profile(rng, n_steps)
    dt = rng.uniform(0.5, 2.0, n_steps)
    temperature = np.linspace(5.0, 35.0, n_steps)
    sim = simulate(
        cell, current, np.array([0.7]), rng, dt=dt, temperature=temperature[:, None], noise=NOISE
    )
    voltage = sim.voltage[:, 0]
    voltage[rng.random(n_steps) < 0.05] = np.nan  # dropouts: no update, c_w kept
    return current, voltage, temperature, dt


def _reference(
    cell: CellModel, s_cap: float, s_r0: float, n_steps: int, seed: int, settings: EkfSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense EKF over [soc, v1, v2, z, w]: z the standardised capacity error (in the
    prediction), w the standardised R0 error (in the measurement, D = -i R0 s_r0); both
    considered (never updated, variance kept at 1). x, P [3x3], cov(x, z), cov(x, w)."""
    current, voltage, temperature, dt = _inputs(cell, n_steps, seed)
    x = np.array([0.6, 0.0, 0.0])
    pa = np.zeros((5, 5))
    pa[:3, :3] = np.diag([0.2**2, 0.01**2, 0.01**2])
    pa[3, 3] = pa[4, 4] = 1.0
    out: tuple[list[np.ndarray], ...] = ([], [], [], [])
    i_prev = 0.0

    def meas(soc: float, k: int, x: np.ndarray) -> tuple[np.ndarray, float]:
        rows = cell.lookup_rows(np.array([soc]), temperature[k])[:, 0]
        h = np.array([rows[6], -1.0, -1.0, 0.0, -current[k] * rows[1] * s_r0])
        return h, rows[0] - current[k] * rows[1] - x[1] - x[2]

    def gain_of(pb: np.ndarray, h: np.ndarray) -> np.ndarray:
        g: np.ndarray = pb @ h / (h @ pb @ h + NOISE.voltage_v**2)
        g[3:] = 0.0
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
        fa[0, 3] = d * s_cap
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
            h, hx = meas(x[0], k, x)
            gain = gain_of(pb, h)
            x = xb + gain[:3] * (z - hx)
            x[0] = min(max(x[0], SOC_CLAMP[0]), SOC_CLAMP[1])
            if settings.max_iterations and abs(x[0] - xb[0]) > settings.iterate_dsoc:
                for _ in range(settings.max_iterations):
                    h, hx = meas(x[0], k, x)
                    gain = gain_of(pb, h)
                    x_new = xb + gain[:3] * (z - hx - h[:3] @ (xb - x)[:3])
                    x_new[0] = min(max(x_new[0], SOC_CLAMP[0]), SOC_CLAMP[1])
                    moved = abs(x_new[0] - x[0])
                    x = x_new
                    if moved < 1e-9:
                        break
            ikh = np.eye(5) - np.outer(gain, h)
            pa = ikh @ pb @ ikh.T + np.outer(gain, gain) * NOISE.voltage_v**2
        i_prev = current[k]
        for lst, v in zip(out, (x, pa[:3, :3], pa[:3, 3], pa[:3, 4]), strict=True):
            lst.append(v.copy())
    return tuple(np.array(a) for a in out)  # type: ignore[return-value]


def _ours(
    cell: CellModel,
    s_cap: float | None,
    s_r0: float | None,
    n_steps: int,
    seed: int,
    settings: EkfSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    current, voltage, temperature, dt = _inputs(cell, n_steps, seed)
    state = FilterState.initial(np.array([0.6]), 0.2)
    out: tuple[list[np.ndarray], ...] = ([], [], [], [])
    for k in range(n_steps):
        state = ekf_step(
            cell,
            state,
            current[k],
            voltage[k : k + 1],
            temperature[k],
            dt[k] if k else 0.0,
            NOISE,
            settings=settings,
            capacity_sigma_rel=s_cap,
            r0_sigma_rel=s_r0,
        ).state
        c = np.zeros(3) if state.c is None else state.c[:, 0]
        cr = np.zeros(3) if state.cr is None else state.cr[:, 0]
        for lst, v in zip(out, (state.x[:, 0], state.covariance()[0], c, cr), strict=True):
            lst.append(v.copy())
    return tuple(np.array(a) for a in out)  # type: ignore[return-value]


def test_ekf_r0_consider_matches_the_dense_schmidt_filter(cell: CellModel) -> None:
    for settings, n in ((PLAIN, 500), (EkfSettings(iterate_dsoc=1e-7, max_iterations=4), 300)):
        ref = _reference(cell, 0.15, 0.3, n, seed=5, settings=settings)
        got = _ours(cell, 0.15, 0.3, n, seed=5, settings=settings)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-7, atol=1e-16)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-7, atol=1e-14)
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-7, atol=1e-14)
        assert np.max(np.abs(got[3][:, 0])) > 1e-4  # the term did something


def test_r0_consider_off_is_the_filter_as_before(cell: CellModel) -> None:
    a = _ours(cell, 0.1, None, 200, seed=6, settings=EkfSettings())
    b = _ours(cell, 0.1, 0.0, 200, seed=6, settings=EkfSettings())
    np.testing.assert_array_equal(a[0], b[0])  # sigma 0: D = 0, the same arithmetic
    np.testing.assert_array_equal(a[1], b[1])


def test_a_wrong_r0_under_current_is_not_read_as_soc(cell: CellModel) -> None:
    """The cell's R0 is 40 % above the model's and the drive starts under load from a
    wide SOC prior: the plain filter moves SOC to explain the ohmic misfit; with the R0
    consider term its SOC error stays smaller, and its sigma covers the error."""
    true = dataclasses.replace(cell, tables=cell.tables.copy())
    true.tables[..., 1] *= 1.4  # R0
    rng = np.random.default_rng(21)
    current = pulse_profile(rng, 1800, lo=2.0, hi=8.0)
    sim = simulate(true, current, np.array([0.8]), rng, noise=NOISE)
    res = {}
    for s in (None, 0.4):
        state = FilterState.initial(np.array([0.8]), 0.08)
        err, cover = [], []
        for k in range(current.size):
            r = ekf_step(
                cell, state, sim.current[k, 0], sim.voltage[k], 25.0, 1.0 if k else 0.0,
                NOISE, r0_sigma_rel=s,
            )  # fmt: skip
            state = r.state
            e = float(r.soc[0] - sim.soc[k, 0])
            err.append(abs(e))
            cover.append(abs(e) <= 2.0 * float(r.soc_sigma[0]))
        res[s] = (max(err[60:]), float(np.mean(cover)))
    assert res[0.4][0] < 0.6 * res[None][0], res
    assert res[0.4][1] > 0.9 > res[None][1], res


def test_ukf_r0_consider_close_to_ekf(cell: CellModel) -> None:
    """The sigma-point filter carries the term through the same update: on a mid-SOC
    pulse train its SOC, variance and cov(x, w) follow the EKF's."""
    rng = np.random.default_rng(8)
    current = pulse_profile(rng, 300)
    sim = simulate(cell, current, np.array([0.55]), rng, noise=NOISE)
    e = u = FilterState.initial(np.array([0.55]), 0.02)
    for k in range(current.size):
        i, v, dt = sim.current[k, 0], sim.voltage[k], 1.0 if k else 0.0
        e = ekf_step(cell, e, i, v, 25.0, dt, NOISE, settings=PLAIN, r0_sigma_rel=0.3).state
        u = ukf_step(cell, u, i, v, 25.0, dt, NOISE, r0_sigma_rel=0.3).state
    assert e.cr is not None and u.cr is not None
    np.testing.assert_allclose(u.x[0], e.x[0], atol=2e-4)
    np.testing.assert_allclose(u.p[0], e.p[0], rtol=0.05)
    np.testing.assert_allclose(u.cr[0], e.cr[0], rtol=0.05, atol=1e-6)


def test_pack_estimator_carries_it_on_request_and_through_a_checkpoint(cell: CellModel) -> None:
    from edge_bms.estimator import R0_SIGMA_REL, PackEstimator

    rng = np.random.default_rng(9)
    current = pulse_profile(rng, 200)
    sim = simulate(cell, current, np.array([0.7, 0.5]), rng, noise=NOISE)
    est = PackEstimator(cell, 2, noise=NOISE, r0_sigma_rel=R0_SIGMA_REL)
    off = PackEstimator(cell, 2, noise=NOISE)  # the default: off
    for k in range(current.size):
        est.step(float(k), sim.current[k], sim.voltage[k], 25.0)
        off.step(float(k), sim.current[k], sim.voltage[k], 25.0)
    assert est.state is not None and est.state.cr is not None
    assert np.max(np.abs(est.state.cr[0])) > 0
    assert off.r0_sigma_rel is None and off.state is not None and off.state.cr is None
    back = PackEstimator.from_state_dict(cell, est.state_dict())
    assert back.state is not None and back.state.cr is not None
    np.testing.assert_array_equal(back.state.cr, est.state.cr)
    assert back.r0_sigma_rel == R0_SIGMA_REL
    # a checkpoint from before the term resumes without it
    old = {k: v for k, v in est.state_dict().items() if k not in ("cr", "r0_sigma_rel")}
    again = PackEstimator.from_state_dict(cell, old)
    assert again.r0_sigma_rel is None and again.state is not None and again.state.cr is None
    with pytest.raises(InputError, match="r0_sigma_rel"):
        PackEstimator(cell, 2, r0_sigma_rel=-0.1)
