"""The temperature chamber: SCPI simulator, physics, and the device through real ptys and TCP."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
import pyvisa
from bluesky import RunEngine
from bluesky.simulators import check_limits
from bluesky.utils import FailedStatus
from ophyd_async.core import init_devices, set_mock_value
from ophyd_async.testing import assert_reading

from hardware_mocks.clock import SimClock
from hardware_mocks.instruments.chamber import ChamberSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.world import LabWorld
from labctl.devices.chamber import TemperatureChamber
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import chamber as codec
from tests.conftest import start_lab, until

SPEED = 1000.0  # a 10-minute ramp and settle takes ~0.6 s


# -- the simulator on its own, with a hand-driven clock --------------------------------------------
class ManualClock(SimClock):
    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


@pytest.fixture
def sim() -> tuple[ChamberSimulator, ManualClock]:
    clock = ManualClock()
    world = LabWorld(clock, lambda fractions, molality, temp: 10.0, ambient_c=25.0)
    return ChamberSimulator("chamber", world), clock


async def _ask(s: ChamberSimulator, text: str) -> str | None:
    reply = await s.handle(text.encode())
    if reply is None:
        return None
    assert reply.endswith(b"\n")
    assert reply.count(b"\n") == 1
    return reply[:-1].decode()


async def _errors(s: ChamberSimulator) -> list[str]:
    out = []
    while (e := await _ask(s, "SYST:ERR?")) != '0,"No error"':
        assert e is not None
        out.append(e)
    return out


async def test_sim_short_long_and_case_insensitive_forms(sim: Any) -> None:
    s, _ = sim
    assert await _ask(s, "SOURce:TEMPerature 30.5") is None  # setters never answer
    for query in (
        "SOUR:TEMP?",
        "sour:temp?",
        ":SOURCE:TEMPERATURE:LEVEL:IMMEDIATE:AMPLITUDE?",
        "TEMP?",
    ):
        assert await _ask(s, query) == "+3.05000E+01"
    assert await _ask(s, "outp?") == "0"
    assert await _ask(s, "OUTPut:STATe ON;:OUTP?") == "1"
    assert await _ask(s, "*IDN?") == "LABCTL,TC-150,TC150-0042,1.4.0"
    assert await _errors(s) == []
    # Neither a truncated long form nor an over-long short form is a SCPI mnemonic.
    assert await _ask(s, "SOURC:TEMP?") is None
    assert await _errors(s) == ['-113,"Undefined header"']


async def test_sim_compound_messages_follow_the_header_path_rule(sim: Any) -> None:
    s, _ = sim
    assert await _ask(s, "SOUR:TEMP:RAMP 1.5;TOL 0.5;DWEL 30") is None
    assert await _ask(s, "SOUR:TEMP:RAMP?;TOL?;DWEL?;:SYST:ERR?") == (
        '+1.50000E+00;+5.00000E-01;+3.00000E+01;0,"No error"'
    )
    # Without the leading ':' the second header is relative to MEAS: (SCPI header path).
    assert await _ask(s, "MEAS:TEMP?;SOUR:TEMP?") is not None
    assert await _errors(s) == ['-113,"Undefined header"']
    assert await _ask(s, "*IDN?;*OPC?;:STAT:OPER:COND?") == "LABCTL,TC-150,TC150-0042,1.4.0;1;0"


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("SOUR:TEMPX 1", '-113,"Undefined header"'),
        ("MEAS:TEMP", '-113,"Undefined header"'),  # a query-only node used as a setter
        ("*RST?", '-113,"Undefined header"'),
        ("SOUR:TEMP", '-109,"Missing parameter"'),
        ("OUTP ON,OFF", '-108,"Parameter not allowed"'),
        ("SOUR:TEMP hot", '-104,"Data type error"'),
        ("SOUR:TEMP 40 C", '-138,"Suffix not allowed"'),
        ("OUTP MAYBE", '-224,"Illegal parameter value"'),
        ("SOUR::TEMP 1", '-102,"Syntax error"'),
        ("OUTP2 ON", '-114,"Header suffix out of range"'),
        ("SOUR:TEMP 150.01", '-222,"Data out of range"'),
        ("SOUR:TEMP -40.5", '-222,"Data out of range"'),
        ("SOUR:TEMP:RAMP 0", '-222,"Data out of range"'),
        ("SOUR:TEMP 40\xe9", '-101,"Invalid character"'),
    ],
)
async def test_sim_errors_go_to_the_queue_not_the_reply(sim: Any, command: str, error: str) -> None:
    s, _ = sim
    reply = await s.handle(command.encode("latin-1"))
    assert reply is None
    assert await _errors(s) == [error]
    assert await _ask(s, "SOUR:TEMP?") == "+2.50000E+01"  # nothing was executed


async def test_sim_error_queue_status_bytes_reset_and_overflow(sim: Any) -> None:
    s, _ = sim
    assert await _ask(s, "*ESR?") == "128"  # power-on
    assert await _ask(s, "*ESR?") == "0"  # read clears it
    await _ask(s, "BOGUS")
    await _ask(s, "SOUR:TEMP 999")
    assert await _ask(s, "SYST:ERR:COUN?;*STB?;*ESR?") == "2;4;48"  # EAV; CME + EXE
    assert await _errors(s) == ['-113,"Undefined header"', '-222,"Data out of range"']  # FIFO
    for _ in range(15):
        await _ask(s, "BOGUS")
    errors = await _errors(s)
    assert len(errors) == 10
    assert errors[-1] == '-350,"Queue overflow"'
    await _ask(s, "SOUR:TEMP 60;:SOUR:TEMP:RAMP 5;:OUTP ON;:BOGUS")
    await _ask(s, "*RST")
    assert await _ask(s, "SOUR:TEMP?;:SOUR:TEMP:RAMP?;:OUTP?") == "+2.50000E+01;+2.00000E+00;0"
    assert await _errors(s) == ['-113,"Undefined header"']  # *RST leaves the queue alone
    await _ask(s, "BOGUS")
    await _ask(s, "*CLS")
    assert await _ask(s, "SYST:ERR?;*ESR?") == '0,"No error";0'


async def test_sim_limits_and_busy(sim: Any) -> None:
    s, _ = sim
    assert await _ask(s, "SOUR:TEMP? MIN;:SOUR:TEMP? MAX") == "-4.00000E+01;+1.50000E+02"
    await _ask(s, "SOUR:TEMP MAX")
    assert await _ask(s, "SOUR:TEMP?") == "+1.50000E+02"
    assert s.busy_reply(b"SOUR:TEMP 20") is None  # busy: ignored, no answer...
    assert await _errors(s) == ['-213,"Init ignored;controller busy"']  # ...and queued


async def test_sim_ramp_overshoot_dwell_and_condition_bits(sim: Any) -> None:
    s, clock = sim
    await _ask(s, "SOUR:TEMP 40;:OUTP ON")
    clock.t = 300.0  # 2 K/min ramp: the internal setpoint is at 35, the air lags behind it
    air = s.temperature_c()
    assert 30.0 < air < 35.0
    assert await _ask(s, "STAT:OPER:COND?") == str(2 + 8 + 256)  # settling, sweeping, running
    first_in_band = stable_at = None
    peak = air
    while stable_at is None:
        clock.t += 1.0
        air = s.temperature_c()
        peak = max(peak, air)
        if first_in_band is None and abs(air - 40.0) <= 0.3:
            first_in_band = clock.t
        if s.stable:
            stable_at = clock.t
        assert clock.t < 3000
    assert first_in_band is not None
    assert stable_at - first_in_band >= 60.0  # the dwell, counted in the chamber's time
    assert 450.0 < first_in_band < 900.0  # ramp 7.5 min, then settling
    clock.t += 600.0
    peak = max(peak, s.temperature_c())
    assert 0.02 < peak - 40.0 < 1.0  # a little overshoot, as a tuned PID gives
    assert await _ask(s, "STAT:OPER:COND?") == str(256 + 512)  # running, stable
    readings = [float(await _ask(s, "MEAS:TEMP?") or "nan") for _ in range(200)]
    assert statistics.mean(readings) == pytest.approx(40.0, abs=0.01)
    assert 0.01 < statistics.stdev(readings) < 0.04  # Pt100 noise at 0.01 degC resolution
    assert all(round(r, 2) == r for r in readings)


async def test_sim_cooling_is_slower_and_off_drifts_to_ambient(sim: Any) -> None:
    s, clock = sim
    await _ask(s, "SOUR:TEMP:RAMP MAX;:SOUR:TEMP 100;:OUTP ON")
    clock.t = 600.0  # heating capacity 5 K/min although 10 K/min was asked
    assert 60.0 < s.temperature_c() < 75.0
    clock.t = 3000.0
    assert s.temperature_c() == pytest.approx(100.0, abs=0.3)
    await _ask(s, "SOUR:TEMP -40")
    clock.t = 3600.0
    assert s.temperature_c() > 100.0 - 3.0 * 10  # cooling capacity <= 3 K/min
    await _ask(s, "OUTP OFF")
    start = s.temperature_c()
    clock.t += 1200.0  # one drift time constant
    assert s.temperature_c() - 25.0 == pytest.approx((start - 25.0) / 2.718, rel=0.02)
    assert await _ask(s, "STAT:OPER:COND?") == "0"


async def test_sim_is_the_thermal_zone_of_meter_and_cell(sim: Any) -> None:
    s, clock = sim
    world = s.world
    assert world.zones["meter"] is s
    assert world.zones["cell"] is s
    world.pick("rack/1")
    world.place("meter")
    await _ask(s, "SOUR:TEMP 5;:OUTP ON")
    for _ in range(60):  # the world advances vials lazily; ask it every minute
        clock.t += 60.0
        world.advance_temperature(world.vials["V01"])
    assert world.environment_c("meter") == pytest.approx(5.0, abs=0.3)
    assert world.vials["V01"].temperature_c == pytest.approx(5.0, abs=0.5)
    assert world.environment_c("rack/2") == 25.0  # the rack is outside the chamber


async def test_sim_long_idle_costs_o1_and_sparse_reads_match_dense_ones(sim: Any) -> None:
    s, clock = sim
    clock.t = 30 * 86400.0  # a month with the controller off: one exact step
    assert s.temperature_c() == pytest.approx(25.0)
    assert s.integration_steps == 1
    await _ask(s, "SOUR:TEMP 40;:OUTP ON")
    clock.t += 3600.0  # ramp 7.5 min, then the loop settles
    assert s.stable
    after_move = s.integration_steps
    assert after_move <= 3600  # 1 s steps while ramping and settling, no more
    clock.t += 30 * 86400.0  # a month holding 40 C: at rest on the setpoint, O(1)
    assert s.temperature_c() == 40.0
    assert s.stable
    assert s.integration_steps - after_move <= 2
    # Asked every second or once an hour, the chamber follows the same trajectory.
    clock2 = ManualClock()
    dense = ChamberSimulator("chamber", LabWorld(clock2, lambda f, m, t: 10.0, ambient_c=25.0))
    sparse = ChamberSimulator("chamber", LabWorld(clock2, lambda f, m, t: 10.0, ambient_c=25.0))
    for c in (dense, sparse):
        await _ask(c, "SOUR:TEMP 60;:OUTP ON")
    for t in range(1, 3601):
        clock2.t = float(t)
        dense.advance()
    assert sparse.temperature_c() == pytest.approx(dense.temperature_c(), abs=1e-9)
    assert sparse.stable == dense.stable
    for c in (dense, sparse):
        await _ask(c, "OUTP OFF")
    for t in range(3601, 7201):
        clock2.t = float(t)
        dense.advance()
    assert sparse.temperature_c() == pytest.approx(dense.temperature_c(), abs=1e-9)


# -- the device against the simulator through pty and TCP --------------------------------------
@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("chamber", transport=transport, speed=SPEED)
    yield lab
    lab.stop()


@pytest.fixture
def tcp_lab() -> Iterator[LabThread]:
    lab = start_lab("chamber", transport="tcp", speed=SPEED)
    yield lab
    lab.stop()


def _device(url: str, *, exchange_timeout: float = 0.4, **kwargs: Any) -> TemperatureChamber:
    # Connect with a generous timeout (a loaded CI box can stall a thread for a few
    # hundred ms), then use short exchanges so that the fault tests stay fast.
    with init_devices():
        chamber = TemperatureChamber(url, timeout=2.0, poll_period=0.01, **kwargs)
    chamber.transport.timeout = exchange_timeout
    return chamber


@pytest.fixture
def chamber(lab: LabThread, RE: RunEngine) -> TemperatureChamber:
    return _device(lab.urls["chamber"])


@pytest.fixture
def tcp_chamber(tcp_lab: LabThread, RE: RunEngine) -> TemperatureChamber:
    return _device(tcp_lab.urls["chamber"])


def _sim(lab: LabThread) -> ChamberSimulator:
    sim = lab.lab.simulators["chamber"]
    assert isinstance(sim, ChamberSimulator)
    return sim


def lab_value(lab: LabThread, fn: Callable[[], Any]) -> Any:
    """Ground truth, read on the lab's own loop thread."""
    return lab.call(fn)


async def _put(signal: Any, value: float) -> None:
    await signal.set(value)  # the status must be created on the RunEngine's loop


async def _put_error(signal: Any, value: float) -> BaseException:
    """The instrument error behind a failed signal put.

    ophyd-async re-raises a TimeoutError of a put as ``TimeoutError(source)`` with ours
    as its cause (and run_coroutine_threadsafe would drop that cause), so look here.
    """
    try:
        await signal.set(value)
    except Exception as exc:
        err: BaseException | None = exc
        while err is not None and not isinstance(err, InstrumentError):
            err = err.__cause__
        return err or exc
    raise AssertionError(f"putting {value} to {signal.name} did not fail")


def _events(RE: RunEngine, plan: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    RE(plan, lambda name, doc: docs.append(doc) if name == "event" else None)
    return [d["data"] for d in docs]


def test_mv_waits_for_the_dwell_then_count_reads_the_chamber(
    lab: LabThread, chamber: TemperatureChamber, RE: RunEngine, call: Callable[..., Any]
) -> None:
    sim = _sim(lab)
    lab.call(lambda: (lab.world.pick("rack/1"), lab.world.place("meter")))
    t0 = lab.call(lab.lab.clock.now)
    RE(bps.mv(chamber, 40.0))
    elapsed = lab.call(lab.lab.clock.now) - t0
    assert elapsed > 450.0 + 60.0  # 15 K at 2 K/min, then the 60 s dwell
    assert lab.call(lambda: sim.stable)
    assert lab.call(sim.temperature_c) == pytest.approx(40.0, abs=0.3)
    # The RunEngine calls stop(success=True) after every plan: the chamber stays on.
    data = _events(RE, bp.count([chamber], num=2))
    assert len(data) == 2
    assert data[0]["chamber-temperature"] == pytest.approx(40.0, abs=0.4)
    assert data[0]["chamber-setpoint"] == 40.0
    assert data[0]["chamber-running"] is True
    assert data[0]["chamber-stable"] is True
    # The vial on the meter warms with the chamber air (first order, tau 3 min).
    vial_c = lab.call(lambda: lab.world.advance_temperature(lab.world.vials["V01"]))
    assert 33.0 < vial_c < 40.5
    assert call(chamber.identity.get_value()) == "LABCTL,TC-150,TC150-0042,1.4.0"
    assert call(chamber.setpoint_max.get_value()) == 150.0


def test_set_reports_progress_to_watchers(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, call: Callable[..., Any]
) -> None:
    updates: list[dict[str, Any]] = []

    async def move() -> None:
        status = tcp_chamber.set(30.0)
        status.watch(cast(Any, lambda **kw: updates.append(kw)))  # a Watcher takes kwargs
        await status

    call(move())
    assert len(updates) > 5
    assert {u["target"] for u in updates} == {30.0}
    assert updates[0]["initial"] == pytest.approx(25.0, abs=0.1)
    assert updates[-1]["current"] == pytest.approx(30.0, abs=0.3)
    assert updates[-1]["fraction"] > 0.9 > updates[0]["fraction"]
    assert updates[-1]["unit"] == "degC"


def test_out_of_range_setpoint_is_refused_and_the_old_one_kept(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, RE: RunEngine, call: Callable[..., Any]
) -> None:
    sim = _sim(tcp_lab)
    RE(bps.mv(tcp_chamber, 30.0))
    for bad in (200.0, -41.0):
        with pytest.raises(FailedStatus) as info:
            RE(bps.mv(tcp_chamber, bad))
        err = info.value.__cause__
        assert isinstance(err, CommandRejectedError)
        assert "chamber: SCPI error -222: Data out of range" in str(err)
        assert err.raw == b'-222,"Data out of range"\n'
        assert err.command == codec.encode_setpoint(bad)
    assert lab_value(tcp_lab, lambda: sim.setpoint_c) == 30.0
    assert codec.decode_temperature(call(tcp_chamber.ask(codec.SETPOINT))) == 30.0
    assert lab_value(tcp_lab, lambda: list(sim.errors)) == []  # the driver left a clean queue
    assert lab_value(tcp_lab, lambda: sim.running)  # and the chamber still holds 30 degC
    with pytest.raises(LimitError, match=r"outside the chamber's range -40\.\.150"):
        call(tcp_chamber.check_value(200.0))
    with pytest.raises(LimitError):  # a plan dry run catches it before anything moves
        check_limits(bps.mv(tcp_chamber, 200.0))  # type: ignore[no-untyped-call]


def test_stop_switches_the_controller_off_and_fails_the_move(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, call: Callable[..., Any]
) -> None:
    sim = _sim(tcp_lab)

    async def move_then_stop() -> float:
        status = tcp_chamber.set(120.0)
        await asyncio.sleep(0.4)  # 400 s simulated: well into the ramp
        assert not status.done
        t0 = time.monotonic()
        await tcp_chamber.stop()
        with pytest.raises(RuntimeError, match="chamber: stopped while moving to 120"):
            await status
        return time.monotonic() - t0

    assert call(move_then_stop()) < 2.0
    assert not lab_value(tcp_lab, lambda: sim.running)
    hot = lab_value(tcp_lab, sim.temperature_c)
    assert hot > 30.0
    time.sleep(0.5)  # 500 s simulated with the controller off: drifting back to ambient
    assert 25.0 < lab_value(tcp_lab, sim.temperature_c) < hot


@pytest.mark.parametrize("success", [False, True])
def test_a_stop_right_after_set_keeps_the_controller_off(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, call: Callable[..., Any], success: bool
) -> None:
    """A stop() before the move task has run must win: no OUTP ON may follow it.

    Even stop(success=True), the RunEngine's end-of-plan call that leaves an *idle*
    chamber alone, switches off a pending move (and that move then ends without error).
    """
    sim = _sim(tcp_lab)

    async def set_and_stop() -> BaseException | None:
        status = tcp_chamber.set(60.0)
        await tcp_chamber.stop(success=success)
        try:
            await asyncio.wait_for(status, 5.0)
        except RuntimeError as exc:
            return exc
        return None

    exc = call(set_and_stop())
    assert (exc is None) is success
    if exc is not None:
        assert "stopped while moving to 60" in str(exc)
    time.sleep(0.05)  # 50 s simulated: a controller switched on again would show it
    assert lab_value(tcp_lab, lambda: (sim.running, sim.setpoint_c)) == (False, 25.0)
    assert call(tcp_chamber.running.get_value()) is False
    # With the move over, the end-of-plan stop(success=True) is a no-op again.
    before = lab_value(tcp_lab, lambda: sim.requests)
    call(tcp_chamber.stop(success=True))
    assert lab_value(tcp_lab, lambda: sim.requests) == before


def test_a_stop_during_the_setup_of_a_move_wins(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, call: Callable[..., Any]
) -> None:
    """stop() while the setpoint message is on the wire: OUTP ON must never follow."""
    sim = _sim(tcp_lab)
    handle = sim.handle
    held = asyncio.Event()  # used on the lab's loop only
    seen: list[bytes] = []

    async def hold_setpoint(request: bytes) -> bytes | None:
        seen.append(request)
        if request.startswith(b"SOUR:TEMP 60"):
            await held.wait()
        return await handle(request)

    sim.handle = hold_setpoint  # type: ignore[method-assign]

    async def scenario() -> None:
        status = tcp_chamber.set(60.0)
        await until(lambda: any(r.startswith(b"SOUR:TEMP 60") for r in seen))
        stopping = asyncio.ensure_future(tcp_chamber.stop())
        await asyncio.sleep(0.05)  # stop() has marked the move and waits for the line
        tcp_lab.loop.call_soon_threadsafe(held.set)
        await stopping
        with pytest.raises(RuntimeError, match="stopped while moving"):
            await status

    try:
        call(scenario())
    finally:
        sim.handle = handle  # type: ignore[method-assign]
    assert not any(b"OUTP ON" in r for r in seen)
    assert any(b"OUTP OFF" in r for r in seen)
    assert not lab_value(tcp_lab, lambda: sim.running)


def test_off_action_and_settle_timeout(
    tcp_lab: LabThread, RE: RunEngine, call: Callable[..., Any]
) -> None:
    sim = _sim(tcp_lab)
    chamber = _device(tcp_lab.urls["chamber"], settle_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(chamber, 100.0))
    assert time.monotonic() - t0 < 2.0
    assert isinstance(info.value.__cause__, DeviceTimeoutError)
    assert "chamber: not stable within +-0.3 K of 100 degC for 60 s" in str(info.value.__cause__)
    RE(bps.trigger(chamber.off, wait=True))
    assert not lab_value(tcp_lab, lambda: sim.running)
    assert call(chamber.running.get_value()) is False


def test_ramp_rate_tolerance_and_dwell_are_sent_to_the_chamber(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, RE: RunEngine, call: Callable[..., Any]
) -> None:
    sim = _sim(tcp_lab)
    RE(bps.mv(tcp_chamber.ramp_rate, 5.0, tcp_chamber.tolerance, 0.5, tcp_chamber.dwell, 10.0))
    assert lab_value(tcp_lab, lambda: sim.ramp) == 5.0
    RE(bps.mv(tcp_chamber, 35.0))
    assert lab_value(tcp_lab, lambda: (sim.tolerance, sim.dwell)) == (0.5, 10.0)
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(tcp_chamber.ramp_rate, 50.0))
    assert "SCPI error -222" in str(info.value.__cause__)
    assert call(tcp_chamber.ramp_rate.get_value()) == 5.0
    with pytest.raises(ValueError, match="kelvin: tolerance band must be > 0"):
        call(_put(tcp_chamber.tolerance, 0.0))


FAULTS = [
    ("no_reply", DeviceTimeoutError),
    ("late_reply", DeviceTimeoutError),
    ("garbage", ProtocolError),
    ("busy", InstrumentBusyError),
    ("drop", ConnectionLostError),
]


@pytest.mark.parametrize(("fault", "exc"), FAULTS)
def test_query_faults_raise_clear_errors_and_recover(
    lab: LabThread,
    chamber: TemperatureChamber,
    call: Callable[..., Any],
    fault: str,
    exc: type[Exception],
) -> None:
    sim = _sim(lab)
    sim.faults.inject(fault, delay_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(chamber.measure())
    assert time.monotonic() - t0 < 3.0  # bounded, never a hang
    assert "chamber" in str(info.value)
    if fault == "busy":
        assert "SCPI error -213: Init ignored;controller busy" in str(info.value)
    # The next exchange gets its own answer (no stale reply taken for it).
    assert codec.decode_positive(call(chamber.ask(codec.RAMP))) == 2.0
    assert call(chamber.measure()) == pytest.approx(lab_value(lab, sim.temperature_c), abs=0.15)


@pytest.mark.parametrize(("fault", "exc"), FAULTS)
def test_setter_faults_raise_clear_errors_and_recover(
    tcp_lab: LabThread,
    tcp_chamber: TemperatureChamber,
    call: Callable[..., Any],
    fault: str,
    exc: type[Exception],
) -> None:
    sim = _sim(tcp_lab)
    sim.faults.inject(fault, delay_s=1.0)
    t0 = time.monotonic()
    err = call(_put_error(tcp_chamber.ramp_rate, 1.5))
    assert time.monotonic() - t0 < 3.0
    assert isinstance(err, exc)
    assert "chamber" in str(err)
    if fault in ("no_reply", "busy", "drop"):  # the setter never reached the controller
        assert lab_value(tcp_lab, lambda: sim.ramp) == 2.0
    call(_put(tcp_chamber.ramp_rate, 1.5))
    assert lab_value(tcp_lab, lambda: sim.ramp) == 1.5
    assert lab_value(tcp_lab, lambda: list(sim.errors)) == []


def test_replies_later_than_the_resync_are_not_taken_for_the_next_answer(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, call: Callable[..., Any]
) -> None:
    # The setter's answer and the diagnosing resync's answer both arrive after every
    # timeout and after the next exchange's drain window: the next resync must read
    # past both (an *IDN? marker could not: the stale one equals the fresh one).
    sim = _sim(tcp_lab)
    sim.faults.inject("late_reply", delay_s=1.5)
    err = call(_put_error(tcp_chamber.ramp_rate, 1.5))
    assert isinstance(err, DeviceTimeoutError)
    tcp_chamber.transport.timeout = 2.0  # long enough to see the stale replies arrive
    call(_put(tcp_chamber.ramp_rate, 1.25))
    assert lab_value(tcp_lab, lambda: sim.ramp) == 1.25
    assert codec.decode_positive(call(tcp_chamber.ask(codec.RAMP))) == 1.25
    assert lab_value(tcp_lab, lambda: list(sim.errors)) == []


def test_a_failed_move_fails_the_run(
    tcp_lab: LabThread, tcp_chamber: TemperatureChamber, RE: RunEngine
) -> None:
    _sim(tcp_lab).faults.inject("busy", count=None)
    t0 = time.monotonic()
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(tcp_chamber, 30.0))
    assert time.monotonic() - t0 < 5.0
    assert isinstance(info.value.__cause__, DeviceTimeoutError | InstrumentBusyError)
    assert RE.state == "idle"
    _sim(tcp_lab).faults.clear()
    RE(bps.mv(tcp_chamber, 30.0))
    assert lab_value(tcp_lab, lambda: _sim(tcp_lab).setpoint_c) == 30.0


def test_round_trip_latency(
    lab: LabThread, chamber: TemperatureChamber, call: Callable[..., Any]
) -> None:
    async def mean_latency() -> float:
        t0 = time.perf_counter()
        for _ in range(200):
            await chamber.measure()
        return (time.perf_counter() - t0) / 200

    latency = call(mean_latency())
    # A benchmark, printed; asserted only against physical and sanity bounds.
    print(f"\n{lab.transport}: MEAS:TEMP? round trip through the device {latency * 1e3:.2f} ms")
    assert 0.002 <= latency < 1.0  # the simulated firmware alone takes 2 ms


def test_an_independent_client_pyvisa_speaks_to_the_simulator(tcp_lab: LabThread) -> None:
    """pyvisa-py's raw-socket SCPI session, with no labctl code in the loop."""
    sim = _sim(tcp_lab)
    host, port = tcp_lab.urls["chamber"].removeprefix("socket://").rsplit(":", 1)
    rm = pyvisa.ResourceManager("@py")
    try:
        inst = rm.open_resource(
            f"TCPIP::{host}::{port}::SOCKET",
            read_termination="\n",
            write_termination="\n",
            timeout=2000,
        )
        assert isinstance(inst, pyvisa.resources.MessageBasedResource)
        assert inst.query("*IDN?") == "LABCTL,TC-150,TC150-0042,1.4.0"
        inst.write("SOUR:TEMP 35.5")
        assert float(inst.query("SOUR:TEMP?")) == 35.5
        assert lab_value(tcp_lab, lambda: sim.setpoint_c) == 35.5
        air = float(inst.query("MEAS:TEMP?"))
        assert air == pytest.approx(lab_value(tcp_lab, sim.temperature_c), abs=0.15)
        inst.write("SOUR:TEMPX 1")
        assert inst.query("SYST:ERR?") == '-113,"Undefined header"'
        assert inst.query("SYST:ERR?") == '0,"No error"'
        inst.write("source:temperature:ramp 1.5;:outp on")  # long forms, any case, compound
        assert inst.query("SOUR:TEMP:RAMP?;:OUTP?") == "+1.50000E+00;1"
        assert lab_value(tcp_lab, lambda: sim.running)
        t0 = time.perf_counter()
        for _ in range(200):
            float(inst.query("MEAS:TEMP?"))
        latency = (time.perf_counter() - t0) / 200
        print(f"\npyvisa-py TCPIP SOCKET: MEAS:TEMP? round trip {latency * 1e3:.2f} ms")
        assert 0.002 <= latency < 1.0  # a benchmark: a sanity bound only
        inst.close()
    finally:
        rm.close()


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        ch = TemperatureChamber("/dev/does-not-exist")
    set_mock_value(ch.temperature, 22.0)
    await ch.set(37.5)
    await assert_reading(
        ch,
        {"ch-temperature": {"value": 37.5}, "ch-setpoint": {"value": 37.5}},
        full_match=False,
    )
    await ch.ramp_rate.set(1.0)  # no I/O in mock mode
    assert await ch.ramp_rate.get_value() == 1.0
    await ch.stop(success=True)  # what the RunEngine does after every plan: nothing
    assert await ch.running.get_value() is True
    await ch.stop()
    assert await ch.running.get_value() is False
    await ch.off.trigger()
    assert ch.off.mock_calls == 1
