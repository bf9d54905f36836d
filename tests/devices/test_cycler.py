"""The BatteryCycler device against the BT2200 simulator, through real ptys and TCP."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus, RunEngineInterrupted
from ophyd_async.core import WatchableAsyncStatus, init_devices, set_mock_value
from ophyd_async.testing import assert_reading

from hardware_mocks.clock import SimClock
from hardware_mocks.faults import Fault
from hardware_mocks.instruments.cycler import CyclerSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.physics.electrolyte import landesfeind_blend
from hardware_mocks.world import LabWorld
from labctl.devices.cycler import (
    BatteryCycler,
    CyclerChannel,
    EndTest,
    SequenceAbortedError,
    SequenceError,
    SequenceFailedError,
    Step,
)
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import bt2200
from tests.conftest import start_lab, until

SPEED = 2000.0


@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("cycler", transport=transport, speed=SPEED)
    yield lab
    lab.stop()


@pytest.fixture
def tcp_lab() -> Iterator[LabThread]:
    lab = start_lab("cycler", transport="tcp", speed=SPEED)
    yield lab
    lab.stop()


def _cycler(lab: LabThread) -> BatteryCycler:
    with init_devices():
        cycler = BatteryCycler(lab.urls["cycler"], timeout=1.0, poll_period=0.05)
    return cycler


@pytest.fixture
def cycler(lab: LabThread, RE: RunEngine) -> BatteryCycler:
    return _cycler(lab)


@pytest.fixture
def tcp_cycler(tcp_lab: LabThread, RE: RunEngine) -> BatteryCycler:
    return _cycler(tcp_lab)


def _sim(lab: LabThread) -> CyclerSimulator:
    sim = lab.lab.simulators["cycler"]
    assert isinstance(sim, CyclerSimulator)
    return sim


class _Progress:
    """A bluesky watcher that records the step numbers a status reports."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, current: int | None = None, *args: Any, **kwargs: Any) -> None:
        assert current is not None
        self.steps.append(current)


def _start(call: Callable[..., Any], ch: CyclerChannel, steps: list[Step]) -> Any:
    """Start a sequence on the RunEngine's loop; returns (status, progress updates)."""
    progress = _Progress()
    updates = progress.steps

    async def start() -> WatchableAsyncStatus[int]:
        status = ch.run_sequence(steps)
        status.watch(progress)
        return status

    return call(start()), updates


def _wait(call: Callable[..., Any], status: Any, timeout: float = 60.0) -> None:
    async def wait() -> None:
        await status

    call(wait(), timeout=timeout)


def _wait_running(call: Callable[..., Any], ch: CyclerChannel) -> bt2200.CellStatus:
    for _ in range(200):
        st: bt2200.CellStatus = call(ch.status())
        if st.running and abs(st.current_a) > 0:
            return st
        time.sleep(0.01)
    raise AssertionError("the sequence never started")


def test_identify_and_cell_definitions(cycler: BatteryCycler, call: Callable[..., Any]) -> None:
    assert call(cycler.model.get_value()) == "BT2203A"
    assert call(cycler.serial_number.get_value()) == "MY59001234"
    assert len(cycler.channels) == 8
    raw = call(cycler.ask(b"CELL:DEF? 1008\n"))
    assert raw == b"(@108)\n"
    assert call(cycler.channels[3].cell_id.get_value()) == 1003


def test_count_while_a_cc_discharge_runs(
    cycler: BatteryCycler, RE: RunEngine, call: Callable[..., Any]
) -> None:
    ch = cycler.channels[1]
    # 0.5 A: the half-full cell stays far from the cut-off for hours of simulated time
    # (seconds of wall time), however late the count below comes on a loaded machine.
    status, _ = _start(call, ch, [Step.discharge(0.5, 2.5, 36000)])
    _wait_running(call, ch)
    docs: list[dict[str, Any]] = []
    RE(
        bp.count([ch], num=3, delay=0.05),
        lambda name, doc: docs.append(doc) if name == "event" else None,
    )
    data = [d["data"] for d in docs]
    assert len(data) == 3
    for d in data:
        assert d["cycler-channels-1-current"] == pytest.approx(0.5, abs=0.005)  # discharge > 0
        assert d["cycler-channels-1-state"] == "RUNNING"
        assert d["cycler-channels-1-step"] == 1
        assert 3.0 < d["cycler-channels-1-voltage"] < 3.75
    # The cell discharges while we watch: voltage falls, step capacity rises.
    assert data[-1]["cycler-channels-1-capacity_ah"] > data[0]["cycler-channels-1-capacity_ah"]
    assert data[-1]["cycler-channels-1-voltage"] < data[0]["cycler-channels-1-voltage"]
    call(ch.stop(success=False))
    with pytest.raises(SequenceAbortedError):
        _wait(call, status)


def test_charge_rest_discharge_runs_to_completion(
    cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    ch = cycler.channels[2]
    steps = [Step.charge(2.5, 4.2, 1200), Step.rest(300), Step.discharge(2.5, 2.5, 1200)]
    t0 = time.monotonic()
    status, updates = _start(call, ch, steps)
    _wait(call, status)
    # 2700 s simulated at speed 2000: about 1.35 s of wall time.
    assert 1.2 < time.monotonic() - t0 < 10.0
    assert status.success
    # Progress is the step number and never goes back (a short step may fall between polls).
    assert updates[0] >= 1
    assert updates[-1] == 3
    assert updates == sorted(updates)

    async def trigger() -> None:
        await ch.trigger()

    call(trigger())
    assert call(ch.state.get_value()) == "IDLE"
    assert call(ch.result.get_value()) == "OK"
    assert call(ch.step.get_value()) == 3
    assert call(ch.current.get_value()) == 0.0
    # The discharge step ran its full 1200 s at 2.5 A (the cell started half full).
    assert call(ch.capacity_ah.get_value()) == pytest.approx(2.5 * 1200 / 3600, rel=2e-3)
    log = call(ch.fetch_log())
    assert [r.step for r in log] == sorted(r.step for r in log)
    assert {r.step for r in log} == {1, 2, 3}
    assert all(b.time_s >= a.time_s for a, b in itertools.pairwise(log))
    charge = [r for r in log if r.step == 1]
    rest = [r for r in log if r.step == 2]
    assert all(r.current_a == pytest.approx(-2.5, abs=1e-3) for r in charge[1:])  # charging < 0
    assert charge[-1].capacity_ah == pytest.approx(2.5 * 1200 / 3600, rel=2e-3)
    # Rest after charge: the voltage relaxes downward, visibly.
    assert all(b.voltage_v <= a.voltage_v + 1e-4 for a, b in itertools.pairwise(rest))
    assert rest[0].voltage_v - rest[-1].voltage_v > 0.01
    assert call(ch.fetch_log()) == []  # rows are delivered once


@pytest.mark.parametrize("success", [True, False])
def test_stop_turns_the_output_off(
    cycler: BatteryCycler, call: Callable[..., Any], success: bool
) -> None:
    ch = cycler.channels[1]
    status, _ = _start(call, ch, [Step.charge(3.0, 4.2, 36000)])
    st = _wait_running(call, ch)
    assert st.current_a == pytest.approx(-3.0, abs=0.005)  # charging: negative
    call(ch.stop(success=success))
    raw = call(cycler.ask(bt2200.encode_measure("current", [ch.cell]), bt2200.EXPECT_NUMBERS))
    assert bt2200.decode_currents(raw, 1) == [0.0]
    assert call(ch.current.get_value()) == 0.0
    assert call(ch.state.get_value()) == "IDLE"
    assert call(ch.result.get_value()) == "ABORTED"
    # bluesky: stop(success=True) (pause, suspend) ends the status without error, halted;
    # stop(success=False) fails it.
    if success:
        _wait(call, status)
        assert status.success
    else:
        with pytest.raises(SequenceAbortedError, match="aborted by stop"):
            _wait(call, status)
        assert status.done
        assert not status.success


@pytest.mark.parametrize("success", [True, False])
def test_a_stop_right_after_run_sequence_means_it_never_starts(
    lab: LabThread, cycler: BatteryCycler, call: Callable[..., Any], success: bool
) -> None:
    ch = cycler.channels[3]

    async def start_and_stop() -> BaseException | None:
        status = ch.run_sequence([Step.discharge(2.0, 2.5, 3600)])
        await ch.stop(success=success)  # before the status task has sent anything
        try:
            await status
        except SequenceAbortedError as exc:
            return exc
        return None

    exc = call(start_and_stop())
    assert (exc is None) is success
    sim = _sim(lab)
    # Never initiated: no sequence number, no result, no current.
    assert lab.call(lambda: (bool(sim.running[2]), int(sim.seq_no[2]), int(sim.result[2]))) == (
        False,
        0,
        0,
    )
    assert call(ch.status()).result == "NONE"


def test_a_stop_while_the_sequence_is_being_defined_wins(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    """stop() while CELL:ENAB is on the wire: CELL:INIT must never follow it."""
    sim = _sim(tcp_lab)
    handle = sim.handle
    held = asyncio.Event()  # belongs to the lab's loop (only used there)
    seen: list[bytes] = []

    async def hold_enable(request: bytes) -> bytes | None:
        seen.append(request)
        if b"CELL:ENAB" in request:
            await held.wait()  # the reply to ENAB waits until the test lets it go
        return await handle(request)

    sim.handle = hold_enable  # type: ignore[method-assign]
    ch = tcp_cycler.channels[2]

    async def scenario() -> None:
        status = ch.run_sequence([Step.discharge(2.0, 2.5, 3600)])
        await until(lambda: any(b"CELL:ENAB" in r for r in seen))
        stopping = asyncio.ensure_future(ch.stop())
        await asyncio.sleep(0.05)  # stop() has marked the run and waits for the line
        tcp_lab.loop.call_soon_threadsafe(held.set)
        await stopping
        await status  # stop(success=True): ends without error

    try:
        call(scenario())
    finally:
        sim.handle = handle  # type: ignore[method-assign]
    assert not any(b"CELL:INIT" in r for r in seen)
    assert any(b"CELL:ABOR" in r for r in seen)
    assert tcp_lab.call(lambda: (bool(sim.running[1]), int(sim.seq_no[1]))) == (False, 0)


def test_a_sequence_that_ends_without_a_result_fails(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    """Another client's *RST (and redefinition of the cell) ends the sequence with result
    NONE: that is no success."""
    ch = tcp_cycler.channels[4]
    status, _ = _start(call, ch, [Step.rest(36000)])
    for _ in range(200):
        if call(ch.status()).running:
            break
    sim = _sim(tcp_lab)
    reset = sim.handle(b"*RST;:CELL:DEF 1004,(@104)")
    asyncio.run_coroutine_threadsafe(reset, tcp_lab.loop).result(10)
    with pytest.raises(SequenceError, match="without a result") as info:
        _wait(call, status)
    assert not isinstance(info.value, SequenceFailedError | SequenceAbortedError)
    assert info.value.status.result == "NONE"


def test_an_error_check_never_reads_another_channels_error(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    """A busy (not-a-number) answer and its SYST:ERR? stay together on the line.

    Channel 1's voltage query is answered busy (-200 queued); channel 2's setter, waiting
    for the line, queues -222. Each must get its own error, not the other's.
    """
    _sim(tcp_lab).faults.inject("busy")
    bad_step = b"SEQ:STEP:DEF 2,1,CHARGE,60,10,4.2\n"  # 10 A: above the 6.25 A rating

    async def both() -> list[BaseException | None]:
        query = asyncio.ensure_future(tcp_cycler.channels[1].measure_voltage())
        setter = asyncio.ensure_future(tcp_cycler.send(bad_step))
        results = await asyncio.gather(query, setter, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    busy, rejected = call(both())
    assert isinstance(busy, InstrumentBusyError)
    assert "-200" in str(busy)
    assert busy.raw == b"9.91E+37\n"
    assert isinstance(rejected, CommandRejectedError)
    assert not isinstance(rejected, InstrumentBusyError)
    assert "-222" in str(rejected)
    assert "current 10 A" in str(rejected)


def test_pause_and_resume_rerun_the_sequence(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, RE: RunEngine
) -> None:
    """bluesky's pause stops movables with success=True: the run pauses (it does not
    fail), and resume re-runs the sequence from the checkpoint to completion."""
    ch, sim = tcp_cycler.channels[1], _sim(tcp_lab)

    def plan() -> Any:
        yield from bps.checkpoint()
        # 1.8 s of wall time: the pause surely lands while it runs.
        yield from bps.abs_set(ch, [Step.rest(3600), Step.charge(1.0, 4.2, 60)], wait=True)

    def pause_once_running() -> None:
        deadline = time.monotonic() + 10.0
        while not tcp_lab.call(lambda: bool(sim.running[0])) and time.monotonic() < deadline:
            time.sleep(0.005)
        RE.request_pause()  # type: ignore[no-untyped-call]

    pauser = threading.Thread(target=pause_once_running)
    pauser.start()
    with pytest.raises(RunEngineInterrupted):
        RE(plan())
    pauser.join()
    assert RE.state == "paused"
    assert tcp_lab.call(lambda: (bool(sim.running[0]), int(sim.result[0]))) == (False, 4)
    result = RE.resume()  # type: ignore[no-untyped-call]
    assert result.exit_status == "success"
    assert tcp_lab.call(lambda: (int(sim.result[0]), int(sim.step_no[0]))) == (2, 2)  # OK


def test_limits_are_rejected_by_the_instrument_with_222(
    tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    ch = tcp_cycler.channels[1]
    for step, text in [
        (Step.charge(10.0, 4.2, 60), "current 10 A"),
        (Step.charge(1.0, 4.6, 60), "voltage 4.6 V"),
        (Step.discharge(1.0, 1.5, 60), "voltage 1.5 V"),
    ]:
        status, _ = _start(call, ch, [step])
        with pytest.raises(CommandRejectedError, match="-222") as info:
            _wait(call, status)
        assert text in str(info.value)
        assert "cycler" in str(info.value)
        assert info.value.raw is not None
        assert info.value.raw.startswith(b"-222")
    assert call(ch.status()).result == "NONE"  # nothing ran


def test_fail_action_fails_the_status(tcp_cycler: BatteryCycler, call: Callable[..., Any]) -> None:
    ch = tcp_cycler.channels[4]
    guard = EndTest("VOLT_LE", 3.55, action="FAIL")
    steps = [Step("DISCHARGE", 3600, 5.0, 2.5, (guard,)), Step.rest(60)]
    status, _ = _start(call, ch, steps)
    with pytest.raises(SequenceFailedError, match=r"VOLT_LE 3\.55") as info:
        _wait(call, status)
    st = info.value.status
    assert (st.result, st.step, st.test, st.test_type) == ("FAIL", 1, 1, "VOLT_LE")
    assert st.measured <= 3.55
    assert call(tcp_cycler.ask(b"STAT:CELL:REP? (@1004)\n")) == b"3\n"


def test_abs_set_in_a_plan_waits_for_the_sequence(
    tcp_cycler: BatteryCycler, RE: RunEngine, call: Callable[..., Any]
) -> None:
    ch = tcp_cycler.channels[5]
    RE(bps.abs_set(ch, [Step.rest(120), Step.charge(1.0, 4.2, 120)], wait=True))
    st = call(ch.status())
    assert (st.state, st.result, st.step) == ("IDLE", "OK", 2)
    assert call(ch.capacity_ah.get_value()) == pytest.approx(1.0 * 120 / 3600, rel=1e-2)


def test_electrolyte_in_the_cell_station_sets_the_resistance(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    world = tcp_lab.world
    steps = [Step.discharge(5.0, 2.5, 300)]
    # Both cells start from the same rest state, one with the default 10 mS/cm electrolyte
    # and one initiated after a poor electrolyte was put at the cell station.
    ref_status, _ = _start(call, tcp_cycler.channels[1], steps)
    _wait_running(call, tcp_cycler.channels[1])
    tcp_lab.call(world.pick, "rack/1")
    tcp_lab.call(world.place, "cell")
    tcp_lab.call(world.dispense, "LiPF6-PC", 5.0, "cell")
    vial = world.vial_at("cell")
    assert vial is not None
    fractions, molality = tcp_lab.call(vial.composition)
    kappa = world.electrolyte_model(fractions, molality, 25.0)
    assert kappa < 3.0  # 2.5 mol/kg LiPF6 in PC alone: a poor electrolyte
    poor_status, _ = _start(call, tcp_cycler.channels[2], steps)
    _wait(call, ref_status)
    _wait(call, poor_status)
    sim = _sim(tcp_lab)
    assert tcp_lab.call(lambda: float(sim.cells.kappa_ms_cm[0])) == pytest.approx(10.0)
    assert tcp_lab.call(lambda: float(sim.cells.kappa_ms_cm[1])) == pytest.approx(kappa)
    # Compare the two discharges at the same times into the step (from the data logs).
    ref = {r.time_s: r for r in call(tcp_cycler.channels[1].fetch_log())}
    poor = {r.time_s: r for r in call(tcp_cycler.channels[2].fetch_log())}
    extra_ohm = sim.params.r_electrolyte_ohm * (10.0 / kappa - 1.0)
    for t in (10.0, 100.0, 250.0):
        assert ref[t].current_a == pytest.approx(poor[t].current_a, abs=1e-3)
        assert ref[t].voltage_v - poor[t].voltage_v > 5.0 * extra_ohm
    assert poor[250.0].temperature_c > ref[250.0].temperature_c  # more I^2 R heat


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
    cycler: BatteryCycler,
    call: Callable[..., Any],
    fault: str,
    exc: type[Exception],
) -> None:
    ch = cycler.channels[1]
    _sim(lab).faults.inject(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(ch.measure_voltage())
    assert time.monotonic() - t0 < 5.0  # bounded, never a hang
    error = info.value
    assert isinstance(error, InstrumentError)
    assert "cycler" in str(error)
    if fault == "busy":
        assert "-200" in str(error)
        assert error.raw == b"9.91E+37\n"
    # The next command works again (reconnecting after a drop).
    assert 3.0 < call(ch.measure_voltage()) < 4.2


def test_late_reply_is_not_taken_for_the_next_answer(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    ch = tcp_cycler.channels[1]
    _sim(tcp_lab).faults.inject("late_reply", delay_s=1.5)
    with pytest.raises(DeviceTimeoutError):
        call(ch.measure_voltage())
    # The late voltage arrives during the next exchange's drain, not as its reply.
    st = call(ch.status())
    assert st.state == "IDLE"
    assert 3.0 < st.voltage_v < 4.2


def test_transient_poll_errors_do_not_fail_a_running_sequence(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    ch = tcp_cycler.channels[6]
    status, _ = _start(call, ch, [Step.rest(1200), Step.discharge(1.0, 2.5, 300)])
    for _ in range(200):  # wait until it runs: a garbled *setter* must fail the status
        if call(ch.status()).running:
            break
    _sim(tcp_lab).faults.inject("garbage", count=2)
    _wait(call, status)
    assert status.success
    assert _sim(tcp_lab).faults.fired[Fault.GARBAGE] == 2


def test_failed_trigger_fails_the_run(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, RE: RunEngine
) -> None:
    _sim(tcp_lab).faults.inject("garbage")
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([tcp_cycler.channels[1]], num=1))
    cause = info.value.__cause__
    assert isinstance(cause, ProtocolError)
    assert cause.raw  # the garbled bytes travel with the error
    assert RE.state == "idle"


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        cyc = BatteryCycler("/dev/does-not-exist", channels=2)
    ch = cyc.channels[2]
    set_mock_value(ch.voltage, 3.7)
    set_mock_value(ch.current, 1.5)
    set_mock_value(ch.state, "RUNNING")
    await ch.trigger()
    await assert_reading(
        ch,
        {
            "cyc-channels-2-voltage": {"value": 3.7},
            "cyc-channels-2-current": {"value": 1.5},
            "cyc-channels-2-state": {"value": "RUNNING"},
        },
        full_match=False,
    )
    progress = _Progress()
    status = ch.run_sequence([Step.rest(10), Step.rest(10)])
    status.watch(progress)
    await status
    assert status.success
    assert progress.steps == [2]
    await ch.stop()
    assert await ch.current.get_value() == 0.0
    assert await ch.fetch_log() == []
    with pytest.raises(ValueError, match="steps"):
        ch.run_sequence([])


class _ManualClock(SimClock):
    """A clock that only moves when told (simulator-level tests, no wire)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


async def _bare_cycler(*setup: bytes) -> tuple[CyclerSimulator, _ManualClock]:
    clock = _ManualClock()
    sim = CyclerSimulator("cycler", LabWorld(clock, landesfeind_blend))
    for command in (b"CELL:DEF:QUIC 1", *setup):
        await sim.handle(command)
    assert sim.errors == []
    return sim, clock


async def test_sim_idle_and_resting_channels_cost_no_steps_of_their_own() -> None:
    rest = (b"SEQ:STEP:DEF 1,1,REST,3600", b"CELL:ENAB (@1001),1")
    sim, clock = await _bare_cycler(*rest)
    try:
        clock.t = 86400.0  # a day with every channel idle: one exact step
        sim.advance()
        assert sim.integration_steps == 1
        await sim.handle(b"CELL:INIT (@1001)")
        before = sim.integration_steps
        clock.t += 3600.0  # an hour of rest on one channel: from log row to log row
        sim.advance()
        assert sim.integration_steps - before <= 3600 / sim.log_period_s + 2
        assert (int(sim.result[0]), int(sim.log_written[0])) == (2, 361)  # OK; 1 s, 10 s, ...
        # A channel under current costs one step per internal step, idle ones nothing more.
        await sim.handle(b"SEQ:STEP:DEF 2,1,DISCHARGE,600,1.0,2.5;:CELL:ENAB (@1002),2")
        await sim.handle(b"CELL:INIT (@1002)")
        before = sim.integration_steps
        clock.t += 600.0
        sim.advance()
        assert sim.integration_steps - before == 600
    finally:
        await sim.close()


async def test_sim_rest_jumps_match_one_second_steps() -> None:
    """The exact jumps over a rest give what stepping every second gives."""
    steps = b"SEQ:STEP:DEF 1,1,DISCHARGE,600,3.0,2.5;:SEQ:STEP:DEF 1,2,REST,1800"
    never = b"SEQ:TEST:DEF 1,2,1,VOLT_GE,5.9,NONE,0,NEXT"  # forces 1 s steps, never fires
    runs = []
    for extra in ((), (never,)):
        sim, clock = await _bare_cycler(steps, *extra, b"CELL:ENAB (@1001),1")
        try:
            await sim.handle(b"CELL:INIT (@1001)")
            clock.t = 2500.0
            sim.advance()
            runs.append((sim, sim.integration_steps))
        finally:
            await sim.close()
    (jumped, n_jumped), (stepped, n_stepped) = runs
    assert n_stepped == 2400 + 1  # (the last 100 s, all channels idle, are one step)
    assert n_jumped <= 600 + 1800 / 10 + 2  # the rest jumped from log row to log row
    assert jumped.v[0] == pytest.approx(stepped.v[0], abs=1e-6)
    assert jumped.cells.temp_c[0] == pytest.approx(stepped.cells.temp_c[0], abs=1e-3)
    assert int(jumped.log_written[0]) == int(stepped.log_written[0])
    n = int(jumped.log_written[0])
    np.testing.assert_allclose(jumped.log[0, :n, :3], stepped.log[0, :n, :3], atol=1e-6)


async def test_sim_log_fetch_repeats_until_acknowledged() -> None:
    """``DATA:LOG:FETC?``: rows go only once a later read acknowledges them."""
    sim, clock = await _bare_cycler(
        b"SEQ:STEP:DEF 1,1,DISCHARGE,95,1.0,2.5", b"CELL:ENAB (@1001),1", b"DATA:LOG:PER 10"
    )

    async def fetch(*args: int) -> bt2200.LogBatch:
        reply = await sim.handle(b"DATA:LOG:FETC? " + b",".join(b"%d" % a for a in args))
        assert reply is not None
        return bt2200.decode_log_fetch(reply)

    try:
        await sim.handle(b"CELL:INIT (@1001)")
        clock.t = 100.0
        sim.advance()
        assert int(sim.log_written[0]) == 11  # 1 s, 10 s, ..., 90 s and the end at 95 s
        first = await fetch(1001, 4)  # a client's first read: from the unacknowledged rows
        assert (first.first, [r.time_s for r in first.rows]) == (0, [1.0, 10.0, 20.0, 30.0])
        assert await fetch(1001, 4) == first  # its answer lost: asked again, the same rows
        assert await fetch(1001, 4, 0) == first
        assert int(sim.log_read[0]) == 0  # nothing acknowledged yet
        nxt = await fetch(1001, 100, first.next)  # acknowledges rows 0..3
        assert (nxt.first, len(nxt.rows), nxt.rows[-1].time_s) == (4, 7, 95.0)
        assert int(sim.log_read[0]) == 4
        assert await fetch(1001, 100, 2) == nxt  # a stale cursor cannot go back
        assert await fetch(1001, 100, 500) == nxt  # a cursor from before a power cycle
        assert await fetch(1001, 100, 11) == bt2200.LogBatch(11, [])
        # The legacy read and a clear still discard; the next answer says where it starts.
        await sim.handle(b"DATA:LOG:CLE")
        assert await fetch(1001, 100, 4) == bt2200.LogBatch(11, [])
        assert await sim.handle(b"DATA:LOG:FETC? 1001,0") is None
        assert await sim.handle(b"DATA:LOG:FETC? 1001,10,-1") is None
        assert [code for code, _ in sim.errors] == [-222, -222]
    finally:
        await sim.close()


def test_log_fetch_codec() -> None:
    rows = [bt2200.LogRow(1.0, 3.7, 2.0, 0.000556, 25.0, 1)]
    assert bt2200.encode_log_fetch(1001) == b"DATA:LOG:FETC? 1001,1000\n"
    assert bt2200.encode_log_fetch(1001, 50, 12) == b"DATA:LOG:FETC? 1001,50,12\n"
    raw = bt2200.format_log_fetch(12, rows)
    assert raw == b"12,1,1.0,3.70000,-2.00000,0.000556,25.00,1\n"
    assert bt2200.decode_log_fetch(raw) == bt2200.LogBatch(12, rows)
    assert bt2200.decode_log_fetch(raw).next == 13
    assert bt2200.decode_log_fetch(b"7,0\n") == bt2200.LogBatch(7, [])
    for bad in (b"-1,0\n", b"1.5,0\n", b"3\n", b"3,2,1.0,3.7,0.0,0.0,25.0,1\n"):
        with pytest.raises(ProtocolError):
            bt2200.decode_log_fetch(bad)
    with pytest.raises(ValueError, match="first"):
        bt2200.encode_log_fetch(1001, 10, -1)
    # The reply's shape: the tail of a longer reply (a client that gave up on it and
    # flushed its input mid-line) is no answer, so the transport reads past it.
    complete = bt2200.reply_complete_for(bt2200.EXPECT_LOG)
    assert complete(raw)
    assert complete(b"3,0\n")
    tail = b"67,26.35,3,3450.0,4.04227,-2.50000,0.198611,26.37,3\n"
    assert not complete(tail)
    assert complete(tail + raw)
    assert bt2200.last_reply(tail + raw) == raw


async def test_fetch_log_keeps_its_cursor_through_lost_and_stale_answers() -> None:
    """The channel's side of ``DATA:LOG:FETC?``, on scripted answers."""
    row = [bt2200.LogRow(float(t), 3.7, 1.0, 0.0, 25.0, 1) for t in range(8)]
    answers: list[bytes | Exception] = []
    asked: list[bytes] = []

    async def ask(command: bytes, shape: Any = None) -> bytes:
        asked.append(command)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def send(command: bytes) -> None:
        raise AssertionError("no setter expected")

    ch = CyclerChannel(1, ask, send, lambda: False, name="cycler-1")
    answers += [bt2200.format_log_fetch(0, row[:3])]
    assert await ch.fetch_log() == row[:3]
    answers += [DeviceTimeoutError("no complete reply")]  # the answer is lost
    with pytest.raises(DeviceTimeoutError):
        await ch.fetch_log()
    # The late answer to the lost read, then (next call) that of the read that got it.
    answers += [bt2200.format_log_fetch(3, row[3:5]), bt2200.format_log_fetch(3, row[3:6])]
    assert await ch.fetch_log() == row[3:5]
    assert await ch.fetch_log() == row[5:6]  # the stale rows 3 and 4 are not repeated
    answers += [bt2200.format_log_fetch(8, [])]  # rows 6 and 7 cleared on the instrument
    assert await ch.fetch_log() == []
    assert asked == [
        b"DATA:LOG:FETC? 1001,250\n",
        b"DATA:LOG:FETC? 1001,250,3\n",
        b"DATA:LOG:FETC? 1001,250,3\n",
        b"DATA:LOG:FETC? 1001,250,5\n",
        b"DATA:LOG:FETC? 1001,250,6\n",
    ]
    # Full batches are read on until a short one.
    answers += [bt2200.format_log_fetch(8, row[:2]), bt2200.format_log_fetch(10, row[:1])]
    assert await ch.fetch_log(max_rows=2) == [*row[:2], row[0]]
    assert asked[-2:] == [b"DATA:LOG:FETC? 1001,2,8\n", b"DATA:LOG:FETC? 1001,2,10\n"]
    # A call that fails after a full batch keeps that batch (the instrument has been
    # told it may discard it) for the next call.
    answers += [bt2200.format_log_fetch(11, row[:2]), DeviceTimeoutError("no reply")]
    with pytest.raises(DeviceTimeoutError):
        await ch.fetch_log(max_rows=2)
    answers += [bt2200.format_log_fetch(13, row[2:3])]
    assert await ch.fetch_log(max_rows=2) == row[:3]
    assert asked[-3:] == [b"DATA:LOG:FETC? 1001,2,11\n", *[b"DATA:LOG:FETC? 1001,2,13\n"] * 2]
    assert answers == []


def test_pyvisa_client_talks_to_the_simulator(tcp_lab: LabThread) -> None:
    import pyvisa
    from pyvisa.resources import MessageBasedResource

    port = int(tcp_lab.urls["cycler"].rsplit(":", 1)[1])
    rm = pyvisa.ResourceManager("@py")
    inst = rm.open_resource(
        f"TCPIP::127.0.0.1::{port}::SOCKET",
        read_termination="\n",
        write_termination="\n",
        timeout=2000,
    )
    try:
        assert isinstance(inst, MessageBasedResource)
        assert inst.query("*IDN?").startswith("Keysight Technologies,BT2203A,")
        inst.write("CELL:DEFine 1001,(@101)")
        inst.write("SEQuence:STEP:DEFine 1,1,DISCHARGE,600,2.0,2.5")
        inst.write("SEQ:TEST:DEF 1,1,1,VOLT_LE,2.5,NONE,0,NEXT")
        inst.write("CELL:ENABle (@1001),1")
        inst.write("CELL:INITiate (@1001)")
        assert inst.query("SYSTem:ERRor?") == '+0,"No error"'
        assert inst.query("STAT:CELL:REP? (@1001)") == "1"
        volts = float(inst.query("MEAS:CELL:VOLT? (@1001)"))
        amps = float(inst.query("MEASure:CELL:CURRent? (@1001)"))
        assert 3.0 < volts < 3.75
        assert amps == pytest.approx(-2.0, abs=0.005)  # the BT2200 reports discharge < 0
        inst.write("CELL:FROB (@1001)")
        assert inst.query("SYST:ERR?") == '-113,"Undefined header"'
        assert inst.query("SYST:ERR?") == '+0,"No error"'
        inst.write("CELL:ABORt (@1001)")
        assert float(inst.query("MEAS:CELL:CURR? (@1001)")) == 0.0
    finally:
        inst.close()
        rm.close()


def test_a_data_log_reply_lost_on_the_wire_loses_no_rows(
    tcp_lab: LabThread, tcp_cycler: BatteryCycler, call: Callable[..., Any]
) -> None:
    # The instrument answers a log read, but the answer comes after the client's timeout
    # (a simulator that lags at high speed does this): the rows must come with the next read.
    ch = tcp_cycler.channels[4]
    status, _ = _start(call, ch, [Step.discharge(2.5, 2.5, 600), Step.rest(300)])
    _wait(call, status)
    sim = _sim(tcp_lab)
    written = int(sim.log_written[3])
    assert written >= 90  # every 10 s over 900 s, plus step ends
    sim.faults.inject("late_reply", delay_s=1.5)  # the client times out after 1.0 s
    with pytest.raises(DeviceTimeoutError):
        call(ch.fetch_log())
    time.sleep(1.0)  # the late answer arrives and is discarded as stale by the next read
    log = call(ch.fetch_log())
    assert len(log) == written
    assert log[0].step == 1
    assert log[0].time_s == 1.0  # the first row: one internal step into the sequence
    assert {r.step for r in log} == {1, 2}
    assert call(ch.fetch_log()) == []  # and each row once
