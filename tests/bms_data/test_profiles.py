"""Load profiles: the vehicle model's energy and power on EPA cycles, the synthetic
cycle, pulses, and the fixed train/held-out split of the plan."""

from __future__ import annotations

import numpy as np
import pytest

from labctl.models.bms import dataset as ds
from labctl.models.bms import profiles as pr
from labctl.models.bms.truth import solve_max_current


def wh_per_km(vehicle: pr.Vehicle, speed: np.ndarray) -> tuple[float, float]:
    km = float(np.sum(speed)) / 1000.0  # 1 s samples
    return float(np.sum(vehicle.battery_power_w(speed))) / 3600.0 / km, km


def test_udds_energy_per_km_and_distance_are_plausible() -> None:
    vehicle = pr.Vehicle()
    udds = pr.epa_cycle("udds")
    consumption, km = wh_per_km(vehicle, udds)
    assert km == pytest.approx(11.99, abs=0.05)  # EPA: 7.45 mi
    # Mid-size EVs use 120-200 Wh/km at the battery in city driving without HVAC.
    assert 110.0 < consumption < 160.0
    cell = vehicle.cell_power_w(udds)
    # Peaks ~2.5-3C of the 5 Ah cell at ~3.6 V; regen present but smaller.
    assert 2.2 < cell.max() / 3.6 / 5.0 < 3.2
    assert -30.0 < cell.min() < -10.0
    assert vehicle.cells == 864


def test_hwfet_uses_more_power_per_second_than_udds() -> None:
    vehicle = pr.Vehicle()
    hwfet = pr.epa_cycle("hwfet")
    consumption, km = wh_per_km(vehicle, hwfet)
    assert km == pytest.approx(16.5, abs=0.1)
    assert 100.0 < consumption < 170.0
    assert (
        vehicle.cell_power_w(hwfet).mean() > 2 * vehicle.cell_power_w(pr.epa_cycle("udds")).mean()
    )


def test_road_load_terms() -> None:
    vehicle = pr.Vehicle(aux_w=0.0)
    cruise = np.full(10, 20.0)  # 72 km/h, constant
    expected = (0.5 * 1.2 * 0.62 * 400.0 + 0.009 * 1800.0 * 9.81) * 20.0 / 0.88
    np.testing.assert_allclose(vehicle.battery_power_w(cruise), expected, rtol=1e-12)
    braking = np.linspace(20.0, 10.0, 11)
    assert (vehicle.battery_power_w(braking) < 0).all()  # regen
    with pytest.raises(ValueError, match="negative speed"):
        vehicle.battery_power_w(np.array([1.0, -1.0]))


def test_synthetic_cycle_is_seeded_and_urban_like() -> None:
    a = pr.synthetic_urban_cycle(np.random.default_rng(5), 3000)
    b = pr.synthetic_urban_cycle(np.random.default_rng(5), 3000)
    np.testing.assert_array_equal(a, b)
    assert a.size == 3000 and a.min() >= 0.0 and a.max() <= 27.0
    assert np.diff(a).max() <= 1.9 and np.diff(a).min() >= -2.3
    assert (a == 0).mean() > 0.05  # it stops
    consumption, _ = wh_per_km(pr.Vehicle(), a)
    assert 100.0 < consumption < 170.0


def test_pulse_profile_mean_rate_and_limits() -> None:
    breaks, levels = pr.pulse_profile(np.random.default_rng(2), 20_000.0, mean_c_rate=0.4)
    dur = np.diff(breaks)
    assert np.sum(levels * dur) / np.sum(dur) == pytest.approx(2.0, rel=0.05)  # 0.4C of 5 Ah
    assert levels.max() <= 12.5 and levels.min() >= -7.5
    assert (levels < 0).any() and (levels == 0).any()
    t, y = pr.step_series(breaks[:4], levels[:3], edge_s=0.05)
    assert np.interp(breaks[1] - 0.01, t, y) == levels[0]
    assert np.interp(breaks[1] + 0.06, t, y) == levels[1]


def test_split_rules_hold_for_the_full_plan() -> None:
    specs = ds.plan()
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    assert not [s.name for s in train if s.cycle == "udds"]
    assert not [s.name for s in train if 10.0 in s.ambients]
    assert {s.cycle for s in test if s.kind == "drive"} >= {"udds", "hwfet", "synth"}
    assert all(s.split == "test" for s in specs if s.cycle == "udds")
    # Every temperature appears; 10 C only in the held-out set.
    assert {a for s in train for a in s.ambients} == {-10.0, 0.0, 25.0, 40.0}
    assert 10.0 in {a for s in test for a in s.ambients}
    # Aged cells and ambient steps are on both sides; SOP truth on held-out discharges.
    assert {s.cell for s in train} == {s.cell for s in test} == {"fresh", "aged90", "aged80"}
    assert any(len(s.ambient) > 1 for s in train) and any(len(s.ambient) > 1 for s in test)
    assert all(s.sop == (s.split == "test" and s.kind != "cccv") for s in specs)
    assert len(specs) == len({s.name for s in specs}) == 39
    assert ds.split_of("hwfet", [25.0, 10.0]) == "test"
    assert ds.split_of("synth", [-10.0, 25.0]) == "train"


def test_max_current_search_on_an_analytic_margin() -> None:
    # margin falls linearly with current and crosses 0 at 7.3 A.
    def margin(i: float) -> float:
        return 0.073 - 0.01 * i

    i, n = solve_max_current(margin, 15.0)
    assert 7.28 <= i <= 7.3 and n <= 8
    assert solve_max_current(lambda i: 1.0 - 0.01 * i, 15.0) == (15.0, 1)  # the cap
    assert solve_max_current(lambda i: -0.1 - i, 15.0)[0] == 0.0  # already beyond
