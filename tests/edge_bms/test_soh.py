"""SOH: AWTLS capacity beats WLS with noisy SOC; R0 RLS tracks a step change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.errors import InputError
from edge_bms.identify import simulate_ecm
from edge_bms.soh import SohEstimator, awtls_solve
from tests.edge_bms.conftest import pulse_profile


def segments(
    rng: np.random.Generator, n_cells: int, n_points: int, q_true: float
) -> list[tuple[np.ndarray, ...]]:
    """(x, y, var_x, var_y) per point: SOC differences of 10-40 points either way,
    SOC estimates with 1.5 % sigma at each end, coulomb counts with a current sensor's
    noise growing with the segment's length."""
    out: list[tuple[np.ndarray, ...]] = []
    for _ in range(n_points):
        x = rng.uniform(0.1, 0.4, n_cells) * rng.choice([-1.0, 1.0], n_cells)
        sx = np.sqrt(2) * 0.015
        sy = 0.002 + 0.01 * np.abs(x) * q_true
        out.append(
            (
                x + sx * rng.standard_normal(n_cells),
                q_true * x + sy * rng.standard_normal(n_cells),
                np.full(n_cells, sx**2),
                sy**2,
            )
        )
    return out


def test_awtls_beats_wls_with_noisy_soc_differences() -> None:
    rng = np.random.default_rng(7)
    n, q_true = 200, 4.5  # 200 independent cells, aged from the nominal 5 Ah
    est = SohEstimator(n, 5.0, capacity_forgetting=1.0)
    for x, y, vx, vy in segments(rng, n, 100, q_true):
        est.update_capacity(x, y, vx, vy)
    err_tls = est.capacity_ah / q_true - 1
    err_wls = est.capacity_ah_wls / q_true - 1
    # regression dilution: WLS is biased low by about sx^2 / E[x^2] (~ -1 %: the 1/sy^2
    # weights favour the short segments, where it is worst); AWTLS is not (measured:
    # WLS mean -0.97 %, rms 1.35 %; AWTLS mean +0.01 %, rms 0.82 %)
    assert err_wls.mean() < -0.008
    assert abs(err_tls.mean()) < 0.0015
    rms_tls = np.sqrt(np.mean(err_tls**2))
    rms_wls = np.sqrt(np.mean(err_wls**2))
    assert rms_tls < 0.7 * rms_wls
    assert np.mean(np.abs(err_tls) < np.abs(err_wls)) > 0.6
    # the reported sigma is calibrated: about 95 % within 2 sigma
    within = np.abs(est.capacity_ah - q_true) < 2 * est.capacity_sigma
    assert 0.88 < within.mean() <= 1.0


def test_awtls_with_forgetting_follows_a_fading_capacity() -> None:
    rng = np.random.default_rng(11)
    n = 50
    est = SohEstimator(n, 5.0, capacity_forgetting=0.95)
    for q in (5.0, 4.6):  # a fade of 8 % between two campaigns of 150 points
        for x, y, vx, vy in segments(rng, n, 150, q):
            est.update_capacity(x, y, vx, vy)
    err = est.capacity_ah / 4.6 - 1
    assert abs(err.mean()) < 0.005
    assert np.sqrt(np.mean(err**2)) < 0.02  # measured 1.4 %: a memory of ~20 points


def test_awtls_solver_is_the_weighted_tls_optimum_when_the_ratio_is_constant() -> None:
    """With sx = K sy for every point, AWTLS is exact WTLS: compare with a dense search."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.5, 0.5, 40)
    sy = 0.02 * np.ones(40)
    k = 0.01
    sx = k * sy
    y = 4.0 * x + sy * rng.standard_normal(40)
    xm = x + sx * rng.standard_normal(40)
    sums = [
        np.array([v])
        for v in (
            np.sum(xm**2 / sy**2),
            np.sum(xm * y / sy**2),
            np.sum(y**2 / sy**2),
            np.sum(xm**2 / sx**2),
            np.sum(xm * y / sx**2),
            np.sum(y**2 / sx**2),
        )
    ]
    q, sigma = awtls_solve(
        sums[0], sums[1], sums[2], sums[3], sums[4], sums[5], np.array([k]), np.array([1.0])
    )
    grid = np.linspace(3.8, 4.2, 40001)
    cost = ((y[None] - grid[:, None] * xm[None]) ** 2 / (sy**2 + grid[:, None] ** 2 * sx**2)).sum(1)
    assert q[0] == pytest.approx(grid[np.argmin(cost)], abs=1e-5)
    assert 0 < sigma[0] < 0.05


def test_r0_rls_tracks_a_step_change(cell: CellModel) -> None:
    """Four cells on one current profile; at sample 3000 their R0 jumps to 1.2x-2x.
    With forgetting 0.85, within 25 current steps (2000 samples at 1 s) every estimate is
    within 3 % and stays there (measured: 18 steps, 1498 samples)."""
    rng = np.random.default_rng(5)
    k_steps, k_change = 6000, 3000
    i = pulse_profile(rng, k_steps, -5.0, 10.0)
    t = np.arange(k_steps, dtype=float)
    v0, soc = simulate_ecm(cell, t, i, 25.0, 0.9)
    r0_table = cell.lookup(soc, 25.0).r0
    scales = np.array([1.0, 1.2, 1.5, 2.0])
    after = (t >= k_change)[:, None]
    true_scale = np.where(after, scales[None, :], 1.0)  # [K, 4]
    v = v0[:, None] - (true_scale - 1.0) * (r0_table * i)[:, None]
    v += 0.001 * rng.standard_normal(v.shape)  # 1 mV voltage noise

    est = SohEstimator(4, 5.0, r0_ref_ohm=float(cell.lookup(0.5, 25.0).r0), r0_forgetting=0.85)
    history = np.empty((k_steps, 4))
    n_steps_seen = np.zeros(k_steps, dtype=int)
    for k in range(k_steps):
        est.update(i[k], v[k], 1.0, r0_table_ohm=r0_table[k])
        history[k] = est.r0_scale
        n_steps_seen[k] = int(est.r0_updates[0])
    before = history[k_change - 1]
    assert np.allclose(before, 1.0, atol=0.03)
    ok = np.all(np.abs(history / scales - 1) < 0.03, axis=1) & (t >= k_change)
    # the first sample from which the estimates stay within 3 % of the new values
    stays = np.flatnonzero(ok & np.flip(np.cumprod(np.flip(ok))).astype(bool))
    assert stays.size
    settle_samples = int(stays[0]) - k_change
    settle_steps = n_steps_seen[stays[0]] - n_steps_seen[k_change - 1]
    assert settle_steps <= 25, (settle_steps, settle_samples)
    assert settle_samples <= 2000
    assert est.r0_ohm == pytest.approx(scales * est.r0_ref, rel=0.03)


def test_per_step_update_closes_capacity_segments_on_trusted_soc(cell: CellModel) -> None:
    """A 4.5 Ah cell (nominal 5) cycled 80 % <-> 20 % with a trusted SOC (sigma 1 %) at
    the ends of each half cycle: the capacity is found within 1.5 %."""
    rng = np.random.default_rng(9)
    dt = 10.0
    q_true = 4.5
    half = int(0.6 * q_true * 3600 / (4.5 * dt))  # 4.5 A for 60 % SOC
    one = np.concatenate([np.full(half, 4.5), np.zeros(30), np.full(half, -4.5), np.zeros(30)])
    i = np.tile(one, 8)
    soc = 0.8 - np.concatenate([[0.0], np.cumsum(i[:-1] * dt)]) / 3600 / q_true
    est = SohEstimator(2, 5.0, min_delta_soc=0.3, max_point_sigma=0.02, capacity_forgetting=1.0)
    at_rest = np.abs(i) == 0
    for k in range(i.size):
        sigma = np.where(at_rest[k], 0.01, 0.05)  # the filter trusts its SOC only at rest
        noisy = soc[k] + sigma * rng.standard_normal(2)
        est.update(i[k], 3.7, dt, soc=noisy, soc_sigma=sigma)
    assert est.n_points.tolist() == [15.0, 15.0]
    assert est.capacity_ah == pytest.approx(q_true, rel=0.015)


def test_capacity_is_trusted_only_after_capacity_min_points() -> None:
    """Until ``capacity_min_points`` points made it, a filter gets the nominal capacity."""
    est = SohEstimator(1, 5.0, min_delta_soc=0.3, capacity_min_points=3, capacity_forgetting=1.0)
    seen = []
    soc, dt, q_true = 0.8, 10.0, 4.5
    steps = int(0.6 * q_true * 3600 / (4.5 * dt))  # 60 % of the true capacity at 4.5 A
    for half in range(6):  # 60 % down, 60 % up, ...: a point at the rest after each
        sign = 1.0 if half % 2 == 0 else -1.0
        for _ in range(steps):
            soc -= sign * 4.5 * dt / 3600 / q_true
            est.update(sign * 4.5, 3.7, dt, soc=soc, soc_sigma=0.05)  # not trusted under load
        est.update(0.0, 3.7, dt, soc=soc, soc_sigma=0.01)  # at rest: a point
        seen.append(
            (int(est.n_points[0]), float(est.capacity_ah_trusted[0]), float(est.capacity_ah[0]))
        )
    for points, trusted, estimate in seen:
        assert trusted == (estimate if points >= 3 else 5.0)
    assert seen[-1][0] >= 3
    assert seen[-1][1] == pytest.approx(q_true, rel=0.02)
    assert seen[1][1] == 5.0 and seen[1][2] != 5.0  # an estimate exists, not yet fed back


def test_state_dict_round_trip_is_json_and_continues_identically() -> None:
    rng = np.random.default_rng(4)
    a = SohEstimator(3, 5.0)
    data = segments(rng, 3, 20, 4.8)
    for x, y, vx, vy in data[:10]:
        a.update_capacity(x, y, vx, vy)
    a.update(np.array([1.0, 2.0, 3.0]), np.array([3.7, 3.6, 3.5]), 1.0)
    b = SohEstimator.from_state_dict(json.loads(json.dumps(a.state_dict())))
    for x, y, vx, vy in data[10:]:
        a.update_capacity(x, y, vx, vy)
        b.update_capacity(x, y, vx, vy)
    a.update(np.array([5.0, 2.0, 3.0]), np.array([3.6, 3.6, 3.5]), 1.0)
    b.update(np.array([5.0, 2.0, 3.0]), np.array([3.6, 3.6, 3.5]), 1.0)
    assert np.array_equal(a.capacity_ah, b.capacity_ah)
    assert np.array_equal(a.r0_scale, b.r0_scale)
    assert a.r0_updates.tolist() == [1.0, 0.0, 0.0]


def test_inputs_are_checked() -> None:
    with pytest.raises(InputError, match="r0_forgetting"):
        SohEstimator(2, 5.0, r0_forgetting=1.5)
    est = SohEstimator(2, 5.0)
    with pytest.raises(InputError, match="voltage_v must be a scalar or have 2 values"):
        est.update(1.0, [3.7, 3.7, 3.7], 1.0)
    with pytest.raises(InputError, match="dt_s"):
        est.update(1.0, [3.7, 3.7], 0.0)
    with pytest.raises(InputError, match="format"):
        SohEstimator.from_state_dict({"format": "other"})


def test_r0_is_trusted_only_after_r0_min_updates_steps(cell: CellModel) -> None:
    """One current step moves the RLS most of the way (prior sigma 0.5), so a filter
    gets the scale only once ``r0_min_updates`` steps made it; until then, 1."""
    est = SohEstimator(2, 5.0, cell=cell, r0_min_updates=5)
    r0 = float(cell.lookup(0.5, 25.0).r0)
    levels = [0.0, 4.0] * 4  # 7 steps of 4 A
    v_rest = 3.7
    seen = []
    for i in levels:
        # cell 0 reads 1.5x the table's R0, cell 1 the table's
        v = v_rest - i * r0 * np.array([1.5, 1.0])
        est.update(i, v, 1.0, r0_table_ohm=r0)
        seen.append((int(est.r0_updates[0]), est.r0_scale_trusted.copy(), est.r0_scale.copy()))
    for updates, trusted, scale in seen:
        if updates < 5:
            np.testing.assert_array_equal(trusted, 1.0)
        else:
            np.testing.assert_array_equal(trusted, scale)
    assert seen[-1][0] == 7
    assert seen[-1][1][0] == pytest.approx(1.5, rel=0.02)
    # capacity: the nominal until capacity_min_points points
    assert est.n_points.max() == 0
    np.testing.assert_array_equal(est.capacity_ah_trusted, 5.0)
