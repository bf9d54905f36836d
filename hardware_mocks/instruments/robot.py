"""Cartesian vial gantry with a servo gripper, speaking a Marlin 2.1 G-code subset.

The robot that moves vials between stations is modelled on the common lab build: a
three-axis belt/lead-screw gantry driven by a Marlin board, with a parallel-jaw
gripper on servo 0 and a jaw-mounted vial-presence switch.

Wire protocol (Marlin 2.1 behaviour, serial 115200 8N1; here pty or TCP):

* Requests are lines ending with LF (CR also accepted). Optional Marlin line numbers
  and checksums: ``N12 G1 X10*<xor>``; a wrong sequence, a missing or wrong checksum is
  answered like Marlin (``Error:Line Number is not Last Line Number+1, Last Line: 11``,
  ``Resend: 12``, ``ok``) and the line is not executed. ``M110 N<n>`` resets the count.
* Every executed command ends with ``ok`` in ADVANCED_OK form: ``ok N12 P15 B3`` (N: the
  line number just executed, if one was sent; P: free planner blocks; B: free command
  buffer slots). Information precedes the ``ok``; a refused command prints an
  ``Error:...`` or ``echo:...`` line and then ``ok`` (Marlin acknowledges every line).
* Commands: ``G0``/``G1 X Y Z F`` (mm, F in mm/min, modal), ``G90``/``G91``, ``G4 P<ms>``/
  ``S<s>``, ``G28 [X] [Y] [Z]`` (Z homes first, to Z max, like Marlin with Z_HOME_TO_MAX;
  ends with a position report), ``M114`` (``X:.. Y:.. Z:.. E:.. Count X:.. Y:.. Z:..``,
  planned position in mm and stepper counts in steps), ``M400`` (wait for moves to finish),
  ``M280 P0 S<deg>`` (servo; ``M280 P0`` reports ``echo: Servo 0: <deg>``), ``M119``
  (endstops), ``M115`` (firmware and capabilities), ``M92`` (steps/mm: report or set),
  ``M110``, ``M17``, ``M18``/``M84`` (steppers off: axes become unhomed), ``M410``
  (quickstop), ``M112`` (emergency stop), ``M999``.
* ``G0``/``G1`` return ``ok`` as soon as the move is queued (16-block planner; a full
  planner delays the ``ok``); ``M400``, ``G4``, ``G28`` wait for the motion. While a command
  waits, Marlin prints ``echo:busy: processing`` every 2 s (host keepalive).
* Unknown commands: ``echo:Unknown command: "G5 X1"`` then ``ok``. Moves of unhomed axes:
  ``echo:Home XYZ First`` (NO_MOTION_BEFORE_HOMING) then ``ok``, not executed.
* ``M112``: ``Error:Printer halted. kill() called!`` and the firmware stops.

Gripper convention: servo 0 drives the jaws; ``M280 P0 S90`` opens, ``M280 P0 S10``
closes; any angle <= 45 deg closes the jaws far enough to hold a 28 mm vial. Marlin's
``M280`` blocks for SERVO_DELAY (300 ms) and does not wait for queued moves, so hosts
send ``M400`` first. The vial-presence switch is wired to the filament-runout input:
``M119`` reports ``filament: TRIGGERED`` while a vial is between the jaws, ``open``
otherwise (this is how a host tells a real grip from jaws closed on nothing).

Extensions (what stock Marlin does differently; all documented in docs/instruments/robot.md):

* Moves beyond the soft limits (X 0..600, Y 0..400, Z 0..150 mm) are refused with
  ``Error:Move out of range: X650.00 (limits X0.00..600.00)``; stock Marlin clamps silently.
* A deck guard refuses moves that would crash a carried vial (``Error:Collision: ...``):
  while carrying, moves that change X or Y must start and end at Z >= ``safe_z_mm`` (120),
  and the gripper may go below that height only straight over a *free* station, not
  below its pick height. Opening the jaws while carrying is refused except at a free
  station's pick position (``Error:Refusing to release ...``), so a vial is never dropped.
* A real board is dead after ``kill()`` until reset; here every further line is answered
  with the halt error, and ``M999`` stands in for the reset button (axes unhomed).
* The server writes a reply in one piece, so keepalive lines arrive together with the
  final ``ok`` instead of every 2 s.

Physics: a move of length L at feedrate v (capped so that no axis exceeds its maximum
feedrate) with acceleration a (capped per axis) follows a trapezoidal velocity profile:
t = L/v + v/a, or 2*sqrt(L/a) for short moves that never reach v; queued moves run
back to back (no junction blending). Positions are interpolated lazily against the
lab's simulated clock, so ``M114`` during a move shows stepper counts in between and
``M410`` freezes the axes where they are. Homing runs at the homing feedrate with a
bump (back off and re-approach at half speed), as Marlin's HOMING_BUMP_MM does.
Defaults follow Marlin's Configuration.h style for a belt XY (80 steps/mm, 300 mm/s,
1500 mm/s^2) and lead-screw Z (400 steps/mm, 40 mm/s, 300 mm/s^2).

The deck: stations at fixed XY with a pick height (Z of the jaws when gripping a vial
seated there), :data:`DEFAULT_DECK`; the 12 rack slots form a 4 x 3 grid at 40 mm pitch.
Closing the jaws at a station's pick position (within ``station_tolerance_mm`` in XY and
``z_tolerance_mm`` in Z) picks the vial there (``world.pick``); opening them there places
it (``world.place``). Closing anywhere else, or on an empty station, grips nothing.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from hardware_mocks.server import Simulator
from hardware_mocks.world import LabWorld, WorldError

AXES: tuple[str, ...] = ("X", "Y", "Z")
Vec = tuple[float, float, float]

RACK_ORIGIN_MM = (60.0, 60.0)
RACK_PITCH_MM = 40.0
RACK_COLUMNS = 4
RACK_PICK_Z_MM = 40.0


def rack_grid(slots: int = 12) -> dict[str, tuple[float, float, float]]:
    """Rack slot coordinates: row-major grid, ``RACK_COLUMNS`` slots per row."""
    grid = {}
    for i in range(slots):
        row, col = divmod(i, RACK_COLUMNS)
        grid[f"rack/{i + 1}"] = (
            RACK_ORIGIN_MM[0] + col * RACK_PITCH_MM,
            RACK_ORIGIN_MM[1] + row * RACK_PITCH_MM,
            RACK_PICK_Z_MM,
        )
    return grid


# station -> (x, y, pick z) in mm, machine coordinates after G28. The device keeps its
# own copy as its default calibration (labctl never imports the simulators); a test
# asserts both agree.
DEFAULT_DECK: dict[str, tuple[float, float, float]] = {
    **rack_grid(12),
    "balance": (300.0, 100.0, 70.0),  # pan ~30 mm above the deck
    "stirrer": (420.0, 100.0, 55.0),
    "meter": (420.0, 280.0, 60.0),
    "cell": (540.0, 280.0, 65.0),
}

HALTED = "Error:Printer halted. kill() called!"
KEEPALIVE = "echo:busy: processing"
FIRMWARE = (
    "FIRMWARE_NAME:Marlin 2.1.2.1 (Jun 28 2023 12:00:00) "
    "SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 "
    "MACHINE_TYPE:Vial Gantry EXTRUDER_COUNT:1 UUID:{uuid}"
)
CAPABILITIES = (
    ("SERIAL_XON_XOFF", 0),
    ("BINARY_FILE_TRANSFER", 0),
    ("EEPROM", 1),
    ("AUTOREPORT_POS", 0),
    ("AUTOREPORT_TEMP", 0),
    ("EMERGENCY_PARSER", 1),
    ("HOST_ACTION_COMMANDS", 0),
    ("SOFTWARE_POWER", 0),
    ("TOGGLE_LIGHTS", 0),
    ("Z_PROBE", 0),
)
BUFSIZE = 4  # Marlin's command queue; one slot is the command being executed

_LINE_NO = re.compile(r"^N\s*(-?\d+)\s*")
_CODE = re.compile(r"^([GM])(\d+)(?:\.\d+)?(?![\d.])")
_WORD = re.compile(r"([A-Z])\s*([-+]?(?:\d+\.?\d*|\.\d+))?")
_M110_N = re.compile(r"M110\b.*?N\s*(-?\d+)")


@dataclass
class Segment:
    """One planned straight move with a trapezoidal speed profile (machine coordinates)."""

    start: Vec
    end: Vec
    t0: float  # sim s when the move starts
    length: float
    cruise: float  # mm/s reached (lower than requested for short moves)
    accel: float  # mm/s^2
    t_acc: float  # s spent accelerating (and decelerating)
    t_cruise: float

    @classmethod
    def plan(cls, start: Vec, end: Vec, t0: float, speed: float, accel: float) -> Segment:
        length = math.dist(start, end)
        if length <= 0:
            return cls(start, end, t0, 0.0, 0.0, accel, 0.0, 0.0)
        if speed * speed / accel >= length:  # triangle: never reaches the feedrate
            t_acc = math.sqrt(length / accel)
            return cls(start, end, t0, length, accel * t_acc, accel, t_acc, 0.0)
        t_acc = speed / accel
        t_cruise = (length - speed * t_acc) / speed
        return cls(start, end, t0, length, speed, accel, t_acc, t_cruise)

    @property
    def duration(self) -> float:
        return 2 * self.t_acc + self.t_cruise

    @property
    def t_end(self) -> float:
        return self.t0 + self.duration

    def at(self, t: float) -> Vec:
        tau = t - self.t0
        if tau <= 0 or self.length <= 0:
            return self.start if tau <= 0 else self.end
        if tau >= self.duration:
            return self.end
        a, v = self.accel, self.cruise
        if tau < self.t_acc:
            s = 0.5 * a * tau * tau
        elif tau < self.t_acc + self.t_cruise:
            s = 0.5 * a * self.t_acc**2 + v * (tau - self.t_acc)
        else:
            s = self.length - 0.5 * a * (self.duration - tau) ** 2
        f = s / self.length
        return (
            self.start[0] + f * (self.end[0] - self.start[0]),
            self.start[1] + f * (self.end[1] - self.start[1]),
            self.start[2] + f * (self.end[2] - self.start[2]),
        )


class RefusedError(Exception):
    """A command the firmware refuses: its reply lines (then ``ok``)."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0] if lines else "")
        self.lines = list(lines)


Words = dict[str, float | None]
Handler = Callable[["RobotSimulator", Words], Awaitable[list[str]]]


def _axis_map(
    given: Mapping[str, float | Sequence[float]] | None, default: dict[str, float]
) -> dict[str, float]:
    out = dict(default)
    for k, v in (given or {}).items():
        if k.upper() not in default:
            raise ValueError(f"axis {k!r}: must be one of {sorted(default)}")
        out[k.upper()] = float(v)  # type: ignore[arg-type]
    return out


class RobotSimulator(Simulator):
    kind = "robot"
    protocol = "marlin-gcode"
    reply_terminator = b"\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        deck: Mapping[str, Sequence[float]] | None = None,
        limits_mm: Mapping[str, Sequence[float]] | None = None,
        safe_z_mm: float = 120.0,
        station_tolerance_mm: float = 1.5,
        z_tolerance_mm: float = 1.0,
        max_feedrate_mm_s: Mapping[str, float] | None = None,
        max_accel_mm_s2: Mapping[str, float] | None = None,
        default_accel_mm_s2: float = 1500.0,
        homing_feedrate_mm_s: Mapping[str, float] | None = None,
        homing_bump_mm: Mapping[str, float] | None = None,
        steps_per_mm: Mapping[str, float] | None = None,
        open_angle: float = 90.0,
        grip_angle: float = 45.0,
        servo_delay_s: float = 0.3,
        keepalive_s: float = 2.0,
        planner_blocks: int = 16,
        power_on_position_mm: Sequence[float] = (300.0, 200.0, 100.0),
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        self.deck: dict[str, tuple[float, float, float]] = {}
        for station, coords in (deck or DEFAULT_DECK).items():
            if len(coords) != 3:
                raise ValueError(f"deck[{station!r}]: need [x, y, pick_z] in mm, got {coords!r}")
            self.deck[station] = (float(coords[0]), float(coords[1]), float(coords[2]))
        missing = sorted(set(world.stations) - set(self.deck))
        if missing:
            raise ValueError(f"deck: no coordinates for station(s) {missing}; pass deck=...")
        self.limits: dict[str, tuple[float, float]] = {
            "X": (0.0, 600.0),
            "Y": (0.0, 400.0),
            "Z": (0.0, 150.0),
        }
        for k, v in (limits_mm or {}).items():
            if k.upper() not in self.limits or len(v) != 2 or not v[0] < v[1]:
                raise ValueError(f"limits_mm[{k!r}]: need [min, max] for X, Y or Z, got {v!r}")
            self.limits[k.upper()] = (float(v[0]), float(v[1]))
        for station, (x, y, z) in self.deck.items():
            if not all(self._within(a, c) for a, c in zip(AXES, (x, y, z), strict=True)):
                raise ValueError(f"deck[{station!r}] = {(x, y, z)} lies outside the soft limits")
        self.safe_z = safe_z_mm
        self.station_tol = station_tolerance_mm
        self.z_tol = z_tolerance_mm
        self.max_feedrate = _axis_map(max_feedrate_mm_s, {"X": 300.0, "Y": 300.0, "Z": 40.0})
        self.max_accel = _axis_map(max_accel_mm_s2, {"X": 1500.0, "Y": 1500.0, "Z": 300.0})
        self.default_accel = default_accel_mm_s2
        self.homing_feedrate = _axis_map(homing_feedrate_mm_s, {"X": 50.0, "Y": 50.0, "Z": 20.0})
        self.homing_bump = _axis_map(homing_bump_mm, {"X": 5.0, "Y": 5.0, "Z": 2.0})
        self.steps_per_mm = _axis_map(steps_per_mm, {"X": 80.0, "Y": 80.0, "Z": 400.0, "E": 93.0})
        self.open_angle = open_angle
        self.grip_angle = grip_angle
        self.servo_delay_s = servo_delay_s
        self.keepalive_s = keepalive_s
        self.planner_blocks = planner_blocks
        # Own RNG: drawing from world.rng would shift every other simulator's noise.
        self.uuid = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
        # Where the machine really is (machine coordinates) when no move is running.
        start = tuple(float(v) for v in power_on_position_mm)
        if len(start) != 3:
            raise ValueError(f"power_on_position_mm: need [x, y, z], got {power_on_position_mm!r}")
        self._rest: Vec = (start[0], start[1], start[2])
        self._moves: deque[Segment] = deque()
        # Marlin boots believing it is at 0,0,0: logical = machine - origin until homed.
        self._origin: dict[str, float] = dict(zip(AXES, self._rest, strict=True))
        self.homed: set[str] = set()
        self.planned: dict[str, float] = dict.fromkeys(AXES, 0.0)  # Marlin's current_position
        self.relative = False
        self.feedrate_mm_s = 1500.0 / 60.0  # Marlin's power-on feedrate
        self.servo_angle = open_angle
        self.halted = False
        self.last_line = 0
        self.collisions = 0  # refused crashes, for tests and demos

    # -- kinematics -----------------------------------------------------------------
    def _within(self, axis: str, value: float) -> bool:
        lo, hi = self.limits[axis]
        return lo - 1e-6 <= value <= hi + 1e-6

    def position(self) -> Vec:
        """Machine position now, advancing the planner queue."""
        now = self.clock.now()
        while self._moves and self._moves[0].t_end <= now:
            self._rest = self._moves.popleft().end
        if self._moves and self._moves[0].t0 <= now:
            return self._moves[0].at(now)
        return self._rest

    def _queue_end(self) -> tuple[Vec, float]:
        if self._moves:
            return self._moves[-1].end, self._moves[-1].t_end
        return self._rest, self.clock.now()

    def _to_machine(self, logical: Mapping[str, float]) -> Vec:
        x, y, z = (logical[a] + self._origin[a] for a in AXES)
        return (x, y, z)

    def _freeze(self) -> None:
        """Stop dead where the axes are (quickstop, kill)."""
        pos = self.position()
        self._moves.clear()
        self._rest = pos
        for a, v in zip(AXES, pos, strict=True):
            self.planned[a] = v - self._origin[a]

    async def _synchronize(self) -> float:
        """Wait until the planner is empty (Marlin's planner.synchronize); sim s waited."""
        self.position()
        if not self._moves:
            return 0.0
        wait = max(0.0, self._moves[-1].t_end - self.clock.now())
        await self.clock.sleep(wait)
        self.position()
        return wait

    def _keepalives(self, waited_s: float) -> list[str]:
        return [KEEPALIVE] * int(waited_s // self.keepalive_s) if self.keepalive_s > 0 else []

    def _station_at(self, x: float, y: float) -> str | None:
        for station, (sx, sy, _) in self.deck.items():
            if math.hypot(x - sx, y - sy) <= self.station_tol:
                return station
        return None

    def _pick_position(self, pos: Vec) -> str | None:
        """The station whose pick position the jaws are at, if any."""
        station = self._station_at(pos[0], pos[1])
        if station is not None and abs(pos[2] - self.deck[station][2]) <= self.z_tol:
            return station
        return None

    # -- deck guard -----------------------------------------------------------------
    def _check_collision(self, start: Vec, end: Vec) -> None:
        vial = self.world.in_gripper
        if vial is None:
            return
        travels = math.hypot(end[0] - start[0], end[1] - start[1]) > 1e-6
        low = min(start[2], end[2])
        if travels and low < self.safe_z - 1e-6:
            raise RefusedError(
                f"Error:Collision: carrying {vial} with an XY move at Z{low:.2f}, "
                f"below the safe travel height Z{self.safe_z:.2f}"
            )
        if end[2] >= self.safe_z - 1e-6:
            return
        station = self._station_at(end[0], end[1])
        if station is None:
            raise RefusedError(
                f"Error:Collision: carried vial {vial} would hit the deck at "
                f"X{end[0]:.2f} Y{end[1]:.2f} Z{end[2]:.2f} (no station there)"
            )
        occupant = self.world.stations.get(station)
        if occupant is not None:
            raise RefusedError(
                f"Error:Collision: station {station} is occupied by {occupant}; "
                f"cannot lower {vial} onto it"
            )
        pick_z = self.deck[station][2]
        if end[2] < pick_z - self.z_tol:
            raise RefusedError(
                f"Error:Collision: {vial} would be pushed into {station} at Z{end[2]:.2f}, "
                f"below its pick height Z{pick_z:.2f}"
            )

    # -- protocol -------------------------------------------------------------------
    def busy_reply(self, request: bytes) -> bytes | None:
        return (KEEPALIVE + "\n").encode()

    def _ok(self, line_no: int | None) -> str:
        self.position()
        free = self.planner_blocks - len(self._moves)
        n = f" N{line_no}" if line_no is not None else ""
        return f"ok{n} P{free} B{BUFSIZE - 1}"

    def _line_error(self, message: str) -> list[str]:
        # Marlin's gcode_line_error: report, ask for the next expected line, plain ok.
        return [f"Error:{message}{self.last_line}", f"Resend: {self.last_line + 1}", "ok"]

    def _strip_line_number(self, text: str) -> tuple[int | None, str, list[str] | None]:
        """(line number, command, error reply) following Marlin's get_serial_commands."""
        m = _LINE_NO.match(text)
        star = text.rfind("*")
        if m is None:
            if star >= 0:
                return None, text, self._line_error("No Line Number with checksum, Last Line: ")
            return None, text, None
        is_m110 = "M110" in text
        m110 = _M110_N.search(text) if is_m110 else None
        number = int(m110.group(1)) if m110 else int(m.group(1))
        command = text[m.end() : star if star >= 0 else None].strip()
        if number != self.last_line + 1 and not is_m110:
            return (
                number,
                command,
                self._line_error("Line Number is not Last Line Number+1, Last Line: "),
            )
        if star < 0:
            return number, command, self._line_error("No Checksum with line number, Last Line: ")
        want = 0
        for ch in text[:star].encode("latin-1"):
            want ^= ch
        try:
            got = int(text[star + 1 :].strip())
        except ValueError:
            got = -1
        if got != want:
            return number, command, self._line_error("checksum mismatch, Last Line: ")
        self.last_line = number
        return int(m.group(1)), command, None

    async def handle(self, request: bytes) -> bytes | None:
        text = request.decode("latin-1").split(";", 1)[0].strip()
        if not text:
            return None  # Marlin ignores empty and comment-only lines
        line_no, command, error = self._strip_line_number(text)
        if self.halted:
            if command.startswith("M999"):
                self.halted = False
                return (self._ok(line_no) + "\n").encode()
            return (HALTED + "\n").encode()
        if error is not None:
            return "".join(f"{x}\n" for x in error).encode()
        try:
            lines = await self._execute(command)
        except RefusedError as exc:
            lines = exc.lines
        if self.halted:  # M112: no ok, the board is dead
            return (HALTED + "\n").encode()
        return "".join(f"{x}\n" for x in [*lines, self._ok(line_no)]).encode()

    async def _execute(self, command: str) -> list[str]:
        m = _CODE.match(command)
        if m is None:
            raise RefusedError(f'echo:Unknown command: "{command}"')
        code = f"{m.group(1)}{int(m.group(2))}"
        words: dict[str, float | None] = {}
        for letter, value in _WORD.findall(command[m.end() :].upper()):
            words.setdefault(letter, float(value) if value else None)
        handler = self._HANDLERS.get(code)
        if handler is None:
            raise RefusedError(f'echo:Unknown command: "{command}"')
        return await handler(self, words)

    async def _g0(self, w: Words) -> list[str]:
        moving = [a for a in AXES if w.get(a) is not None]
        unhomed = [a for a in moving if a not in self.homed]
        if unhomed:
            raise RefusedError(f"echo:Home {''.join(unhomed)} First")
        f = w.get("F")
        if f is not None and f > 0:
            self.feedrate_mm_s = f / 60.0
        target = dict(self.planned)
        for a in moving:
            value = w[a]
            assert value is not None
            target[a] = self.planned[a] + value if self.relative else value
        for a in moving:
            if not self._within(a, target[a]):
                lo, hi = self.limits[a]
                raise RefusedError(
                    f"Error:Move out of range: {a}{target[a]:.2f} (limits {a}{lo:.2f}..{hi:.2f})"
                )
        start, t0 = self._queue_end()
        end = self._to_machine(target)
        try:
            self._check_collision(start, end)
        except RefusedError:
            self.collisions += 1
            raise
        length = math.dist(start, end)
        if length > 0:
            unit = [(e - s) / length for s, e in zip(start, end, strict=True)]
            speed, accel = self.feedrate_mm_s, self.default_accel
            for a, u in zip(AXES, unit, strict=True):
                if abs(u) > 1e-12:
                    speed = min(speed, self.max_feedrate[a] / abs(u))
                    accel = min(accel, self.max_accel[a] / abs(u))
            while len(self._moves) >= self.planner_blocks:  # planner full: ok waits
                await self.clock.sleep(self._moves[0].t_end - self.clock.now())
                self.position()
            start, t0 = self._queue_end()
            self._moves.append(Segment.plan(start, end, max(t0, self.clock.now()), speed, accel))
        self.planned = target
        return []

    async def _g4(self, w: Words) -> list[str]:
        waited = await self._synchronize()
        dwell = (w.get("P") or 0.0) / 1000.0 + (w.get("S") or 0.0)
        await self.clock.sleep(dwell)
        return self._keepalives(waited + dwell)

    async def _g28(self, w: Words) -> list[str]:
        axes = [a for a in AXES if a in w] or list(AXES)
        waited = await self._synchronize()
        pos = list(self.position())
        vial = self.world.in_gripper
        xy_only = "Z" not in axes and ("X" in axes or "Y" in axes)
        if vial is not None and xy_only and pos[2] < self.safe_z - 1e-6:
            self.collisions += 1
            raise RefusedError(
                f"Error:Collision: carrying {vial}; homing XY at Z{pos[2]:.2f}, below the "
                f"safe travel height Z{self.safe_z:.2f}"
            )
        seconds = 0.0
        for a in sorted(axes, key=lambda a: a != "Z"):  # Z homes first (Z_HOME_TO_MAX)
            i = AXES.index(a)
            home = self.limits[a][1] if a == "Z" else self.limits[a][0]
            feed, bump = self.homing_feedrate[a], self.homing_bump[a]
            # Fast approach, back off by the bump, re-approach at half speed.
            seconds += abs(pos[i] - home) / feed + bump / feed + bump / (feed / 2)
            pos[i] = home
            self._origin[a] = 0.0
            self.planned[a] = home
            self.homed.add(a)
        await self.clock.sleep(seconds)
        self._rest = (pos[0], pos[1], pos[2])
        return [*self._keepalives(waited + seconds), self._m114_line()]

    async def _g90(self, w: Words) -> list[str]:
        self.relative = False
        return []

    async def _g91(self, w: Words) -> list[str]:
        self.relative = True
        return []

    def _m114_line(self) -> str:
        now = self.position()
        counts = [
            round((v - self._origin[a]) * self.steps_per_mm[a])
            for a, v in zip(AXES, now, strict=True)
        ]
        p = self.planned
        return (
            f"X:{p['X']:.2f} Y:{p['Y']:.2f} Z:{p['Z']:.2f} E:0.00 "
            f"Count X:{counts[0]} Y:{counts[1]} Z:{counts[2]}"
        )

    async def _m114(self, w: Words) -> list[str]:
        return [self._m114_line()]

    async def _m400(self, w: Words) -> list[str]:
        return self._keepalives(await self._synchronize())

    async def _m280(self, w: Words) -> list[str]:
        if "P" not in w or w["P"] is None:
            return []
        index = int(w["P"])
        if index != 0:
            raise RefusedError(f"Error:Servo {index} out of range")
        angle = w.get("S")
        if angle is None:
            return [f"echo: Servo {index}: {round(self.servo_angle)}"]
        angle = min(180.0, max(0.0, angle))
        closing = angle <= self.grip_angle
        was_closed = self.servo_angle <= self.grip_angle
        pos = self.position()  # M280 does not wait for the planner: wherever the jaws are now
        station = self._pick_position(pos)
        vial = self.world.in_gripper
        free_here = station is not None and self.world.stations.get(station) is None
        if vial is not None and not closing and not free_here:
            raise RefusedError(
                f"Error:Refusing to release {vial} at X{pos[0]:.2f} Y{pos[1]:.2f} "
                f"Z{pos[2]:.2f}: not at a free station's pick position"
            )
        await self.clock.sleep(self.servo_delay_s)
        self.servo_angle = angle
        try:
            if closing and not was_closed and vial is None and station is not None:
                if self.world.stations.get(station) is not None:
                    self.world.pick(station)
            elif not closing and vial is not None and station is not None:
                self.world.place(station)
        except WorldError as exc:
            raise RefusedError(f"Error:Gripper: {exc}") from exc
        return []

    async def _m119(self, w: Words) -> list[str]:
        x, y, z = self.position()

        def state(hit: bool) -> str:
            return "TRIGGERED" if hit else "open"

        return [
            "Reporting endstop status",
            f"x_min: {state(x <= self.limits['X'][0] + 0.01)}",
            f"y_min: {state(y <= self.limits['Y'][0] + 0.01)}",
            f"z_max: {state(z >= self.limits['Z'][1] - 0.01)}",
            f"filament: {state(self.world.in_gripper is not None)}",
        ]

    async def _m115(self, w: Words) -> list[str]:
        return [FIRMWARE.format(uuid=self.uuid), *(f"Cap:{k}:{v}" for k, v in CAPABILITIES)]

    async def _m92(self, w: Words) -> list[str]:
        given = {a: v for a, v in w.items() if a in self.steps_per_mm and v is not None}
        if not given:
            s = self.steps_per_mm
            return [
                "echo:; Steps per unit:",
                f"echo:  M92 X{s['X']:.2f} Y{s['Y']:.2f} Z{s['Z']:.2f} E{s['E']:.2f}",
            ]
        for a, v in given.items():
            if v <= 0:
                raise RefusedError(f"Error:Invalid steps per unit {a}{v:.2f}")
            self.steps_per_mm[a] = v
        return []

    async def _m110(self, w: Words) -> list[str]:
        n = w.get("N")
        if n is not None:
            self.last_line = int(n)
        return []

    async def _m17(self, w: Words) -> list[str]:
        return []

    async def _m18(self, w: Words) -> list[str]:
        waited = await self._synchronize()  # planner.finish_and_disable()
        axes = [a for a in AXES if a in w] or list(AXES)
        for a in axes:
            # Steppers off: the carriage may be pushed, so the position is no longer known.
            self.homed.discard(a)
        return self._keepalives(waited)

    async def _m410(self, w: Words) -> list[str]:
        self._freeze()
        return []

    async def _m112(self, w: Words) -> list[str]:
        self._freeze()
        self.homed.clear()
        self.halted = True
        return []

    async def _m999(self, w: Words) -> list[str]:
        return []  # not halted: nothing to restart

    _HANDLERS: ClassVar[dict[str, Handler]] = {
        "G0": _g0,
        "G1": _g0,
        "G4": _g4,
        "G28": _g28,
        "G90": _g90,
        "G91": _g91,
        "M17": _m17,
        "M18": _m18,
        "M84": _m18,
        "M92": _m92,
        "M110": _m110,
        "M112": _m112,
        "M114": _m114,
        "M115": _m115,
        "M119": _m119,
        "M280": _m280,
        "M400": _m400,
        "M410": _m410,
        "M999": _m999,
    }
