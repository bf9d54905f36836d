"""Cartesian vial gantry with a servo gripper, over Marlin G-code.

A three-axis gantry on a Marlin 2.x board moves vials between stations of the deck.
``x``, ``y``, ``z`` are Movable axes (``G1`` then poll ``M114`` until the stepper counts
reach the planned position, then ``M400``), ``gripper`` is Movable between ``"open"``
and ``"closed"`` (``M280 P0 S<angle>``, vial presence from ``M119``'s ``filament:``
input), and ``transfer`` is Movable to ``(source, destination)``: the whole safe pick
and place sequence, done only when the vial is really down. ``home`` is an Action
(``G28``); ``stop()`` sends ``M410`` (quickstop). See docs/instruments/robot.md.

Stopping follows bluesky: ``stop(success=True)`` (pause, suspend, end of a plan) ends a
move, gripper action or transfer without error, the gantry halted where it is;
``stop(success=False)`` ends it with :class:`MotionStoppedError`. Each ``set()`` takes
the stop generation when it is called, and every ``G1``/``M280`` checks it just before
it is sent, so a stop that arrives before the motion is under way always wins.

The station table below is the device's default calibration (machine coordinates after
``G28``); pass ``deck=`` to use a measured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from bluesky.protocols import Location, Movable, Stoppable
from ophyd_async.core import (
    AsyncStatus,
    StandardReadable,
    StandardReadableFormat,
    WatchableAsyncStatus,
    WatcherUpdate,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from labctl.devices.base import Action, SerialInstrument
from labctl.devices.errors import (
    CommandRejectedError,
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import gcode

try:
    import termios

    _TTY_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - Windows has no termios
    _TTY_ERRORS = ()

Station = tuple[float, float, float]  # x, y, pick z (mm)

# Default calibration: station -> (x, y, pick z) in mm. Rack slots form a 4 x 3 grid at
# 40 mm pitch from (60, 60); pick z is the jaw height that grips a seated vial.
DEFAULT_DECK: dict[str, Station] = {
    "rack/1": (60.0, 60.0, 40.0),
    "rack/2": (100.0, 60.0, 40.0),
    "rack/3": (140.0, 60.0, 40.0),
    "rack/4": (180.0, 60.0, 40.0),
    "rack/5": (60.0, 100.0, 40.0),
    "rack/6": (100.0, 100.0, 40.0),
    "rack/7": (140.0, 100.0, 40.0),
    "rack/8": (180.0, 100.0, 40.0),
    "rack/9": (60.0, 140.0, 40.0),
    "rack/10": (100.0, 140.0, 40.0),
    "rack/11": (140.0, 140.0, 40.0),
    "rack/12": (180.0, 140.0, 40.0),
    "balance": (300.0, 100.0, 70.0),
    "stirrer": (420.0, 100.0, 55.0),
    "meter": (420.0, 280.0, 60.0),
    "cell": (540.0, 280.0, 65.0),
}

GRIPPER_STATES = ("open", "closed")


class MotionStoppedError(InstrumentError):
    """A move or transfer was ended by ``stop()`` before it finished."""

    def __init__(self, message: str, *, instrument: str = "", success: bool = False) -> None:
        super().__init__(message, instrument=instrument)
        self.success = success


class GripError(CommandRejectedError):
    """The jaws closed on nothing, or a vial did not come free."""


def _annotate(exc: InstrumentError, context: str) -> None:
    """Prefix what the device was doing to an error's message (the raw reply stays)."""
    if context and not exc.message.startswith(context):
        exc.message = f"{context}: {exc.message}"
        exc.args = (exc.message,)


MoveFn = Callable[[dict[str, float], float, str, int], AsyncIterator[dict[str, float]]]


class _Motions:
    """What a gantry shares with its children: the stop generation and motions in flight."""

    def __init__(self) -> None:
        self.generation = 0  # bumped by every stop(): motions started under an older one end
        self.success = True  # the latest stop()'s success
        self.active = 0  # set() statuses not done yet (pending or moving)

    def track(self, status: AsyncStatus[None] | WatchableAsyncStatus[float]) -> None:
        """Count ``status`` as active, from now (synchronously) until it is done."""
        self.active += 1
        status.task.add_done_callback(self._done)

    def _done(self, _: object) -> None:
        self.active -= 1


class GantryAxis(StandardReadable, Movable[float], Stoppable):
    """One linear axis (mm). ``set(v)`` moves there; the readback is named like the axis."""

    def __init__(
        self,
        axis: str,
        move: MoveFn,
        stop: Callable[[bool], Awaitable[None]],
        is_mock: Callable[[], bool],
        speed: float,
        motions: _Motions,
        name: str = "",
    ) -> None:
        self._axis = axis
        self._move = move
        self._stop = stop
        self._is_mock = is_mock
        self._motions = motions
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback, self._set_readback = soft_signal_r_and_setter(
                float, 0.0, units="mm", precision=2
            )
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.velocity = soft_signal_rw(float, speed, units="mm/s")
        self.setpoint, self._set_setpoint = soft_signal_r_and_setter(float, 0.0, units="mm")
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        self.readback.set_name(name)  # events show "robot-x", like an ophyd-async motor

    def set(self, value: float) -> WatchableAsyncStatus[float]:
        # The stop generation is taken now: a stop() before the task runs must win.
        status = WatchableAsyncStatus(self._do_set(value, self._motions.generation), name=self.name)
        self._motions.track(status)
        return status

    async def _do_set(self, value: float, generation: int) -> AsyncIterator[WatcherUpdate[float]]:
        value = float(value)
        initial = await self.readback.get_value()
        self._set_setpoint(value)
        if self._is_mock():
            self._set_readback(value)
            yield WatcherUpdate(current=value, initial=initial, target=value, name=self.name)
            return
        speed = await self.velocity.get_value()
        try:
            async for pos in self._move(
                {self._axis: value}, speed, f"move {self.name} to {value:g} mm", generation
            ):
                yield WatcherUpdate(
                    current=pos[self._axis],
                    initial=initial,
                    target=value,
                    name=self.name,
                    unit="mm",
                    precision=2,
                )
        except MotionStoppedError as exc:
            if not exc.success:
                raise

    async def locate(self) -> Location[float]:
        return Location(
            setpoint=await self.setpoint.get_value(), readback=await self.readback.get_value()
        )

    async def stop(self, success: bool = True) -> None:
        await self._stop(success)


class Gripper(StandardReadable, Movable[str], Stoppable):
    """The jaws: ``set("open")`` / ``set("closed")``; ``holding`` is the vial-presence switch."""

    def __init__(
        self,
        actuate: Callable[[bool, str, int], Awaitable[bool]],
        stop: Callable[[bool], Awaitable[None]],
        is_mock: Callable[[], bool],
        motions: _Motions,
        name: str = "",
    ) -> None:
        self._actuate = actuate
        self._stop = stop
        self._is_mock = is_mock
        self._motions = motions
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.state, self._set_state = soft_signal_r_and_setter(str, "open")
        with self.add_children_as_readables():
            self.holding, self._set_holding = soft_signal_r_and_setter(bool, False)
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        self.state.set_name(name)

    def set(self, value: str) -> AsyncStatus[None]:
        status = AsyncStatus(self._do_set(value, self._motions.generation), name=self.name)
        self._motions.track(status)
        return status

    async def _do_set(self, value: str, generation: int) -> None:
        if value not in GRIPPER_STATES:
            raise LimitError(f"{self.name}: value must be 'open' or 'closed', got {value!r}")
        if self._is_mock():
            self._set_state(value)
            return
        try:
            await self._actuate(value == "closed", f"{self.name} -> {value}", generation)
        except MotionStoppedError as exc:
            if not exc.success:
                raise

    async def stop(self, success: bool = True) -> None:
        await self._stop(success)


class Transfer(StandardReadable, Movable[tuple[str, str]], Stoppable):
    """Move a vial: ``set(("rack/1", "balance"))`` completes once it sits at the destination.

    A pick and place is atomic to a pause: ``stop(success=True)`` (what the RunEngine
    sends when it pauses or a suspender trips) lets a transfer in flight finish, at most
    ``finish_timeout`` s, rather than halting with a vial in the jaws over the deck; the
    plan then goes on from a known place. ``stop(success=False)`` (abort, failure,
    emergency) quickstops at once and the status fails with :class:`MotionStoppedError`.
    """

    finish_timeout = 60.0

    def __init__(
        self,
        transfer: Callable[[str, str, int], Awaitable[None]],
        stop: Callable[[bool], Awaitable[None]],
        is_mock: Callable[[], bool],
        motions: _Motions,
        name: str = "",
    ) -> None:
        self._transfer = transfer
        self._stop = stop
        self._is_mock = is_mock
        self._motions = motions
        self.mock_calls: list[tuple[str, str]] = []
        self._in_flight: AsyncStatus[None] | None = None
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.last, self._set_last = soft_signal_r_and_setter(str, "")
        with self.add_children_as_readables():
            self.completed, self._set_completed = soft_signal_r_and_setter(int, 0)
        super().__init__(name=name)

    def set(self, value: tuple[str, str]) -> AsyncStatus[None]:
        status = AsyncStatus(self._do_set(value, self._motions.generation), name=self.name)
        self._motions.track(status)
        self._in_flight = status
        return status

    async def _do_set(self, value: tuple[str, str], generation: int) -> None:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise LimitError(f"{self.name}: value must be (source, destination), got {value!r}")
        source, destination = (str(v) for v in value)
        if not self._is_mock():
            try:
                await self._transfer(source, destination, generation)
            except MotionStoppedError as exc:
                if not exc.success:
                    raise
                return  # halted part way (bluesky pause/suspend): not a completed transfer
        else:
            self.mock_calls.append((source, destination))
        self._set_last(f"{source} -> {destination}")
        self._set_completed(await self.completed.get_value() + 1)

    async def stop(self, success: bool = True) -> None:
        status = self._in_flight
        if success and status is not None and not status.done:
            # A pause: put the vial down first. If it does not finish in time, halt.
            done, _ = await asyncio.wait({status.task}, timeout=self.finish_timeout)
            if done:
                return
        await self._stop(success)


class Gantry(SerialInstrument, Stoppable):
    """A Marlin vial gantry: axes ``x``/``y``/``z``, ``gripper``, ``transfer``, ``home``.

    Readings: the three axis readbacks (mm), ``gripper`` state and ``gripper-holding``,
    ``transfer`` (last transfer done). Configuration: ``firmware``, ``homed``, axis
    velocities. ``trigger()`` refreshes positions and the gripper from the controller.
    Errors name the axis or station and carry the raw reply: :class:`LimitError` (soft
    limit, unknown station), :class:`gcode.NotHomedError`, :class:`gcode.CollisionError`
    (occupied destination, unsafe travel), :class:`GripError` (closed on nothing),
    :class:`gcode.FirmwareHaltedError` (after ``M112``), :class:`MotionStoppedError`.
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        deck: Mapping[str, Sequence[float]] | None = None,
        safe_z: float = 120.0,
        xy_speed: float = 150.0,
        z_speed: float = 40.0,
        servo: int = 0,
        open_angle: float = 90.0,
        closed_angle: float = 10.0,
        home_timeout: float = 120.0,
        poll_period: float = 0.05,
        baudrate: int = 115200,
    ) -> None:
        self.deck: dict[str, Station] = {}
        for station, c in (deck or DEFAULT_DECK).items():
            if len(c) != 3 or not all(math.isfinite(v) for v in c):
                raise ValueError(f"deck[{station!r}]: need finite (x, y, pick_z) in mm, got {c!r}")
            self.deck[station] = (float(c[0]), float(c[1]), float(c[2]))
        self.safe_z = safe_z
        self.servo = servo
        self.open_angle = open_angle
        self.closed_angle = closed_angle
        self.home_timeout = home_timeout
        self.poll_period = poll_period
        self.steps_per_mm: dict[str, float] = {"X": 80.0, "Y": 80.0, "Z": 400.0}
        self._line = 0
        self._resync = False
        self._motions = _Motions()
        motions, mock = self._motions, lambda: self.is_mock
        with self.add_children_as_readables():
            self.x = GantryAxis("X", self._motion, self.stop, mock, xy_speed, motions)
            self.y = GantryAxis("Y", self._motion, self.stop, mock, xy_speed, motions)
            self.z = GantryAxis("Z", self._motion, self.stop, mock, z_speed, motions)
            self.gripper = Gripper(self._actuate, self.stop, mock, motions)
            self.transfer = Transfer(self._transfer_vial, self.stop, mock, motions)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.firmware, self._set_firmware = soft_signal_r_and_setter(str, "")
            self.homed, self._set_homed = soft_signal_r_and_setter(bool, False)
        self._axes = {"X": self.x, "Y": self.y, "Z": self.z}
        self.home = Action(self._home)
        super().__init__(url, name, timeout=timeout, baudrate=baudrate)

    # -- line-numbered exchanges ----------------------------------------------------
    async def _exchange(self, command: str, line: int | None, timeout: float | None) -> bytes:
        payload = gcode.encode(command, line)
        try:
            return await self._query(payload, gcode.reply_complete_for(line), timeout=timeout)
        except DeviceTimeoutError as exc:
            self._resync = True
            if exc.raw and gcode.only_keepalives(exc.raw):
                raise InstrumentBusyError(
                    f"firmware kept answering 'busy' for {timeout or self.transport.timeout:g} s"
                    " without finishing",
                    instrument=self.name,
                    command=payload,
                    raw=exc.raw,
                ) from exc
            raise
        except ConnectionLostError:
            self._resync = True
            raise
        except _TTY_ERRORS as exc:
            # pyserial's flush() (tcdrain) on a pty that hung up raises termios.error, which
            # the transport does not map yet: drop the port so the next call reopens it.
            self._resync = True
            await self.transport.close()
            raise ConnectionLostError(
                f"connection lost: {exc}", instrument=self.name, command=payload
            ) from exc

    async def _resync_lines(self) -> None:
        """``N<n> M110 N<n>``: make the firmware expect our next line number again."""
        n = self._line + 1
        raw = await self._exchange(f"M110 N{n}", n, None)
        self._decode(lambda: gcode.decode_reply("M110", raw, n))
        self._line = n
        self._resync = False

    async def _send(
        self,
        command: str,
        *,
        timeout: float | None = None,
        context: str = "",
        generation: int | None = None,
    ) -> gcode.Reply:
        """Send one numbered line and decode its reply; errors get ``context`` prefixed.

        With ``generation``, a stop() since then raises :class:`MotionStoppedError`
        instead of sending: checked after any resync and with no await before the line
        is taken, so a stop() that comes later queues its ``M410`` behind this command.
        """
        try:
            for attempt in (1, 2):
                if self._resync:
                    await self._resync_lines()
                if generation is not None:
                    self._check_stop(generation, context)
                self._line += 1
                n = self._line
                raw = await self._exchange(command, n, timeout)
                try:
                    return self._decode(functools.partial(gcode.decode_reply, command, raw, n))
                except gcode.ResendRequestedError:
                    # Not executed (line number/checksum): safe to send once more.
                    self._resync = True
                    if attempt == 2:
                        raise
                except ProtocolError:
                    self._resync = True
                    raise
            raise AssertionError("unreachable")
        except InstrumentError as exc:
            exc.instrument = exc.instrument or self.name
            _annotate(exc, context)
            raise

    async def command(self, line: str, *, timeout: float | None = None) -> tuple[str, ...]:
        """Send any G-code line; returns its information lines (device state is not updated)."""
        return (await self._send(line, timeout=timeout)).lines

    # -- connect and state ------------------------------------------------------------
    async def _identify(self) -> None:
        self._line, self._resync = 0, False
        raw = await self._exchange("M110 N0", None, None)  # unnumbered: restart the count
        self._decode(lambda: gcode.decode_reply("M110 N0", raw))
        m115 = await self._send("M115")
        info = self._decode(lambda: gcode.decode_firmware(m115))
        if not info.name.startswith("Marlin"):
            raise ProtocolError(
                f"not a Marlin controller: FIRMWARE_NAME {info.name!r}", instrument=self.name
            )
        self._set_firmware(info.name)
        reply = await self._send("M92")
        self.steps_per_mm = self._decode(lambda: gcode.decode_steps_per_mm(reply))
        await self._send("G90")
        await self._refresh()
        self._set_homed(await self._probe_homed())

    async def _probe_homed(self) -> bool:
        """A zero-length relative move is refused exactly when an axis is not homed."""
        await self._send("G91")
        try:
            await self._send("G0 X0 Y0 Z0")
        except gcode.NotHomedError:
            return False
        except gcode.CollisionError:
            return True  # the deck guard runs after the homing check
        finally:
            await self._send("G90")
        return True

    def _show_position(self, pos: gcode.Position) -> dict[str, float]:
        values = pos.planned if pos.settled(self.steps_per_mm) else pos.actual(self.steps_per_mm)
        for axis, device in self._axes.items():
            device._set_readback(values[axis])
        return values

    async def _position(self, context: str = "") -> gcode.Position:
        reply = await self._send("M114", context=context)
        return self._decode(lambda: gcode.decode_position(reply))

    async def _holding(self, context: str = "") -> tuple[bool, bytes]:
        reply = await self._send("M119", context=context)
        states = self._decode(lambda: gcode.decode_endstops(reply))
        if "filament" not in states:
            raise ProtocolError(
                "M119 shows no 'filament:' input (the vial-presence switch)",
                instrument=self.name,
                raw=reply.raw,
            )
        self.gripper._set_holding(states["filament"])
        return states["filament"], reply.raw

    async def _refresh(self) -> None:
        self._show_position(await self._position())
        await self._holding()
        reply = await self._send(gcode.format_servo(self.servo))
        _, angle = self._decode(lambda: gcode.decode_servo(reply))
        closed = abs(angle - self.closed_angle) < abs(angle - self.open_angle)
        self.gripper._set_state("closed" if closed else "open")

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self.is_mock:
            return
        await self._refresh()

    def station(self, name: str) -> Station:
        """Calibrated (x, y, pick z) of a station; :class:`LimitError` if unknown."""
        try:
            return self.deck[name]
        except KeyError:
            raise LimitError(
                f"unknown station {name!r}; known: {', '.join(self.deck)}", instrument=self.name
            ) from None

    # -- motion ---------------------------------------------------------------------
    def _check_stop(self, generation: int, context: str) -> None:
        if self._motions.generation != generation:
            raise MotionStoppedError(
                f"{context}: stopped", instrument=self.name, success=self._motions.success
            )

    async def _motion(
        self, target: dict[str, float], speed: float, context: str, generation: int
    ) -> AsyncIterator[dict[str, float]]:
        """G1 to ``target``; yields positions while moving; returns once it is there.

        ``generation`` is the stop generation the motion was asked under: a stop() since
        then ends it (before ``G1`` if it is not sent yet) with :class:`MotionStoppedError`.
        """
        self._check_stop(generation, context)
        start = {a: await d.readback.get_value() for a, d in self._axes.items()}
        command = gcode.format_move(
            x=target.get("X"), y=target.get("Y"), z=target.get("Z"), feedrate_mm_s=speed
        )
        await self._send(command, context=context, generation=generation)
        distance = math.dist([start[a] for a in target], list(target.values()))
        deadline = time.monotonic() + self.transport.timeout + 3.0 * distance / speed + 2.0
        while True:
            pos = await self._position(context)
            yield self._show_position(pos)
            if self._motions.generation != generation:
                # That poll may have been answered before stop()'s M410: read again (it
                # queues behind the M410) so the readback shows where the axes stopped.
                with contextlib.suppress(InstrumentError):
                    yield self._show_position(await self._position(context))
                self._check_stop(generation, context)
            if pos.settled(self.steps_per_mm):
                break
            if time.monotonic() > deadline:
                raise DeviceTimeoutError(
                    f"{context}: still moving after {time.monotonic() - deadline:.1f} s "
                    "past the expected end",
                    instrument=self.name,
                    command=command.encode(),
                    raw=gcode.format_position(pos),
                )
            await asyncio.sleep(self.poll_period)
        await self._send("M400", context=context)
        yield self._show_position(await self._position(context))

    async def _move(
        self, target: dict[str, float], speed: float, context: str, generation: int
    ) -> None:
        async for _ in self._motion(target, speed, context, generation):
            pass

    async def _actuate(self, close: bool, context: str, generation: int) -> bool:
        """Open or close the jaws (after the axes stop); returns the vial-presence switch."""
        self._check_stop(generation, context)
        await self._send("M400", context=context)  # M280 does not wait for the planner
        angle = self.closed_angle if close else self.open_angle
        await self._send(
            gcode.format_servo(self.servo, angle), context=context, generation=generation
        )
        self.gripper._set_state("closed" if close else "open")
        holding, _ = await self._holding(context)
        return holding

    async def _home(self) -> None:
        reply = await self._send(gcode.format_home(), timeout=self.home_timeout, context="home")
        self._show_position(self._decode(lambda: gcode.decode_position(reply)))
        self._set_homed(True)

    async def stop(self, success: bool = True) -> None:
        """Quickstop (``M410``) whatever is moving; a pending or running set() ends.

        ``success=True`` ends those statuses without error, ``success=False`` with
        :class:`MotionStoppedError`. With nothing pending or moving only the generation
        moves on: the RunEngine stops every touched movable after each plan.
        """
        self._motions.success = success
        self._motions.generation += 1  # first, synchronously: no G1/M280 goes out after this
        if self.is_mock or not self._motions.active:
            return
        await self._send("M410", context="stop")

    async def emergency_stop(self) -> None:
        """``M112``: kill the firmware. A real board then needs a reset and homing."""
        self._motions.success = False
        self._motions.generation += 1
        with contextlib.suppress(gcode.FirmwareHaltedError):  # the expected answer
            await self._send("M112", context="emergency stop")
        self._set_homed(False)

    # -- transfer ---------------------------------------------------------------------
    async def _transfer_vial(self, source: str, destination: str, gen: int) -> None:
        """The whole pick and place; ``gen`` is the stop generation ``set()`` was called in."""
        where = f"transfer {source} -> {destination}"
        sx, sy, sz = self.station(source)
        dx, dy, dz = self.station(destination)
        if source == destination:
            raise LimitError(f"{where}: source and destination are the same", instrument=self.name)
        self._check_stop(gen, where)
        xy, zs = await self.x.velocity.get_value(), await self.z.velocity.get_value()
        self._show_position(await self._position(where))  # start from where it really is
        holding, raw = await self._holding(where)
        if holding:
            raise GripError(
                f"{where}: the gripper already holds a vial; place it first",
                instrument=self.name,
                raw=raw,
            )
        if await self.z.readback.get_value() < self.safe_z - 0.01:
            await self._move({"Z": self.safe_z}, zs, f"{where}: lift to safe height", gen)
        if await self.gripper.state.get_value() != "open":
            await self._actuate(False, f"{where}: open the gripper", gen)
        await self._move({"X": sx, "Y": sy}, xy, f"{where}: travel over {source}", gen)
        await self._move({"Z": sz}, zs, f"{where}: descend to {source}", gen)
        if not await self._actuate(True, f"{where}: grip at {source}", gen):
            _, raw = await self._holding(where)
            recovery = await self._back_off(gen, where)
            raise GripError(
                f"{where}: gripper closed on nothing at {source!r} (X{sx:g} Y{sy:g} "
                f"Z{sz:g}): no vial there{recovery}",
                instrument=self.name,
                raw=raw,
            )
        await self._move({"Z": self.safe_z}, zs, f"{where}: lift from {source}", gen)
        await self._move({"X": dx, "Y": dy}, xy, f"{where}: travel over {destination}", gen)
        try:
            await self._move({"Z": dz}, zs, f"{where}: lower onto {destination}", gen)
        except gcode.CollisionError as exc:
            _annotate(exc, f"the vial is still held at safe height over {destination!r}")
            raise
        if await self._actuate(False, f"{where}: release at {destination}", gen):
            _, raw = await self._holding(where)
            raise GripError(
                f"{where}: the vial did not come free at {destination!r}",
                instrument=self.name,
                raw=raw,
            )
        await self._move({"Z": self.safe_z}, zs, f"{where}: lift from {destination}", gen)

    async def _back_off(self, gen: int, where: str) -> str:
        """After gripping nothing: open and rise again; returns a note if that failed."""
        try:
            await self._actuate(False, f"{where}: reopen", gen)
            zs = await self.z.velocity.get_value()
            await self._move({"Z": self.safe_z}, zs, f"{where}: lift", gen)
        except InstrumentError as exc:
            return f" (and backing off failed: {exc})"
        return ""
