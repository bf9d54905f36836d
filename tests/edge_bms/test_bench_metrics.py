"""The benchmark's SOC arithmetic (labctl.models.bms_eval) on hand-made traces, where
every figure can be worked out by hand, and the batched runner it relies on."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.soh import SohEstimator
from labctl.models.bms_correction import Profile
from labctl.models.bms_eval import (
    Trace,
    converge_time,
    coulomb_count,
    ocv_initial_soc,
    run_cells,
    run_filter,
    soc_metrics,
    wrong_start_times,
    wrong_starts,
)

from .conftest import pulse_profile, simulate


def trace(error: list[float], sigma: float | list[float] = 0.01, t0: float = 100.0) -> Trace:
    """A 1 Hz trace starting at ``t0`` whose estimate is truth + ``error``."""
    e = np.asarray(error, dtype=float)
    truth = np.linspace(0.9, 0.5, e.size)
    return Trace(
        "hand",
        t0 + np.arange(e.size, dtype=float),
        truth,
        truth + e,
        np.broadcast_to(np.asarray(sigma, dtype=float), e.shape).copy(),
        0.0,
    )


def test_converge_time_is_the_first_sample_after_the_last_one_outside_the_band() -> None:
    # outside at 0, 1 and 4 (0.021 > 0.02), inside from 5 on
    tr = trace([0.3, -0.1, 0.01, 0.019, 0.021, 0.0, -0.019, 0.005])
    assert converge_time(tr, 0.02) == 5.0  # t[5] - t[0], not t[5]
    assert converge_time(trace([0.01, -0.019, 0.0]), 0.02) == 0.0  # never outside
    assert converge_time(trace([0.0, 0.0, 0.05]), 0.02) == math.inf  # ends outside
    assert converge_time(tr, 0.5) == 0.0


def test_wrong_start_times_count_only_starts_left_far_enough_off() -> None:
    """From true 0.95 the +30 start clips to 1.0 (5 points off): not counted; the -30
    run is, with its converge_time."""
    n = 8
    p = Profile("p", np.arange(n, dtype=float), np.ones(n), np.full(n, 3.7), np.full(n, 25.0),
                soc_true=np.linspace(0.95, 0.94, n))  # fmt: skip
    assert wrong_starts(p) == (0.95, [pytest.approx(0.65), 1.0])
    low = trace([0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    high = trace([0.05] * n)  # never converges, but is not counted
    assert wrong_start_times(p, [low, high]) == [2.0]
    assert wrong_start_times(p, [low, high], band=0.5) == [0.0]


def test_soc_metrics_errors_after_convergence_and_times_over_traces() -> None:
    a = trace([0.3, -0.1, 0.01, -0.03, 0.04, 0.0])  # converges at 5 s
    b = trace([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # at 0 s
    c = trace([0.0, 0.0, 0.0, 0.0, 0.0, 0.05])  # never
    m = soc_metrics([a, b, c], converge_s=3.0, band=0.02)
    # samples at t - t0 >= 3 s: a -> -0.03, 0.04, 0.0; b -> 0, 0, 0; c -> 0, 0, 0.05
    after = np.array([-0.03, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05])
    assert m["n"] == 9
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean(after**2)))
    assert m["rmse"] == pytest.approx(math.sqrt(0.005 / 9))
    assert m["mae"] == pytest.approx(0.12 / 9)
    assert m["max_abs"] == pytest.approx(0.05)
    assert m["converge_s_worst"] == math.inf
    assert m["converge_s_median"] == 5.0
    assert soc_metrics([a, b], converge_s=3.0)["converge_s_median"] == 2.5


def test_soc_metrics_sigma_calibration() -> None:
    # errors of 0.5, 1.5, 2.5 and -0.5 sigma after convergence (sigma 0.01; the first
    # sample, far off, falls before converge_s)
    tr = trace([0.9, 0.005, 0.015, 0.025, -0.005], sigma=0.01)
    m = soc_metrics([tr], converge_s=1.0)
    assert m["within_1sigma"] == pytest.approx(0.5)
    assert m["within_2sigma"] == pytest.approx(0.75)
    assert m["nees"] == pytest.approx((0.25 + 2.25 + 6.25 + 0.25) / 4)
    # per-sample sigma: 0.02 with sigma 0.04 is 0.5 sigma, 0.019 with sigma 0.01 is 1.9
    tr2 = trace([0.0, 0.02, 0.019], sigma=[1.0, 0.04, 0.01])
    m2 = soc_metrics([tr2], converge_s=1.0)
    assert m2["within_1sigma"] == pytest.approx(0.5)
    assert m2["within_2sigma"] == pytest.approx(1.0)
    assert m2["nees"] == pytest.approx((0.25 + 3.61) / 2)


def test_coulomb_count_has_no_sigma_so_no_calibration_figures() -> None:
    t = np.arange(5, dtype=float)
    p = Profile(
        "cc",
        t,
        np.full(5, 3.6),  # 3.6 A for 1 s = 1 mAh per step
        np.full(5, 3.7),
        np.full(5, 25.0),
        soc_true=0.8 - np.arange(5, dtype=np.float64) * 5e-4,
    )
    tr = coulomb_count(p, 2.0, initial_soc=0.81)
    assert tr.soc == pytest.approx(0.81 - np.arange(5) * 5e-4)
    m = soc_metrics([tr], converge_s=0.0)
    assert m["rmse"] == pytest.approx(0.01)
    assert "within_1sigma" not in m and "nees" not in m


def test_run_cells_matches_one_cell_runs_and_the_ocv_start(cell: CellModel) -> None:
    rng = np.random.default_rng(5)
    sim = simulate(cell, pulse_profile(rng, 300), np.array([0.7]), rng)
    p = Profile(
        "sim",
        sim.t,
        sim.current[:, 0],
        sim.voltage[:, 0],
        sim.temperature[:, 0],
        soc_true=sim.soc[:, 0],
    )
    both = run_cells(cell, p, 2, initial_soc=[0.4, 1.0], record=True)
    for tr, start in zip(both, (0.4, 1.0), strict=True):
        one = run_filter(cell, p, initial_soc=start)
        np.testing.assert_allclose(tr.soc, one.soc, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tr.soc_sigma, one.soc_sigma, rtol=0, atol=1e-12)
    assert set(both[0].extras) == {"v1", "v2", "capacity_ah", "r0_scale", "temperature_c"}
    assert np.all(both[0].extras["capacity_ah"] == cell.capacity_ah)
    # the coulomb count's OCV start is the OCV of the first voltage plus the estimator's
    # start drop (here a cell with a small-current resistance), or i R0 when asked
    gaps = np.full(cell.temperature_c.size, 0.04)
    m = dataclasses.replace(cell, ocv_half_gap_v=gaps, ocv_test_current_a=0.25)
    i0, v0, t0 = float(p.current_a[0]), float(p.voltage_v[0]), float(p.temperature_c[0])
    for opts, drop in (
        (None, lambda s: m.start_drop(i0, s, t0)),
        ({"start_drop": "r0"}, lambda s: i0 * m.lookup(s, t0).r0),
    ):
        want = float(m.soc_from_ocv(v0 + drop(float(m.soc_from_ocv(v0, t0))), t0))
        assert ocv_initial_soc(m, p, opts) == pytest.approx(want, abs=1e-12)
    assert abs(ocv_initial_soc(cell, p) - 0.7) < 0.05


def test_soh_drops_a_capacity_point_of_implausible_capacity() -> None:
    """The per-step driver closes a point once the SOC moved 10 points; one whose SOC
    moved 11 points for 0.1 Ah (0.91 Ah: a filter still converging) is dropped and its
    segment restarted; the next (0.55 Ah for 11 points: 5 Ah) is used."""
    est = SohEstimator(1, 5.0, capacity_forgetting=1.0)
    est.update(0.0, 3.7, 1.0, soc=0.9, soc_sigma=0.01)  # opens the segment
    est.update(360.0, 3.7, 1.0, soc=0.79, soc_sigma=0.01)  # 0.1 Ah for 0.11 SOC
    assert est.n_points.tolist() == [0.0]
    assert est.seg_soc.tolist() == [0.79] and est.seg_ah.tolist() == [0.0]
    assert est.capacity_ah == pytest.approx([5.0])
    est.update(1980.0, 3.7, 1.0, soc=0.68, soc_sigma=0.01)  # 0.55 Ah for 0.11 SOC
    assert est.n_points.tolist() == [1.0]
    assert est.capacity_ah == pytest.approx([5.0], rel=1e-6)
    est.update(1440.0, 3.7, 1.0, soc=0.58, soc_sigma=0.01)  # 0.4 Ah / 0.1: 4 Ah, kept
    assert est.n_points.tolist() == [2.0]
    assert 4.0 < float(est.capacity_ah[0]) < 5.0
