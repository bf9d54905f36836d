"""New Era NE-1000 syringe pumps daisy-chained on one RS-232 line.

A :class:`PumpNetwork` owns the one serial port of the line and exposes one
:class:`SyringePump` per reagent as ``network.pump[reagent]`` (an ophyd-async
``DeviceMap`` keyed by reagent name). All pumps share the network's transport, whose
lock serialises their commands; pumps still run concurrently, as on a real chain.

A pump is a ``Movable``: ``set(volume_ml)`` infuses that volume at the configured rate
and completes only when the pump reports its program stopped with the volume delivered
(``DIS``), reporting progress to watchers on the way. ``stop()`` halts it.

Stopping follows bluesky: ``stop(success=True)`` (what the RunEngine sends on pause,
suspend and at the end of every plan) ends a move in progress without error, the pump
halted; ``stop(success=False)`` ends it with an error. A stop that arrives before the
pump was started (``set()`` still programming it) wins: ``RUN`` is never sent. Each
``set()`` records the stop generation when it is called, so no later code can forget a
stop that came in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from bluesky.protocols import Movable, Stoppable
from ophyd_async.core import (
    Device,
    DeviceConnector,
    DeviceMap,
    StandardReadable,
    StandardReadableFormat,
    StrictEnum,
    WatchableAsyncStatus,
    WatcherUpdate,
    set_mock_value,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from labctl.devices.base import Action, SerialConnector, SerialInstrument
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
)
from labctl.devices.protocols import ne1000
from labctl.devices.transport import SerialTransport

T = TypeVar("T")

try:  # POSIX serial ports
    import termios

    _TTY_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - Windows
    _TTY_ERRORS = ()

REOPEN_ATTEMPTS = 5
REOPEN_PAUSE_S = 0.1


class PumpStatus(StrictEnum):
    """What the pump's status character says (``ALARM``: it answered with an alarm)."""

    STOPPED = "stopped"
    INFUSING = "infusing"
    WITHDRAWING = "withdrawing"
    PAUSED = "paused"
    PAUSE_PHASE = "pause phase"
    USER_WAIT = "user wait"
    PURGING = "purging"
    ALARM = "alarm"


_STATUS = {
    ne1000.Status.STOPPED: PumpStatus.STOPPED,
    ne1000.Status.INFUSING: PumpStatus.INFUSING,
    ne1000.Status.WITHDRAWING: PumpStatus.WITHDRAWING,
    ne1000.Status.PAUSED: PumpStatus.PAUSED,
    ne1000.Status.PAUSE_PHASE: PumpStatus.PAUSE_PHASE,
    ne1000.Status.USER_WAIT: PumpStatus.USER_WAIT,
    ne1000.Status.PURGING: PumpStatus.PURGING,
}


class _SharedLineConnector(SerialConnector):
    """Identifies one pump on a port its network opens; never closes the shared port."""

    async def connect_real(self, device: Device, timeout: float, force_reconnect: bool) -> None:
        self.mock = False
        await self.transport.open()
        await asyncio.wait_for(self.identify(), timeout)
        await DeviceConnector.connect_real(self, device, timeout, force_reconnect)


class SyringePump(StandardReadable, Movable[float], Stoppable):
    """One NE-1000 at ``address`` on a line whose transport a :class:`PumpNetwork` owns.

    Movable: ``set(volume_ml)`` infuses that volume (mL) into whatever sits at the
    dispense station. Stoppable: ``stop()``.

    Readings: ``dispensed`` (mL delivered by the last move, hinted; the pump's own
    count, not a weighing), ``total_dispensed`` (mL since connect), ``contents``
    (estimated mL in the syringe; NaN until known), ``status`` (queried at each read),
    ``last_alarm`` (the last alarm the pump reported, "" if none).
    Configuration: ``reagent``, ``address``, ``diameter`` (mm), ``rate`` (mL/min),
    ``syringe_volume`` (mL), ``firmware``; ``diameter`` and ``rate`` are writable.
    Actions: ``refill`` (withdraw back to full from the tracked contents) and ``prime``
    (fill a freshly mounted, empty syringe: withdraw its whole volume).
    """

    def __init__(
        self,
        transport: SerialTransport,
        address: int,
        reagent: str,
        name: str = "",
        *,
        syringe_volume_ml: float = 10.0,
        diameter_mm: float | None = None,
        rate_ml_min: float | None = None,
        refill_rate_ml_min: float | None = None,
        contents_ml: float | None = None,
        poll_interval: float = 0.1,
        move_timeout_margin: float = 10.0,
    ) -> None:
        if not (isinstance(address, int) and 0 <= address <= ne1000.MAX_ADDRESS):
            raise ValueError(f"address: must be 0..{ne1000.MAX_ADDRESS}, got {address!r}")
        if not syringe_volume_ml > 0:
            raise ValueError(f"syringe_volume_ml: must be > 0, got {syringe_volume_ml!r}")
        if contents_ml is not None and not 0 <= contents_ml <= syringe_volume_ml:
            raise ValueError(f"contents_ml: must be 0..{syringe_volume_ml}, got {contents_ml!r}")
        if diameter_mm is not None:
            ne1000.encode_diameter(address, diameter_mm)  # validates
        for field, rate in (
            ("rate_ml_min", rate_ml_min),
            ("refill_rate_ml_min", refill_rate_ml_min),
        ):
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{field}: must be > 0 mL/min, got {rate!r}")
        self._transport = transport
        self._address = address
        self._capacity = syringe_volume_ml
        self._want_diameter = diameter_mm
        self._want_rate = rate_ml_min
        self._refill_rate = refill_rate_ml_min
        self.poll_interval = poll_interval
        self.move_timeout_margin = move_timeout_margin
        self._diameter_mm = math.nan
        self._rate_ml_min = math.nan
        self._volume_units = ne1000.VolumeUnits.ML
        self._contents = math.nan if contents_ml is None else float(contents_ml)
        self._total = 0.0
        self._moved = 0.0  # latest DIS count of the move in progress
        self._ran = False  # RUN was sent for the move in progress: the plunger may have moved
        # Every stop() bumps the generation; a move compares it with the one it was
        # started under (recorded synchronously in set()), so a stop is never lost.
        self._stop_gen = 0
        self._stop_success = True
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.dispensed, self._set_dispensed = soft_signal_r_and_setter(
                float, 0.0, units="mL", precision=4
            )
        with self.add_children_as_readables():
            self.total_dispensed, self._set_total = soft_signal_r_and_setter(
                float, 0.0, units="mL", precision=4
            )
            self.contents, self._set_contents = soft_signal_r_and_setter(
                float, self._contents, units="mL", precision=3
            )
            self.last_alarm, self._set_last_alarm = soft_signal_r_and_setter(str, "")
        with self.add_children_as_readables(StandardReadableFormat.UNCACHED_SIGNAL):
            self.status, _ = soft_signal_r_and_setter(PumpStatus, getter=self._read_status)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.reagent, _ = soft_signal_r_and_setter(str, reagent)
            self.address, _ = soft_signal_r_and_setter(int, address)
            self.diameter = soft_signal_rw(
                float,
                units="mm",
                precision=2,
                getter=lambda: self._diameter_mm,
                setter=self._put_diameter,
            )
            self.rate = soft_signal_rw(
                float,
                units="mL/min",
                precision=4,
                getter=lambda: self._rate_ml_min,
                setter=self._put_rate,
            )
            self.syringe_volume, _ = soft_signal_r_and_setter(float, syringe_volume_ml, units="mL")
            self.firmware, self._set_firmware = soft_signal_r_and_setter(str)
        self.refill = Action(self._refill)
        self.prime = Action(self._prime)
        self._connector_ = _SharedLineConnector(transport, self._identify)
        super().__init__(name=name, connector=self._connector_)

    # -- I/O ------------------------------------------------------------------------------
    @property
    def is_mock(self) -> bool:
        return self._connector_.mock

    @property
    def label(self) -> str:
        return self.name or f"pump {self._address}"

    def _stamp(self, exc: InstrumentError) -> None:
        exc.instrument = self.label

    async def _exchange(self, payload: bytes, expect: str) -> bytes:
        complete = ne1000.reply_complete_for(self._address, expect)
        for attempt in range(REOPEN_ATTEMPTS):
            try:
                raw = await self._transport.query(payload, complete)
                break
            except ConnectionLostError as exc:
                # Reopening failed before anything was sent (the error has no command):
                # a re-plugged adapter or a restarted server needs a moment. Retrying is
                # safe then; after a loss mid-exchange it is not (RUN, STP).
                if exc.command is None and attempt < REOPEN_ATTEMPTS - 1:
                    await asyncio.sleep(REOPEN_PAUSE_S)
                    continue
                self._stamp(exc)
                raise
            except InstrumentError as exc:
                self._stamp(exc)
                raise
            except _TTY_ERRORS as exc:
                # pyserial's flush() on a hung-up pty raises termios.error, which the
                # transport does not map: drop the port so the next call reopens it.
                await self._transport.close()
                raise ConnectionLostError(
                    f"connection lost: {exc}", instrument=self.label, command=payload
                ) from exc
        return ne1000.last_frame(raw)

    def _decode(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ne1000.PumpAlarmError as exc:
            self._set_last_alarm(ne1000.ALARM_TEXT[exc.alarm])
            self._stamp(exc)
            raise
        except InstrumentError as exc:
            self._stamp(exc)
            raise

    async def _ack(self, payload: bytes) -> ne1000.Status:
        """Send a set command; the reply must be status only."""
        raw = await self._exchange(payload, ne1000.EXPECT_STATUS)
        return self._decode(lambda: ne1000.decode_status(raw, self._address, payload))

    async def _query(self, command: str, expect: str, decode: Callable[[bytes, bytes], T]) -> T:
        payload = ne1000.encode(self._address, command)
        raw = await self._exchange(payload, expect)
        return self._decode(lambda: decode(raw, payload))

    async def pump_status(self) -> ne1000.Status:
        """The pump's status character (raises :class:`ne1000.PumpAlarmError` on an alarm)."""
        return await self._ack(ne1000.encode(self._address))

    async def read_dispensed(self) -> ne1000.Dispensed:
        return await self._query(
            "DIS",
            ne1000.EXPECT_DISPENSED,
            lambda raw, cmd: ne1000.decode_dispensed(raw, self._address, cmd),
        )

    async def _read_status(self) -> PumpStatus:
        try:
            return _STATUS[await self.pump_status()]
        except ne1000.PumpAlarmError:
            return PumpStatus.ALARM

    # -- connect --------------------------------------------------------------------------
    async def _identify(self) -> None:
        # Basic mode whatever the pump was left in: SAF 0 sent as a safe-mode packet (the
        # manual's recipe); the reply comes back in basic framing. A pending alarm (the
        # power-on reset) answers first and is acknowledged by being reported: send again.
        payload = ne1000.encode_safe_mode(self._address, 0)
        for attempt in range(3):
            raw = await self._exchange(payload, ne1000.EXPECT_STATUS)
            try:
                self._decode(functools.partial(ne1000.decode_status, raw, self._address, payload))
                break
            except ne1000.PumpAlarmError:
                if attempt == 2:
                    raise
        version = await self._query(
            "VER",
            ne1000.EXPECT_VERSION,
            lambda raw, cmd: ne1000.decode_version(raw, self._address, cmd),
        )
        self._set_firmware(version.text)
        if self._want_diameter is not None:
            await self._write_diameter(self._want_diameter)
        else:
            await self._read_diameter()
        if self._want_rate is not None:
            await self._write_rate(self._want_rate)
        else:
            await self._read_rate()
        await self._read_volume_units()

    async def _read_diameter(self) -> float:
        self._diameter_mm = await self._query(
            "DIA",
            ne1000.EXPECT_FLOAT,
            lambda raw, cmd: ne1000.decode_float(raw, self._address, cmd),
        )
        return self._diameter_mm

    async def _read_rate(self) -> float:
        value, units = await self._query(
            "RAT", ne1000.EXPECT_RATE, lambda raw, cmd: ne1000.decode_rate(raw, self._address, cmd)
        )
        self._rate_ml_min = value * units.ml_per_min
        return self._rate_ml_min

    async def _read_volume_units(self) -> None:
        _, self._volume_units = await self._query(
            "VOL",
            ne1000.EXPECT_VOLUME,
            lambda raw, cmd: ne1000.decode_volume(raw, self._address, cmd),
        )

    async def _put_diameter(self, mm: float | None) -> float:
        if mm is None:
            raise ValueError(f"{self.label}: diameter must be a number of mm")
        return await self._write_diameter(mm)

    async def _put_rate(self, ml_min: float | None) -> float:
        if ml_min is None:
            raise ValueError(f"{self.label}: rate must be a number of mL/min")
        return await self._write_rate(ml_min)

    async def _write_diameter(self, mm: float) -> float:
        await self._ack(ne1000.encode_diameter(self._address, mm))
        await self._read_volume_units()  # the pump picks µL or mL from the diameter
        return await self._read_diameter()

    async def _write_rate(self, ml_min: float) -> float:
        value, units = ne1000.best_rate_units(ml_min)
        await self._ack(ne1000.encode_rate(self._address, value, units))
        return await self._read_rate()

    # -- moving ---------------------------------------------------------------------------
    async def _ensure_stopped(self) -> None:
        status = await self.pump_status()
        if status is ne1000.Status.PAUSED:  # a paused program would resume, not restart
            status = await self._ack(ne1000.encode(self._address, "STP"))
        if status is not ne1000.Status.STOPPED:
            raise InstrumentBusyError(
                f"pump is {_STATUS[status].value}; stop it before a new move",
                instrument=self.label,
            )

    def _stopped(self, generation: int) -> bool:
        return self._stop_gen != generation

    async def _run_phase(
        self, volume_ml: float, direction: ne1000.Direction, generation: int
    ) -> AsyncIterator[float]:
        """Program and run one phase; yield the volume moved so far at each poll.

        A stop() since ``generation`` was taken ends the phase: before ``RUN`` nothing is
        started at all; after it the pump has been halted by stop() itself.
        """
        addr = self._address
        self._moved, self._ran = 0.0, False
        if self._stopped(generation):
            return
        await self._ensure_stopped()
        await self._ack(ne1000.encode_direction(addr, direction))
        await self._ack(ne1000.encode_clear(addr, direction))
        value, units = ne1000.best_volume_units(volume_ml)
        if units is not self._volume_units:
            await self._ack(ne1000.encode_volume_units(addr, units))
            self._volume_units = units
        await self._ack(ne1000.encode_volume(addr, value))
        expected_s = volume_ml / self._rate_ml_min * 60.0 if self._rate_ml_min > 0 else 0.0
        deadline = time.monotonic() + 1.5 * expected_s + self.move_timeout_margin
        tolerance = 1.5 * ne1000.float_resolution(value) * units.ml
        # Checked with no await before RUN takes the line: a stop() from now on queues its
        # STP behind our RUN (the transport lock is FIFO), so it halts what RUN started.
        if self._stopped(generation):
            return
        self._ran = True
        await self._ack(ne1000.encode(addr, "RUN"))
        while True:
            try:
                status = await self.pump_status()
            finally:
                # Whatever happened (an alarm stops the pump), learn how far it got.
                with contextlib.suppress(InstrumentError):
                    dis = await self.read_dispensed()
                    inf = direction is ne1000.Direction.INFUSE
                    self._moved = dis.infused_ml if inf else dis.withdrawn_ml
            yield self._moved
            if status is ne1000.Status.STOPPED:
                break
            if status is ne1000.Status.PAUSED:
                if self._stopped(generation):
                    break
                raise CommandRejectedError(
                    f"pump paused (keypad?) after {self._moved:.4g} of {volume_ml:.4g} mL",
                    instrument=self.label,
                )
            if time.monotonic() > deadline:
                await self._halt()
                raise DeviceTimeoutError(
                    f"move of {volume_ml:.4g} mL not finished after {1.5 * expected_s:.1f} s "
                    f"(+{self.move_timeout_margin:g} s); stopped at {self._moved:.4g} mL",
                    instrument=self.label,
                )
            await asyncio.sleep(self.poll_interval)
        if not self._stopped(generation) and abs(self._moved - volume_ml) > tolerance:
            raise InstrumentError(
                f"pump stopped after {self._moved:.4g} of {volume_ml:.4g} mL",
                instrument=self.label,
            )

    def _account(self, infused_ml: float, failed: bool) -> None:
        self._total += infused_ml
        self._set_total(self._total)
        self._set_dispensed(infused_ml)
        # After a failure once the pump was started (a stall, a lost line) nobody knows
        # where the plunger is; before RUN nothing moved.
        if (failed and self._ran) or math.isnan(self._contents):
            self._contents = math.nan
        else:
            self._contents = max(0.0, self._contents - infused_ml)
        self._set_contents(self._contents)

    def set(self, value: float) -> WatchableAsyncStatus[float]:
        """Infuse ``value`` mL at the configured rate; done when the pump has stopped."""
        # The stop generation is taken now, not when the status task first runs: a stop()
        # right after set() must cancel this move, not be forgotten by it.
        return WatchableAsyncStatus(self._infuse(value, self._stop_gen), name=self.name)

    async def _infuse(self, value: float, generation: int) -> AsyncIterator[WatcherUpdate[float]]:
        volume = float(value)
        if not (math.isfinite(volume) and volume > 0):
            raise ValueError(f"{self.label}: volume must be a finite number > 0 mL, got {value!r}")
        ne1000.format_float(ne1000.best_volume_units(volume)[0], "volume")  # fits 4 digits?
        if self.is_mock:
            set_mock_value(self.dispensed, volume)
            self._total += volume
            set_mock_value(self.total_dispensed, self._total)
            yield WatcherUpdate(current=volume, initial=0.0, target=volume, name=self.name)
            return
        if not math.isnan(self._contents) and volume > self._contents + 1e-9:
            raise LimitError(
                f"{volume:.4g} mL asked but the syringe holds about {self._contents:.4g} mL; "
                "refill first",
                instrument=self.label,
            )
        failed, self._moved, self._ran = True, 0.0, False
        try:
            async for moved in self._run_phase(volume, ne1000.Direction.INFUSE, generation):
                self._set_dispensed(moved)
                yield WatcherUpdate(
                    current=moved,
                    initial=0.0,
                    target=volume,
                    name=self.name,
                    unit="mL",
                    precision=4,
                    fraction=min(1.0, moved / volume),
                )
            failed = False
        finally:
            self._account(self._moved, failed)
        if self._stopped(generation) and not self._stop_success:
            raise InstrumentError(
                f"stopped after {self._moved:.4g} of {volume:.4g} mL", instrument=self.label
            )

    async def _halt(self) -> None:
        status = await self._ack(ne1000.encode(self._address, "STP"))
        if status is ne1000.Status.PAUSED:  # the first STP pauses, the second stops
            await self._ack(ne1000.encode(self._address, "STP"))

    async def stop(self, success: bool = True) -> None:
        """Halt the pump; a move in progress or still being programmed then ends.

        ``success=True`` (bluesky's pause/suspend/end of plan): the move's status
        completes without error; ``success=False``: it fails.
        """
        self._stop_gen += 1  # first, synchronously: the move must see it before RUN
        self._stop_success = success
        if self.is_mock:
            return
        await self._halt()

    # -- actions --------------------------------------------------------------------------
    async def _withdraw(self, volume_ml: float, start_ml: float) -> None:
        """Withdraw ``volume_ml`` into a syringe holding ``start_ml``."""
        generation = self._stop_gen  # a stop() from here on ends the withdraw
        rate = self._rate_ml_min
        if self._refill_rate is not None:
            await self._write_rate(self._refill_rate)
        self._moved, self._ran = 0.0, False
        try:
            async for _ in self._run_phase(volume_ml, ne1000.Direction.WITHDRAW, generation):
                pass
        except InstrumentError:
            if self._ran:
                self._contents = math.nan
                self._set_contents(math.nan)
            raise
        finally:
            if self._refill_rate is not None and math.isfinite(rate):
                with contextlib.suppress(InstrumentError):
                    await self._write_rate(rate)
        # A stop() may have ended the withdraw early: count what really moved.
        self._contents = min(self._capacity, start_ml + self._moved)
        self._set_contents(self._contents)

    async def _refill(self) -> None:
        if math.isnan(self._contents):
            raise LimitError(
                "syringe contents unknown: prime an empty syringe, or give contents_ml",
                instrument=self.label,
            )
        need = self._capacity - self._contents
        if need > 1e-3:
            await self._withdraw(need, self._contents)

    async def _prime(self) -> None:
        await self._withdraw(self._capacity, 0.0)


class PumpNetwork(SerialInstrument):
    """NE-1000 pumps daisy-chained on one serial line, one per reagent.

    ``reagents`` names the pumps in address order (``["EC", "PC"]``: EC at 0, PC at 1),
    or maps reagent -> address. Each pump is ``network.pump[reagent]``, a
    :class:`SyringePump`; all of them share this device's transport. ``read()`` reads
    every pump. Actions ``refill`` and ``prime`` run on all pumps at once; ``stop()``
    halts them all.
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        reagents: Sequence[str] | Mapping[str, int],
        timeout: float = 2.0,
        baudrate: int = 19200,
        syringe_volume_ml: float = 10.0,
        diameter_mm: float | None = None,
        rate_ml_min: float | None = None,
        refill_rate_ml_min: float | None = None,
        contents_ml: float | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        if isinstance(reagents, Mapping):
            addresses = dict(reagents)
        else:
            addresses = {r: i for i, r in enumerate(reagents)}
        if not addresses:
            raise ValueError("reagents: at least one pump is needed")
        if len(addresses) != len(reagents) or len(set(addresses.values())) != len(addresses):
            raise ValueError(f"reagents: names and addresses must be unique, got {reagents!r}")
        super().__init__(url, name, timeout=timeout, baudrate=baudrate)
        self.pump = DeviceMap[SyringePump](
            {
                reagent: SyringePump(
                    self.transport,
                    address,
                    reagent,
                    syringe_volume_ml=syringe_volume_ml,
                    diameter_mm=diameter_mm,
                    rate_ml_min=rate_ml_min,
                    refill_rate_ml_min=refill_rate_ml_min,
                    contents_ml=contents_ml,
                    poll_interval=poll_interval,
                )
                for reagent, address in addresses.items()
            }
        )
        self.add_readables(list(self.pump.values()), StandardReadableFormat.CHILD)
        self.refill = Action(lambda: self._all(lambda p: p._refill()))
        self.prime = Action(lambda: self._all(lambda p: p._prime()))
        if name:
            self.set_name(name)  # the pumps were added after the base class named us

    async def _all(self, fn: Callable[[SyringePump], Awaitable[None]]) -> None:
        results = await asyncio.gather(*(fn(p) for p in self.pump.values()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def stop(self, success: bool = True) -> None:
        await self._all(lambda p: p.stop(success))
