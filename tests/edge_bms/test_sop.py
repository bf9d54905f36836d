"""State of power against a brute-force simulation of the same ECM."""

from __future__ import annotations

import numpy as np
import pytest

from edge_bms.cell import CellModel, Limits
from edge_bms.errors import InputError
from edge_bms.sop import (
    BINDING,
    NO_DERATING,
    Derating,
    cell_power_limits,
    pack_power_limits,
    power_limits,
    simulate_constant_current,
)


def brute_force(
    cell: CellModel,
    soc: float,
    temp: float,
    v1: float,
    v2: float,
    r0_scale: float,
    horizon: float,
    sign: float,
    i_cap: float,
    limits: Limits,
    step_a: float = 0.002,
) -> tuple[float, float]:
    """Largest feasible constant current on a fine grid, by stepping the ECM sample by
    sample (parameters looked up at each step's SOC); returns (current, power)."""
    cand = np.arange(0.0, i_cap + step_a / 2, step_a)
    s = np.full(cand.size, soc)
    x1 = np.full(cand.size, v1)
    x2 = np.full(cand.size, v2)
    ok = np.ones(cand.size, dtype=bool)
    i = sign * cand
    v = np.zeros(cand.size)
    for _ in range(int(horizon) + 1):  # dt = 1 s: steps 0..N
        p = cell.lookup(s, temp)
        v = p.ocv - i * p.r0 * r0_scale - x1 - x2
        ok &= (v >= limits.v_min) if sign > 0 else (v <= limits.v_max)
        a1, a2 = np.exp(-1.0 / p.tau1), np.exp(-1.0 / p.tau2)
        x1 = a1 * x1 + p.r1 * (1 - a1) * i
        x2 = a2 * x2 + p.r2 * (1 - a2) * i
        s = s - i / (3600 * cell.capacity_ah)
    # the SOC after N steps is the last one that carried current: s before this update
    s_end = soc - i * horizon / (3600 * cell.capacity_ah)
    ok &= (s_end >= limits.soc_min) if sign > 0 else (s_end <= limits.soc_max)
    # feasibility is monotone in the current: take the last of the leading feasible run
    k = int(np.argmin(ok)) - 1 if not ok.all() else cand.size - 1
    if k < 0:
        return 0.0, 0.0
    return float(cand[k]), float(cand[k] * v[k])


STATES = [
    # soc, T, v1, v2, r0_scale: mid SOC, cold, nearly empty, nearly full, aged, and a
    # cell relaxing from a heavy discharge (its lowest voltage is at the first step)
    (0.55, 25.0, 0.0, 0.0, 1.0),
    (0.30, 0.0, 0.01, 0.02, 1.0),
    (0.06, 25.0, 0.0, 0.0, 1.0),
    (0.97, 10.0, -0.01, -0.02, 1.0),
    (0.40, 35.0, 0.0, 0.0, 2.0),
    (0.12, 25.0, 0.06, 0.05, 1.3),
]


@pytest.mark.parametrize("horizon", [10.0, 30.0])
def test_limits_match_a_brute_force_simulation_within_one_percent(
    cell: CellModel, horizon: float
) -> None:
    soc, temp, v1, v2, scale = (np.array(c) for c in zip(*STATES, strict=True))
    got = cell_power_limits(
        cell, soc, temp, horizon, v1=v1, v2=v2, r0_scale=scale, derating=NO_DERATING
    )
    lim = cell.limits
    for k in range(len(STATES)):
        for sign, i_got, p_got, i_max in (
            (1.0, got.i_discharge_a[k], got.p_discharge_w[k], lim.i_discharge_max_a),
            (-1.0, got.i_charge_a[k], got.p_charge_w[k], lim.i_charge_max_a),
        ):
            i_ref, p_ref = brute_force(
                cell, soc[k], temp[k], v1[k], v2[k], scale[k], horizon, sign, i_max, lim
            )
            assert i_got == pytest.approx(i_ref, rel=0.01, abs=0.01), (k, sign)
            assert p_got == pytest.approx(p_ref, rel=0.01, abs=0.05), (k, sign)
    # the states were chosen to exercise every kind of bound
    names = {BINDING[b] for b in np.concatenate([got.bound_discharge, got.bound_charge])}
    assert names >= {"voltage", "current"}


def test_limits_are_consistent_with_the_model_voltage(cell: CellModel) -> None:
    """At the discharge limit the worst voltage over the horizon is v_min (to 1 mV)."""
    soc = np.array([0.2, 0.5, 0.8])
    temp = np.array([0.0, 25.0, 25.0])
    res = cell_power_limits(cell, soc, temp, 30.0, derating=NO_DERATING)
    v = simulate_constant_current(cell, soc, temp, res.i_discharge_a, 30.0)
    volt = res.bound_discharge == BINDING.index("voltage")
    assert volt.any()
    assert np.allclose(v.min(axis=1)[volt], cell.limits.v_min, atol=1e-3)
    assert np.allclose(v[:, -1], res.v_discharge_end)
    assert np.allclose(res.p_discharge_w, res.i_discharge_a * res.v_discharge_end)
    # a longer horizon never allows more
    res10 = cell_power_limits(cell, soc, temp, 10.0, derating=NO_DERATING)
    assert np.all(res10.i_discharge_a >= res.i_discharge_a - 1e-9)
    assert np.all(res10.i_charge_a >= res.i_charge_a - 1e-9)


def test_vectorised_equals_one_cell_at_a_time(cell: CellModel) -> None:
    rng = np.random.default_rng(3)
    n = 200
    soc = rng.uniform(0.02, 0.98, n)
    temp = rng.uniform(-5, 45, n)
    v1 = rng.uniform(-0.03, 0.03, n)
    batch = cell_power_limits(cell, soc, temp, 10.0, v1=v1)
    for k in rng.choice(n, 5, replace=False):
        one = cell_power_limits(cell, soc[k : k + 1], temp[k : k + 1], 10.0, v1=v1[k : k + 1])
        assert one.p_discharge_w[0] == pytest.approx(batch.p_discharge_w[k], rel=1e-9)
        assert one.p_charge_w[0] == pytest.approx(batch.p_charge_w[k], rel=1e-9)


def test_temperature_derating_and_soc_bounds(cell: CellModel) -> None:
    der = Derating()
    assert der.charge(np.array([-5.0, 0.0, 7.5, 20.0, 42.5, 50.0])).tolist() == pytest.approx(
        [0.0, 0.0, 0.5, 1.0, 0.5, 0.0]
    )
    res = cell_power_limits(cell, [0.5, 0.5], [-5.0, 42.5], 10.0, derating=der)
    assert res.i_charge_a[0] == 0.0  # no charging below 0 degC
    assert res.bound_charge[0] == BINDING.index("current")
    assert res.i_charge_a[1] == pytest.approx(0.5 * cell.limits.i_charge_max_a)
    # 0.4 % above soc_min: 0.004 * 5 Ah * 3600 s / 30 s = 2.4 A over 30 s
    lim = cell.limits.model_copy(update={"soc_min": 0.5})
    res = cell_power_limits(cell, [0.504], [25.0], 30.0, limits=lim, derating=NO_DERATING)
    assert res.i_discharge_a[0] == pytest.approx(2.4, rel=1e-6)
    assert BINDING[res.bound_discharge[0]] == "soc"


def test_pack_takes_the_weakest_cell_and_sums_voltages_at_its_current(cell: CellModel) -> None:
    soc = np.array([0.6, 0.03, 0.95, 0.65])
    temp = np.full(4, 0.0)
    pack = pack_power_limits(cell, soc, temp, 10.0, derating=NO_DERATING)
    assert pack.weakest_discharge == 1
    assert pack.i_discharge_a == pytest.approx(pack.cells.i_discharge_a.min())
    v_end = simulate_constant_current(cell, soc, temp, pack.i_discharge_a, 10.0)[:, -1]
    assert pack.p_discharge_w == pytest.approx(pack.i_discharge_a * v_end.sum(), rel=1e-9)
    # the weakest cell sits exactly at its own limit; the others have headroom
    assert v_end[1] == pytest.approx(pack.cells.v_discharge_end[1], abs=1e-6)
    assert pack.p_discharge_w < pack.cells.p_discharge_w.sum()
    assert pack.weakest_charge == 2  # the fullest cell limits the charge
    both = power_limits(cell, soc, temp)
    assert sorted(both) == [10.0, 30.0]


def test_inputs_are_checked(cell: CellModel) -> None:
    with pytest.raises(InputError, match="multiple of dt_s"):
        cell_power_limits(cell, [0.5], [25.0], 10.5)
    with pytest.raises(InputError, match="non-finite"):
        cell_power_limits(cell, [0.5, np.nan], [25.0], 10.0)
    with pytest.raises(InputError, match="do not broadcast"):
        cell_power_limits(cell, [0.5, 0.6], [25.0, 25.0, 25.0], 10.0)
    with pytest.raises(InputError, match="strictly increasing"):
        Derating(charge_t_c=(10.0, 0.0, 20.0, 30.0))
