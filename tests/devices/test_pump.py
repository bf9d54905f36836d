"""NE-1000 pumps against the simulated pump network, through real ptys and TCP.

Also an independent client (nesp_lib) driving the simulator, proving it speaks the
real protocol, and the round-trip latency per command.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import nesp_lib
import pytest
import serial
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.core import NotConnectedError, init_devices

from hardware_mocks.instruments.pump import PumpNetworkSimulator
from hardware_mocks.lab import LabThread
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import ne1000
from labctl.devices.pump import PumpNetwork, PumpStatus, SyringePump
from tests.conftest import start_lab, until

SPEED = 200.0
RATE = 5.0  # mL/min: 1 mL takes 12 simulated seconds, 60 ms of wall time at SPEED
# Delivered/nominal volume spread of the simulator: 0.5 % per syringe, 0.2 % per run.
SIGMA = math.hypot(0.005, 0.002)


@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("pump", "balance", transport=transport, speed=SPEED)
    yield lab
    lab.stop()


def _sim(lab: LabThread) -> PumpNetworkSimulator:
    sim = lab.lab.simulators["pumps"]
    assert isinstance(sim, PumpNetworkSimulator)
    return sim


def _network(lab: LabThread, **kwargs: Any) -> PumpNetwork:
    options: dict[str, Any] = {"rate_ml_min": RATE, "poll_interval": 0.02, "timeout": 1.0}
    options.update(kwargs)
    with init_devices():
        pumps = PumpNetwork(lab.urls["pumps"], reagents=list(lab.world.reagents), **options)
    return pumps


@pytest.fixture
def pumps(lab: LabThread, RE: RunEngine) -> PumpNetwork:
    return _network(lab)


def _vial_on_balance(lab: LabThread) -> None:
    lab.call(lambda: (lab.world.pick("rack/1"), lab.world.place("balance")))


def _vial_grams(lab: LabThread) -> dict[str, float]:
    def contents() -> dict[str, float]:
        vial = lab.world.vial_at("balance")
        assert vial is not None
        return dict(vial.contents_g)

    result: dict[str, float] = lab.call(contents)
    return result


def _density(lab: LabThread, reagent: str) -> float:
    density = lab.world.reagents[reagent].density_g_ml
    assert density is not None
    return density


def _events(RE: RunEngine, plan: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    RE(plan, lambda name, doc: docs.append(doc) if name == "event" else None)
    return [d["data"] for d in docs]


def test_connect_identifies_every_pump(
    lab: LabThread, pumps: PumpNetwork, call: Callable[..., Any]
) -> None:
    assert list(pumps.pump) == list(lab.world.reagents)
    for address, (reagent, pump) in enumerate(pumps.pump.items()):
        config = call(pump.read_configuration())
        assert config[f"pumps-pump-{reagent}-firmware"]["value"] == "NE1000V3.928"
        assert config[f"pumps-pump-{reagent}-address"]["value"] == address
        assert config[f"pumps-pump-{reagent}-diameter"]["value"] == pytest.approx(14.43)
        assert config[f"pumps-pump-{reagent}-rate"]["value"] == pytest.approx(RATE)
        # The simulator's rate is what we set (stored as 5000 µL/min on the pump).
        assert _sim(lab).pump(address).rate_ml_min == pytest.approx(RATE)
        # The power-on reset alarm was reported to us, which acknowledged it.
        assert call(pump.last_alarm.get_value()) == ne1000.ALARM_TEXT[ne1000.Alarm.RESET]
        assert _sim(lab).pump(address).alarm is None


def test_mv_dispenses_into_the_vial_at_the_balance(
    lab: LabThread, pumps: PumpNetwork, RE: RunEngine, call: Callable[..., Any]
) -> None:
    _vial_on_balance(lab)
    ec, dmc = pumps.pump["EC"], pumps.pump["DMC"]
    t0 = time.monotonic()
    RE(bps.mv(ec, 1.2, dmc, 0.6))  # two pumps on one line, concurrently
    wall = time.monotonic() - t0
    assert wall < 5.0
    assert call(ec.dispensed.get_value()) == pytest.approx(1.2, abs=1e-3)
    assert call(dmc.dispensed.get_value()) == pytest.approx(0.6, abs=1e-3)
    assert call(ec.status.get_value()) is PumpStatus.STOPPED
    grams = _vial_grams(lab)
    for reagent, nominal in (("EC", 1.2), ("DMC", 0.6)):
        expected = nominal * _density(lab, reagent)
        # Within the simulated volumetric error (4 sigma), and not exact: that error exists.
        assert grams[reagent] == pytest.approx(expected, rel=4 * SIGMA)
        assert grams[reagent] != pytest.approx(expected, rel=1e-6)
        # And exactly what the syringe really delivered, per the simulator's ground truth.
        truth = _sim(lab).pump(reagent).delivered_true_ml * _density(lab, reagent)
        assert grams[reagent] == pytest.approx(truth, rel=1e-9)
    assert set(grams) == {"EC", "DMC"}
    # Infusing moved the plungers down by the nominal volumes.
    assert _sim(lab).pump("EC").plunger_ml == pytest.approx(10.0 - 1.2)


def test_balance_sees_the_mass_rise_during_a_dispense(
    transport: str, RE: RunEngine, call: Callable[..., Any]
) -> None:
    # A slow lab (speed 20): 0.5 mL at 1 mL/min takes 30 s simulated, 1.5 s of wall time,
    # so a loaded machine still samples the rise many times.
    lab = start_lab("pump", "balance", transport=transport, speed=20.0)
    try:
        _vial_on_balance(lab)
        pumps = _network(lab, rate_ml_min=1.0)
        density = _density(lab, "PC")

        def sample() -> tuple[float, float]:
            vial = lab.world.vial_at("balance")
            assert vial is not None
            return lab.world.clock.now(), vial.contents_g.get("PC", 0.0)

        async def watch() -> list[tuple[float, float]]:
            samples: list[tuple[float, float]] = []
            status = pumps.pump["PC"].set(0.5)
            while not status.done:
                samples.append(lab.call(sample))
                await asyncio.sleep(0.02)
            await status
            return samples

        samples = call(watch())
        final = _vial_grams(lab)["PC"]
        assert final == pytest.approx(0.5 * density, rel=4 * SIGMA)
        rising = [(t, g) for t, g in samples if 0.05 * final < g < 0.95 * final]
        assert len(rising) >= 3  # the liquid arrived progressively, not at the end
        assert [g for _, g in samples] == sorted(g for _, g in samples)
        # ... at the pump's rate, in simulated time (1 mL/min, within the volumetric error).
        (t1, g1), (t2, g2) = rising[0], rising[-1]
        assert t2 > t1
        assert (g2 - g1) / density / (t2 - t1) * 60.0 == pytest.approx(1.0, rel=0.05)
    finally:
        lab.stop()


def test_count_and_scan_read_the_pumps(lab: LabThread, pumps: PumpNetwork, RE: RunEngine) -> None:
    _vial_on_balance(lab)
    data = _events(RE, bp.count([pumps], num=1))
    assert len(data) == 1
    assert {f"pumps-pump-{r}-status" for r in lab.world.reagents} <= set(data[0])
    assert data[0]["pumps-pump-EC-status"] == "stopped"
    # A list scan of volumes: each step dispenses its setpoint, read back as `dispensed`.
    emc = pumps.pump["EMC"]
    # (bluesky annotates *args as (motor, positions) pairs, but documents the flat form.)
    data = _events(RE, bp.list_scan([emc], emc, [0.2, 0.3]))  # type: ignore[arg-type]
    assert [d["pumps-pump-EMC-dispensed"] for d in data] == [
        pytest.approx(0.2, abs=1e-3),
        pytest.approx(0.3, abs=1e-3),
    ]
    assert data[-1]["pumps-pump-EMC-total_dispensed"] == pytest.approx(0.5, abs=2e-3)
    assert _vial_grams(lab)["EMC"] == pytest.approx(0.5 * _density(lab, "EMC"), rel=4 * SIGMA)


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
    pumps: PumpNetwork,
    call: Callable[..., Any],
    fault: str,
    exc: type[Exception],
) -> None:
    pump = pumps.pump["DEC"]
    _sim(lab).faults.inject(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(pump.read_dispensed())
    assert time.monotonic() - t0 < 5.0  # bounded, never a hang
    assert "pumps-pump-DEC" in str(info.value)
    # The next command works again (reconnecting after a drop).
    assert call(pump.pump_status()) is ne1000.Status.STOPPED


def test_late_reply_is_not_taken_for_the_next_answer(
    lab: LabThread, pumps: PumpNetwork, call: Callable[..., Any]
) -> None:
    pump = pumps.pump["EC"]
    _sim(lab).faults.inject("late_reply", delay_s=1.3)
    with pytest.raises(DeviceTimeoutError):
        call(pump.read_dispensed())
    # The late "I...W..." arrives while we wait for a status: read past by its shape.
    assert call(pump.pump_status()) is ne1000.Status.STOPPED
    assert call(pump.read_dispensed()).infused_ml == 0.0


def test_fault_fails_the_move_in_the_run(
    lab: LabThread, pumps: PumpNetwork, RE: RunEngine, call: Callable[..., Any]
) -> None:
    _sim(lab).faults.inject("garbage")
    t0 = time.monotonic()
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(pumps.pump["EC"], 0.5))
    assert time.monotonic() - t0 < 5.0
    assert isinstance(info.value.__cause__, ProtocolError)
    assert info.value.__cause__.raw  # the garbled bytes travel with the error
    assert RE.state == "idle"
    # It failed before RUN: nothing moved, nothing is counted.
    assert _sim(lab).pump("EC").plunger_ml == 10.0
    assert call(pumps.pump["EC"].total_dispensed.get_value()) == 0.0


def test_stall_alarm_fails_the_move_with_the_volume_reached(
    lab: LabThread, pumps: PumpNetwork, call: Callable[..., Any]
) -> None:
    _vial_on_balance(lab)
    pump = pumps.pump["DMC"]
    lab.call(_sim(lab).jam, "DMC", 0.3)  # a blocked line: the motor stalls after 0.3 mL

    async def move() -> None:
        await pump.set(1.0)

    t0 = time.monotonic()
    with pytest.raises(ne1000.PumpAlarmError, match="stalled") as info:
        call(move())
    assert time.monotonic() - t0 < 5.0
    assert info.value.alarm is ne1000.Alarm.STALLED
    assert "pumps-pump-DMC" in str(info.value)
    assert call(pump.dispensed.get_value()) == pytest.approx(0.3, abs=2e-3)
    assert math.isnan(call(pump.contents.get_value()))  # plunger position now unknown
    assert _vial_grams(lab)["DMC"] == pytest.approx(0.3 * _density(lab, "DMC"), rel=4 * SIGMA)
    # The alarm was acknowledged by being reported: the pump works again.
    call(move())
    assert call(pump.dispensed.get_value()) == pytest.approx(1.0, abs=2e-3)


def test_empty_syringe_stalls_then_prime_and_refill(
    lab: LabThread, RE: RunEngine, call: Callable[..., Any]
) -> None:
    pumps = _network(lab, contents_ml=10.0, refill_rate_ml_min=8.0)
    _vial_on_balance(lab)
    pc, ec = pumps.pump["PC"], pumps.pump["EC"]
    # More than the tracked contents is refused before anything moves.
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(pc, 10.5))
    assert isinstance(info.value.__cause__, LimitError)
    # A syringe that is really almost empty (unknown to the device) stalls: alarm.
    lab.call(setattr, _sim(lab).pump("EC"), "plunger_ml", 0.25)
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(ec, 1.0))
    assert isinstance(info.value.__cause__, ne1000.PumpAlarmError)
    assert call(ec.dispensed.get_value()) == pytest.approx(0.25, abs=2e-3)
    grams_before = _vial_grams(lab)
    # prime: withdraw a whole syringe into the now empty barrel; no liquid reaches the vial.
    RE(bps.trigger(ec.prime, wait=True))
    assert _sim(lab).pump("EC").plunger_ml == pytest.approx(10.0)
    assert call(ec.contents.get_value()) == pytest.approx(10.0)
    assert call(ec.rate.get_value()) == pytest.approx(RATE)  # restored after refilling at 8
    # Dispense, then refill the network (every pump tops up from its tracked contents).
    RE(bps.mv(pc, 2.0))
    assert call(pc.contents.get_value()) == pytest.approx(8.0, abs=2e-3)
    RE(bps.trigger(pumps.refill, wait=True))
    assert _sim(lab).pump("PC").plunger_ml == pytest.approx(10.0, abs=1e-3)
    assert call(pc.contents.get_value()) == pytest.approx(10.0)
    assert _vial_grams(lab)["EC"] == pytest.approx(grams_before["EC"])

    # Priming a syringe that is not empty hits the plunger stop: a stall, not a silent fill.
    async def prime_pc() -> None:
        await pc.prime.trigger()

    with pytest.raises(ne1000.PumpAlarmError):
        call(prime_pc())


@pytest.fixture
def slow_lab() -> Iterator[LabThread]:
    """Speed 50: a dispense at 0.5 mL/min moves 0.01 mL per wall second (stop tests)."""
    lab = start_lab("pump", "balance", transport="tcp", speed=50.0)
    yield lab
    lab.stop()


def test_stop_halts_a_dispense_early(
    slow_lab: LabThread, RE: RunEngine, call: Callable[..., Any]
) -> None:
    lab = slow_lab
    # 5 mL would take 10 min simulated, 12 s of wall time.
    pumps = _network(lab, rate_ml_min=0.5, contents_ml=10.0)
    _vial_on_balance(lab)
    pump = pumps.pump["EMC"]
    truth = _sim(lab).pump("EMC")

    async def start_then_stop() -> float:
        status = pump.set(5.0)
        # Synchronise on the simulator: stop once liquid is really flowing.
        await until(lambda: lab.call(lambda: truth.delivered_true_ml) >= 0.05)
        t0 = time.monotonic()
        await pump.stop()
        await status  # completes (stopped as planned) without delivering everything
        assert time.monotonic() - t0 < 2.0
        return float(await pump.dispensed.get_value())

    delivered = call(start_then_stop())
    assert 0.05 < delivered < 2.0
    assert call(pump.contents.get_value()) == pytest.approx(10.0 - delivered)
    assert _sim(lab).pump("EMC").state == "S"
    # Nothing more arrives after the stop.
    grams = _vial_grams(lab)["EMC"]
    time.sleep(0.2)
    assert _vial_grams(lab)["EMC"] == grams


@pytest.mark.parametrize("success", [True, False])
def test_a_stop_right_after_set_means_nothing_is_dispensed(
    lab: LabThread, pumps: PumpNetwork, call: Callable[..., Any], success: bool
) -> None:
    """The RunEngine's stop() on abort/pause may come before the pump was started."""
    _vial_on_balance(lab)
    pump = pumps.pump["EC"]

    async def set_and_stop() -> BaseException | None:
        status = pump.set(2.0)
        await pump.stop(success=success)  # before the move task has sent anything
        try:
            await asyncio.wait_for(status, 5.0)
        except InstrumentError as exc:
            return exc
        return None

    exc = call(set_and_stop())
    assert (exc is None) is success  # bluesky: success=True ends the move without error
    if exc is not None:
        assert "stopped after 0 of 2 mL" in str(exc)
    time.sleep(0.1)  # were it running, 2 mL at 5 mL/min would be 0.3 mL in by now
    assert _sim(lab).pump("EC").plunger_ml == 10.0
    assert _sim(lab).pump("EC").delivered_true_ml == 0.0
    assert call(pump.dispensed.get_value()) == 0.0
    assert call(pump.read_dispensed()).infused_ml == 0.0
    assert _vial_grams(lab).get("EC", 0.0) == 0.0


def test_a_stop_while_the_pump_is_being_programmed_wins(
    lab: LabThread, pumps: PumpNetwork, call: Callable[..., Any]
) -> None:
    """stop() while VOL is on the wire: RUN must never follow."""
    _vial_on_balance(lab)
    sim = _sim(lab)
    handle = sim.handle
    held = asyncio.Event()  # used on the lab's loop only
    seen: list[bytes] = []

    def is_volume(request: bytes) -> bool:
        return request.startswith(b"0VOL") and request[4:5].isdigit()  # "0VOL2000" (uL)

    async def hold_volume(request: bytes) -> bytes | None:
        seen.append(request)
        if is_volume(request):
            await held.wait()
        return await handle(request)

    sim.handle = hold_volume  # type: ignore[method-assign]
    pump = pumps.pump["EC"]  # address 0

    async def scenario() -> None:
        status = pump.set(2.0)
        await until(lambda: any(is_volume(r) for r in seen))
        stopping = asyncio.ensure_future(pump.stop())
        await asyncio.sleep(0.05)  # stop() has been recorded and waits for the line
        lab.loop.call_soon_threadsafe(held.set)
        await stopping
        await status

    try:
        call(scenario())
    finally:
        sim.handle = handle  # type: ignore[method-assign]
    assert b"0RUN" not in seen
    assert seen.index(b"0STP") > seen.index(b"0VOL2000")  # the stop came during programming
    assert sim.pump("EC").plunger_ml == 10.0
    assert call(pump.dispensed.get_value()) == 0.0


def test_out_of_range_rate_is_rejected_by_the_pump(
    pumps: PumpNetwork, call: Callable[..., Any]
) -> None:
    # A 14.43 mm syringe cannot go past ~10.4 mL/min (63.6 mm/min of plunger travel).
    async def set_rate(ml_min: float) -> None:
        await pumps.pump["EC"].rate.set(ml_min)

    with pytest.raises(CommandRejectedError, match="out of range") as info:
        call(set_rate(50.0))
    assert info.value.raw is not None
    assert b"?OOR" in info.value.raw
    assert call(pumps.pump["EC"].rate.get_value()) == pytest.approx(RATE)
    call(set_rate(8.0))
    assert call(pumps.pump["EC"].rate.get_value()) == pytest.approx(8.0)


def test_missing_pump_fails_to_connect_in_bounded_time(lab: LabThread, RE: RunEngine) -> None:
    t0 = time.monotonic()
    with pytest.raises(NotConnectedError, match="ghost"), init_devices():
        pumps = PumpNetwork(lab.urls["pumps"], reagents={"EC": 0, "ghost": 42}, timeout=0.5)
    assert time.monotonic() - t0 < 5.0
    assert pumps.pump["ghost"].label == "pumps-pump-ghost"


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        pumps = PumpNetwork("/dev/does-not-exist", reagents=["A", "B"])
    await pumps.pump["B"].set(1.5)
    assert await pumps.pump["B"].dispensed.get_value() == 1.5
    await pumps.refill.trigger()
    assert pumps.refill.mock_calls == 1
    assert isinstance(pumps.pump["A"], SyringePump)


# -- the simulator against independent peers ------------------------------------------


def test_nesp_lib_drives_the_simulator_over_a_pty(RE: RunEngine) -> None:
    """nesp_lib (an independent NE-1000 client) speaks to the simulator as to a pump."""
    lab = start_lab("pump", "balance", transport="pty", speed=SPEED)
    try:
        _vial_on_balance(lab)
        with nesp_lib.Port(lab.urls["pumps"]) as port:
            # Its constructor sends SAF0 as a safe-mode packet, expects a basic reply,
            # and retries once over the power-on reset alarm.
            pump = nesp_lib.Pump(port, address=3)  # DMC
            assert pump.model_number == 1000
            assert pump.firmware_version == (3, 928)
            pump.syringe_diameter_mm = 19.13
            assert pump.syringe_diameter_mm == pytest.approx(19.13)
            pump.pumping_direction = nesp_lib.PumpingDirection.INFUSE
            assert pump.pumping_direction is nesp_lib.PumpingDirection.INFUSE
            pump.pumping_volume_ml = 1.5
            assert pump.pumping_volume_ml == pytest.approx(1.5)
            pump.pumping_rate_ml_per_min = 6.0
            assert pump.pumping_rate_ml_per_min == pytest.approx(6.0)
            pump.run()  # blocks, polling the status, until the pump stops
            assert pump.status is nesp_lib.Status.STOPPED
            assert pump.volume_infused_ml == pytest.approx(1.5)
            assert pump.volume_withdrawn_ml == 0.0
            pump.volume_infused_clear()
            assert pump.volume_infused_ml == 0.0
            # A rate the syringe cannot reach: the pump's ?OOR becomes nesp_lib's ValueError.
            with pytest.raises(ValueError, match="Pumping rate invalid"):
                pump.pumping_rate_ml_per_min = 500.0
        grams = _vial_grams(lab)["DMC"]
        assert grams == pytest.approx(1.5 * _density(lab, "DMC"), rel=4 * SIGMA)
    finally:
        lab.stop()


def test_safe_mode_framing_crc_and_timeout_alarm(RE: RunEngine) -> None:
    lab = start_lab("pump", transport="tcp", speed=SPEED)
    try:
        with serial.serial_for_url(lab.urls["pumps"], timeout=1.0) as port:

            def exchange(packet: bytes, safe: bool) -> ne1000.Reply:
                port.reset_input_buffer()
                port.write(packet)
                buf = b""
                while not ne1000.reply_complete(buf, safe=safe):
                    chunk = port.read(1)
                    assert chunk, f"no reply to {packet!r} (got {buf!r})"
                    buf += chunk
                return ne1000.decode_reply(buf, safe=safe)

            assert exchange(ne1000.encode(1), safe=False).alarm is ne1000.Alarm.RESET
            assert (
                exchange(ne1000.encode_safe_mode(1, 1), safe=True).status is ne1000.Status.STOPPED
            )
            assert exchange(ne1000.encode(1, "DIA", safe=True), safe=True).data == "14.43"
            # In safe mode a basic packet, or a safe one with a bad CRC, is refused.
            assert exchange(ne1000.encode(1, "DIA"), safe=True).error == "COM"
            bad = bytearray(ne1000.encode(1, "VER", safe=True))
            bad[-2] ^= 0xFF
            assert exchange(bytes(bad), safe=True).error == "COM"
            # A packet cut short is discarded after the pump's 0.5 s inter-byte timeout,
            # so it does not swallow the start of the next one.
            port.write(ne1000.encode(1, "VER", safe=True)[:4])
            time.sleep(0.6)
            assert exchange(ne1000.encode(1, "DIA", safe=True), safe=True).data == "14.43"
            # Start a continuous withdraw, then go silent past the 1 s timeout.
            assert exchange(ne1000.encode(1, "DIR", "WDR", safe=True), safe=True).error is None
            exchange(ne1000.encode(1, "VOL", "0", safe=True), safe=True)
            lab.call(setattr, _sim(lab).pump(1), "plunger_ml", 0.0)
            assert (
                exchange(ne1000.encode(1, "RUN", safe=True), safe=True).status
                is ne1000.Status.WITHDRAWING
            )
            time.sleep(1.3)
            reply = exchange(ne1000.encode(1, safe=True), safe=True)
            assert reply.alarm is ne1000.Alarm.TIMEOUT
            pump = _sim(lab).pump(1)
            assert pump.state == "S"  # the timeout stopped the pump ...
            # ... 1 s (wall) after the last packet: SPEED simulated seconds at 1 mL/min.
            assert pump.withdrawn_ml == pytest.approx(1.0 / 60 * SPEED, rel=0.15)
            # Back to basic mode with the manual's packet; the reply is in basic framing.
            assert (
                exchange(ne1000.encode_safe_mode(1, 0), safe=False).status is ne1000.Status.STOPPED
            )
            assert exchange(ne1000.encode(1, "SAF"), safe=False).data == "0"
    finally:
        lab.stop()


def test_round_trip_latency(transport: str, RE: RunEngine, call: Callable[..., Any]) -> None:
    """Mean wall time of one status query through the device stack (200 of them)."""
    lab = start_lab("pump", transport=transport, speed=SPEED)
    try:
        pump = _network(lab).pump["EC"]

        async def measure() -> list[float]:
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                await pump.pump_status()
                times.append(time.perf_counter() - t0)
            return times

        times = call(measure())
        mean_ms = statistics.fmean(times) * 1e3
        # A benchmark, printed; asserted only against physical and sanity bounds.
        print(
            f"\nNE-1000 status query round trip via {transport}: mean {mean_ms:.2f} ms, "
            f"p95 {sorted(times)[189] * 1e3:.2f} ms (simulator latency 2 ms)"
        )
        assert 2.0 < mean_ms < 1000.0  # at least the simulated firmware latency
    finally:
        lab.stop()


def test_simulator_rejects_bad_options() -> None:
    from hardware_mocks.config import ConfigError, load_lab_config
    from hardware_mocks.lab import SimulatedLab

    cfg = load_lab_config()
    cfg.instruments = [i for i in cfg.instruments if i.kind == "pump"]
    cfg.instruments[0].options = {"reagents": ["EC", "water"]}
    with pytest.raises(ConfigError, match=r"unknown \['water'\]"):
        SimulatedLab(cfg)
