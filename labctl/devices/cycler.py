"""Multichannel battery cycler over SCPI (Keysight BT2200 family: BT2202A/BT2203A).

``BatteryCycler(url)`` holds a :class:`~ophyd_async.core.DeviceVector` ``channels`` of
:class:`CyclerChannel` (keys 1..n). On connect the device identifies the instrument
(``*IDN?``), clears its error queue and defines one cell per channel (cell ``1001`` on
channel ``101``, ...). Each channel is

* **Readable/Triggerable**: ``trigger()`` reads the cell's status, capacity and
  temperature in one round trip; ``read()`` then gives ``voltage`` (V), ``current``
  (A, **positive = discharge**; the BT2200 reports charge as positive and the codec
  converts), ``capacity_ah`` (charge moved in the present/last step), ``temperature``
  (degC), ``step`` (1-based, 0 before any run), ``state`` (``IDLE``/``RUNNING``) and
  ``result`` (``NONE``/``OK``/``FAIL``/``ABORTED``).
* **Movable-like**: ``run_sequence(steps)`` (also ``set(steps)``, so ``bps.abs_set`` works)
  defines the steps as the channel's own sequence, enables and initiates it, and returns
  a ``WatchableAsyncStatus`` that reports the step number as progress and completes when
  the instrument says the sequence has ended: successfully (result ``OK`` after the
  sequence was seen running), or failed with :class:`SequenceFailedError` (a ``FAIL``
  test fired), :class:`SequenceAbortedError` (``stop(success=False)``, or another
  client's ``CELL:ABORt``) or :class:`SequenceError` (it ended with no result at all).
* **Stoppable**: ``stop()`` sends ``CELL:ABORt`` for the channel: its output turns off.
  As bluesky expects, ``stop(success=True)`` (pause, suspend, end of plan) ends a running
  sequence's status without error, ``stop(success=False)`` fails it. The stop token is
  made in ``run_sequence()`` itself and checked just before ``CELL:INITiate``, so a stop
  that comes while the sequence is still being defined means it never starts.
* ``fetch_log()`` returns the data-log rows recorded since the previous call (for
  streaming to a database or a BMS); a call that fails on the wire loses no rows.

Setters are sent as ``<setter>;:SYST:ERR?`` so every command is confirmed; a rejected one
raises :class:`~labctl.devices.errors.CommandRejectedError` with the SCPI code (e.g.
``-222`` for a current above the channel rating or a voltage limit outside 2.0..4.5 V).
A query and the ``SYST:ERR?`` that explains a not-a-number answer run under one device
lock, so the error read is never another channel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import termios
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from ophyd_async.core import (
    AsyncStatus,
    DeviceVector,
    StandardReadable,
    StandardReadableFormat,
    WatchableAsyncStatus,
    WatcherUpdate,
    soft_signal_r_and_setter,
)

from labctl.devices.base import SerialInstrument
from labctl.devices.errors import (
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import bt2200, scpi
from labctl.devices.protocols.bt2200 import CellStatus, EndTest, LogRow, Step
from labctl.devices.transport import ReplyComplete

__all__ = [
    "BatteryCycler",
    "CellStatus",
    "CyclerChannel",
    "EndTest",
    "LogRow",
    "SequenceAbortedError",
    "SequenceError",
    "SequenceFailedError",
    "Step",
]

T = TypeVar("T")
log = logging.getLogger(__name__)
_STATUS_SHAPE = bt2200.expect("verbose", "numbers", "numbers")

# Poll errors that say nothing about the sequence itself: retry them a few times.
_TRANSIENT = (ProtocolError, DeviceTimeoutError, ConnectionLostError, InstrumentBusyError)


class SequenceError(InstrumentError):
    """A sequence did not complete successfully."""

    def __init__(self, message: str, *, status: CellStatus, instrument: str = "") -> None:
        super().__init__(message, instrument=instrument)
        self.status = status


class SequenceFailedError(SequenceError):
    """A step test with action FAIL ended the sequence (``status`` says which)."""


class SequenceAbortedError(SequenceError):
    """The sequence was aborted (``stop()`` or another client's ``CELL:ABORt``)."""


Ask = Callable[[bytes, "re.Pattern[bytes] | None"], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


class _Run:
    """A sequence run's stop token, made synchronously by ``run_sequence()``."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.stopped = False
        self.success = True

    def stop(self, success: bool) -> None:
        self.stopped, self.success = True, success
        self.event.set()


class CyclerChannel(StandardReadable):
    """One cycler channel (and the cell on it); created by :class:`BatteryCycler`."""

    def __init__(
        self,
        index: int,
        ask: Ask,
        send: Send,
        is_mock: Callable[[], bool],
        *,
        poll_period: float = 0.5,
        max_poll_errors: int = 3,
        name: str = "",
    ) -> None:
        self.index = index
        self.cell = bt2200.cell_id(index)
        self.channel = bt2200.channel_number(index)
        self.sequence_id = index  # each channel runs its own sequence number
        self.poll_period = poll_period
        self.max_poll_errors = max_poll_errors
        # Plain callables (not Devices): ophyd-async would adopt a Device attribute as a child.
        self._ask = ask
        self._send = send
        self._is_mock = is_mock
        self._run_token: _Run | None = None  # the pending or running sequence, if any
        # Index of the first data-log row not yet returned (None: ask from the
        # instrument's first unacknowledged row, as after connecting).
        self._log_next: int | None = None
        self._log_held: list[LogRow] = []  # read, not yet returned by fetch_log()
        with self.add_children_as_readables():
            self.voltage, self._set_voltage = soft_signal_r_and_setter(
                float, units="V", precision=5
            )
            self.current, self._set_current = soft_signal_r_and_setter(
                float, units="A", precision=5
            )
            self.capacity_ah, self._set_capacity = soft_signal_r_and_setter(
                float, units="Ah", precision=6
            )
            self.temperature, self._set_temperature = soft_signal_r_and_setter(
                float, units="degC", precision=2
            )
            self.step, self._set_step = soft_signal_r_and_setter(int)
            self.state, self._set_state = soft_signal_r_and_setter(str, "IDLE")
            self.result, self._set_result = soft_signal_r_and_setter(str, "NONE")
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.cell_id, _ = soft_signal_r_and_setter(int, self.cell)
        super().__init__(name=name)

    # -- reading ----------------------------------------------------------------------------
    def _decoded(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except InstrumentError as exc:
            exc.instrument = exc.instrument or self.name
            raise

    async def status(self) -> CellStatus:
        """One round trip: verbose status, step capacity and temperature; updates signals."""
        query = bt2200.compound(
            bt2200.encode_verbose(self.cell),
            bt2200.encode_measure("capacity_ah", [self.cell]),
            bt2200.encode_measure("temperature", [self.cell]),
        )
        raw = await self._ask(query, _STATUS_SHAPE)
        try:
            verbose, cap, temp = bt2200.split_compound(raw, 3)
            st = bt2200.decode_verbose(verbose)
            (capacity,) = bt2200.decode_values(cap, 1)
            (temperature,) = bt2200.decode_values(temp, 1)
        except InstrumentError as exc:
            exc.command, exc.raw = query, raw  # report the whole exchange, not a fragment
            exc.instrument = exc.instrument or self.name
            raise
        self._set_voltage(st.voltage_v)
        self._set_current(st.current_a)
        self._set_capacity(capacity)
        self._set_temperature(temperature)
        self._set_step(st.step)
        self._set_state(st.state)
        self._set_result(st.result)
        return st

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self._is_mock():
            return
        await self.status()

    async def measure_voltage(self) -> float:
        """``MEAS:CELL:VOLT?`` for this cell."""
        raw = await self._ask(bt2200.encode_measure("voltage", [self.cell]), bt2200.EXPECT_NUMBERS)
        return self._decoded(lambda: bt2200.decode_values(raw, 1)[0])

    async def fetch_log(self, max_rows: int = 250) -> list[LogRow]:
        """Every data-log row recorded since the previous call (oldest first).

        Reads ``max_rows`` at a time with ``DATA:LOG:FETC?`` from the index of the first
        row not yet read, which the channel keeps: the instrument discards rows only once
        a later read acknowledges them, so a read whose answer is lost (a timeout, a
        garbled line; the error is raised) loses no rows: the next call returns them,
        with those that earlier reads of the failed call got. Rows the instrument no
        longer holds (its ring buffer overwrote them, or the log was cleared) are
        skipped with a warning.
        """
        if self._is_mock():
            return []
        while True:
            wanted = self._log_next
            query = bt2200.encode_log_fetch(self.cell, max_rows, wanted)
            raw = await self._ask(query, bt2200.EXPECT_LOG)
            batch = self._decoded(functools.partial(bt2200.decode_log_fetch, raw))
            fresh = batch.rows
            if wanted is not None:
                if batch.first < wanted:
                    # A late answer to an earlier read: keep only the rows this read
                    # asked for; the instrument still holds the rest.
                    fresh = fresh[wanted - batch.first :]
                elif batch.first > wanted:
                    log.warning(
                        "%s: %d data-log rows were lost (overwritten or cleared)",
                        self.name,
                        batch.first - wanted,
                    )
            # The next read acknowledges these rows: from here on only the channel has
            # them, so they wait in _log_held until a call returns.
            self._log_held.extend(fresh)
            self._log_next = max(batch.next, wanted or 0)
            if len(batch.rows) < max_rows:
                rows, self._log_held = self._log_held, []
                return rows

    # -- running ----------------------------------------------------------------------------
    def run_sequence(self, steps: Sequence[Step]) -> WatchableAsyncStatus[int]:
        """Run ``steps`` on this channel; the status reports the step number as progress."""
        steps = tuple(steps)
        commands = bt2200.encode_sequence(self.sequence_id, steps)  # validates before I/O
        # The stop token exists from this call on: a stop() before the status task runs
        # (or while the sequence is still being defined) means it is never initiated.
        run = self._run_token = _Run()
        status = WatchableAsyncStatus(self._run(steps, commands, run), name=self.name)
        status.task.add_done_callback(lambda _: self._forget(run))
        return status

    def set(self, value: Sequence[Step]) -> WatchableAsyncStatus[int]:
        """``bps.abs_set(channel, steps, wait=True)``: same as :meth:`run_sequence`."""
        return self.run_sequence(value)

    def _forget(self, run: _Run) -> None:
        if self._run_token is run:
            self._run_token = None

    def _mark_stopped(self, success: bool) -> None:
        if self._run_token is not None:
            self._run_token.stop(success)

    async def _run(
        self, steps: tuple[Step, ...], commands: list[bytes], run: _Run
    ) -> AsyncIterator[WatcherUpdate[int]]:
        n = len(steps)

        def update(step: int) -> WatcherUpdate[int]:
            return WatcherUpdate(
                current=step, initial=0, target=n, name=self.name, unit="step", fraction=step / n
            )

        if self._is_mock():
            self._set_step(n)
            self._set_result("OK")
            yield update(n)
            return
        try:
            setup = [*commands, bt2200.encode_enable([self.cell], self.sequence_id)]
            for command in setup:
                if run.stopped:
                    break
                await self._send(command)
            # Checked with no await before send() takes the device lock: a stop() from
            # here on queues its CELL:ABORt behind this CELL:INITiate.
            if not run.stopped:
                await self._send(bt2200.encode_initiate([self.cell]))
            failures = 0
            seen_running = False
            while True:
                try:
                    st = await self.status()
                except _TRANSIENT:
                    # A garbled or lost poll says nothing about the cell, which keeps running.
                    failures += 1
                    if failures > self.max_poll_errors:
                        raise
                    await asyncio.sleep(self.poll_period)
                    continue
                failures = 0
                seen_running = seen_running or st.running
                yield update(min(st.step, n))
                if not st.running:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.event.wait(), self.poll_period)
            self._judge(st, started=seen_running or st.step >= 1, run=run)
        finally:
            self._forget(run)

    def _judge(self, st: CellStatus, *, started: bool, run: _Run) -> None:
        """Raise unless the sequence that just ended succeeded (or a stop() says it may)."""
        if st.result == "FAIL":
            raise SequenceFailedError(
                f"channel {self.index}: step {st.step} failed test {st.test} "
                f"({st.test_type} {st.limit:g}, measured {st.measured:g})",
                status=st,
                instrument=self.name,
            )
        if st.result == "OK" and started:
            return
        if run.stopped:
            if run.success:
                return  # halted by stop(success=True): bluesky's pause/suspend
            raise SequenceAbortedError(
                f"channel {self.index}: sequence aborted by stop() at step {st.step}",
                status=st,
                instrument=self.name,
            )
        if st.result == "ABORTED":
            raise SequenceAbortedError(
                f"channel {self.index}: sequence aborted", status=st, instrument=self.name
            )
        raise SequenceError(
            f"channel {self.index}: sequence ended without a result (state {st.state}, "
            f"result {st.result}, step {st.step}); was it reset by another client?",
            status=st,
            instrument=self.name,
        )

    async def stop(self, success: bool = True) -> None:
        """Abort this channel's sequence; its output turns off (current 0).

        A sequence in progress (or still being defined) then ends: without error for
        ``success=True``, with :class:`SequenceAbortedError` for ``success=False``.
        """
        self._mark_stopped(success)  # first, synchronously: no CELL:INIT goes out after this
        if self._is_mock():
            self._set_state("IDLE")
            self._set_current(0.0)
            return
        await self._send(bt2200.encode_abort([self.cell]))
        await self.status()


class BatteryCycler(SerialInstrument):
    """A BT2200-class cycler: ``channels[1..n]`` are :class:`CyclerChannel` devices.

    ``stop()`` aborts every channel. Configuration: ``model``, ``serial_number``,
    ``firmware``.
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        channels: int = 8,
        poll_period: float = 0.5,
    ) -> None:
        if not 1 <= channels <= 256:
            raise ValueError(f"channels: must be within 1..256, got {channels!r}")
        self.channels = DeviceVector(
            {
                i: CyclerChannel(
                    i, self.ask, self.send, lambda: self.is_mock, poll_period=poll_period
                )
                for i in range(1, channels + 1)
            }
        )
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.model, self._set_model = soft_signal_r_and_setter(str)
            self.serial_number, self._set_serial = soft_signal_r_and_setter(str)
            self.firmware, self._set_firmware = soft_signal_r_and_setter(str)
        super().__init__(url, name, timeout=timeout)
        # One exchange at a time *including* its error check: the transport's lock covers
        # a single query, and a SYST:ERR? sent after another channel's command would read
        # that command's error.
        self._io_lock = asyncio.Lock()

    # -- I/O ----------------------------------------------------------------------------------
    async def _query(
        self, payload: bytes, complete: ReplyComplete, *, timeout: float | None = None
    ) -> bytes:
        try:
            return await super()._query(payload, complete, timeout=timeout)
        except termios.error as exc:
            # pyserial's flush() on a pty that hung up mid-exchange raises termios.error,
            # which is no OSError, so the shared transport lets it through and keeps the
            # dead port. Map it to a lost connection and drop the port: the next call
            # reopens it.
            await self.transport.close()
            raise ConnectionLostError(
                f"connection lost: {exc}", instrument=self.name, command=payload
            ) from exc

    async def ask(self, command: bytes, shape: re.Pattern[bytes] | None = None) -> bytes:
        """Send a query and return its reply line.

        ``shape`` (from :func:`bt2200.expect`) lets stale replies of another shape, left
        over from a timed-out command, be read past. A not-a-number answer is explained
        by the error queue (busy -> :class:`InstrumentBusyError`).
        """
        complete = bt2200.reply_complete if shape is None else bt2200.reply_complete_for(shape)
        async with self._io_lock:
            raw = bt2200.last_reply(await self._query(command, complete))
            if not bt2200.is_not_a_number(raw):
                return raw
            err_cmd = scpi.encode("SYST:ERR?")
            err_raw = bt2200.last_reply(
                await self._query(err_cmd, bt2200.reply_complete_for(bt2200.EXPECT_ERROR))
            )
        err = self._decode(lambda: bt2200.decode_error(err_raw))
        if err.ok:
            raise ProtocolError(
                "instrument answered 'not a number'",
                instrument=self.name,
                command=command,
                raw=raw,
            )
        exc = bt2200.error_to_exception(err, command, raw)
        exc.instrument = self.name
        raise exc

    async def send(self, command: bytes) -> None:
        """Send a setter and confirm it with ``SYST:ERR?`` in the same message."""
        raw = await self.ask(bt2200.checked(command), bt2200.EXPECT_ERROR)
        err = self._decode(lambda: bt2200.decode_error(raw))
        if not err.ok:
            exc = bt2200.error_to_exception(err, command, raw)
            exc.instrument = self.name
            raise exc

    async def _identify(self) -> None:
        raw = await self.ask(scpi.encode("*IDN?"), bt2200.EXPECT_IDENTITY)
        ident = self._decode(lambda: bt2200.decode_identity(raw))
        if "keysight" not in ident.manufacturer.lower() or not ident.model.startswith("BT22"):
            raise ProtocolError(
                f"not a Keysight BT2200-family cycler: {ident.manufacturer} {ident.model}",
                instrument=self.name,
                raw=raw,
            )
        self._set_model(ident.model)
        self._set_serial(ident.serial)
        self._set_firmware(ident.firmware)
        await self._write(scpi.encode("*CLS"))
        for channel in self.channels.values():
            channel._log_next = None  # (maybe another instrument, or one power-cycled)
            await self.send(bt2200.encode_define_cell(channel.cell, channel.channel))

    async def stop(self, success: bool = True) -> None:
        """Abort every channel: all outputs off (sequences end as for a channel's stop())."""
        for channel in self.channels.values():
            channel._mark_stopped(success)
        if self.is_mock:
            return
        await self.send(bt2200.encode_abort())
