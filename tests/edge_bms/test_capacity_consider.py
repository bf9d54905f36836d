"""The capacity's uncertainty carried as a Schmidt consider parameter in the filters:
against a dense 4-state reference, neutral at sigma 0, and what it is for (an aged cell
whose capacity the filter does not know yet)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.estimator import PackEstimator
from edge_bms.filters import (
    EkfSettings,
    FilterNoise,
    FilterState,
    StepResult,
    ekf_step,
    ukf_step,
)
from edge_bms.soh import SohEstimator

from .conftest import FILTER_NOISE, Simulated, pulse_profile, simulate
from .schmidt_reference import PLAIN, inputs, ours, reference

NOISE = FILTER_NOISE


def _schmidt_reference(
    cell: CellModel, sigma: float, n_steps: int, seed: int, settings: EkfSettings = PLAIN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense reference with the capacity's consider parameter alone (D = 0)."""
    return reference(cell, sigma, 0.0, n_steps, seed, settings)[:3]


def _ours(
    step: Callable[..., StepResult],
    cell: CellModel,
    sigma: float | None,
    n_steps: int,
    seed: int,
    settings: EkfSettings = PLAIN,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ours(step, cell, sigma, None, n_steps, seed, settings)[:3]


def test_ekf_consider_matches_the_dense_schmidt_filter(cell: CellModel) -> None:
    x_ref, p_ref, c_ref = _schmidt_reference(cell, 0.15, 600, seed=3)
    x, p, c = _ours(ekf_step, cell, 0.15, 600, seed=3)
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(p, p_ref, rtol=1e-8, atol=1e-16)
    np.testing.assert_allclose(c, c_ref, rtol=1e-8, atol=1e-14)
    # the term did something: SOC variance beyond what the filter claims without it
    _, p_plain, _ = _ours(ekf_step, cell, None, 600, seed=3)
    # (0.15 x ~0.05 SOC counted over these 10 minutes: 0.75e-2 before voltage updates)
    assert p[-1, 0, 0] > 1.15 * p_plain[-1, 0, 0]
    assert np.max(np.abs(c[:, 0])) > 1e-4


def test_iterated_ekf_consider_matches_the_dense_schmidt_filter(cell: CellModel) -> None:
    """The iterated update (forced at every step here) takes cov(x, z) from its last
    linearisation, as the dense reference does."""
    every = EkfSettings(iterate_dsoc=1e-7, max_iterations=4)
    x_ref, p_ref, c_ref = _schmidt_reference(cell, 0.15, 400, seed=4, settings=every)
    x, p, c = _ours(ekf_step, cell, 0.15, 400, seed=4, settings=every)
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(p, p_ref, rtol=1e-7, atol=1e-16)
    np.testing.assert_allclose(c, c_ref, rtol=1e-7, atol=1e-14)
    # and it is not the plain update's cov(x, z)
    _, _, c_plain = _ours(ekf_step, cell, 0.15, 400, seed=4)
    assert np.max(np.abs(c - c_plain)) > 1e-6


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_sigma_zero_is_the_plain_filter(cell: CellModel, step: Callable[..., StepResult]) -> None:
    x0, p0, _ = _ours(step, cell, None, 300, seed=5)
    x1, p1, c1 = _ours(step, cell, 0.0, 300, seed=5)
    np.testing.assert_array_equal(x1, x0)
    np.testing.assert_array_equal(p1, p0)
    np.testing.assert_array_equal(c1, 0.0)


@pytest.mark.parametrize("step", [ekf_step, ukf_step], ids=["ekf", "ukf"])
def test_joint_covariance_stays_positive_definite(
    cell: CellModel, step: Callable[..., StepResult]
) -> None:
    """[[P, c], [c^T, 1]] is a covariance: P - c c^T must stay positive definite, also
    with a sigma that changes from step to step (EKF with its default iterated update,
    which the 30-point-off start triggers)."""
    current, voltage, temperature, dt = inputs(cell, 800, seed=8)
    state = FilterState.initial(np.array([0.2, 0.6, 0.9]), 0.3)
    sigmas = np.array([0.05, 0.2, 0.4])
    for k in range(800):
        r = step(
            cell,
            state,
            current[k],
            np.full(3, voltage[k]),
            temperature[k],
            dt[k] if k else 0.0,
            NOISE,
            capacity_sigma_rel=sigmas * (1.0 if k < 400 else 0.3),
        )
        state = r.state
        assert state.c is not None
        full = state.covariance() - np.einsum("in,jn->nij", state.c, state.c)
        assert np.all(np.linalg.eigvalsh(full)[:, 0] > -1e-12), k


def _aged_drive(cell: CellModel, seed: int) -> tuple[CellModel, np.ndarray, Simulated]:
    """Two hours of discharge-heavy pulses on a cell with 80 % of the model's capacity."""
    aged = dataclasses.replace(cell, capacity_ah=0.8 * cell.capacity_ah)
    rng = np.random.default_rng(seed)
    current = pulse_profile(rng, 7200, lo=-2.0, hi=6.0)
    sim = simulate(aged, current, np.array([0.95]), rng, noise=NOISE)
    return aged, current, sim


def test_consider_term_helps_an_aged_cell_the_filter_does_not_know(cell: CellModel) -> None:
    """The filter runs with the nominal capacity and a 20 % relative sigma on it (what an
    SOH estimator's prior says before it has data): with the consider term its SOC error
    is smaller and its sigma covers the error; without it the coulomb count's bias
    accumulates under an overconfident sigma."""
    _, current, sim = _aged_drive(cell, seed=11)
    # a filter that trusts coulomb counting (small SOC noise), as a tuned one does
    noise = FilterNoise(soc_per_sqrt_s=2e-6, voltage_v=2e-3)
    out = {}
    for sigma in (None, 0.2):
        state = FilterState.initial(np.array([0.95]), 0.02)
        err, z = [], []
        for k in range(current.size):
            r = ekf_step(
                cell,
                state,
                sim.current[k, 0],
                sim.voltage[k],
                25.0,
                1.0 if k else 0.0,
                noise,
                capacity_sigma_rel=sigma,
            )
            state = r.state
            e = float(r.soc[0] - sim.soc[k, 0])
            err.append(e)
            z.append(abs(e) / float(r.soc_sigma[0]))
        out[sigma] = (np.sqrt(np.mean(np.square(err))), np.mean(np.array(z) <= 2.0))
    rmse_off, cover_off = out[None]
    rmse_on, cover_on = out[0.2]
    assert rmse_on < 0.7 * rmse_off, out
    assert cover_on > 0.85 > cover_off, out


def test_pack_estimator_takes_the_sigma_from_its_health_hook(cell: CellModel) -> None:
    """With an SOH estimator the filter gets capacity_sigma_trusted / capacity as the
    consider sigma (the prior's 10 % before any capacity point); capacity_consider=False
    or no sigma on the hook leaves the filter as it was; the cross-covariance survives a
    checkpoint."""
    _, _current, sim = _aged_drive(cell, seed=12)
    runs = {}
    for consider in (True, False):
        health = SohEstimator(1, cell.capacity_ah, cell=cell)
        est = PackEstimator(cell, 1, noise=NOISE, health=health, capacity_consider=consider)
        for k in range(600):
            est.step(float(k), sim.current[k, 0], sim.voltage[k], 25.0)
        runs[consider] = est
    on, off = runs[True], runs[False]
    assert on.state is not None and off.state is not None
    assert off.state.c is None
    assert on.state.c is not None and abs(on.state.c[0, 0]) > 0
    assert on._capacity_sigma_rel is not None
    np.testing.assert_allclose(on._capacity_sigma_rel, 0.1)
    assert on.state.p[0, 0] > off.state.p[0, 0]

    resumed = PackEstimator.from_state_dict(
        cell, on.state_dict(), health=SohEstimator(1, cell.capacity_ah, cell=cell)
    )
    assert resumed.state is not None and resumed.state.c is not None
    np.testing.assert_array_equal(resumed.state.c, on.state.c)
    assert resumed.capacity_consider
    # the relative sigma follows the capacity in use (the prior's 0.5 Ah over 4 Ah)
    resumed.set_scales(capacity_ah=0.8 * cell.capacity_ah)
    np.testing.assert_allclose(resumed._capacity_sigma_rel, 0.125)  # type: ignore[arg-type]

    class NoSigma:  # a health hook without capacity_sigma_trusted
        capacity_ah_trusted = np.full(1, cell.capacity_ah)
        r0_scale_trusted = np.ones(1)

        def update(self, *args: object, **kwargs: object) -> None:
            pass

    plain = PackEstimator(cell, 1, noise=NOISE, health=NoSigma())
    for k in range(50):
        plain.step(float(k), sim.current[k, 0], sim.voltage[k], 25.0)
    assert plain.state is not None and plain.state.c is None


def test_ukf_consider_close_to_ekf_consider_on_a_near_linear_segment(cell: CellModel) -> None:
    """Where OCV is nearly linear the sigma-point filter must carry the consider term as
    the EKF does: same SOC, variance and cov(x, z). (Not what this can tell: whether the
    sigma points include the capacity's share; on a linear segment the spread hardly
    depends on it.)"""
    n, n_steps = 20, 900
    rng = np.random.default_rng(7)
    soc0 = rng.uniform(0.85, 0.95, n)
    current = np.clip(pulse_profile(rng, n_steps), 0.0, 3.0)  # discharge within the segment
    sim = simulate(cell, current, soc0, rng, noise=NOISE)
    assert sim.soc.min() > 0.7
    out = {}
    for step in (ekf_step, ukf_step):
        state = FilterState.initial(soc0, 0.01)
        for k in range(n_steps):
            state = step(
                cell,
                state,
                sim.current[k],
                sim.voltage[k],
                25.0,
                1.0 if k else 0.0,
                NOISE,
                capacity_sigma_rel=0.3,
            ).state
        out[step] = state
    e, u = out[ekf_step], out[ukf_step]
    assert e.c is not None and u.c is not None
    # the term is large here: it almost doubles the SOC variance
    plain = FilterState.initial(soc0, 0.01)
    for k in range(n_steps):
        plain = ekf_step(
            cell, plain, sim.current[k], sim.voltage[k], 25.0, 1.0 if k else 0.0, NOISE
        ).state
    assert np.all(e.p[0] > 1.5 * plain.p[0])
    np.testing.assert_allclose(u.x[0], e.x[0], atol=2e-4)
    np.testing.assert_allclose(u.p[0], e.p[0], rtol=0.02)
    np.testing.assert_allclose(u.c[0], e.c[0], rtol=0.02)


def test_capacity_version_cache_gives_the_same_trajectory_as_reading_every_step(
    cell: CellModel,
) -> None:
    """The estimator re-reads capacity and its sigma only when the SOH estimator's
    ``capacity_version`` changes: over an aged drive in which capacity points close, the
    SOC, sigma and fed-back capacity equal those of the same SOH estimator behind a proxy
    without the counter (read every step), bit for bit; a set_scales value is
    overwritten by the next health update, as without the cache; a swapped hook is
    read at once."""
    aged, _current, sim = _aged_drive(cell, seed=13)

    class EveryStep:  # the same estimator, without capacity_version
        def __init__(self, inner: SohEstimator) -> None:
            self.inner = inner

        def update(self, *args: object, **kwargs: object) -> None:
            self.inner.update(*args, **kwargs)  # type: ignore[arg-type]

        @property
        def capacity_ah_trusted(self) -> np.ndarray:
            return self.inner.capacity_ah_trusted

        @property
        def capacity_sigma_trusted(self) -> np.ndarray:
            return self.inner.capacity_sigma_trusted

        @property
        def r0_scale_trusted(self) -> np.ndarray:
            return self.inner.r0_scale_trusted

    def soh() -> SohEstimator:
        return SohEstimator(
            1, cell.capacity_ah, cell=cell, min_delta_soc=0.05, max_point_sigma=0.05
        )

    cached_soh = soh()
    cached = PackEstimator(cell, 1, noise=NOISE, health=cached_soh)
    plain = PackEstimator(cell, 1, noise=NOISE, health=EveryStep(soh()))
    caps = []
    for k in range(sim.voltage.shape[0]):
        a = cached.step(float(k), sim.current[k, 0], sim.voltage[k], 25.0)
        b = plain.step(float(k), sim.current[k, 0], sim.voltage[k], 25.0)
        np.testing.assert_array_equal(a.soc, b.soc)
        np.testing.assert_array_equal(a.soc_sigma, b.soc_sigma)
        np.testing.assert_array_equal(a.capacity_ah, b.capacity_ah)
        caps.append(float(a.capacity_ah[0]))
        if k == 3000:
            for est in (cached, plain):
                est.set_scales(capacity_ah=[3.0])
        if k == 5000:  # a new hook is read at once, even with the same version count
            new = soh()
            new.capacity_version = cached_soh.capacity_version
            cached.health = new
            plain.health = EveryStep(soh())
    # the drive closed capacity points and the fed-back capacity moved towards the truth
    assert cached_soh.capacity_version >= 3
    assert abs(caps[4999] - aged.capacity_ah) < abs(cell.capacity_ah - aged.capacity_ah)
    assert caps[5002] == cell.capacity_ah  # read from the new hook at step 5001
