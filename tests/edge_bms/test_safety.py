"""Safety checks: debounce, latching, clear with hysteresis, batched channels, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_bms.errors import InputError
from edge_bms.identify import LG_M50_LIMITS
from edge_bms.safety import Alarm, SafetyConfig, SafetyMonitor, Threshold

LIMITS = LG_M50_LIMITS


def config(**over: Threshold) -> SafetyConfig:
    base = SafetyConfig.from_limits(LIMITS, debounce_s=0.0, debounce_samples=3)
    return base.model_copy(update=over)


def feed(mon: SafetyMonitor, ts: float, v: float | list[float], n: int = 1) -> list[Alarm]:
    cells = np.full(n, v) if np.isscalar(v) else np.asarray(v)
    return mon.update(ts, cells, 25.0, 0.0)


def test_from_limits_puts_trip_limits_outside_the_operating_window() -> None:
    cfg = SafetyConfig.from_limits(LIMITS)
    assert cfg.over_voltage.limit == pytest.approx(4.25)
    assert cfg.under_voltage.limit == pytest.approx(2.45)
    assert cfg.over_current_discharge.limit == pytest.approx(7.28 * 1.2)
    assert cfg.over_current_charge.limit == pytest.approx(3.4 * 1.2)
    assert cfg.over_temperature.limit == 60.0


def test_sample_debounce_needs_consecutive_samples() -> None:
    mon = SafetyMonitor(config(), 1)
    seq = [4.30, 4.30, 4.10, 4.30, 4.30, 4.30, 4.30]
    trips = [feed(mon, float(k), v) for k, v in enumerate(seq)]
    # the run of two is broken by 4.10; the next run trips on its third sample (ts 5)
    assert [len(t) for t in trips] == [0, 0, 0, 0, 0, 1, 0]
    alarm = trips[5][0]
    assert (alarm.kind, alarm.cell, alarm.value, alarm.ts) == ("over_voltage", 0, 4.30, 5.0)
    assert alarm.limit == pytest.approx(4.25)
    assert alarm.event == "trip"
    assert "cell 0" in alarm.message()


def test_time_debounce_counts_seconds_from_the_first_violating_sample() -> None:
    th = Threshold(limit=4.25, hysteresis=0.05, debounce_s=2.0, debounce_samples=1)
    mon = SafetyMonitor(config(over_voltage=th), 1)
    ts = np.arange(0.0, 5.0, 0.5)  # violating from ts 1.0
    tripped_at = [t for t in ts if feed(mon, t, 4.3 if t >= 1.0 else 4.0)]
    assert tripped_at == [3.0]


def test_latched_alarm_stays_and_clear_is_refused_inside_the_hysteresis_band() -> None:
    mon = SafetyMonitor(config(), 2)
    for k in range(3):
        feed(mon, k, [4.0, 4.31], 2)
    assert mon.active_mask("over_voltage").tolist() == [False, True]
    feed(mon, 3, [4.0, 4.22], 2)  # below the limit 4.25, but within 0.05 of it
    assert mon.tripped  # latched: the value alone does not clear it
    res = mon.clear("over_voltage", 1)
    assert res.cleared == []
    assert len(res.refused) == 1
    assert "hysteresis" in res.refused[0][1]
    assert mon.tripped
    feed(mon, 4, [4.0, 4.15], 2)
    res = mon.clear()
    assert [(a.kind, a.cell, a.event) for a in res.cleared] == [("over_voltage", 1, "clear")]
    assert not mon.tripped
    # after the clear a new violation must debounce again
    assert feed(mon, 5, [4.0, 4.4], 2) == []
    assert feed(mon, 6, [4.0, 4.4], 2) == []
    assert len(feed(mon, 7, [4.0, 4.4], 2)) == 1


def test_non_latching_alarm_clears_itself_past_the_hysteresis() -> None:
    th = Threshold(limit=2.45, hysteresis=0.05, debounce_s=0.0, debounce_samples=2, latching=False)
    mon = SafetyMonitor(config(under_voltage=th), 1)
    out = [feed(mon, k, v) for k, v in enumerate([2.40, 2.40, 2.47, 2.49, 2.51])]
    assert [[(a.kind, a.event) for a in e] for e in out] == [
        [],
        [("under_voltage", "trip")],
        [],  # 2.47: back over the limit but within the band
        [],  # 2.49: still within 2.45 + 0.05
        [("under_voltage", "clear")],
    ]


def test_batched_cells_name_the_cell_and_currents_carry_signs() -> None:
    n = 96
    mon = SafetyMonitor(config(), n, n_temperature=8)
    v = np.full(n, 3.7)
    v[3] = 4.4
    v[50] = 2.3
    temps = np.full(8, 25.0)
    temps[7] = -25.0
    events: list[Alarm] = []
    for k in range(3):
        events += mon.update(float(k), v, temps, -4.5)  # a 4.5 A charge: over 3.4 * 1.2
    got = sorted((a.kind, a.cell) for a in events)
    assert got == [
        ("over_current_charge", None),
        ("over_voltage", 3),
        ("under_temperature", 7),
        ("under_voltage", 50),
    ]
    charge = next(a for a in events if a.kind == "over_current_charge")
    assert charge.value == -4.5
    assert charge.limit == pytest.approx(-4.08)
    assert charge.to_dict()["cell"] is None
    # a discharge at 8 A is within the discharge limit (7.28 * 1.2 = 8.74 A)
    mon2 = SafetyMonitor(config(), n)
    assert all(mon2.update(float(k), np.full(n, 3.7), 25.0, 8.0) == [] for k in range(5))
    assert [a.kind for k in range(3) for a in mon2.update(5.0 + k, 3.7, 25.0, 9.0)] == [
        "over_current_discharge"
    ]


def test_a_dropout_neither_confirms_nor_resets_a_pending_condition() -> None:
    mon = SafetyMonitor(config(), 1)
    assert feed(mon, 0, 4.3) == []
    assert feed(mon, 1, float("nan")) == []
    assert feed(mon, 2, 4.3) == []
    assert len(feed(mon, 3, 4.3)) == 1  # three valid violating samples


def test_clear_without_a_valid_sample_is_refused() -> None:
    mon = SafetyMonitor(config(), 1)
    for k in range(3):
        feed(mon, k, 4.3)
    mon._state["over_voltage"].last[:] = np.nan  # as if restored before any sample
    res = mon.clear()
    assert res.refused and "no valid sample" in res.refused[0][1]


def test_state_dict_round_trip_continues_a_pending_debounce() -> None:
    a = SafetyMonitor(config(), 4)
    b = SafetyMonitor(config(), 4)
    v = [3.7, 4.3, 3.7, 3.7]
    for k in range(2):
        feed(a, k, v, 4)
        feed(b, k, v, 4)
    b = SafetyMonitor.from_state_dict(json.loads(json.dumps(b.state_dict())))
    assert feed(a, 2, v, 4) == feed(b, 2, v, 4)
    assert b.active_mask("over_voltage").tolist() == [False, True, False, False]
    with pytest.raises(InputError, match="format"):
        SafetyMonitor.from_state_dict({"format": "nope"})


def test_inputs_are_checked() -> None:
    mon = SafetyMonitor(config(), 3)
    with pytest.raises(InputError, match="cell_v must have 3 values"):
        mon.update(0.0, [3.7, 3.7], 25.0, 0.0)
    mon.update(5.0, 3.7, 25.0, 0.0)
    with pytest.raises(InputError, match="backwards"):
        mon.update(4.0, 3.7, 25.0, 0.0)
    with pytest.raises(InputError, match="kind must be one of"):
        mon.clear("melting")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"under_voltage\.limit"):
        SafetyConfig.model_validate(
            config().model_dump() | {"under_voltage": {"limit": 5.0, "hysteresis": 0.1}}
        )


@given(
    debounce_s=st.floats(0.5, 20.0),
    dt=st.floats(0.05, 2.0),
    fraction=st.floats(0.0, 0.999),
    before=st.integers(0, 20),
)
def test_a_condition_shorter_than_the_debounce_never_trips(
    debounce_s: float, dt: float, fraction: float, before: int
) -> None:
    th = Threshold(limit=4.25, hysteresis=0.05, debounce_s=debounce_s, debounce_samples=1)
    mon = SafetyMonitor(config(over_voltage=th), 1)
    # violating samples spanning less than debounce_s, then normal ones
    n_bad = int(fraction * debounce_s / dt) + 1
    if (n_bad - 1) * dt >= debounce_s:
        n_bad -= 1
    values = [4.0] * before + [4.3] * n_bad + [4.0] * 5
    events = [feed(mon, k * dt, v) for k, v in enumerate(values)]
    assert not any(events)
    assert not mon.tripped


@given(debounce_s=st.floats(0.5, 20.0), dt=st.floats(0.05, 2.0))
def test_a_condition_as_long_as_the_debounce_trips_exactly_once(
    debounce_s: float, dt: float
) -> None:
    th = Threshold(limit=4.25, hysteresis=0.05, debounce_s=debounce_s, debounce_samples=1)
    mon = SafetyMonitor(config(over_voltage=th), 1)
    n_bad = int(np.ceil(debounce_s / dt)) + 3
    trips = [feed(mon, 1.0 + k * dt, 4.3) for k in range(n_bad)]
    assert sum(len(t) for t in trips) == 1
    first = next(k for k, t in enumerate(trips) if t)
    assert first * dt >= debounce_s - 1e-9
    assert (first - 1) * dt < debounce_s + 1e-9
