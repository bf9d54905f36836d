"""PackEstimator: input checks, initialisation, dropouts, checkpoints and the hooks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_bms.cell import CellModel, load_cell
from edge_bms.errors import CheckpointError, InputError
from edge_bms.estimator import (
    HEALTH_CAPACITY_MAX,
    HEALTH_R0_SCALE_MIN,
    OCV_PRIOR_SIGMA,
    OCV_PRIOR_SIGMA_RANGE,
    OCV_PRIOR_SIGMA_V,
    UNKNOWN_SOC,
    CorrectionInputs,
    PackEstimate,
    PackEstimator,
    pack_soc,
)
from edge_bms.filters import FilterNoise, FilterState, ekf_step

from .conftest import pulse_profile, simulate

N = 4
NOISE = FilterNoise(voltage_v=2e-3, v2_v_per_sqrt_s=2e-4)


def _started(cell: CellModel, **kwargs: Any) -> PackEstimator:
    est = PackEstimator(cell, N, initial_soc=0.6, noise=NOISE, **kwargs)
    est.step(0.0, 1.0, cell.ocv(np.full(N, 0.6), 25.0), 25.0)
    return est


def _snapshot(est: PackEstimator) -> str:
    return json.dumps(est.state_dict(), sort_keys=True)


# -- input checks ----------------------------------------------------------------------
GOOD = {"ts": 1.0, "current_a": 2.0, "cell_v": [3.7, 3.7, 3.7, 3.7], "temp_c": 25.0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ts", 0.0, "ts 0.0 is not after the previous sample's ts 0.0"),
        ("ts", float("nan"), "ts must be finite, got nan"),
        ("ts", "soon", "ts must be a number (s), got 'soon'"),
        ("current_a", float("nan"), "current_a = nan is not finite"),
        ("current_a", 2e5, "current_a = 200000.0 A is beyond +-10000 A"),
        ("current_a", [1.0, 2.0], "current_a must be one value (series string) or 4 values"),
        ("current_a", [1.0, 2.0, math.inf, 0.0], "current_a[2] = inf is not finite"),
        ("cell_v", [3.7, 3.7, 3.7], "cell_v must have 4 values, got shape (3,)"),
        ("cell_v", [3.7, math.inf, 3.7, 3.7], "cell_v[1] = inf is not finite"),
        ("cell_v", [3.7, 3.7, -0.2, 3.7], "cell_v[2] = -0.2 is outside (0.0, 10.0) V"),
        ("cell_v", [3.7, "x", 3.7, 3.7], "cell_v must be numbers, got [3.7, 'x', 3.7, 3.7]"),
        ("temp_c", 400.0, "temp_c = 400.0 is outside [-60.0, 150.0] C"),
        ("temp_c", [25.0, 25.0, float("nan"), 25.0], "temp_c[2] = nan is outside"),
        ("temp_c", [25.0, 25.0], "temp_c must be one value or 4 values, got shape (2,)"),
    ],
)
def test_bad_input_names_field_and_value_and_changes_nothing(
    cell: CellModel, field: str, value: object, message: str
) -> None:
    est = _started(cell)
    before = _snapshot(est)
    with pytest.raises(InputError) as info:
        est.step(**{**GOOD, field: value})  # type: ignore[arg-type]
    assert message in str(info.value)
    assert _snapshot(est) == before
    est.step(**GOOD)  # type: ignore[arg-type]  # and it carries on


@given(
    v=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from([3.6, 4.0]),
        min_size=3,
        max_size=5,
    ),
    i=st.floats(allow_nan=True, allow_infinity=True) | st.lists(st.floats(-20, 20), max_size=5),
    t=st.floats(allow_nan=True, allow_infinity=True),
    dt=st.floats(-10.0, 1e5) | st.just(math.nan),
)
def test_any_input_is_estimated_or_rejected_cleanly(
    cell: CellModel, v: list[float], i: float | list[float], t: float, dt: float
) -> None:
    """Whatever arrives, the estimator either gives finite SOC and sigma or raises
    InputError and stays as it was."""
    est = _started(cell)
    before = _snapshot(est)
    try:
        e = est.step(float(est.last_ts or 0.0) + dt, i, v, t)
    except InputError:
        assert _snapshot(est) == before
        return
    assert np.all(np.isfinite(e.soc)) and np.all(np.isfinite(e.soc_sigma))
    assert np.all(e.soc_sigma > 0)
    assert np.array_equal(np.isnan(e.innovation), np.isnan(np.asarray(v, dtype=float)))


def test_constructor_checks(cell: CellModel) -> None:
    with pytest.raises(InputError, match="n_cells must be an integer >= 1, got 0"):
        PackEstimator(cell, 0)
    with pytest.raises(InputError, match="method must be 'ekf' or 'ukf', got 'pf'"):
        PackEstimator(cell, 2, method="pf")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"initial_soc\[1\] = 1.5 is outside \[0.0, 1.0\]"):
        PackEstimator(cell, 2, initial_soc=[0.5, 1.5])
    with pytest.raises(InputError, match=r"noise\.voltage_v: Input should be greater than 0"):
        PackEstimator(cell, 2, noise={"voltage_v": 0.0})


# -- initialisation, dropouts, pack SOC -----------------------------------------------
def test_soc_from_ocv_inverts_the_ocv_and_clamps_outside(cell: CellModel) -> None:
    """The exact inverse (segment search) against the OCV itself, at temperatures on and
    between the grid's, and below/above the OCV range (clamped to the grid's ends)."""
    rng = np.random.default_rng(7)
    soc = rng.uniform(cell.soc[0], cell.soc[-1], 500)
    temp = rng.uniform(-15.0, 45.0, 500)
    back = cell.soc_from_ocv(cell.ocv(soc, temp), temp)
    np.testing.assert_allclose(back, soc, atol=1e-12)
    lo, hi = cell.soc_from_ocv([1.0, 9.0], 25.0)
    assert (lo, hi) == (cell.soc[0], cell.soc[-1])
    assert cell.soc_from_ocv(np.full((2, 3), 3.7), 25.0).shape == (2, 3)


def test_initial_soc_from_ocv_of_the_first_sample(cell: CellModel) -> None:
    """A cell at rest reads its OCV: SOC from the first sample, sigma the stated prior,
    used once (no update with the same sample); a missing voltage gets the wide prior."""
    soc = np.array([0.2, 0.5, 0.8, 0.9])
    v = cell.ocv(soc, 10.0)
    v[3] = np.nan
    est = PackEstimator(cell, N, noise=NOISE)
    e = est.step(100.0, 0.0, v, 10.0)
    np.testing.assert_allclose(e.soc[:3], soc[:3], atol=1e-9)
    # sigma: the OCV's voltage uncertainty over the slope there, within the stated range
    slope = np.abs(cell.lookup_rows(soc[:3], 10.0)[6])
    expected = np.clip(OCV_PRIOR_SIGMA_V / slope, *OCV_PRIOR_SIGMA_RANGE)
    np.testing.assert_allclose(e.soc_sigma[:3], expected, rtol=1e-9)
    assert expected.max() <= OCV_PRIOR_SIGMA
    # on the shipped cell's graphite plateau (SOC 0.9, 0.26 V per unit) the slope formula
    # gives an unclipped, wider sigma (this synthetic cell is steep everywhere)
    m50 = load_cell()
    flat = PackEstimator(m50, 1).step(100.0, 0.0, m50.ocv(np.array([0.9]), 10.0), 10.0)
    assert OCV_PRIOR_SIGMA_RANGE[0] < flat.soc_sigma[0] < OCV_PRIOR_SIGMA_RANGE[1]
    assert flat.soc_sigma[0] > expected.max()
    assert e.soc[3] == UNKNOWN_SOC and e.soc_sigma[3] > 0.25
    np.testing.assert_allclose(e.innovation[:3], 0.0, atol=1e-9)
    assert e.flags.initial and e.flags.correction_reason == "initial"
    assert e.flags.dropout == (3,)
    # under load the ohmic drop is taken out before inverting OCV
    v_load = cell.ocv(soc, 25.0) - 5.0 * cell.lookup(soc, 25.0).r0
    e = PackEstimator(cell, N).step(0.0, 5.0, v_load, 25.0)
    np.testing.assert_allclose(e.soc, soc, atol=0.01)


def test_one_missing_voltage_only_stops_that_cell(cell: CellModel) -> None:
    est = _started(cell)
    ref = _started(cell)
    v = cell.ocv(np.full(N, 0.58), 25.0)
    v_missing = v.copy()
    v_missing[2] = np.nan
    e = est.step(1.0, 1.0, v_missing, 25.0)
    full = ref.step(1.0, 1.0, v, 25.0)
    assert e.flags.dropout == (2,)
    assert math.isnan(e.innovation[2]) and np.all(np.isfinite(e.innovation[[0, 1, 3]]))
    np.testing.assert_array_equal(e.soc[[0, 1, 3]], full.soc[[0, 1, 3]])
    assert e.soc[2] != full.soc[2] and e.soc_sigma[2] > full.soc_sigma[2]


def test_per_cell_current_and_temperature(cell: CellModel) -> None:
    """Parallel groups measured one by one: each cell its own current and temperature."""
    rng = np.random.default_rng(10)
    k_steps = 400
    current = np.stack([pulse_profile(rng, k_steps) for _ in range(N)], axis=1)
    temp = np.array([5.0, 15.0, 30.0, 40.0])
    soc0 = np.array([0.3, 0.5, 0.7, 0.9])
    sim = simulate(cell, current, soc0, rng, temperature=temp, noise=NOISE)
    est = PackEstimator(cell, N, noise=NOISE)
    for k in range(k_steps):
        e = est.step(sim.t[k], sim.current[k], sim.voltage[k], temp)
    np.testing.assert_array_equal(e.current_a, sim.current[-1])
    np.testing.assert_array_equal(e.temp_c, temp)
    assert np.abs(e.soc - sim.soc[-1]).max() < 0.01
    # the same pack fed one current for all cells would be wrong by the charge difference
    assert np.ptp(soc0 - sim.soc[-1]) > 0.02


def test_pack_soc_is_the_usable_charge_ratio() -> None:
    # equal capacities: the emptiest cell can give 0.2, the fullest take 0.1
    assert pack_soc(np.array([0.2, 0.5, 0.9]), 5.0) == pytest.approx(0.2 / 0.3)
    # with capacities: D = min(0.2*5, 0.5*2, 0.9*5) = 1.0, C = min(0.8*5, 0.5*2, 0.1*5) = 0.5
    caps = np.array([5.0, 2.0, 5.0])
    assert pack_soc(np.array([0.2, 0.5, 0.9]), caps) == pytest.approx(1.0 / 1.5)
    assert pack_soc(np.array([0.0, 1.0]), 5.0) == 0.0  # can neither charge nor discharge
    assert pack_soc(np.array([1.03, 1.01]), 5.0) == 1.0
    assert pack_soc(np.array([0.4]), 5.0) == pytest.approx(0.4)


def test_tracks_a_pack_with_the_ukf(cell: CellModel) -> None:
    rng = np.random.default_rng(11)
    soc0 = rng.uniform(0.4, 0.9, N)
    sim = simulate(cell, pulse_profile(rng, 600), soc0, rng, noise=NOISE)
    est = PackEstimator(cell, N, method="ukf", noise=NOISE)
    for k in range(600):
        e = est.step(1000.0 + sim.t[k], sim.current[k, 0], sim.voltage[k], 25.0)
    assert np.abs(e.soc - sim.soc[-1]).max() < 0.01
    assert e.pack_soc == pytest.approx(pack_soc(e.soc, 5.0))


# -- checkpoints ------------------------------------------------------------------------
def test_state_dict_round_trip_continues_identically(cell: CellModel) -> None:
    rng = np.random.default_rng(12)
    sim = simulate(cell, pulse_profile(rng, 120), rng.uniform(0.3, 0.9, N), rng, noise=NOISE)
    v = sim.voltage.copy()
    v[59, 1] = np.nan  # the saved state holds a missing innovation
    a = PackEstimator(cell, N, method="ukf", noise=NOISE)
    a.set_scales(capacity_ah=[5.0, 4.8, 4.9, 5.0], r0_scale=[1.0, 1.2, 1.0, 1.1])
    for k in range(60):
        a.step(sim.t[k], sim.current[k], v[k], 25.0)
    text = json.dumps(a.state_dict(), allow_nan=False)
    b = PackEstimator.from_state_dict(cell, json.loads(text))
    for k in range(60, 120):
        ea = a.step(sim.t[k], sim.current[k], v[k], 25.0)
        eb = b.step(sim.t[k], sim.current[k], v[k], 25.0)
        np.testing.assert_array_equal(ea.soc, eb.soc)
        np.testing.assert_array_equal(ea.soc_sigma, eb.soc_sigma)
    # saved before the first sample: starts as configured
    fresh = PackEstimator.from_state_dict(
        cell, PackEstimator(cell, 2, initial_soc=0.3).state_dict()
    )
    assert fresh.state is None
    np.testing.assert_array_equal(
        fresh.step(0.0, 0.0, [3.7, 3.7], 25.0).soc,
        PackEstimator(cell, 2, initial_soc=0.3).step(0.0, 0.0, [3.7, 3.7], 25.0).soc,
    )
    # an OCV start saved before its first sample keeps the slope-derived sigma, and the
    # SOH feedback setting survives
    v0 = cell.ocv(np.array([0.3, 0.9]), 25.0)
    ocv = PackEstimator(cell, 2, health_feedback="capacity")
    restored = PackEstimator.from_state_dict(cell, json.loads(json.dumps(ocv.state_dict())))
    assert restored.health_feedback == "capacity"
    np.testing.assert_array_equal(
        restored.step(0.0, 0.0, v0, 25.0).soc_sigma, ocv.step(0.0, 0.0, v0, 25.0).soc_sigma
    )


def test_reset_soc_before_and_after_the_first_sample(cell: CellModel) -> None:
    est = PackEstimator(cell, 2, noise=NOISE)
    est.reset_soc([0.4, 0.6], 0.02)  # before any sample: the start
    e = est.step(0.0, 0.0, cell.ocv(np.array([0.4, 0.6]), 25.0), 25.0)
    np.testing.assert_allclose(e.soc, [0.4, 0.6], atol=2e-3)
    assert np.all(e.soc_sigma < 0.02)  # fused with the first sample's OCV reading
    est.reset_soc(0.8, 0.05)  # later: SOC and its sigma replaced, RC voltages kept
    st = est.state
    assert st is not None
    np.testing.assert_array_equal(st.x[0], [0.8, 0.8])
    np.testing.assert_array_equal(st.p[0], [0.05**2, 0.05**2])
    np.testing.assert_array_equal(st.p[1:3], 0.0)
    with pytest.raises(InputError, match=r"soc\[1\] = 1.2 is outside"):
        est.reset_soc([0.5, 1.2], 0.05)
    with pytest.raises(InputError, match="sigma must be > 0"):
        est.reset_soc(0.5, 0.0)


def test_bad_checkpoints_are_refused(cell: CellModel) -> None:
    good = _started(cell).state_dict()
    with pytest.raises(CheckpointError, match="is for cell model 'other', not 'synthetic-5ah'"):
        PackEstimator.from_state_dict(cell, {**good, "cell": "other"})
    with pytest.raises(CheckpointError, match=r"x has shape \(3, 3\), expected \(3, 4\)"):
        PackEstimator.from_state_dict(cell, {**good, "x": [r[:3] for r in good["x"]]})
    with pytest.raises(CheckpointError, match=r"format 'x/9', expected 'edge_bms\.estimator/1'"):
        PackEstimator.from_state_dict(cell, {**good, "format": "x/9"})
    with pytest.raises(CheckpointError, match="method: Input should be 'ekf' or 'ukf'"):
        PackEstimator.from_state_dict(cell, {**good, "method": "pf"})
    bad_p = [list(r) for r in good["p"]]
    bad_p[0][1] = -1e-6
    with pytest.raises(CheckpointError, match="p has a variance <= 0"):
        PackEstimator.from_state_dict(cell, {**good, "p": bad_p})


# -- hooks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Out:
    dv_v: np.ndarray
    r_var_v2: np.ndarray
    used: np.ndarray


class FakeCorrection:
    """Adds ``dv`` where ``used``; records what it was given."""

    def __init__(self, dv: np.ndarray, used: np.ndarray, r_var: np.ndarray | None = None) -> None:
        self.dv, self.used = dv, used
        self.r_var = np.full(dv.shape, np.nan) if r_var is None else r_var
        self.seen: list[CorrectionInputs] = []

    def features(self, inputs: CorrectionInputs) -> np.ndarray:
        self.seen.append(inputs)
        return np.stack([inputs.soc, inputs.current_a])

    def predict(self, features: Any) -> Out:
        assert features.shape == (2, N)
        return Out(self.dv, self.r_var, self.used)


class Broken(FakeCorrection):
    def predict(self, features: Any) -> Out:
        raise RuntimeError("onnxruntime: bad input")


def _one_step(cell: CellModel, correction: Any, **kwargs: Any) -> tuple[PackEstimate, Any]:
    est = _started(cell, correction=correction, **kwargs)
    state = est.state
    return est.step(1.0, 2.0, cell.ocv(np.full(N, 0.6), 25.0) - 0.03, 25.0), state


def test_correction_shifts_the_predicted_voltage(cell: CellModel) -> None:
    dv = np.array([0.01, -0.02, 0.0, 0.005])
    r_var = np.array([np.nan, 1e-4, np.nan, np.nan])
    corr = FakeCorrection(dv, np.ones(N, dtype=bool), r_var)
    e, prior = _one_step(cell, corr)
    v = cell.ocv(np.full(N, 0.6), 25.0) - 0.03
    plain = ekf_step(cell, prior, 2.0, v, 25.0, 1.0, NOISE)
    np.testing.assert_allclose(e.v_pred - plain.v_pred, dv, atol=1e-12)
    assert e.flags.correction_used and e.flags.correction_reason == ""
    # the learned variance replaced R in cell 1 only
    assert e.innovation_var[1] > plain.innovation_var[1] + 0.9e-4
    np.testing.assert_allclose(e.innovation_var[[0, 2, 3]], plain.innovation_var[[0, 2, 3]])
    seen = corr.seen[-1]
    assert seen.dt_s == 1.0 and seen.current_a.shape == (N,)
    np.testing.assert_array_equal(seen.soc, prior.x[0])


def test_correction_falls_back_per_cell_and_on_errors(cell: CellModel) -> None:
    dv = np.array([0.01, np.nan, 0.01, 0.01])
    used = np.array([True, True, False, True])
    e, prior = _one_step(cell, FakeCorrection(dv, used))
    assert not e.flags.correction_used and e.flags.correction_reason == "range"
    np.testing.assert_array_equal(e.flags.correction_cells, [True, False, False, True])
    v = cell.ocv(np.full(N, 0.6), 25.0) - 0.03
    plain = ekf_step(cell, prior, 2.0, v, 25.0, 1.0, NOISE)
    np.testing.assert_allclose(e.v_pred - plain.v_pred, [0.01, 0.0, 0.0, 0.01], atol=1e-12)

    e, _ = _one_step(cell, Broken(dv, used))
    assert e.flags.correction_reason == "error: RuntimeError: onnxruntime: bad input"
    np.testing.assert_allclose(e.v_pred, plain.v_pred, atol=1e-12)
    e, _ = _one_step(cell, FakeCorrection(np.zeros(3), np.ones(3, dtype=bool)))
    assert e.flags.correction_reason.startswith("error: ValueError: dv_v, used, r_var_v2")
    e, _ = _one_step(cell, None, correction_fallback="integrity")
    assert not e.flags.correction_used and e.flags.correction_reason == "integrity"


class FakeHealth:
    def __init__(self) -> None:
        self.capacity = np.full(N, 5.0)
        self.r0_scale = np.ones(N)
        self.calls: list[dict[str, Any]] = []

    @property
    def capacity_ah_trusted(self) -> np.ndarray:
        return self.capacity

    @property
    def r0_scale_trusted(self) -> np.ndarray:
        return self.r0_scale

    def update(self, current_a: Any, voltage_v: Any, dt_s: float, **kw: Any) -> None:
        self.calls.append({"dt_s": dt_s, **kw})
        self.capacity = np.array([4.0, 5.0, 2.5, np.nan])  # the last is a glitch: ignored
        self.r0_scale = np.array([1.0, 2.0, 1.0, 1.0])


def test_health_scales_apply_from_the_next_step(cell: CellModel) -> None:
    health = FakeHealth()
    est = _started(cell, health=health)
    assert health.calls == []  # the first sample has no interval
    est.step(1.0, 0.0, cell.ocv(np.full(N, 0.6), 25.0), 25.0)
    assert health.calls[-1]["dt_s"] == 1.0 and health.calls[-1]["r0_table_ohm"].shape == (N,)
    before = est.state
    assert before is not None
    i = 10.0
    e = est.step(361.0, i, np.full(N, np.nan), 25.0)  # predict only: pure coulomb count
    expected = before.x[0] - 360.0 * 0.0 / 3600  # held current was 0 A
    np.testing.assert_allclose(e.soc, expected)
    e = est.step(721.0, i, np.full(N, np.nan), 25.0)  # now 10 A for 360 s
    drop = 10.0 * 360.0 / 3600.0 / np.array([4.0, 5.0, 2.5, 5.0])
    np.testing.assert_allclose(expected - e.soc, drop, rtol=1e-12)
    np.testing.assert_array_equal(e.capacity_ah, [4.0, 5.0, 2.5, 5.0])
    np.testing.assert_array_equal(e.r0_scale, [1.0, 2.0, 1.0, 1.0])


def test_safety_sees_raw_samples_and_power_sees_the_estimate(cell: CellModel) -> None:
    class Safety:
        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        def update(self, ts: float, cell_v: Any, temp_c: Any, current_a: Any) -> list[str]:
            self.seen.append((ts, np.array(cell_v), current_a))
            return ["under_voltage"] if np.nanmin(cell_v) < 3.0 else []

    safety = Safety()
    est = _started(cell, safety=safety, power=lambda e: {"pack_soc": e.pack_soc})
    v = np.array([3.7, np.nan, 2.9, 3.7])
    e = est.step(1.0, 1.0, v, 25.0)
    assert e.alarms == ["under_voltage"]
    np.testing.assert_array_equal(safety.seen[-1][1], v)
    assert e.sop == {"pack_soc": e.pack_soc}


def test_works_with_the_package_soh_and_safety(cell: CellModel) -> None:
    """The real SohEstimator and SafetyMonitor fit the hooks' Protocols."""
    from edge_bms.safety import SafetyConfig, SafetyMonitor
    from edge_bms.soh import SohEstimator

    rng = np.random.default_rng(13)
    sim = simulate(cell, pulse_profile(rng, 300), rng.uniform(0.4, 0.9, N), rng, noise=NOISE)
    health = SohEstimator(N, cell.capacity_ah, cell=cell, r0_min_updates=2)
    safety = SafetyMonitor(SafetyConfig.from_limits(cell.limits), N)
    est = PackEstimator(cell, N, noise=NOISE, health=health, safety=safety)
    for k in range(300):
        e = est.step(sim.t[k], sim.current[k, 0], sim.voltage[k], 25.0)
    assert np.abs(e.soc - sim.soc[-1]).max() < 0.01
    # fed back within physical bounds: no better than the table, no more than rated; R0
    # only after r0_min_updates current steps (test_soh checks the gate itself)
    assert health.r0_updates.min() >= 2
    np.testing.assert_array_equal(e.r0_scale, np.maximum(health.r0_scale, HEALTH_R0_SCALE_MIN))
    np.testing.assert_array_equal(
        e.capacity_ah, np.minimum(health.capacity_ah, HEALTH_CAPACITY_MAX * cell.capacity_ah)
    )
    assert list(e.alarms) == []


def test_estimate_arrays_are_read_only(cell: CellModel) -> None:
    est = _started(cell)
    e = est.step(1.0, 1.0, [3.7, 3.7, 3.7, 3.7], 25.0)
    for name in ("soc", "soc_sigma", "v_rc", "cell_v", "innovation"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(e, name)[0] = 0.0
    est.step(2.0, 1.0, [3.7, 3.7, 3.7, 3.7], 25.0)  # the next step still runs


def test_as_dict_is_json(cell: CellModel) -> None:
    est = _started(cell)
    e = est.step(1.0, 1.0, [3.7, np.nan, 3.7, 3.7], 25.0)
    d = json.loads(json.dumps(e.as_dict(), allow_nan=False))
    assert d["innovation"][1] is None and d["dropout"] == [1]
    assert d["correction_reason"] == "none"
    assert isinstance(FilterState.initial([0.5], 0.1).soc, np.ndarray)


@pytest.mark.parametrize("feedback", ["all", "capacity", "none"])
def test_health_feedback_chooses_what_an_soh_estimate_changes(
    cell: CellModel, feedback: str
) -> None:
    class Health:  # a fixed verdict: 80 % capacity, 2x R0
        capacity_ah_trusted = np.full(N, 0.8 * cell.capacity_ah)
        r0_scale_trusted = np.full(N, 2.0)

        def update(self, *args: Any, **kwargs: Any) -> None:
            pass

    est = PackEstimator(cell, N, noise=NOISE, health=Health(), health_feedback=feedback)  # type: ignore[arg-type]
    for k in range(3):
        e = est.step(float(k), 1.0, np.full(N, 3.7), 25.0)
    cap = 0.8 * cell.capacity_ah if feedback != "none" else cell.capacity_ah
    np.testing.assert_allclose(e.capacity_ah, cap)
    np.testing.assert_allclose(e.r0_scale, 2.0 if feedback == "all" else 1.0)
    with pytest.raises(InputError, match="health_feedback must be 'all', 'capacity' or 'none'"):
        PackEstimator(cell, N, health_feedback="some")  # type: ignore[arg-type]


def test_a_given_soc_is_fused_with_the_first_ocv_reading(cell: CellModel) -> None:
    """A wrong SOC with a wide sigma lands at the OCV reading; a stored SOC with a tight
    sigma barely moves; a cell without a first voltage keeps what it was given."""
    true = np.array([0.3, 0.5, 0.8, 0.6])
    v = cell.ocv(true, 25.0)  # rested cells
    wide = PackEstimator(cell, N, initial_soc=np.clip(true + 0.3, 0, 1), noise=NOISE)
    e = wide.step(0.0, 0.0, v, 25.0)
    assert np.abs(e.soc - true).max() < 0.01
    assert e.soc_sigma.max() < 0.1  # the OCV reading's sigma, not the prior's 0.3
    assert e.flags.initial
    tight = PackEstimator(cell, N, initial_soc=true + 0.02, initial_soc_sigma=0.002, noise=NOISE)
    e = tight.step(0.0, 0.0, v, 25.0)
    np.testing.assert_allclose(e.soc, true + 0.02, atol=0.002)
    v_missing = v.copy()
    v_missing[1] = np.nan
    e = PackEstimator(cell, N, initial_soc=0.9, noise=NOISE).step(0.0, 0.0, v_missing, 25.0)
    assert e.soc[1] == pytest.approx(0.9)
    assert e.soc_sigma[1] == pytest.approx(0.3)
    assert abs(e.soc[0] - true[0]) < 0.01


def test_ocv_start_sigma_includes_the_cells_ocv_gap(cell: CellModel) -> None:
    """With ``start_ocv_gap`` the OCV start's sigma adds that many times the cell's
    half pseudo-OCV gap at the temperature (interpolated over the file's temperatures);
    a cell file without it, or 0, leaves the sigma as it was; it survives a
    checkpoint taken before the first sample."""
    import dataclasses

    gaps = np.linspace(0.04, 0.01, cell.temperature_c.size)
    hyst = dataclasses.replace(cell, ocv_half_gap_v=gaps)
    v = cell.ocv(np.full(N, 0.5), 0.0)
    sig = {}
    for name, model, k in (("plain", cell, 1.0), ("off", hyst, 0.0), ("on", hyst, 1.0)):
        est = PackEstimator(model, N, start_ocv_gap=k)
        sig[name] = est.step(0.0, 0.0, v, 0.0).soc_sigma.copy()
    np.testing.assert_array_equal(sig["plain"], sig["off"])
    slope = np.abs(cell.lookup_rows(np.full(N, 0.5), 0.0)[6])
    expected = (OCV_PRIOR_SIGMA_V + float(hyst.ocv_half_gap(0.0))) / slope
    np.testing.assert_allclose(sig["on"], np.clip(expected, *OCV_PRIOR_SIGMA_RANGE), rtol=1e-3)
    assert np.all(sig["on"] > 2 * sig["off"])
    saved = PackEstimator(hyst, N, start_ocv_gap=0.7).state_dict()
    back = PackEstimator.from_state_dict(hyst, saved)
    assert back.start_ocv_gap == 0.7
    with pytest.raises(InputError, match="start_ocv_gap"):
        PackEstimator(cell, N, start_ocv_gap=-1.0)
