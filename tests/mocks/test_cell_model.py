"""The cycler's cell model: OCV, capacity, resistances, ageing, heat and conservation."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardware_mocks.physics import cell as cm

P = cm.CellParams()


def _ctl(direction: int, current: float, voltage: float, n: int = 1) -> cm.Control:
    return cm.Control(
        np.full(n, direction, dtype=np.int64), np.full(n, float(current)), np.full(n, voltage)
    )


def _discharge_capacity(
    state: cm.CellState,
    current: float,
    params: cm.CellParams = P,
    env: float = 25.0,
    cutoff: float = 2.5,
    dt: float = 2.0,
) -> tuple[float, cm.CellState]:
    """Ah delivered by a CC discharge to ``cutoff`` (the loop stops when CV would start)."""
    ah = 0.0
    ctl = _ctl(cm.DISCHARGE, current, cutoff)
    for _ in range(200_000):
        state, i, _v = cm.step(state, ctl, params, env, dt)
        ah += float(i[0]) * dt / 3600.0
        if i[0] < 0.999 * current:  # current limited by the cut-off: CC phase over
            return ah, state
    raise AssertionError("discharge never reached the cut-off")


def _charge_full(
    state: cm.CellState, current: float, params: cm.CellParams = P, dt: float = 5.0
) -> cm.CellState:
    """CC-CV to 4.2 V until the current tapers to C/20."""
    ctl = _ctl(cm.CHARGE, current, 4.2)
    for _ in range(200_000):
        state, i, _v = cm.step(state, ctl, params, 25.0, dt)
        if -i[0] < params.capacity_ah / 20:
            return state
    raise AssertionError("charge never tapered")


def test_ocv_is_monotonic_and_spans_the_nmc_graphite_window() -> None:
    soc = np.linspace(0.0, 1.0, 20001)
    for temp in (-10.0, 25.0, 45.0):
        u = cm.ocv(soc, np.full_like(soc, temp))
        assert np.all(np.diff(u) > 0), f"OCV not strictly increasing at {temp} C"
    u25 = cm.ocv(soc)
    assert u25[0] == pytest.approx(2.50, abs=0.01)
    assert u25[-1] == pytest.approx(4.19, abs=0.01)
    assert cm.ocv(0.5) == pytest.approx(3.67, abs=0.05)  # the M50 mid-SOC plateau
    # The entropic term is small: tenths of a mV per kelvin.
    assert abs(float(cm.ocv(0.5, 45.0) - cm.ocv(0.5, 25.0))) < 0.01


@given(st.floats(-10, 10, allow_nan=False), st.floats(-40, 80, allow_nan=False))
def test_ocv_is_finite_for_any_soc(soc: float, temp: float) -> None:
    assert np.isfinite(cm.ocv(soc, temp))


def test_capacity_of_a_c5_discharge_at_25c_is_nominal() -> None:
    state = cm.init_state(1, soc=1.0, params=P)
    ah, end = _discharge_capacity(state, P.capacity_ah / 5, dt=5.0)
    assert ah == pytest.approx(P.capacity_ah, rel=0.02)
    assert end.soc[0] < 0.02


def test_voltage_sag_is_current_times_r0() -> None:
    state = cm.init_state(1, soc=0.6, params=P)
    r0, _, _ = cm.resistances(state, P)
    v_rest = float(cm.terminal_voltage(state, P, np.zeros(1))[0])
    for current in (1.0, 5.0):
        # A short step: the RC pairs have not charged yet, only R0 shows.
        _, i, v = cm.step(state, _ctl(cm.DISCHARGE, current, 2.5), P, 25.0, 0.01)
        assert float(i[0]) == pytest.approx(current)
        assert (v_rest - float(v[0])) / current == pytest.approx(float(r0[0]), rel=0.01)


def test_lower_conductivity_raises_resistance_as_one_over_kappa() -> None:
    kappas = [2.0, 5.0, 10.0, 20.0]
    r0 = []
    for kappa in kappas:
        state = cm.init_state(1, kappa_ms_cm=kappa, params=P)
        r0.append(float(cm.resistances(state, P)[0][0]))
    assert r0 == sorted(r0, reverse=True)
    # Only the electrolyte part scales: R0(k) - R0(10) = R_el (10/k - 1).
    for kappa, r in zip(kappas, r0, strict=True):
        assert r - r0[2] == pytest.approx(P.r_electrolyte_ohm * (10.0 / kappa - 1.0), rel=1e-9)
    # ... and a poorer electrolyte delivers less capacity at 1C before the cut-off.
    good, _ = _discharge_capacity(cm.init_state(1, soc=1.0, kappa_ms_cm=10.0), 5.0, dt=5.0)
    poor, _ = _discharge_capacity(cm.init_state(1, soc=1.0, kappa_ms_cm=1.0), 5.0, dt=5.0)
    assert poor < good


def test_lower_temperature_raises_every_resistance() -> None:
    temps = [-20.0, 0.0, 25.0, 45.0]
    res = [cm.resistances(cm.init_state(1, temp_c=t), P) for t in temps]
    for k in range(3):
        values = [float(r[k][0]) for r in res]
        assert values == sorted(values, reverse=True), f"R{k} does not fall with temperature"
    # Charge transfer (Ea 50 kJ/mol) roughly quadruples from 25 C to 0 C.
    assert float(res[1][1][0] / res[2][1][0]) == pytest.approx(
        np.exp(50e3 / cm.R_GAS * (1 / 273.15 - 1 / 298.15)), rel=1e-9
    )
    # A cold cell (held cold: a big thermal mass) reaches the cut-off sooner at 1C.
    cold_params = replace(P, mass_kg=1e6)
    cold, _ = _discharge_capacity(cm.init_state(1, soc=1.0, temp_c=-10.0), 5.0, cold_params, -10)
    warm, _ = _discharge_capacity(cm.init_state(1, soc=1.0), 5.0, cold_params, 25.0)
    assert cold < 0.97 * warm


def test_capacity_fades_and_resistance_grows_with_cycling() -> None:
    state = cm.init_state(1, soc=1.0, params=P)
    capacities, r0 = [], []
    for _ in range(3):
        ah, state = _discharge_capacity(state, 5.0, dt=5.0)
        capacities.append(ah)
        r0.append(float(cm.resistances(state, P)[0][0]))
        state = _charge_full(state, 5.0)
    assert capacities[0] > capacities[1] > capacities[2]
    # About fade_per_efc of the nominal capacity per full equivalent cycle (cycles 2 and
    # 3 start from the same CC-CV charge; a little more is lost to resistance growth).
    per_cycle = (capacities[1] - capacities[2]) / P.capacity_ah
    assert per_cycle == pytest.approx(P.fade_per_efc, rel=0.3)
    assert r0[0] < r0[1] < r0[2]
    aged = replace(state, throughput_ah=np.array([2 * P.capacity_ah * 100]))
    assert float(cm.capacity_ah(aged, P)[0]) == pytest.approx(P.capacity_ah * 0.8)


def test_charge_is_conserved_with_coulombic_efficiency() -> None:
    params = replace(P, fade_per_efc=0.0)  # constant capacity: SOC maps straight to Ah
    state = cm.init_state(1, soc=0.5, params=params)
    charged = discharged = 0.0
    for direction, current, seconds in ((cm.CHARGE, 3.0, 1800), (cm.DISCHARGE, 2.0, 2700)):
        ctl = _ctl(direction, current, 4.2 if direction == cm.CHARGE else 2.5)
        for _ in range(seconds):
            state, i, _v = cm.step(state, ctl, params, 25.0, 1.0)
            if i[0] < 0:
                charged -= float(i[0]) / 3600
            else:
                discharged += float(i[0]) / 3600
    assert charged == pytest.approx(1.5)
    assert discharged == pytest.approx(1.5)
    # Same Ah in and out, but only eta of the charge was stored.
    expected = 0.5 + (params.coulombic_efficiency * charged - discharged) / params.capacity_ah
    assert float(state.soc[0]) == pytest.approx(expected, abs=1e-9)
    assert float(state.soc[0]) < 0.5
    assert float(state.charge_ah[0]) == pytest.approx(discharged - charged, abs=1e-9)


def test_energy_is_conserved_terminal_plus_heat_plus_stored() -> None:
    state = cm.init_state(1, soc=0.9, params=P)
    chemical_j = 0.0
    ctl = _ctl(cm.DISCHARGE, 5.0, 2.5)
    for _ in range(2400):
        u = float(cm.ocv(state.soc, state.temp_c)[0])
        state, i, _v = cm.step(state, ctl, P, 25.0, 1.0)
        chemical_j += u * float(i[0])
    _, r1, r2 = cm.resistances(state, P)
    stored_j = 0.5 * (
        P.tau1_s / float(r1[0]) * float(state.v1[0]) ** 2
        + P.tau2_s / float(r2[0]) * float(state.v2[0]) ** 2
    )
    accounted = float(state.terminal_wh[0]) * 3600 + float(state.heat_j[0]) + stored_j
    assert accounted == pytest.approx(chemical_j, rel=1e-3)
    assert float(state.heat_j[0]) > 0


def test_cc_cv_charge_tapers_without_overshoot() -> None:
    state = cm.init_state(1, soc=0.7, params=P)
    ctl = _ctl(cm.CHARGE, 5.0, 4.2)
    currents, voltages = [], []
    for _ in range(5400):
        state, i, v = cm.step(state, ctl, P, 25.0, 1.0)
        currents.append(-float(i[0]))
        voltages.append(float(v[0]))
    assert max(voltages) <= 4.2 + 1e-9
    assert currents[0] == pytest.approx(5.0)  # CC first
    cv = [c for c, v in zip(currents, voltages, strict=True) if v > 4.2 - 1e-9]
    assert len(cv) > 100
    assert cv[-1] < 0.5
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(cv))


def test_rest_relaxation_after_discharge() -> None:
    state = cm.init_state(1, soc=0.8, params=P)
    for _ in range(1200):
        state, _, _ = cm.step(state, _ctl(cm.DISCHARGE, 5.0, 2.5), P, 25.0, 1.0)
    rest = _ctl(cm.IDLE, 0.0, 2.5)
    voltages = []
    for _ in range(1800):
        state, i, v = cm.step(state, rest, P, 25.0, 1.0)
        assert i[0] == 0.0
        voltages.append(float(v[0]))
    assert all(b >= a for a, b in itertools.pairwise(voltages))
    ocv_now = float(cm.ocv(state.soc, state.temp_c)[0])
    assert voltages[-1] - voltages[0] > 0.01  # visible recovery, tens of mV
    assert ocv_now - voltages[-1] < 0.3 * (ocv_now - voltages[0])


def test_joule_heating_and_cooling_to_the_environment() -> None:
    state = cm.init_state(1, soc=0.9, temp_c=25.0, params=P)
    for _ in range(1200):
        state, _, _ = cm.step(state, _ctl(cm.DISCHARGE, 5.0, 2.5), P, 25.0, 1.0)
    assert float(state.temp_c[0]) > 26.0  # I^2 R heating at 1C
    # Steady state at constant power: T_env + P / hA, here within the first minutes' drift.
    r0, r1, r2 = cm.resistances(state, P)
    steady = 25.0 + 25.0 * float(r0[0] + r1[0] + r2[0]) / P.h_a_w_k
    assert float(state.temp_c[0]) < steady
    # A relaxed cell cools toward a 10 C environment with the time constant C_th / hA.
    hot = cm.init_state(1, soc=0.5, temp_c=40.0, params=P)
    tau = P.mass_kg * P.cp_j_kg_k / P.h_a_w_k
    hot, _, _ = cm.step(hot, _ctl(cm.IDLE, 0, 2.5), P, 10.0, tau)
    assert float(hot.temp_c[0]) == pytest.approx(10.0 + 30.0 / np.e, rel=1e-9)


def test_batched_step_matches_single_cells_and_is_pure() -> None:
    socs, temps, kappas = [0.2, 0.5, 0.9], [0.0, 25.0, 40.0], [3.0, 10.0, 12.0]
    batch = cm.init_state(3, params=P)
    batch = replace(batch, soc=np.array(socs), temp_c=np.array(temps), kappa_ms_cm=np.array(kappas))
    before = batch.soc.copy()
    ctl = cm.Control(np.array([1, -1, 0]), np.array([2.0, 3.0, 0.0]), np.array([2.5, 4.2, 3.0]))
    out, i, v = cm.step(batch, ctl, P, 20.0, 1.0)
    assert np.array_equal(batch.soc, before)  # input untouched
    for k in range(3):
        single = cm.init_state(1, soc=socs[k], temp_c=temps[k], kappa_ms_cm=kappas[k])
        ctl_k = cm.Control(
            ctl.direction[k : k + 1], ctl.current_a[k : k + 1], ctl.voltage_v[k : k + 1]
        )
        s1, i1, v1 = cm.step(single, ctl_k, P, 20.0, 1.0)
        assert (i[k], v[k], out.soc[k], out.temp_c[k]) == pytest.approx(
            (i1[0], v1[0], s1.soc[0], s1.temp_c[0])
        )
