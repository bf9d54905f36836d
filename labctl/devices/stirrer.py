"""Magnetic hotplate stirrer over IKA NAMUR (RCT digital, C-MAG HS 7, RET control-visc).

Each regulated quantity (speed, temperature) is a :class:`NamurAxis`: Movable and
Stoppable. Stopping follows bluesky: ``stop(success=True)`` (pause, suspend) ends a
move in progress without error, ``stop(success=False)`` with
:class:`MotionStoppedError`; either switches that function off. A move's stop token is
made in ``set()`` itself and checked before ``START_x``, so a stop that arrives before
the function was started wins.

Which sensor the temperature axis waits for depends on the instrument's regulation:
without a probe an RCT digital regulates its plate (``IN_PV_2``); with a PT 1000 plugged
in it regulates the medium (``IN_PV_1``). ``Stirrer(..., regulate="probe")`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Literal

from bluesky.protocols import Reading
from ophyd_async.core import (
    AsyncStatus,
    StandardReadable,
    StandardReadableFormat,
    set_mock_value,
    soft_signal_r_and_setter,
)

from labctl.devices.base import Action, SerialInstrument
from labctl.devices.errors import (
    CommandRejectedError,
    DeviceTimeoutError,
    InstrumentError,
    LimitError,
)
from labctl.devices.protocols import namur

QueryValue = Callable[[bytes, int], Awaitable[float]]
Write = Callable[[bytes], Awaitable[None]]
Regulation = Literal["plate", "probe"]


class MotionStoppedError(InstrumentError):
    """A move ended by ``stop(success=False)``, or replaced by a newer ``set()``."""


class _Move:
    """One move's stop token, made synchronously by ``set()``."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.stopped = False
        self.success = True
        self.reason = ""

    def stop(self, success: bool, reason: str) -> None:
        if not self.stopped:
            self.stopped, self.success, self.reason = True, success, reason
        self.event.set()


class NamurAxis(StandardReadable):
    """One regulated quantity of a NAMUR stirrer (speed or temperature), as a Movable.

    ``set(value)`` writes the setpoint, confirms it by reading it back (NAMUR setters
    have no reply; one lost frame is resent once), switches the function on and
    completes when the actual value is within ``tolerance`` of the target.
    ``stop()`` acts only while a move is pending or in progress: it ends the move
    (without error for ``success=True``, with :class:`MotionStoppedError` otherwise)
    and switches the function off. So the RunEngine's stop at the end of every plan
    leaves a stirrer that has reached its setpoint running.

    ``read()`` queries the instrument first; ``refresh()`` does so explicitly
    (``readback.get_value()`` alone returns the last value read).
    """

    def __init__(
        self,
        *,
        query_value: QueryValue,
        write: Write,
        is_mock: Callable[[], bool],
        instrument: Callable[[], str],
        setpoint_channel: int,
        readback_channel: int,
        function: int,
        units: str,
        tolerance: float,
        limits: tuple[float, float],
        move_timeout: float,
        poll_period: float,
        zero_means_off: bool = False,
        name: str = "",
    ) -> None:
        self._query_value = query_value
        self._write_raw = write
        self._is_mock = is_mock
        self._instrument = instrument
        self._sp_channel = setpoint_channel
        self._pv_channel = readback_channel
        self._function = function
        self.units = units
        self.tolerance = tolerance
        self.limits = limits
        self.move_timeout = move_timeout
        self.poll_period = poll_period
        self._zero_means_off = zero_means_off
        self._move: _Move | None = None  # the pending or running move, if any
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback, self._set_readback = soft_signal_r_and_setter(
                float, units=units, precision=1
            )
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.setpoint, self._set_setpoint = soft_signal_r_and_setter(
                float, units=units, precision=1
            )
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        self.readback.set_name(name)  # the reading carries the axis' own name, as a motor's

    # -- instrument I/O -------------------------------------------------------------
    async def refresh(self) -> float:
        """Read the actual value from the instrument (``IN_PV_x``) and return it."""
        if self._is_mock():
            return float(await self.readback.get_value())
        value = await self._query_value(namur.encode_read_value(self._pv_channel), self._pv_channel)
        self._set_readback(value)
        return value

    async def refresh_setpoint(self) -> float:
        """Read the setpoint from the instrument (``IN_SP_x``) and return it."""
        if self._is_mock():
            return float(await self.setpoint.get_value())
        value = await self._query_value(
            namur.encode_read_setpoint(self._sp_channel), self._sp_channel
        )
        self._set_setpoint(value)
        return value

    async def read(self) -> dict[str, Reading[float]]:
        await self.refresh()
        return await super().read()

    async def read_configuration(self) -> dict[str, Reading[float]]:
        await self.refresh_setpoint()
        return await super().read_configuration()

    def check_limits(self, value: float) -> None:
        """Raise :class:`LimitError` (before anything is sent) for an impossible target."""
        lo, hi = self.limits
        ok = math.isfinite(value) and (lo <= value <= hi or (self._zero_means_off and value == 0))
        if not ok:
            allowed = f"0 or {lo:g}..{hi:g}" if self._zero_means_off else f"{lo:g}..{hi:g}"
            raise LimitError(
                f"{self.name or 'setpoint'}: {value!r} {self.units} outside {allowed} {self.units}",
                instrument=self._instrument(),
            )

    async def write_setpoint(self, value: float, move: _Move | None = None) -> float:
        """``OUT_SP_x value``, confirmed by ``IN_SP_x`` (resent once if the frame was lost).

        With ``move``, a move that was stopped or replaced meanwhile sends nothing more
        (a newer move's setpoint must not be overwritten by a retry of this one).
        """
        self.check_limits(value)
        if self._is_mock():
            set_mock_value(self.setpoint, value)
            return value
        payload = namur.encode_setpoint(self._sp_channel, value)
        got = math.nan
        for _ in range(2):
            if move is not None and move.stopped:
                return got
            await self._write_raw(payload)
            got = await self.refresh_setpoint()
            if abs(got - round(value, 1)) < 0.05:
                return got
        if move is not None and move.stopped:
            return got
        raise CommandRejectedError(
            f"{self.name}: setpoint not taken: sent {value:g} {self.units}, instrument still "
            f"reports {got:g} (out of its range, or not in remote mode)",
            instrument=self._instrument(),
            command=payload,
            raw=namur.format_value(got, self._sp_channel),
        )

    async def switch(self, on: bool) -> None:
        """START_x / STOP_x for this axis' function (heater or motor)."""
        if self._is_mock():
            return
        encode = namur.encode_start if on else namur.encode_stop
        await self._write_raw(encode(self._function))

    # -- Movable / Stoppable --------------------------------------------------------
    def set(self, value: float, timeout: float | None = None) -> AsyncStatus[None]:
        """Move to ``value``; the status completes once the actual value is within tolerance."""
        # A new target replaces the old one, as for a motor: the old status fails.
        self._stop_move(success=False, reason="replaced by a new set()")
        move = self._move = _Move()  # from now on a stop() finds this move and ends it
        status = AsyncStatus(self._do_move(float(value), timeout, move), name=self.name)
        status.task.add_done_callback(lambda _: self._forget(move))
        return status

    def _forget(self, move: _Move) -> None:
        if self._move is move:
            self._move = None

    def _stop_move(self, *, success: bool, reason: str) -> bool:
        """End the pending or running move, if any; True if there was one."""
        move, self._move = self._move, None
        if move is None:
            return False
        move.stop(success, reason)
        return True

    async def _do_move(self, value: float, timeout: float | None, move: _Move) -> None:
        try:
            if not move.stopped:
                await self.write_setpoint(value, move)
            # Checked with no await before the write takes the line: a stop() from here
            # on sends its STOP_x after our START_x.
            if not move.stopped:
                await self.switch(not (self._zero_means_off and value == 0.0))
            limit = self.move_timeout if timeout is None else timeout
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limit
            while not move.stopped:
                actual = await self.refresh()
                if abs(actual - value) <= self.tolerance:
                    return
                if loop.time() >= deadline:
                    raise DeviceTimeoutError(
                        f"{self.name}: did not reach {value:g} {self.units} within {limit:g} s "
                        f"(last reading {actual:g} {self.units})",
                        instrument=self._instrument(),
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(move.event.wait(), self.poll_period)
            if not move.success:
                raise MotionStoppedError(
                    f"{self.name}: move to {value:g} {self.units} {move.reason}",
                    instrument=self._instrument(),
                )
        finally:
            self._forget(move)

    def cancel_move(self) -> bool:
        """Abandon a move in progress (its status fails); True if there was one."""
        return self._stop_move(success=False, reason="abandoned (cancel_move)")

    async def stop(self, success: bool = True) -> None:
        """End a pending or running move and switch this function off; no-op when idle.

        ``success=True`` (bluesky's pause/suspend/end of plan) ends the move's status
        without error, ``success=False`` with :class:`MotionStoppedError`.
        """
        if self._stop_move(success=success, reason="stopped"):
            await self.switch(False)

    async def stop_now(self, success: bool = False) -> None:
        """Switch this function off whether or not a move is in progress."""
        self._stop_move(success=success, reason="stopped")
        await self.switch(False)


class Stirrer(SerialInstrument):
    """A magnetic hotplate stirrer over IKA NAMUR.

    Movable children: ``speed`` (rpm; readback ``IN_PV_4``) and ``temperature``
    (setpoint ``OUT_SP_1``). ``regulate`` says what the instrument regulates and so what
    the temperature axis reads back and waits for: ``"plate"`` (default; no probe
    fitted: the plate sensor ``IN_PV_2``) or ``"probe"`` (a PT 1000 plugged in: the RCT
    digital then regulates the medium, ``IN_PV_1``). Readings: ``<name>-speed``,
    ``<name>-temperature`` (that readback) and ``<name>-probe_temperature`` (the PT 1000
    in the medium, ``IN_PV_1``). Configuration: ``model`` (``IN_NAME``) and each axis'
    ``setpoint``. Actions: ``heater_off``, ``motor_off``, ``reset``. ``stop()`` switches
    heater and motor off.

    Limits are checked before anything is sent (``LimitError``); a setpoint the
    instrument ignores anyway is reported from the read-back (``CommandRejectedError``).
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        speed_tolerance: float = 5.0,
        temperature_tolerance: float = 1.0,
        speed_limits: tuple[float, float] = (50.0, 1500.0),
        temperature_limits: tuple[float, float] = (0.0, 310.0),
        speed_timeout: float = 60.0,
        temperature_timeout: float = 3600.0,
        poll_period: float = 0.05,
        regulate: Regulation = "plate",
    ) -> None:
        readback = {"plate": namur.PLATE_TEMPERATURE, "probe": namur.MEDIUM_TEMPERATURE}
        if regulate not in readback:
            raise ValueError(f"regulate: must be 'plate' or 'probe', got {regulate!r}")
        self.regulate: Regulation = regulate
        self._poll_period = poll_period
        with self.add_children_as_readables():
            self.speed = self._axis(
                setpoint_channel=namur.SPEED,
                readback_channel=namur.SPEED,
                units="rpm",
                tolerance=speed_tolerance,
                limits=speed_limits,
                move_timeout=speed_timeout,
                zero_means_off=True,
            )
            self.temperature = self._axis(
                setpoint_channel=namur.MEDIUM_TEMPERATURE,
                readback_channel=readback[regulate],
                units="degC",
                tolerance=temperature_tolerance,
                limits=temperature_limits,
                move_timeout=temperature_timeout,
            )
        with self.add_children_as_readables():
            self.probe_temperature, self._set_probe = soft_signal_r_and_setter(
                float, units="degC", precision=1
            )
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.model, self._set_model = soft_signal_r_and_setter(str)
        self.heater_off = Action(lambda: self.temperature.stop_now())
        self.motor_off = Action(lambda: self.speed.stop_now())
        self.reset = Action(lambda: self._write_shielded(namur.encode_reset()))
        super().__init__(
            url,
            name,
            timeout=timeout,
            serial_kwargs={"bytesize": 7, "parity": "E", "stopbits": 1},
        )

    def _axis(
        self,
        *,
        setpoint_channel: int,
        readback_channel: int,
        units: str,
        tolerance: float,
        limits: tuple[float, float],
        move_timeout: float,
        zero_means_off: bool = False,
    ) -> NamurAxis:
        return NamurAxis(
            query_value=self._query_value,
            write=self._write_shielded,
            is_mock=lambda: self.is_mock,
            instrument=lambda: self.name,
            setpoint_channel=setpoint_channel,
            readback_channel=readback_channel,
            function=setpoint_channel,  # START_1 heats, START_4 stirs
            units=units,
            tolerance=tolerance,
            limits=limits,
            move_timeout=move_timeout,
            poll_period=self._poll_period,
            zero_means_off=zero_means_off,
        )

    # -- I/O, shielded: a cancelled move must not free the port while a worker
    # thread is still mid-exchange (the transport's lock would be released early).
    async def _query_value(self, payload: bytes, channel: int) -> float:
        raw = await asyncio.shield(self._query(payload, namur.reply_complete_for(channel)))
        return self._decode(lambda: namur.decode_value(namur.last_reply(raw), channel))

    async def _write_shielded(self, payload: bytes) -> None:
        try:
            await asyncio.shield(self._write(payload))
        except InstrumentError as exc:
            exc.instrument = exc.instrument or self.name
            raise

    async def refresh_probe(self) -> float:
        """Read the medium temperature from the PT 1000 probe (``IN_PV_1``)."""
        if self.is_mock:
            return float(await self.probe_temperature.get_value())
        value = await self._query_value(
            namur.encode_read_value(namur.MEDIUM_TEMPERATURE), namur.MEDIUM_TEMPERATURE
        )
        self._set_probe(value)
        return value

    async def read(self) -> dict[str, Reading[float]]:
        await self.refresh_probe()  # the axes refresh themselves in their read()
        return await super().read()

    async def _identify(self) -> None:
        raw = await self._query(namur.encode_name(), namur.reply_complete)
        self._set_model(self._decode(lambda: namur.decode_name(raw)))
        await self.speed.refresh_setpoint()
        await self.temperature.refresh_setpoint()

    async def stop(self, success: bool = True) -> None:
        """Switch heater and motor off; moves in progress end as for the axes' stop()."""
        await self.temperature.stop_now(success)
        await self.speed.stop_now(success)
