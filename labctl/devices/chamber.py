"""Environmental temperature chamber over SCPI (IEEE 488.2), as an ophyd-async device.

``set(40.0)`` writes the setpoint, switches the controller on and completes once the
chamber reports that its air temperature has stayed within ``tolerance`` of the
setpoint for ``dwell`` seconds (the stability criterion is sent to the chamber with
every move and judged by it, in the chamber's own time) and the measured temperature
confirms it. Every setter is followed by ``SYST:ERR?`` (in the same program message);
a queued error raises :class:`~labctl.devices.errors.CommandRejectedError` (``-213``,
the chamber's busy code, raises :class:`~labctl.devices.errors.InstrumentBusyError`).
After a timeout or a garbled reply the line is resynchronised with ``*IDN?`` before
the next command, because SCPI replies carry no command identifier.

``stop()`` switches the controller off. A move's stop token is created in ``set()``
itself (not when its task first runs) and checked before every setup message, so a
stop that arrives while the move is still pending or being set up wins: ``OUTP ON`` is
never sent after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from bluesky.protocols import Location
from ophyd_async.core import (
    AsyncStatus,
    SignalRW,
    SoftSignalBackend,
    StandardReadableFormat,
    WatchableAsyncStatus,
    WatcherUpdate,
    soft_signal_r_and_setter,
)

from labctl.devices.base import Action, SerialInstrument
from labctl.devices.errors import (
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import chamber, scpi

T = TypeVar("T")

try:  # a pty hung up between write() and tcdrain() raises termios.error, not an OSError
    import termios

    _TTY_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - no termios on Windows
    _TTY_ERRORS = ()


class _Move:
    """A move's stop token: set synchronously by ``set()``, fired by ``stop()``."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.success = False


class TemperatureChamber(SerialInstrument):
    """A SCPI temperature chamber: Movable (setpoint, waits for stability), Stoppable.

    Readings: ``temperature`` (air, deg C; the readback, hinted), ``setpoint``,
    ``running`` (controller on), ``stable``. Configuration: ``identity``,
    ``ramp_rate`` (K/min, written to the chamber on put), ``tolerance`` (K) and
    ``dwell`` (s, in the chamber's time) of the stability criterion,
    ``setpoint_min``/``setpoint_max`` (the chamber's range, read at connect).
    Action: ``off`` (controller off, like ``stop()``).

    ``settle_timeout`` (wall seconds) bounds each move; ``None`` estimates it from the
    step, the ramp rate and the dwell, with 30 minutes of margin. ``poll_period`` is
    how often a move polls the chamber (wall seconds).
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        tolerance: float = 0.3,
        dwell: float = 60.0,
        settle_timeout: float | None = None,
        poll_period: float = 0.5,
        baudrate: int = 9600,
    ) -> None:
        chamber.encode_tolerance(tolerance)  # validate early: ValueError names the field
        chamber.encode_dwell(dwell)
        if poll_period <= 0:
            raise ValueError(f"poll_period: must be > 0, got {poll_period!r}")
        self.settle_timeout = settle_timeout
        self.poll_period = poll_period
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.temperature, self._set_temperature = soft_signal_r_and_setter(
                float, units="degC", precision=2
            )
        with self.add_children_as_readables():
            self.setpoint, self._set_setpoint = soft_signal_r_and_setter(
                float, units="degC", precision=2
            )
            self.running, self._set_running = soft_signal_r_and_setter(bool)
            self.stable, self._set_stable = soft_signal_r_and_setter(bool)
        self._ramp_backend = SoftSignalBackend(float, 2.0, "K/min", 2, setter=self._put_ramp)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.identity, self._set_identity = soft_signal_r_and_setter(str)
            self.ramp_rate = SignalRW(backend=self._ramp_backend)
            self.tolerance = SignalRW(
                backend=SoftSignalBackend(float, tolerance, "K", 2, setter=self._check_tolerance)
            )
            self.dwell = SignalRW(
                backend=SoftSignalBackend(float, dwell, "s", 1, setter=self._check_dwell)
            )
            self.setpoint_min, self._set_min = soft_signal_r_and_setter(
                float, -math.inf, units="degC"
            )
            self.setpoint_max, self._set_max = soft_signal_r_and_setter(
                float, math.inf, units="degC"
            )
        self.off = Action(self._switch_off)  # plans: bps.trigger(chamber.off, wait=True)
        super().__init__(url, name, timeout=timeout, baudrate=baudrate)
        self._io_lock = asyncio.Lock()
        self._resync_needed = False
        self._sync_tokens = itertools.cycle(chamber.SYNC_TOKENS)  # never the last one again
        self._move: _Move | None = None  # the pending or running move, if any

    # -- SCPI exchanges ---------------------------------------------------------------------
    async def _query(
        self, payload: bytes, complete: Callable[[bytes], bool], *, timeout: float | None = None
    ) -> bytes:
        await self._reopen()
        try:
            return await super()._query(payload, complete, timeout=timeout)
        except _TTY_ERRORS as exc:
            raise await self._lost(payload, exc) from exc

    async def _write(self, payload: bytes) -> None:
        await self._reopen()
        try:
            await super()._write(payload)
        except _TTY_ERRORS as exc:
            raise await self._lost(payload, exc) from exc

    async def _reopen(self) -> None:
        """After a lost connection, retry opening for up to ``timeout`` seconds.

        A USB-serial adapter re-enumerates, a device server accepts again, a pty's
        link is re-pointed: the port often comes back a moment after it went away.
        """
        if self._transport.is_open:
            return
        deadline = time.monotonic() + self._transport.timeout
        while True:
            try:
                await self._transport.open()
                return
            except ConnectionLostError as exc:
                if time.monotonic() >= deadline:
                    raise self._error(exc) from None
            await asyncio.sleep(0.05)

    async def _lost(self, payload: bytes, exc: Exception) -> ConnectionLostError:
        """What the shared transport should do for termios.error too: drop the port."""
        await self._transport.close()
        return ConnectionLostError(f"connection lost: {exc}", instrument=self.name, command=payload)

    def _error(self, exc: InstrumentError) -> InstrumentError:
        exc.instrument = exc.instrument or self.name
        return exc

    async def _resync(self, *, clear: bool = True) -> None:
        """Read past any stale reply to a fresh sync token (after a timeout/garble).

        With ``clear``, ``*CLS`` goes first: errors still queued belong to commands that
        have already been reported as failed, and must not fail the next one.
        """
        token = next(self._sync_tokens)
        await self._query(chamber.sync_query(token, clear=clear), chamber.sync_complete(token))
        self._resync_needed = False

    async def _exchange(self, payload: bytes) -> bytes:
        """One query/response with the lock held; marks the line dirty on a timeout."""
        try:
            return await self._query(payload, scpi.reply_complete)
        except DeviceTimeoutError:
            self._resync_needed = True
            raise

    async def _diagnose(self) -> InstrumentError | None:
        """After a query timed out: a queued SCPI error explains it (busy, unknown header)."""
        try:
            await self._resync(clear=False)
            raw = await self._query(chamber.ERROR, scpi.reply_complete)
            err = chamber.decode_error(raw)
            if err.ok:
                return None
            await self._write(chamber.CLS)  # follow-on errors of the same failure
        except InstrumentError:
            self._resync_needed = True
            return None
        return chamber.error_for(err, chamber.ERROR, raw)

    async def ask(self, payload: bytes) -> bytes:
        """Send a query, return its raw response (errors name this chamber)."""
        async with self._io_lock:
            if self._resync_needed:
                await self._resync()
            try:
                return await self._exchange(payload)
            except DeviceTimeoutError as exc:
                cause = await self._diagnose()
                if cause is not None:
                    cause.command = payload
                    raise self._error(cause) from exc
                raise

    def _decode_reply(self, decode: Callable[[bytes], T], raw: bytes) -> T:
        try:
            return decode(raw)
        except ProtocolError as exc:
            self._resync_needed = True  # a garbled line may leave a reply behind it
            raise self._error(exc) from None

    async def send(self, payload: bytes) -> None:
        """Send a setter with ``SYST:ERR?`` in the same message; a queued error raises.

        ``SOUR:TEMP 40;:SYST:ERR?`` costs one round trip, and a setter the line lost
        (or a busy chamber ignored) cannot pass as accepted: the check never answers.
        """
        message = chamber.compound(payload, chamber.ERROR)
        async with self._io_lock:
            if self._resync_needed:
                await self._resync()
            try:
                raw = await self._exchange(message)
            except DeviceTimeoutError as exc:
                cause = await self._diagnose()  # -1xx aborts the message; busy ignores it
                if cause is not None:
                    cause.command = payload
                    raise self._error(cause) from exc
                exc.message = f"no answer to the SYST:ERR? check of {payload!r} (command lost?)"
                raise
            err = self._decode_reply(chamber.decode_error, raw)
            if not err.ok:
                await self._write(chamber.CLS)  # later checks must not see follow-on errors
                raise self._error(chamber.error_for(err, payload, raw))

    async def read_status(self) -> chamber.ChamberStatus:
        """One poll (single round trip): temperature, setpoint, condition; updates signals."""
        raw = await self.ask(chamber.STATUS)
        status = self._decode_reply(chamber.decode_status, raw)
        self._set_temperature(status.temperature_c)
        self._set_setpoint(status.setpoint_c)
        self._set_running(status.condition.running)
        self._set_stable(status.condition.stable)
        return status

    async def measure(self) -> float:
        """``MEAS:TEMP?``: the air temperature now, deg C."""
        value = self._decode_reply(chamber.decode_temperature, await self.ask(chamber.TEMPERATURE))
        self._set_temperature(value)
        return value

    async def _identify(self) -> None:
        async with self._io_lock:
            raw = await self._query(chamber.IDN, scpi.reply_complete)
            ident = self._decode(lambda: scpi.decode_identity(raw))
            self._resync_needed = False
            await self._write(chamber.CLS)  # errors left by an earlier session are not ours
        self._set_identity(
            ",".join((ident.manufacturer, ident.model, ident.serial, ident.firmware))
        )
        decode = chamber.decode_temperature
        self._set_min(self._decode_reply(decode, await self.ask(chamber.SETPOINT_MIN)))
        self._set_max(self._decode_reply(decode, await self.ask(chamber.SETPOINT_MAX)))
        self._ramp_backend.set_value(
            self._decode_reply(chamber.decode_positive, await self.ask(chamber.RAMP))
        )
        await self.read_status()

    # -- configuration setters ------------------------------------------------------------------
    async def _put_ramp(self, value: float | None) -> float:
        if value is None:
            raise ValueError("ramp_rate: a value in K/min is required")
        payload = chamber.encode_ramp(value)
        if not self.is_mock:
            await self.send(payload)
        return float(payload.split()[-1])

    @staticmethod
    def _check_tolerance(value: float | None) -> float:
        if value is None:
            raise ValueError("tolerance: a value in K is required")
        return float(chamber.encode_tolerance(value).split()[-1])

    @staticmethod
    def _check_dwell(value: float | None) -> float:
        if value is None:
            raise ValueError("dwell: a value in s is required")
        return float(chamber.encode_dwell(value).split()[-1])

    # -- bluesky verbs -----------------------------------------------------------------------------
    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self.is_mock:
            return
        await self.read_status()

    async def check_value(self, value: float) -> None:
        """Checkable: a setpoint outside the chamber's range (read at connect) is refused."""
        lo, hi = await self.setpoint_min.get_value(), await self.setpoint_max.get_value()
        if not lo <= value <= hi:
            raise LimitError(
                f"setpoint {value:g} degC outside the chamber's range {lo:g}..{hi:g} degC",
                instrument=self.name,
            )

    async def locate(self) -> Location[float]:
        if not self.is_mock:
            await self.read_status()
        return Location(
            setpoint=await self.setpoint.get_value(), readback=await self.temperature.get_value()
        )

    def _estimate_timeout(self, start: float, target: float, ramp: float, dwell: float) -> float:
        if self.settle_timeout is not None:
            return self.settle_timeout
        return 2.0 * abs(target - start) / max(ramp, 1e-3) * 60.0 + dwell + 1800.0

    def set(self, value: float, timeout: float | None = None) -> WatchableAsyncStatus[float]:
        """Go to ``value`` deg C and wait until the chamber is stable there.

        ``timeout`` (wall seconds) overrides ``settle_timeout`` for this move.
        """
        # The stop token exists from this call on: a stop() before the status task runs
        # finds a pending move and wins (the move then never sends OUTP ON).
        move = self._move = _Move()
        status = WatchableAsyncStatus(self._do_set(value, timeout, move), name=self.name)
        status.task.add_done_callback(lambda _: self._forget(move))
        return status

    def _forget(self, move: _Move) -> None:
        if self._move is move:
            self._move = None

    async def _do_set(
        self, value: float, timeout: float | None, move: _Move
    ) -> AsyncIterator[WatcherUpdate[float]]:
        stop = move.event
        try:
            target = float(value)
            payload = chamber.encode_setpoint(target)  # ValueError before any I/O
            tolerance = await self.tolerance.get_value()
            dwell = await self.dwell.get_value()
            if self.is_mock:
                initial = await self.temperature.get_value()
                self._set_setpoint(target)
                self._set_temperature(target)
                self._set_running(True)
                self._set_stable(True)
                yield WatcherUpdate(current=target, initial=initial, target=target, name=self.name)
                return
            initial = await self.temperature.get_value()
            if not stop.is_set():
                initial = (await self.read_status()).temperature_c
            setup = (
                chamber.encode_tolerance(tolerance),
                chamber.encode_dwell(dwell),
                payload,  # -222 out of range raises; the chamber keeps its setpoint
                chamber.encode_output(True),
            )
            for message in setup:
                # Checked with no await before send() takes the I/O lock: a stop() from
                # here on queues its OUTP OFF behind this message.
                if stop.is_set():  # a stop() now must not be undone by our OUTP ON
                    break
                await self.send(message)
            ramp = await self.ramp_rate.get_value()
            if timeout is None:
                timeout = self._estimate_timeout(initial, target, ramp, dwell)
            deadline = time.monotonic() + timeout
            span = abs(target - initial)
            while not stop.is_set():
                status = await self.read_status()
                error = abs(status.temperature_c - target)
                yield WatcherUpdate(
                    current=status.temperature_c,
                    initial=initial,
                    target=target,
                    name=self.name,
                    unit="degC",
                    precision=2,
                    fraction=1.0 if span == 0 else max(0.0, min(1.0, 1.0 - error / span)),
                )
                if abs(status.setpoint_c - target) > 1e-3 * max(1.0, abs(target)):
                    raise InstrumentError(
                        f"setpoint changed to {status.setpoint_c:g} degC (another set() or "
                        f"the front panel) while moving to {target:g} degC",
                        instrument=self.name,
                    )
                if status.condition.stable and error <= tolerance:
                    return
                if not status.condition.running and not stop.is_set():
                    raise InstrumentError(
                        f"controller switched off (OUTP OFF) before settling at {target:g} degC",
                        instrument=self.name,
                    )
                if time.monotonic() > deadline:
                    raise DeviceTimeoutError(
                        f"not stable within +-{tolerance:g} K of {target:g} degC for {dwell:g} s "
                        f"after {timeout:g} s (last {status.temperature_c:.2f} degC)",
                        instrument=self.name,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_period)
            if not move.success:
                raise RuntimeError(f"{self.name}: stopped while moving to {target:g} degC")
        finally:
            self._forget(move)

    async def stop(self, success: bool = False) -> None:
        """Stop: switch the controller off (``OUTP OFF``), ending a move in progress.

        The RunEngine calls ``stop(success=True)`` on every device it has moved at the
        end of *every* plan. A chamber must hold its temperature between plans, so that
        call switches the controller off only while a move is pending or in progress
        (and that move then completes without error); ``stop()`` /
        ``stop(success=False)`` always switches it off and fails a move in progress.
        """
        move = self._move
        if move is not None:
            move.success = success
            move.event.set()  # first, synchronously: the move sends nothing more
        if success and move is None:
            return
        if self.is_mock:
            self._set_running(False)
            return
        await self.send(chamber.encode_output(False))
        self._set_running(False)
        self._set_stable(False)

    async def _switch_off(self) -> None:
        await self.stop(success=False)
