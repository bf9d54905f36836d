"""The Stirrer device against the IKA NAMUR simulator, through real ptys and TCP."""

from __future__ import annotations

import asyncio
import math
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

from hardware_mocks.clock import SimClock
from hardware_mocks.faults import Fault
from hardware_mocks.instruments.stirrer import StirrerSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.physics.electrolyte import landesfeind_blend
from hardware_mocks.world import LabWorld
from labctl.devices.base import SerialInstrument
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import namur
from labctl.devices.stirrer import MotionStoppedError, Regulation, Stirrer
from tests.conftest import lab_config, start_lab, until

SPEED = 1000.0  # simulated seconds per wall second


@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("stirrer", transport=transport, speed=SPEED)
    yield lab
    lab.stop()


@pytest.fixture
def stirrer(lab: LabThread, opened: list[SerialInstrument]) -> Stirrer:
    with init_devices():
        stirrer = Stirrer(lab.urls["stirrer"], timeout=0.5, temperature_timeout=30.0)
    opened.append(stirrer)
    return stirrer


def sim(lab: LabThread) -> StirrerSimulator:
    s = lab.lab.simulators["stirrer"]
    assert isinstance(s, StirrerSimulator)
    return s


def vial_on_stirrer(lab: LabThread, *reagents_ml: tuple[str, float]) -> str:
    def move() -> str:
        w = lab.world
        w.pick("rack/1")
        w.place("balance")
        for reagent, ml in reagents_ml:
            w.dispense(reagent, ml)
        w.pick("balance")
        return w.place("stirrer").id

    return str(lab.call(move))


def vial_state(lab: LabThread, vial: str) -> dict[str, Any]:
    vials: dict[str, dict[str, Any]] = lab.call(lambda: lab.world.snapshot()["vials"])
    state = vials[vial]
    return state


def wait_sim(seconds: float) -> None:
    time.sleep(seconds / SPEED)


def test_identify_reads_the_model(stirrer: Stirrer, call: Callable[..., Any]) -> None:
    assert call(stirrer.model.get_value()) == "RCT digital"


def test_mv_completes_at_the_readback_and_keeps_running(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine, call: Callable[..., Any]
) -> None:
    RE(bps.mv(stirrer.speed, 600, stirrer.temperature, 60))
    # mv returned only once both readbacks were within tolerance ...
    assert sim(lab).rpm == pytest.approx(600, abs=5.0)
    assert sim(lab).plate_c == pytest.approx(60, abs=1.0)
    # ... and the RunEngine's end-of-plan stop() did not switch anything off.
    assert sim(lab).motor_on
    assert sim(lab).heater_on
    assert call(stirrer.speed.refresh_setpoint()) == 600.0
    assert call(stirrer.temperature.refresh_setpoint()) == 60.0
    RE(bps.mv(stirrer.speed, 0))
    assert not sim(lab).motor_on
    assert call(stirrer.speed.refresh()) <= 5.0


def test_count_reads_speed_plate_and_probe(lab: LabThread, stirrer: Stirrer, RE: RunEngine) -> None:
    vial = vial_on_stirrer(lab, ("DMC", 5.0))
    RE(bps.mv(stirrer.speed, 300))
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(bp.count([stirrer], num=2), lambda name, doc: docs.append((name, doc)))
    events = [d["data"] for n, d in docs if n == "event"]
    assert len(events) == 2
    assert set(events[0]) == {"stirrer-speed", "stirrer-temperature", "stirrer-probe_temperature"}
    assert events[0]["stirrer-speed"] == pytest.approx(300, abs=2.0)
    assert events[0]["stirrer-temperature"] == pytest.approx(25.0, abs=0.3)  # heater never on
    assert events[1]["stirrer-probe_temperature"] == pytest.approx(
        vial_state(lab, vial)["temperature_c"], abs=0.3
    )
    (descriptor,) = [d for n, d in docs if n == "descriptor"]
    config = descriptor["configuration"]["stirrer"]["data"]
    assert config["stirrer-model"] == "RCT digital"
    assert config["stirrer-speed-setpoint"] == 300.0
    assert sorted(descriptor["hints"]["stirrer"]["fields"]) == [
        "stirrer-speed",
        "stirrer-temperature",
    ]


def test_stirring_mixes_the_vial(lab: LabThread, stirrer: Stirrer, RE: RunEngine) -> None:
    t_placed = lab.world.clock.now()
    vial = vial_on_stirrer(lab, ("LiPF6-EC", 3.0), ("EMC", 5.0))
    assert vial_state(lab, vial)["mixed"] == pytest.approx(0.2, abs=1e-3)  # freshly layered
    wait_sim(60)
    still = vial_state(lab, vial)["mixed"]
    unstirred = lab.world.clock.now() - t_placed  # (simulated; longer if the box is loaded)
    # Diffusion alone takes hours (tau 4 h): at most that much mixing, whatever the delay.
    assert 0.2 < still <= 1.0 - 0.8 * math.exp(-unstirred / (4 * 3600.0)) + 1e-9
    RE(bps.mv(stirrer.speed, 600))
    t0 = lab.world.clock.now()
    wait_sim(30)
    mixed = vial_state(lab, vial)["mixed"]
    elapsed = lab.world.clock.now() - t0
    # 600 rpm: tau = 30 s * 300/600 = 15 s; at least `elapsed` seconds of full speed.
    assert mixed >= 1.0 - (1.0 - still) * math.exp(-elapsed / 15.0) - 1e-6
    assert mixed > 0.8
    wait_sim(120)
    assert vial_state(lab, vial)["mixed"] > 0.999


def test_heating_warms_the_vial_toward_the_plate(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine, call: Callable[..., Any]
) -> None:
    vial = vial_on_stirrer(lab, ("PC", 6.0))
    RE(bps.mv(stirrer.temperature, 70))
    wait_sim(900)
    state = vial_state(lab, vial)
    plate = call(stirrer.temperature.refresh())
    assert plate == pytest.approx(70, abs=0.5)
    # The vial approaches ambient + 0.85 * (plate - ambient) = 63.25 C with tau = 180 s.
    assert 58.0 < state["temperature_c"] < 63.5
    assert call(stirrer.refresh_probe()) == pytest.approx(
        vial_state(lab, vial)["temperature_c"], abs=0.3
    )


def test_stop_switches_heater_and_motor_off(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine, call: Callable[..., Any]
) -> None:
    RE(bps.mv(stirrer.speed, 800, stirrer.temperature, 80))
    call(stirrer.stop())
    call(stirrer.refresh_probe())  # replies come in order: both STOPs have been executed
    assert not sim(lab).motor_on
    assert not sim(lab).heater_on
    wait_sim(10)  # 800 rpm at 300 rpm/s
    assert call(stirrer.speed.refresh()) == 0.0
    plate = call(stirrer.temperature.refresh())
    wait_sim(300)
    assert call(stirrer.temperature.refresh()) < plate - 5.0  # cooling passively
    assert call(stirrer.speed.refresh_setpoint()) == 800.0  # setpoints are kept


def test_heater_off_action_leaves_the_motor_running(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine, call: Callable[..., Any]
) -> None:
    RE(bps.mv(stirrer.speed, 300, stirrer.temperature, 40))
    RE(bps.trigger(stirrer.heater_off, wait=True))
    call(stirrer.refresh_probe())  # in-order replies: the STOP_1 has been executed
    assert not sim(lab).heater_on
    assert sim(lab).motor_on
    assert call(stirrer.speed.refresh()) == pytest.approx(300, abs=5.0)


@pytest.mark.parametrize("success", [True, False])
def test_a_stop_right_after_set_wins(
    lab: LabThread, stirrer: Stirrer, call: Callable[..., Any], success: bool
) -> None:
    before = sim(lab).requests

    async def start_then_stop() -> BaseException | None:
        status = stirrer.temperature.set(250)  # minutes of heating
        await stirrer.temperature.stop(success=success)  # before the move has sent anything
        try:
            await asyncio.wait_for(status, 5.0)
        except MotionStoppedError as exc:
            return exc
        return None

    exc = call(start_then_stop())
    # bluesky: success=True ends the status without error, success=False fails it.
    assert (exc is None) is success
    if exc is not None:
        assert "stirrer-temperature" in str(exc)
        assert "stopped" in str(exc)
    call(stirrer.refresh_probe())  # in-order replies: everything sent has been executed
    assert not sim(lab).heater_on
    assert sim(lab).temperature_setpoint == 0.0  # the move never even wrote its setpoint
    assert sim(lab).requests == before + 2  # only STOP_1 and the probe read went out


@pytest.mark.parametrize("success", [True, False])
def test_stop_during_a_move_halts_it(
    lab: LabThread, stirrer: Stirrer, call: Callable[..., Any], success: bool
) -> None:
    # A weak heater (0.01 K/s: hours to 250 C even at this speed), so that the move is
    # surely still under way when the stop comes, however loaded the machine is.
    lab.call(setattr, sim(lab), "max_heating_rate_k_s", 0.01)

    async def heat_then_stop() -> tuple[bool, BaseException | None]:
        status = stirrer.temperature.set(250)
        await until(lambda: lab.call(lambda: sim(lab).heater_on))  # the move is under way
        await stirrer.temperature.stop(success=success)
        try:
            await asyncio.wait_for(status, 5.0)
        except MotionStoppedError as exc:
            return status.done, exc
        return status.done, None

    done, exc = call(heat_then_stop())
    assert done
    assert (exc is None) is success
    call(stirrer.refresh_probe())
    assert not sim(lab).heater_on
    assert sim(lab).temperature_setpoint == 250.0
    assert sim(lab).plate_c < 240.0  # halted on the way, not at the target


def test_limits_are_checked_before_sending(lab: LabThread, stirrer: Stirrer, RE: RunEngine) -> None:
    before = sim(lab).requests
    for plan in (
        bps.mv(stirrer.speed, 2000),
        bps.mv(stirrer.speed, 20),
        bps.mv(stirrer.temperature, 400),
    ):
        with pytest.raises(FailedStatus) as info:
            RE(plan)
        assert isinstance(info.value.__cause__, LimitError)
        assert "stirrer" in str(info.value.__cause__)
    assert sim(lab).requests == before
    assert RE.state == "idle"


def test_ignored_setpoint_is_caught_by_the_read_back(
    lab: LabThread, call: Callable[..., Any], opened: list[SerialInstrument]
) -> None:
    # A driver configured wider than the hardware: the stirrer ignores OUT_SP_4 2000
    # (as the real firmware does) and only the read-back reveals it.
    with init_devices():
        wide = Stirrer(lab.urls["stirrer"], timeout=0.5, speed_limits=(50.0, 5000.0))
    opened.append(wide)

    async def move() -> None:
        await wide.speed.set(2000.0)

    with pytest.raises(CommandRejectedError, match="setpoint not taken") as info:
        call(move())
    assert info.value.command == b"OUT_SP_4 2000\r\n"
    assert sim(lab).speed_setpoint == 0.0
    assert not sim(lab).motor_on


@pytest.mark.parametrize(
    ("fault", "exc"),
    [
        ("no_reply", DeviceTimeoutError),
        ("busy", DeviceTimeoutError),  # NAMUR has no busy reply: the firmware stays silent
        ("garbage", ProtocolError),
        ("drop", ConnectionLostError),
    ],
)
def test_faults_raise_clear_errors_and_recover(
    lab: LabThread, stirrer: Stirrer, call: Callable[..., Any], fault: str, exc: type[Exception]
) -> None:
    sim(lab).faults.inject(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(stirrer.speed.refresh())
    assert time.monotonic() - t0 < 3.0  # bounded, never a hang
    assert "stirrer" in str(info.value)
    assert call(stirrer.speed.refresh()) == 0.0  # and it works again


def test_a_lost_setter_frame_is_resent_once(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine
) -> None:
    sim(lab).faults.inject(Fault.BUSY)  # swallows the first OUT_SP_4
    RE(bps.mv(stirrer.speed, 400))
    assert sim(lab).faults.fired[Fault.BUSY] == 1
    assert sim(lab).speed_setpoint == 400.0
    assert sim(lab).rpm == pytest.approx(400, abs=5.0)


def test_a_stirrer_that_stays_silent_fails_the_move_in_bounded_time(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine
) -> None:
    sim(lab).faults.inject(Fault.NO_REPLY, count=None)
    t0 = time.monotonic()
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(stirrer.speed, 400))
    assert time.monotonic() - t0 < 5.0
    assert isinstance(info.value.__cause__, DeviceTimeoutError)
    assert info.value.__cause__.command == namur.encode_read_setpoint(namur.SPEED)
    assert RE.state == "idle"
    sim(lab).faults.clear()
    RE(bps.mv(stirrer.speed, 400))
    assert sim(lab).rpm == pytest.approx(400, abs=5.0)


def test_late_reply_is_not_taken_for_the_next_answer(
    lab: LabThread, stirrer: Stirrer, RE: RunEngine, call: Callable[..., Any]
) -> None:
    RE(bps.mv(stirrer.speed, 300))
    sim(lab).faults.inject(Fault.LATE_REPLY, delay_s=1.0)
    with pytest.raises(DeviceTimeoutError):
        call(stirrer.speed.refresh())
    # The late "300.x 4" arrives during the next exchange's drain, not as its reply.
    assert call(stirrer.temperature.refresh()) == pytest.approx(25.0, abs=0.3)


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        stir = Stirrer("/dev/does-not-exist")
    status = stir.speed.set(450)
    await asyncio.sleep(0.2)
    assert not status.done  # waits for the readback, as with hardware
    assert await stir.speed.setpoint.get_value() == 450.0
    set_mock_value(stir.speed.readback, 448.0)
    await asyncio.wait_for(status, 1.0)
    set_mock_value(stir.probe_temperature, 31.5)
    await assert_reading(
        stir,
        {"stir-speed": {"value": 448.0}, "stir-probe_temperature": {"value": 31.5}},
        full_match=False,
    )
    with pytest.raises(LimitError):
        await stir.speed.set(5000)
    # A new target replaces a move in progress: the old status fails, the new one goes on.
    old = stir.speed.set(600)
    new = stir.speed.set(700)
    with pytest.raises(MotionStoppedError, match="replaced by a new set"):
        await asyncio.wait_for(old, 1.0)
    set_mock_value(stir.speed.readback, 700.0)
    await asyncio.wait_for(new, 1.0)
    await stir.stop()
    await stir.heater_off.trigger()
    assert stir.heater_off.mock_calls == 1
    with pytest.raises(ValueError, match="regulate"):
        Stirrer("/dev/does-not-exist", regulate="air")  # type: ignore[arg-type]


@pytest.mark.parametrize("regulate", ["plate", "probe"])
def test_temperature_axis_waits_for_the_sensor_that_is_regulated(
    RE: RunEngine,
    call: Callable[..., Any],
    opened: list[SerialInstrument],
    regulate: Regulation,
) -> None:
    """With a PT 1000 fitted an RCT digital regulates the medium: set() must wait for it."""
    config = lab_config("stirrer")
    config.instruments[0].options["probe_connected"] = regulate == "probe"
    lab = LabThread(config, transport="tcp", speed=SPEED).start()
    try:
        with init_devices():
            stirrer = Stirrer(
                lab.urls["stirrer"], timeout=0.5, temperature_timeout=30.0, regulate=regulate
            )
        opened.append(stirrer)
        vial = vial_on_stirrer(lab, ("DMC", 6.0))
        RE(bps.mv(stirrer.temperature, 40))
        medium = vial_state(lab, vial)["temperature_c"]
        plate = sim(lab).plate_c
        reading = call(stirrer.temperature.refresh())
        if regulate == "probe":
            # The medium is on the setpoint; the plate runs hotter to get it there.
            assert medium == pytest.approx(40.0, abs=1.2)
            assert reading == pytest.approx(medium, abs=0.3)
            assert plate > 41.0
        else:
            # The plate is on the setpoint; the vial on it stays cooler.
            assert plate == pytest.approx(40.0, abs=1.0)
            assert reading == pytest.approx(plate, abs=0.3)
            assert medium < 39.0
    finally:
        lab.stop()


class _ManualClock(SimClock):
    """A clock that only moves when told (simulator-level tests, no wire)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


async def _heated_world(read_every: float | None) -> float:
    clock = _ManualClock()
    world = LabWorld(clock, landesfeind_blend)
    stirrer = StirrerSimulator("stirrer", world)
    world.pick("rack/1")
    vial = world.place("stirrer")
    for command in (b"OUT_SP_1 60", b"START_1", b"OUT_SP_4@600", b"START_4"):
        assert await stirrer.handle(command) is None  # NAMUR setters never answer
    if read_every is not None:
        while clock.t < 600.0:
            clock.t += read_every
            world.advance_temperature(vial)
    clock.t = 600.0
    assert stirrer.speed_setpoint == 600.0  # the '@' spelling of newer firmware
    return world.advance_temperature(vial)


async def test_zone_integrates_the_vial_along_the_plate_trajectory() -> None:
    # The world steps a vial toward a constant environment; the plate is not constant.
    # Read once after 10 min or every 0.1 s, the vial must end at the same temperature.
    dense = await _heated_world(0.1)
    sparse = await _heated_world(None)
    assert sparse == pytest.approx(dense, abs=0.005)
    assert 50.0 < sparse < 25.0 + 0.85 * (60.0 - 25.0)
