"""The ConductivityMeter device against the Orion Star simulator, through real ptys and TCP."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.core import init_devices, set_mock_value
from ophyd_async.testing import assert_reading

from hardware_mocks.faults import Fault
from hardware_mocks.instruments.meter import ConductivityMeterSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.physics.electrolyte import landesfeind_blend
from labctl.devices.base import SerialInstrument
from labctl.devices.errors import (
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    ProtocolError,
)
from labctl.devices.meter import ConductivityMeter
from labctl.devices.protocols import orion
from labctl.devices.stirrer import Stirrer
from tests.conftest import lab_config, start_lab

SPEED = 1000.0  # simulated seconds per wall second
NOISE = 0.005  # the simulator's relative noise (1 sigma)


@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("meter", transport=transport, speed=SPEED)
    yield lab
    lab.stop()


@pytest.fixture
def meter(lab: LabThread, opened: list[SerialInstrument]) -> ConductivityMeter:
    with init_devices():
        meter = ConductivityMeter(lab.urls["meter"], timeout=0.5, stable_timeout=5.0)
    opened.append(meter)
    return meter


def sim(lab: LabThread) -> ConductivityMeterSimulator:
    s = lab.lab.simulators["meter"]
    assert isinstance(s, ConductivityMeterSimulator)
    return s


def make_electrolyte(lab: LabThread, *reagents_ml: tuple[str, float], mixed: bool = True) -> str:
    """Dose reagents into V01 on the balance and pick it up (it stays in the gripper)."""

    def run() -> str:
        w = lab.world
        w.pick("rack/1")
        w.place("balance")
        for reagent, ml in reagents_ml:
            w.dispense(reagent, ml)
        vial = w.pick("balance")
        if mixed:
            vial.mixed = 1.0  # homogenised (mixing on the stirrer is tested in test_stirrer)
        return vial.id

    return str(lab.call(run))


def place(lab: LabThread, station: str) -> None:
    lab.call(lab.world.place, station)


def truth(lab: LabThread, vial: str) -> tuple[float, dict[str, Any]]:
    """The electrolyte model at the vial's actual composition and temperature, and the state."""
    vials: dict[str, dict[str, Any]] = lab.call(lambda: lab.world.snapshot()["vials"])
    state = vials[vial]
    kappa = landesfeind_blend(state["fractions"], state["salt_molality"], state["temperature_c"])
    return kappa * (0.7 + 0.3 * state["mixed"]), state


def events(RE: RunEngine, plan: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    RE(plan, lambda name, doc: docs.append(doc) if name == "event" else None)
    return [d["data"] for d in docs]


def _sim_sleep(lab: LabThread, seconds: float) -> None:
    """Wait until ``seconds`` of *simulated* time have passed (whatever the machine load)."""
    end = lab.call(lab.world.clock.now) + seconds
    while lab.call(lab.world.clock.now) < end:
        time.sleep(0.002)


def _set_speed(lab: LabThread, speed: float) -> None:
    """Change the lab clock's speed from now on, without a jump in simulated time."""
    lab.call(lab.world.clock.set_speed, speed)


def test_identify_reads_system_and_configuration(
    meter: ConductivityMeter, call: Callable[..., Any]
) -> None:
    config = call(meter.read_configuration())
    assert config["meter-model"]["value"] == "A212"
    assert config["meter-serial_number"]["value"] == "X51234"
    assert config["meter-cell_constant"]["value"] == pytest.approx(0.475)
    assert config["meter-temperature_compensation"]["value"] == "Off"


def test_count_measures_the_electrolyte_in_the_vial(
    lab: LabThread, meter: ConductivityMeter, RE: RunEngine
) -> None:
    vial = make_electrolyte(lab, ("LiPF6-EC", 3.0), ("LiPF6-EMC", 4.0), ("EMC", 2.0))
    place(lab, "meter")
    data = events(RE, bp.count([meter], num=8))
    expected, state = truth(lab, vial)
    assert 0.9 < state["salt_molality"] < 2.5  # a real electrolyte, not a trivial one
    readings = [d["meter-conductivity"] for d in data]
    assert all(d["meter-stable"] for d in data)
    for r in readings:  # each within 4 sigma of noise plus the display's last digit
        assert r == pytest.approx(expected, rel=4 * NOISE, abs=0.006)
    assert statistics.fmean(readings) == pytest.approx(expected, rel=2 * NOISE)
    assert statistics.stdev(readings) > 0  # real noise, not a constant
    assert data[-1]["meter-temperature"] == pytest.approx(state["temperature_c"], abs=0.1)


def test_an_unmixed_vial_reads_what_wets_the_cell(
    lab: LabThread, meter: ConductivityMeter, call: Callable[..., Any]
) -> None:
    vial = make_electrolyte(lab, ("LiPF6-EC", 3.0), ("DMC", 5.0), mixed=False)
    place(lab, "meter")
    reading = call(meter.measure_stable())
    expected, state = truth(lab, vial)
    assert state["mixed"] < 0.25
    assert reading.conductivity_ms_cm == pytest.approx(expected, rel=4 * NOISE, abs=0.006)
    homogeneous = landesfeind_blend(
        state["fractions"], state["salt_molality"], state["temperature_c"]
    )
    assert reading.conductivity_ms_cm < 0.85 * homogeneous


def test_probe_in_air_reads_zero(lab: LabThread, meter: ConductivityMeter, RE: RunEngine) -> None:
    (data,) = events(RE, bp.count([meter]))
    assert data["meter-conductivity"] == pytest.approx(0.0, abs=2e-5)  # < 0.02 uS/cm
    assert data["meter-temperature"] == pytest.approx(lab.world.ambient_c, abs=0.1)
    assert data["meter-stable"] is True


def test_too_little_liquid_reads_low_and_never_settles(
    lab: LabThread, RE: RunEngine, opened: list[SerialInstrument]
) -> None:
    with init_devices():
        meter = ConductivityMeter(lab.urls["meter"], timeout=0.5, wait_for_stable=False)
    opened.append(meter)
    vial = make_electrolyte(lab, ("LiPF6-EC", 1.0))  # 1 mL; the cell needs ~3 mL
    place(lab, "meter")
    _sim_sleep(lab, 30.0)
    (data,) = events(RE, bp.count([meter]))
    expected, _ = truth(lab, vial)
    assert data["meter-stable"] is False
    assert 0.2 * expected < data["meter-conductivity"] < 0.6 * expected


def test_a_warm_vial_reads_unstable_until_it_cools(
    transport: str, RE: RunEngine, opened: list[SerialInstrument]
) -> None:
    lab = start_lab("meter", "stirrer", transport=transport, speed=2000.0)
    try:
        with init_devices():
            meter = ConductivityMeter(lab.urls["meter"], timeout=0.5, stable_timeout=0.02)
            stirrer = Stirrer(lab.urls["stirrer"], timeout=0.5, temperature_timeout=10.0)
        opened.extend([meter, stirrer])
        vial = make_electrolyte(lab, ("LiPF6-PC", 4.0), ("DMC", 4.0), mixed=False)
        place(lab, "stirrer")
        RE(bps.mv(stirrer.speed, 600, stirrer.temperature, 80))  # mix and heat
        _sim_sleep(lab, 600.0)  # (longer only warms it further: the vial nears 72 C)
        RE(bps.mv(stirrer.speed, 0))
        # The timing-critical part runs slowly: the vial cools out of the meter's
        # stability band ~8 simulated minutes after it arrives, 5 s of wall time here.
        _set_speed(lab, 100.0)
        lab.call(lambda: (lab.world.pick("stirrer"), lab.world.place("meter")))
        _sim_sleep(lab, 40.0)  # past the probe's settling time
        hot, state = truth(lab, vial)
        assert state["temperature_c"] > 50.0
        assert state["mixed"] > 0.999  # the stirrer homogenised it
        # Still cooling: the meter says so, and a trigger that must be stable times out.
        with pytest.raises(FailedStatus) as info:
            RE(bp.count([meter]))
        assert isinstance(info.value.__cause__, DeviceTimeoutError)
        assert "not stable" in str(info.value.__cause__)
        assert info.value.__cause__.raw is not None
        assert b"Stabilizing" in info.value.__cause__.raw
        _set_speed(lab, 2000.0)
        meter.stable_timeout = 10.0
        (data,) = events(RE, bp.count([meter]))
        expected, state = truth(lab, vial)
        assert data["meter-stable"] is True
        assert abs(data["meter-temperature"] - lab.world.ambient_c) < 4.0
        assert data["meter-conductivity"] < hot  # cooler electrolyte conducts less
        assert data["meter-conductivity"] == pytest.approx(expected, rel=4 * NOISE, abs=0.006)
    finally:
        lab.stop()


def test_overrange_is_a_clear_error(
    transport: str, RE: RunEngine, opened: list[SerialInstrument]
) -> None:
    config = lab_config("meter")
    config.instruments[0].options["max_conductivity_ms_cm"] = 5.0  # a low-range cell
    lab = LabThread(config, transport=transport, speed=SPEED).start()  # type: ignore[arg-type]
    try:
        with init_devices():
            meter = ConductivityMeter(lab.urls["meter"], timeout=0.5)
        opened.append(meter)
        vial = make_electrolyte(lab, ("LiPF6-EC", 3.0), ("EMC", 3.0))
        place(lab, "meter")
        assert truth(lab, vial)[0] > 5.0
        with pytest.raises(FailedStatus) as info:
            RE(bp.count([meter]))
        assert isinstance(info.value.__cause__, orion.OverrangeError)
        assert b"Overrange" in (info.value.__cause__.raw or b"")
        assert "meter" in str(info.value.__cause__)
    finally:
        lab.stop()


@pytest.mark.parametrize(
    ("fault", "exc"),
    [
        ("no_reply", DeviceTimeoutError),
        ("garbage", ProtocolError),
        ("busy", InstrumentBusyError),
        ("drop", ConnectionLostError),
    ],
)
def test_faults_raise_clear_errors_and_recover(
    lab: LabThread,
    meter: ConductivityMeter,
    call: Callable[..., Any],
    fault: str,
    exc: type[Exception],
) -> None:
    sim(lab).faults.inject(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(meter.measure())
    assert time.monotonic() - t0 < 3.0  # bounded, never a hang
    assert "meter" in str(info.value)
    assert call(meter.measure()).conductivity_ms_cm == pytest.approx(0.0, abs=2e-5)


def test_late_reply_is_drained_not_taken_for_the_next_answer(
    lab: LabThread, meter: ConductivityMeter, call: Callable[..., Any]
) -> None:
    sim(lab).faults.inject(Fault.LATE_REPLY, delay_s=0.8)
    with pytest.raises(DeviceTimeoutError):
        call(meter.measure())
    stale = sim(lab).log_number  # the late record was made before its delay
    reading = call(meter.measure())
    # The answer is the fresh record, not the stale one still on its way.
    assert reading.raw.decode().split(", ")[-1].split("\r")[0] == str(stale + 1)
    assert sim(lab).log_number == stale + 1


def test_failed_trigger_fails_the_run(
    lab: LabThread, meter: ConductivityMeter, RE: RunEngine
) -> None:
    sim(lab).faults.inject(Fault.GARBAGE)
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([meter], num=1))
    assert isinstance(info.value.__cause__, ProtocolError)
    assert info.value.__cause__.raw  # the garbled bytes travel with the error
    assert RE.state == "idle"


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        cond = ConductivityMeter("/dev/does-not-exist")
    set_mock_value(cond.conductivity, 10.7)
    set_mock_value(cond.temperature, 25.1)
    set_mock_value(cond.stable, True)
    await cond.trigger()
    await assert_reading(
        cond,
        {
            "cond-conductivity": {"value": 10.7},
            "cond-temperature": {"value": 25.1},
            "cond-stable": {"value": True},
        },
    )
