"""Pulse fits against the simulator's cell model, integrated directly (no instruments)."""

from __future__ import annotations

import numpy as np
import pytest

from hardware_mocks.physics import cell as cm
from labctl.plans.ecm import PulseFitError, fit_pulse, instantaneous_r0


def pulse_record(temp_c: float, dt: float = 1.0) -> tuple[np.ndarray, cm.CellState, cm.CellParams]:
    """Rest, 10 s discharge pulse, 40 s rest, 10 s charge pulse, 40 s rest (t, V, I rows)."""
    params = cm.CellParams()
    state = cm.init_state(1, soc=0.6, temp_c=temp_c, params=params)
    rows: list[tuple[float, float, float]] = []
    t = 0.0
    truth = state

    def run(direction: int, current: float, seconds: float, record: bool) -> None:
        nonlocal state, t
        limit = 2.5 if direction == cm.DISCHARGE else 4.2
        for _ in range(round(seconds / dt)):
            control = cm.Control(np.array([direction]), np.array([current]), np.array([limit]))
            state, i, v = cm.step(state, control, params, temp_c, dt)
            t += dt
            if record:
                rows.append((t, float(v[0]), float(i[0])))

    run(cm.IDLE, 0.0, 3600.0, False)
    t = 0.0  # the record starts here
    run(cm.IDLE, 0.0, 10.0, True)
    truth = state
    run(cm.DISCHARGE, 5.0, 10.0, True)
    run(cm.IDLE, 0.0, 40.0, True)
    run(cm.CHARGE, 3.75, 10.0, True)
    run(cm.IDLE, 0.0, 40.0, True)
    return np.array(rows), truth, params


@pytest.mark.parametrize(("temp_c", "dt"), [(25.0, 1.0), (10.0, 1.0), (25.0, 5.0)])
def test_fit_recovers_the_cell_models_r0_r1_tau(temp_c: float, dt: float) -> None:
    rows, truth, params = pulse_record(temp_c, dt)
    r0, r1, _ = (float(x[0]) for x in cm.resistances(truth, params))
    discharge = rows[(rows[:, 0] > 10 - dt - 1e-9) & (rows[:, 0] <= 60 + 1e-9)]
    fit = fit_pulse(discharge[:, 0], discharge[:, 1], discharge[:, 2])
    # 1 s samples pin R0 to 0.5 %; 5 s samples leave the slow RC pair's curvature in it.
    rel = 0.005 if dt == 1.0 else 0.025
    assert fit.r0_ohm == pytest.approx(r0, rel=rel)
    assert fit.r1_ohm == pytest.approx(r1, rel=0.08)
    assert fit.tau1_s == pytest.approx(params.tau1_s, rel=0.1)
    assert fit.c1_f == pytest.approx(fit.tau1_s / fit.r1_ohm)
    assert fit.rmse_v < 1e-4
    # The charge pulse, fitted with the discharge pulse's polarisation in the window.
    both = rows[rows[:, 0] > 10 - dt - 1e-9]
    fit_c = fit_pulse(both[:, 0], both[:, 1], both[:, 2])
    assert fit_c.r0_ohm == pytest.approx(r0, rel=rel)
    # A record that starts polarised needs the two extra terms: the charge pulse alone,
    # 40 s after the discharge pulse.
    late = rows[rows[:, 0] > 60 - dt - 1e-9]
    plain = fit_pulse(late[:, 0], late[:, 1], late[:, 2])
    aware = fit_pulse(late[:, 0], late[:, 1], late[:, 2], initial_polarisation=True)
    assert abs(aware.r1_ohm - r1) < abs(plain.r1_ohm - r1)
    assert aware.r0_ohm == pytest.approx(r0, rel=0.05)
    # The edge estimate is cruder at coarse sampling, good at 1 s.
    edge = instantaneous_r0(discharge[:, 0], discharge[:, 1], discharge[:, 2])
    assert edge == pytest.approx(r0, rel=0.005 if dt == 1.0 else 0.05)


def test_colder_cell_fits_a_larger_resistance() -> None:
    warm, _, _ = pulse_record(35.0)
    cold, _, _ = pulse_record(5.0)
    fits = [fit_pulse(r[:60, 0], r[:60, 1], r[:60, 2]) for r in (warm, cold)]
    assert fits[1].r0_ohm > 1.15 * fits[0].r0_ohm
    assert fits[1].r1_ohm > 2.0 * fits[0].r1_ohm  # charge transfer: Ea 50 kJ/mol


def test_fit_refuses_data_that_cannot_identify_anything() -> None:
    with pytest.raises(PulseFitError, match="at least 6 samples"):
        fit_pulse([0, 1, 2], [4.0, 3.9, 3.9], [0, 1, 1])
    with pytest.raises(PulseFitError, match="no current step"):
        fit_pulse(list(range(10)), [4.0] * 10, [0.0] * 10)
    with pytest.raises(PulseFitError, match="one length"):
        fit_pulse([0, 1], [4.0], [0.0, 1.0])
    with pytest.raises(PulseFitError, match="increasing"):
        fit_pulse([0, 2, 1, 3, 4, 5], [4.0] * 6, [0, 1, 1, 1, 1, 1])
    with pytest.raises(PulseFitError, match="current step"):
        instantaneous_r0([0, 1, 2], [4.0, 4.0, 4.0], [0.0, 0.0, 0.0])
