"""The OCV start's drop at small currents (decision 0022): CellModel.start_drop, the cell
file's ocv_test_current_a, and PackEstimator(start_drop=)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_bms.cell import CellModel, load_cell
from edge_bms.errors import CellModelError, InputError
from edge_bms.estimator import OCV_PRIOR_SIGMA_RANGE, OCV_PRIOR_SIGMA_V, PackEstimator

I_TEST = 0.25


def _with_gap(cell: CellModel, gap_v: float = 0.04, i_test: float | None = I_TEST) -> CellModel:
    gaps = np.full(cell.temperature_c.size, gap_v)
    return dataclasses.replace(cell, ocv_half_gap_v=gaps, ocv_test_current_a=i_test)


def test_two_slopes_below_and_above_the_test_current(cell: CellModel) -> None:
    """|i| R_lo up to the test current (R_lo = half gap / I_test), R0 per ampere beyond,
    continuous there, odd in the current."""
    m = _with_gap(cell)
    soc, temp = 0.5, 10.0
    r0 = float(cell.lookup(soc, temp).r0)
    r_lo = 0.04 / I_TEST
    assert r_lo > r0  # the case the model is for
    small = np.array([0.05, 0.1, I_TEST])
    np.testing.assert_allclose(m.start_drop(small, soc, temp), small * r_lo, rtol=1e-12)
    big = np.array([1.0, 5.0])
    np.testing.assert_allclose(
        m.start_drop(big, soc, temp), I_TEST * r_lo + (big - I_TEST) * r0, rtol=1e-12
    )
    np.testing.assert_allclose(m.start_drop(-small, soc, temp), -small * r_lo, rtol=1e-12)
    assert float(m.start_drop(0.0, soc, temp)) == 0.0
    # concave: the slope never rises with |i|
    i = np.linspace(0.0, 6.0, 601)
    slopes = np.diff(m.start_drop(i, soc, temp)) / np.diff(i)
    assert np.all(np.diff(slopes) <= 1e-12)


def test_without_the_test_current_or_gap_it_is_i_r0(cell: CellModel) -> None:
    i = np.array([-3.0, 0.1, 5.0])
    soc = np.array([0.3, 0.6, 0.9])
    want = i * cell.lookup(soc, 0.0).r0
    np.testing.assert_array_equal(cell.start_drop(i, soc, 0.0), want)
    gap_only = _with_gap(cell, i_test=None)
    np.testing.assert_array_equal(gap_only.start_drop(i, soc, 0.0), want)


def test_a_gap_smaller_than_the_ohmic_drop_gives_r0(cell: CellModel) -> None:
    """R_lo is at least R0: a tiny gap (a warm cell) never makes the start drop smaller."""
    m = _with_gap(cell, gap_v=1e-5)
    i = np.array([0.1, 3.0])
    np.testing.assert_allclose(m.start_drop(i, 0.5, 25.0), i * cell.lookup(0.5, 25.0).r0)


def test_ageing_adds_series_resistance_to_both_slopes(cell: CellModel) -> None:
    m = _with_gap(cell)
    r0 = float(cell.lookup(0.5, 10.0).r0)
    extra = 0.5 * r0  # r0_scale 1.5
    for i in (0.1, 4.0):
        got = float(m.start_drop(i, 0.5, 10.0, r0_scale=1.5))
        assert got == pytest.approx(float(m.start_drop(i, 0.5, 10.0)) + i * extra, rel=1e-12)


@given(
    i=st.floats(-20.0, 20.0).filter(lambda x: x == 0 or abs(x) > 1e-9),
    soc=st.floats(0.0, 1.0),
    temp=st.floats(-20.0, 50.0),
    gap=st.floats(0.0, 0.2),
)
def test_start_drop_is_monotone_and_bounded(
    cell: CellModel, i: float, soc: float, temp: float, gap: float
) -> None:
    """Any current, SOC, temperature and gap: same sign as i, at least |i| R0, at most
    |i| max(R_lo, R0) (the steeper line through zero)."""
    m = _with_gap(cell, gap_v=gap)
    r0 = float(cell.lookup(soc, temp).r0)
    d = float(m.start_drop(i, soc, temp))
    assert np.sign(d) == np.sign(i)
    tol = 1e-15  # V: the second line's round-off, I_test R_lo - I_test R0
    assert abs(i) * r0 - tol <= abs(d) <= abs(i) * max(gap / I_TEST, r0) + tol


def test_cell_file_field_round_trip_and_checks(cell: CellModel) -> None:
    m = _with_gap(cell)
    back = CellModel.from_dict(m.to_dict())
    assert back.ocv_test_current_a == I_TEST
    assert back.with_capacity(4.0).ocv_test_current_a == I_TEST
    for value in (0.0, -0.25, float("inf"), float("nan"), 1e300):
        bad = m.to_dict()
        bad["ocv_test_current_a"] = value
        with pytest.raises(CellModelError, match=r"ocv_test_current_a must be a current in \(0"):
            CellModel.from_dict(bad)
    orphan = cell.to_dict()
    orphan["ocv_test_current_a"] = 0.25
    with pytest.raises(CellModelError, match="ocv_test_current_a needs ocv_half_gap_v"):
        CellModel.from_dict(orphan)


def test_shipped_cell_has_the_small_current_resistance() -> None:
    """lg-m50: C/20 = 0.25 A, and at -10 C the gap gives 170 mOhm, four times R0 (the
    DFN's own drop at 0.11 A from rest there is 20.8 mV: 182 mOhm)."""
    m50 = load_cell()
    assert m50.ocv_test_current_a == 0.25
    r_lo = float(m50.ocv_half_gap(-10.0)) / 0.25
    assert r_lo == pytest.approx(0.170, rel=0.01)  # the figure decision 0022 quotes
    d = float(m50.start_drop(0.11, 0.92, -10.0))
    assert d == pytest.approx(0.11 * r_lo, rel=1e-6)
    assert d > 3.5 * 0.11 * float(m50.lookup(0.92, -10.0).r0)


def test_estimator_start_reads_a_small_current_start(cell: CellModel) -> None:
    """A cell at SOC 0.6 that has just left rest at 0.12 A drops |i| R_lo: "two_slope"
    (the default) reads its SOC back; "r0" reads it low by the missing drop over the
    OCV slope."""
    m = _with_gap(cell)
    soc = np.full(4, 0.6)
    temp = 0.0
    i = 0.12
    v = m.ocv(soc, temp) - m.start_drop(i, soc, temp)
    two = PackEstimator(m, 4).step(0.0, i, v, temp)
    np.testing.assert_allclose(two.soc, soc, atol=1e-9)
    old = PackEstimator(m, 4, start_drop="r0").step(0.0, i, v, temp)
    slope = float(m.lookup(0.6, temp).docv_dsoc)
    missing = i * (0.04 / I_TEST - float(m.lookup(0.6, temp).r0))
    low = 0.6 - old.soc  # about the missing drop over the OCV slope (OCV is not linear)
    assert missing / slope > 0.01
    np.testing.assert_allclose(low, missing / slope, rtol=0.3)
    # the voltage sigma: 5 mV plus half the drop corrected for (the whole modelled drop)
    for est, drop in ((two, i * 0.04 / I_TEST), (old, i * float(m.lookup(0.6, temp).r0))):
        want = np.clip((OCV_PRIOR_SIGMA_V + 0.5 * drop) / slope, *OCV_PRIOR_SIGMA_RANGE)
        np.testing.assert_allclose(est.soc_sigma, want, rtol=3e-2)
    assert two.soc_sigma[0] > old.soc_sigma[0]


def test_estimator_start_drop_option_checked_and_kept(cell: CellModel) -> None:
    with pytest.raises(InputError, match="start_drop must be 'r0' or 'two_slope', got 'bv'"):
        PackEstimator(cell, 2, start_drop="bv")  # type: ignore[arg-type]
    saved = PackEstimator(cell, 2, start_drop="two_slope").state_dict()
    assert PackEstimator.from_state_dict(cell, saved).start_drop == "two_slope"
    old = dict(saved)
    del old["start_drop"]  # a checkpoint from before the option: the old start
    assert PackEstimator.from_state_dict(cell, old).start_drop == "r0"


def test_ukf_and_per_cell_starts_use_the_same_drop(cell: CellModel) -> None:
    """Per-cell currents, temperatures and SOCs: each cell reads its own SOC back, with
    the EKF and the UKF (they share the start)."""
    m = _with_gap(cell)
    soc = np.array([0.3, 0.5, 0.7, 0.9])
    i = np.array([0.05, -0.2, 0.12, 3.0])
    temp = np.array([-5.0, 0.0, 10.0, 25.0])
    v = m.ocv(soc, temp) - m.start_drop(i, soc, temp)
    # (the drop is looked up at the SOC of the raw voltage: 0.06 points off at 3 A)
    for method in ("ekf", "ukf"):
        e = PackEstimator(m, 4, method=method).step(0.0, i, v, temp)
        np.testing.assert_allclose(e.soc, soc, atol=1e-3)


def test_a_given_soc_is_fused_with_the_small_current_reading(cell: CellModel) -> None:
    """A given SOC (sigma 0.3) lands at the two-slope reading, not at the i R0 one."""
    m = _with_gap(cell)
    soc, i, temp = 0.6, 0.12, 0.0
    v = m.ocv(np.full(4, soc), temp) - m.start_drop(i, soc, temp)
    e = PackEstimator(m, 4, initial_soc=0.3).step(0.0, i, v, temp)
    reading = PackEstimator(m, 4).step(0.0, i, v, temp)
    var_p, var_o = 0.3**2, reading.soc_sigma**2
    want = 0.3 + var_p / (var_p + var_o) * (reading.soc - 0.3)
    np.testing.assert_allclose(e.soc, want, rtol=1e-9)
    assert np.all(np.abs(e.soc - soc) < 0.005)


def test_an_aged_cells_start_adds_its_series_resistance(cell: CellModel) -> None:
    """With the R0 scale set (a restored SOH), the start reads a cell whose drop carries
    (scale - 1) R0 more."""
    m = _with_gap(cell)
    soc, i, temp = np.full(4, 0.5), 0.15, 5.0
    v = m.ocv(soc, temp) - m.start_drop(i, soc, temp, r0_scale=1.8)
    est = PackEstimator(m, 4)
    est.set_scales(np.full(4, m.capacity_ah), np.full(4, 1.8))
    np.testing.assert_allclose(est.step(0.0, i, v, temp).soc, soc, atol=1e-4)
    fresh = PackEstimator(m, 4).step(0.0, i, v, temp)
    assert np.all(fresh.soc < soc - 1e-3)  # read low without the ageing
