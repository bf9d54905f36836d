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
from edge_bms.filters import EkfSettings, FilterState, ekf_step, ukf_step

from .conftest import FILTER_NOISE, pulse_profile, simulate
from .schmidt_reference import PLAIN, ours, reference

NOISE = FILTER_NOISE


def test_ekf_r0_consider_matches_the_dense_schmidt_filter(cell: CellModel) -> None:
    for settings, n in ((PLAIN, 500), (EkfSettings(iterate_dsoc=1e-7, max_iterations=4), 300)):
        ref = reference(cell, 0.15, 0.3, n, seed=5, settings=settings)
        got = ours(ekf_step, cell, 0.15, 0.3, n, seed=5, settings=settings)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-7, atol=1e-16)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-7, atol=1e-14)
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-7, atol=1e-14)
        assert np.max(np.abs(got[3][:, 0])) > 1e-4  # the term did something


def test_r0_consider_off_is_the_filter_as_before(cell: CellModel) -> None:
    a = ours(ekf_step, cell, 0.1, None, 200, seed=6, settings=EkfSettings())
    b = ours(ekf_step, cell, 0.1, 0.0, 200, seed=6, settings=EkfSettings())
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


def test_with_health_turns_the_term_on_only_with_a_health_hook(cell: CellModel) -> None:
    """ "with_health": R0_SIGMA_REL when the estimator has a health hook (an online SOH
    leaves an R0 error of that order), off without one (decision 0023); a checkpoint
    keeps the resolved value."""
    from edge_bms.estimator import R0_SIGMA_REL, PackEstimator
    from edge_bms.soh import SohEstimator

    soh = SohEstimator(2, cell.capacity_ah, cell=cell)
    on = PackEstimator(cell, 2, health=soh, r0_sigma_rel="with_health")
    assert on.r0_sigma_rel == R0_SIGMA_REL
    assert PackEstimator(cell, 2, r0_sigma_rel="with_health").r0_sigma_rel is None
    assert PackEstimator.from_state_dict(cell, on.state_dict()).r0_sigma_rel == R0_SIGMA_REL
    assert PackEstimator(cell, 2, r0_sigma_rel=np.float32(0.25)).r0_sigma_rel == 0.25
    for bad in ("always", True, float("nan")):
        with pytest.raises(InputError, match="r0_sigma_rel must be a number >= 0, 'with_health'"):
            PackEstimator(cell, 2, r0_sigma_rel=bad)  # type: ignore[arg-type]
