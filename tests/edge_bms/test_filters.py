"""The batched filters against filterpy (the trusted reference), against themselves cell
by cell, and on synthetic ECM data (convergence, calibration, dropouts, gaps)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from filterpy.kalman import ExtendedKalmanFilter, MerweScaledSigmaPoints, UnscentedKalmanFilter

from edge_bms.cell import CellModel
from edge_bms.filters import (
    SOC_CLAMP,
    EkfSettings,
    FilterNoise,
    FilterState,
    StepResult,
    UkfSettings,
    ekf_step,
    ukf_step,
)

from .conftest import FILTER_NOISE, pulse_profile, simulate

NOISE = FILTER_NOISE


def _reference_inputs(cell: CellModel, n_steps: int, seed: int) -> tuple[np.ndarray, ...]:
    """Simulated current, voltage (with dropouts), temperature and a varying dt (with a
    10-minute gap) for one cell starting at SOC 0.6."""
    rng = np.random.default_rng(seed)
    current = pulse_profile(rng, n_steps)
    dt = rng.uniform(0.5, 2.0, n_steps)
    dt[100] = 600.0
    temperature = np.linspace(5.0, 35.0, n_steps)
    sim = simulate(
        cell, current, np.array([0.6]), rng, dt=dt, temperature=temperature[:, None], noise=NOISE
    )
    voltage = sim.voltage[:, 0]
    voltage[rng.choice(n_steps, 25, replace=False)] = np.nan  # dropouts: predict only
    return sim.current[:, 0], voltage, temperature, dt


def _filterpy_ekf(cell: CellModel, soc0: float, n_steps: int, seed: int) -> np.ndarray:
    """filterpy's ExtendedKalmanFilter on the same model: returns x and P per step."""
    current, voltage, temperature, dt = _reference_inputs(cell, n_steps, seed)
    ekf = ExtendedKalmanFilter(dim_x=3, dim_z=1, dim_u=1)
    ekf.x = np.array([[soc0], [0.0], [0.0]])
    ekf.P = np.diag([0.2**2, 0.01**2, 0.01**2])
    ekf.R = np.array([[NOISE.voltage_v**2]])
    out = np.empty((n_steps, 12))
    i_prev = 0.0
    for k in range(n_steps):
        d = dt[k] if k else 0.0
        c = d / (3600 * cell.capacity_ah)
        soc_prior = ekf.x[0, 0] - c * i_prev
        p = cell.lookup(soc_prior, temperature[k])
        a1, a2 = np.exp(-d / p.tau1), np.exp(-d / p.tau2)
        ekf.F = np.diag([1.0, a1, a2])
        ekf.B = np.array([[-c], [p.r1 * (1 - a1)], [p.r2 * (1 - a2)]])
        ekf.Q = np.diag(
            [
                NOISE.soc_per_sqrt_s**2 * d + (c * NOISE.current_a) ** 2,
                NOISE.v1_v_per_sqrt_s**2 * d,
                NOISE.v2_v_per_sqrt_s**2 * d,
            ]
        )
        ekf.predict(u=np.array([[i_prev]]))
        i = current[k]
        if np.isfinite(voltage[k]):

            def hx(x: np.ndarray, i: float = i, t: float = temperature[k]) -> np.ndarray:
                q = cell.lookup(x[0, 0], t)
                return np.array([[q.ocv - i * q.r0 - x[1, 0] - x[2, 0]]])

            def jac(x: np.ndarray, t: float = temperature[k]) -> np.ndarray:
                return np.array([[cell.lookup(x[0, 0], t).docv_dsoc, -1.0, -1.0]])

            ekf.update(np.array([[voltage[k]]]), jac, hx)
        ekf.x[0, 0] = min(max(ekf.x[0, 0], SOC_CLAMP[0]), SOC_CLAMP[1])
        out[k, :3] = ekf.x[:, 0]
        out[k, 3:] = ekf.P.ravel()
        i_prev = i
    return out


def _run(
    step: Callable[..., StepResult],
    cell: CellModel,
    soc0: np.ndarray,
    current: np.ndarray,
    voltage: np.ndarray,
    temperature: np.ndarray,
    dt: np.ndarray,
    noise: FilterNoise = NOISE,
    sigma0: float = 0.2,
    **kwargs: object,
) -> tuple[np.ndarray, np.ndarray, list[StepResult]]:
    """Run a step function over [K, n] inputs; x [K, 3, n] and full P [K, n, 3, 3]."""
    state = FilterState.initial(soc0, sigma0)
    xs, ps, results = [], [], []
    for k in range(current.shape[0]):
        r = step(
            cell,
            state,
            current[k],
            voltage[k],
            temperature[k],
            dt[k] if k else 0.0,
            noise,
            **kwargs,
        )
        state = r.state
        xs.append(state.x.copy())
        ps.append(state.covariance())
        results.append(r)
    return np.array(xs), np.array(ps), results


def test_ekf_matches_filterpy_step_by_step(cell: CellModel) -> None:
    n_steps = 500
    ref = _filterpy_ekf(cell, 0.9, n_steps, seed=1)
    current, voltage, temperature, dt = _reference_inputs(cell, n_steps, seed=1)
    xs, ps, _ = _run(
        ekf_step,
        cell,
        np.array([0.9]),
        current,
        voltage[:, None],
        temperature,
        dt,
        settings=EkfSettings(max_iterations=0),  # filterpy has no iterated update
    )
    np.testing.assert_allclose(xs[:, :, 0], ref[:, :3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ps[:, 0].reshape(n_steps, 9), ref[:, 3:], rtol=0, atol=1e-9)
    # the comparison means something: the state moved and P changed by orders of magnitude
    assert np.ptp(ref[:, 0]) > 0.05
    assert ref[0, 3] / ref[-1, 3] > 100


def _filterpy_ukf(
    cell: CellModel, soc0: float, n_steps: int, seed: int, settings: UkfSettings
) -> np.ndarray:
    """filterpy's UnscentedKalmanFilter (Merwe scaled points) on the same model."""
    current, voltage, temperature, dt = _reference_inputs(cell, n_steps, seed)
    points = MerweScaledSigmaPoints(
        3, alpha=settings.alpha, beta=settings.beta, kappa=settings.kappa
    )

    def no_model(x: np.ndarray, *args: object) -> np.ndarray:
        raise AssertionError("every call passes fx/hx")

    ukf = UnscentedKalmanFilter(dim_x=3, dim_z=1, dt=1.0, hx=no_model, fx=no_model, points=points)
    ukf.x = np.array([soc0, 0.0, 0.0])
    ukf.P = np.diag([0.2**2, 0.01**2, 0.01**2])
    ukf.R = np.array([[NOISE.voltage_v**2]])
    out = np.empty((n_steps, 12))
    i_prev = 0.0
    for k in range(n_steps):
        d = dt[k] if k else 0.0
        c = d / (3600 * cell.capacity_ah)
        # RC parameters at the mean SOC prior: the process is linear in the state
        p = cell.lookup(ukf.x[0] - c * i_prev, temperature[k])
        a1, a2 = np.exp(-d / p.tau1), np.exp(-d / p.tau2)
        f = np.diag([1.0, a1, a2])
        b = np.array([-c, p.r1 * (1 - a1), p.r2 * (1 - a2)]) * i_prev
        ukf.Q = np.diag(
            [
                NOISE.soc_per_sqrt_s**2 * d + (c * NOISE.current_a) ** 2,
                NOISE.v1_v_per_sqrt_s**2 * d,
                NOISE.v2_v_per_sqrt_s**2 * d,
            ]
        )
        ukf.predict(fx=lambda x, dt, f=f, b=b: f @ x + b)
        i = current[k]
        if np.isfinite(voltage[k]):

            def hx(x: np.ndarray, i: float = i, t: float = temperature[k]) -> np.ndarray:
                q = cell.lookup(x[0], t)
                return np.array([q.ocv - i * q.r0 - x[1] - x[2]])

            ukf.update(np.array([voltage[k]]), hx=hx)
        ukf.x[0] = min(max(ukf.x[0], SOC_CLAMP[0]), SOC_CLAMP[1])
        out[k, :3] = ukf.x
        out[k, 3:] = ukf.P.ravel()
        i_prev = i
    return out


@pytest.mark.parametrize(
    "settings", [UkfSettings(), UkfSettings(alpha=0.5, beta=2.0, kappa=1.0)], ids=["a1", "a05"]
)
def test_ukf_matches_filterpy_step_by_step(cell: CellModel, settings: UkfSettings) -> None:
    n_steps = 500
    ref = _filterpy_ukf(cell, 0.9, n_steps, seed=2, settings=settings)
    current, voltage, temperature, dt = _reference_inputs(cell, n_steps, seed=2)
    xs, ps, _ = _run(
        ukf_step,
        cell,
        np.array([0.9]),
        current,
        voltage[:, None],
        temperature,
        dt,
        settings=settings,
    )
    np.testing.assert_allclose(xs[:, :, 0], ref[:, :3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ps[:, 0].reshape(n_steps, 9), ref[:, 3:], rtol=0, atol=1e-9)
    assert np.ptp(ref[:, 0]) > 0.05


def test_lookup_rows_is_lookup(cell: CellModel) -> None:
    """The filters' fast table path gives CellModel.lookup's values, also off the grid,
    on knots, and broadcast against one temperature."""
    rng = np.random.default_rng(3)
    soc = np.concatenate([rng.uniform(-0.2, 1.2, 500), cell.soc])
    temp = np.concatenate([rng.uniform(-20.0, 60.0, 500), np.full(cell.soc.size, 25.0)])
    p = cell.lookup(soc, temp)
    ref = np.stack([p.ocv, p.r0, p.r1, p.r2, p.tau1, p.tau2, p.docv_dsoc])
    np.testing.assert_allclose(cell.lookup_rows(soc, temp), ref, rtol=1e-12, atol=1e-12)
    grid = soc[:510].reshape(-1, 3)  # [m, 3] against a scalar temperature
    np.testing.assert_allclose(
        cell.lookup_rows(grid, 10.0)[0], cell.lookup(grid, 10.0).ocv, rtol=1e-12, atol=1e-12
    )


def test_iterated_update_is_the_map_estimate(cell: CellModel) -> None:
    """A big update (prior 30 points off) is redone as an iterated EKF: its result is the
    minimum of prior + measurement cost, found here independently by scipy."""
    from scipy.optimize import least_squares

    noise = FilterNoise(voltage_v=2e-3, v2_v_per_sqrt_s=2e-4)
    state = FilterState.initial(np.array([0.45]), 0.3, v_sigma=0.01, current_a=2.0)
    # at zero current h(x) is exactly OCV - v1 - v2, whose Jacobian the EKF uses (under
    # load it leaves out dR0/dsoc, as every ECM filter treating R0 as exogenous does)
    z, i, temp = 3.98, 0.0, 25.0  # OCV about 0.78 SOC
    res = ekf_step(cell, state, i, np.array([z]), temp, 1.0, noise)
    plain = ekf_step(
        cell, state, i, np.array([z]), temp, 1.0, noise, settings=EkfSettings(max_iterations=0)
    )
    # the prior the step used: the predict part of the step, with no update
    prior = ekf_step(cell, state, i, np.array([np.nan]), temp, 1.0, noise)
    xb = prior.state.x[:, 0]
    cov = prior.state.covariance()[0]
    whiten = np.linalg.cholesky(np.linalg.inv(cov)).T

    def residuals(x: np.ndarray) -> np.ndarray:
        q = cell.lookup(x[0], temp)
        h = q.ocv - i * q.r0 - x[1] - x[2]
        return np.concatenate([whiten @ (x - xb), [(z - h) / noise.voltage_v]])

    best = least_squares(residuals, xb, xtol=1e-14, ftol=1e-14, gtol=1e-14).x
    np.testing.assert_allclose(res.state.x[:, 0], best, atol=1e-6)
    assert abs(plain.state.x[0, 0] - best[0]) > 0.02  # the plain EKF lands elsewhere
    # covariance of the converged linearisation: (P^-1 + H^T H / R)^-1
    h_row = np.array([[cell.lookup(best[0], temp).docv_dsoc, -1.0, -1.0]])
    post = np.linalg.inv(np.linalg.inv(cov) + h_row.T @ h_row / noise.voltage_v**2)
    np.testing.assert_allclose(res.state.covariance()[0], post, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_batched_equals_single_cells(cell: CellModel, step: Callable[..., StepResult]) -> None:
    """n cells in one call == n calls of one cell, with every per-cell option in use."""
    n, n_steps = 6, 150
    rng = np.random.default_rng(4)
    soc0 = rng.uniform(0.2, 0.9, n)
    current = np.stack([pulse_profile(rng, n_steps) for _ in range(n)], axis=1)
    sim = simulate(cell, current, soc0, rng, noise=NOISE)
    voltage = sim.voltage.copy()
    voltage[rng.random(voltage.shape) < 0.05] = np.nan
    temperature = np.linspace(0.0, 40.0, n)
    capacity = rng.uniform(4.0, 5.0, n)
    r0_scale = rng.uniform(1.0, 2.0, n)
    correction = rng.normal(0, 0.005, (n_steps, n))
    r_var = rng.uniform(1e-6, 1e-5, n)
    init = np.clip(soc0 + rng.choice([-0.3, 0.3], n), 0.0, 1.0)  # big first updates

    def run(cells: slice) -> tuple[np.ndarray, np.ndarray]:
        state = FilterState.initial(init[cells], 0.3)
        xs, ps = [], []
        for k in range(n_steps):
            r = step(
                cell,
                state,
                current[k, cells],
                voltage[k, cells],
                temperature[cells],
                1.0 if k else 0.0,
                NOISE,
                correction[k, cells],
                capacity_ah=capacity[cells],
                r0_scale=r0_scale[cells],
                measurement_var=r_var[cells],
            )
            state = r.state
            xs.append(state.x)
            ps.append(state.p)
        return np.array(xs), np.array(ps)

    xs, ps = run(slice(None))
    for j in range(n):
        xj, pj = run(slice(j, j + 1))
        np.testing.assert_allclose(xs[:, :, j : j + 1], xj, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ps[:, :, j : j + 1], pj, rtol=1e-12, atol=1e-18)


def test_ukf_close_to_ekf_on_a_near_linear_segment(cell: CellModel) -> None:
    """Where OCV is nearly linear (SOC 0.75-0.95 of the test cell) the two filters agree;
    where it bends (the knee below 0.15) the UKF's secant differs from the EKF's slope."""
    n, n_steps = 50, 600
    rng = np.random.default_rng(5)
    soc0 = rng.uniform(0.8, 0.95, n)
    current = np.clip(pulse_profile(rng, n_steps), -1.0, 3.0)  # stays in the segment
    sim = simulate(cell, current, soc0, rng, noise=NOISE)
    dt = np.ones(n_steps)
    temperature = np.full(n_steps, 25.0)
    args = (cell, soc0, sim.current, sim.voltage, temperature, dt)
    xe, pe, _ = _run(ekf_step, *args, sigma0=0.01)
    xu, pu, _ = _run(ukf_step, *args, sigma0=0.01)
    assert sim.soc.min() > 0.7
    assert np.abs(xe[:, 0] - xu[:, 0]).max() < 2e-3
    sig_ratio = np.sqrt(pu[-1, :, 0, 0] / pe[-1, :, 0, 0])
    assert np.all(np.abs(sig_ratio - 1.0) < 0.05)
    # on the knee, the sigma-point spread sees the curvature: visibly different
    knee = FilterState.initial(np.full(n, 0.08), 0.05)
    ve = ekf_step(cell, knee, 0.0, np.full(n, 3.2), 25.0, 1.0, NOISE)
    vu = ukf_step(cell, knee, 0.0, np.full(n, 3.2), 25.0, 1.0, NOISE)
    assert np.abs(ve.v_pred - vu.v_pred).max() > 1e-3


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_converges_from_a_30_point_wrong_initial_soc(
    cell: CellModel, step: Callable[..., StepResult]
) -> None:
    n, n_steps, within = 60, 400, 200
    rng = np.random.default_rng(6)
    soc0 = rng.uniform(0.35, 0.95, n)
    init = np.where(soc0 > 0.65, soc0 - 0.3, soc0 + 0.3)
    noise = FilterNoise(voltage_v=2e-3, v2_v_per_sqrt_s=2e-4)
    sim = simulate(cell, pulse_profile(rng, n_steps), soc0, rng, noise=noise)
    state = FilterState.initial(init, 0.3)
    err = np.empty((n_steps, n))
    for k in range(n_steps):
        r = step(cell, state, sim.current[k], sim.voltage[k], 25.0, 1.0 if k else 0.0, noise)
        state = r.state
        err[k] = np.abs(r.soc - sim.soc[k])
    assert np.abs(init - soc0).min() > 0.29
    assert err[within:].max() < 0.01
    # and most cells are there at once: the first sample's OCV pins the SOC
    last_out = np.array([np.flatnonzero(e > 0.01).max(initial=-1) + 1 for e in err.T])
    assert np.median(last_out) <= 10


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_soc_sigma_is_calibrated(cell: CellModel, step: Callable[..., StepResult]) -> None:
    """On data with exactly the noise the filter assumes, the normalised SOC error
    (error / sigma) has variance 1 within [0.8, 1.25] and 95 % of it inside +-2
    (within [0.92, 0.98]); 200 cells x 1200 s, after a 300 s burn-in."""
    n, n_steps = 200, 1200
    rng = np.random.default_rng(7)
    noise = FilterNoise(voltage_v=2e-3, current_a=0.1, soc_per_sqrt_s=2e-5, v2_v_per_sqrt_s=2e-4)
    soc0 = rng.uniform(0.3, 0.9, n)
    sim = simulate(cell, pulse_profile(rng, n_steps), soc0, rng, noise=noise)
    state = FilterState.initial(soc0 + rng.normal(0, 0.05, n), 0.05)
    z = np.empty((n_steps, n))
    for k in range(n_steps):
        r = step(cell, state, sim.current[k], sim.voltage[k], 25.0, 1.0 if k else 0.0, noise)
        state = r.state
        z[k] = (r.soc - sim.soc[k]) / r.soc_sigma
    z = z[300:]
    nees = float(np.mean(z**2))
    inside = float(np.mean(np.abs(z) < 2))
    assert 0.8 < nees < 1.25, nees
    assert 0.92 < inside < 0.98, inside


def _assert_pd(p6: np.ndarray) -> None:
    full = FilterState(np.zeros((3, p6.shape[1])), p6, np.zeros(())).covariance()
    assert np.all(np.isfinite(full))
    np.testing.assert_array_equal(full, np.swapaxes(full, 1, 2))
    assert np.linalg.eigvalsh(full).min() > 0


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_dropouts_and_gaps(cell: CellModel, step: Callable[..., StepResult]) -> None:
    """Missing voltages (single cells, then the whole pack for a minute) and a 2-hour gap:
    a dropped cell only predicts, P stays symmetric positive definite, sigma grows over
    the gap, and the filter re-converges after it."""
    n, n_steps = 40, 900
    rng = np.random.default_rng(8)
    noise = FilterNoise(voltage_v=2e-3, v2_v_per_sqrt_s=2e-4)
    soc0 = rng.uniform(0.3, 0.9, n)
    dt = np.ones(n_steps)
    dt[500] = 7200.0  # 2 h without samples; the cells rest (current 0 held)
    current = pulse_profile(rng, n_steps)
    current[499] = 0.0
    sim = simulate(cell, current, soc0, rng, dt=dt, noise=noise)
    voltage = sim.voltage.copy()
    voltage[rng.random(voltage.shape) < 0.1] = np.nan
    voltage[300:360] = np.nan
    state = FilterState.initial(soc0, 0.05)
    for k in range(n_steps):
        d = dt[k] if k else 0.0
        prior = step(cell, state, sim.current[k], np.full(n, np.nan), 25.0, d, noise)
        r = step(cell, state, sim.current[k], voltage[k], 25.0, d, noise)
        gone = np.isnan(voltage[k])
        np.testing.assert_array_equal(r.state.x[:, gone], prior.state.x[:, gone])
        np.testing.assert_array_equal(r.state.p[:, gone], prior.state.p[:, gone])
        assert np.all(np.isnan(r.innovation[gone])) and np.all(np.isfinite(r.innovation[~gone]))
        if k == 500:
            assert np.all(r.state.p[0] > state.p[0] + 0.5 * noise.soc_per_sqrt_s**2 * 7200)
        state = r.state
        _assert_pd(state.p)
        if k in (359, 899):
            assert np.abs(r.soc - sim.soc[k]).max() < (0.02 if k == 359 else 0.01)


def test_soc_clamp_leaves_p_positive_definite(cell: CellModel) -> None:
    """A cell charged far past full (voltages above the table): SOC stops at 1.05."""
    n = 3
    state = FilterState.initial(np.full(n, 0.98), 0.02)
    v_high = cell.ocv(1.0, 25.0) + 0.3
    for _ in range(2000):
        r = ekf_step(cell, state, -20.0, np.full(n, v_high), 25.0, 1.0, NOISE)
        state = r.state
        assert r.soc.max() <= SOC_CLAMP[1]
        _assert_pd(state.p)
    assert np.all(state.x[0] == SOC_CLAMP[1])
    # a cell without voltage, charged on past the clamp: clamped, still finite
    v = np.full(n, v_high)
    v[1] = np.nan
    for _ in range(100):
        state = ekf_step(cell, state, -20.0, v, 25.0, 60.0, NOISE).state
        assert np.all(np.isfinite(state.x)) and state.x[0, 1] == SOC_CLAMP[1]
        _assert_pd(state.p)
