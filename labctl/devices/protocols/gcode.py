"""Marlin G-code over serial: the host side of the protocol (subset for a vial gantry).

Requests are one line, ending with LF. A host that wants replies it can match sends
Marlin line numbers with a checksum, ``N12 G1 X10.000*<xor of the bytes before '*'>``;
Marlin built with ADVANCED_OK then ends the reply with ``ok N12 P15 B3``, so an ``ok``
left over from an earlier, timed-out command (``ok N11 ...``) is recognised and skipped.
A reply is any number of information lines (``X:.. Y:.. Z:.. E:.. Count X:.. Y:.. Z:..``,
``echo:...``, endstop states, ``FIRMWARE_NAME:...``, ``Cap:...``) ended by ``ok``;
``echo:busy: processing`` keepalives may come in between. A refused command prints
``Error:...`` or ``echo:Unknown command: "..."`` / ``echo:Home XYZ First`` before its
``ok``. A line-number or checksum problem is ``Error:...``, ``Resend: <n>``, ``ok`` and
the line was not executed. After ``M112`` the firmware answers
``Error:Printer halted. kill() called!`` and never ``ok``.

Pure functions: bytes in, bytes out; decoding raises only
:class:`~labctl.devices.errors.InstrumentError` subclasses, with the raw reply attached.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)

TERMINATOR = b"\n"
AXES = ("X", "Y", "Z")
KEEPALIVE_PREFIX = "echo:busy:"
HALTED_PREFIXES = ("Error:Printer halted", "Error:Printer stopped")
MAX_LINE_NUMBER = 2**31 - 1


class NotHomedError(CommandRejectedError):
    """A move of axes that have not been homed (``echo:Home XYZ First``)."""


class CollisionError(CommandRejectedError):
    """The firmware's deck guard refused a move or release that would crash a vial."""


class FirmwareHaltedError(CommandRejectedError):
    """The firmware is halted (``M112``/``kill()``) and executes nothing until reset."""


class ResendRequestedError(ProtocolError):
    """The firmware did not execute the line (bad number/checksum) and asks for ``line``."""

    def __init__(self, message: str, *, line: int | None, raw: bytes | None = None) -> None:
        super().__init__(message, raw=raw)
        self.line = line


# -- encoding ---------------------------------------------------------------------------
_COMMAND = re.compile(r"^[GM]\d+(?: [A-Z][-+]?[0-9.]*)*$")


def checksum(text: str) -> int:
    """Marlin's line checksum: XOR of every byte before the ``*``."""
    value = 0
    for byte in text.encode("ascii"):
        value ^= byte
    return value


def encode(command: str, line_number: int | None = None) -> bytes:
    """Frame one G-code command, numbered and checksummed when ``line_number`` is given."""
    if not _COMMAND.fullmatch(command):
        raise ValueError(
            f"command: must look like 'G1 X10.5 F3000' (G/M code, upper-case words): {command!r}"
        )
    if line_number is None:
        return command.encode("ascii") + TERMINATOR
    if not 0 <= line_number <= MAX_LINE_NUMBER:
        raise ValueError(f"line_number: must be 0..{MAX_LINE_NUMBER}, got {line_number!r}")
    text = f"N{line_number} {command}"
    return f"{text}*{checksum(text)}".encode("ascii") + TERMINATOR


def parse_line(frame: bytes) -> tuple[int | None, str]:
    """The instrument side of :func:`encode`: (line number, command); checks the checksum."""
    text = frame.rstrip(b"\r\n").decode("ascii")
    m = re.fullmatch(r"N(\d+) (.*)\*(\d+)", text)
    if m is None:
        return None, text
    if checksum(text[: text.rindex("*")]) != int(m.group(3)):
        raise ValueError(f"checksum mismatch in {frame!r}")
    return int(m.group(1)), m.group(2)


def _mm(name: str, value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number of mm, got {value!r}")
    return f"{value:.3f}"


def format_move(
    *,
    x: float | None = None,
    y: float | None = None,
    z: float | None = None,
    feedrate_mm_s: float | None = None,
    rapid: bool = False,
) -> str:
    """``G1`` (or ``G0``) to the given coordinates; the feedrate goes out in mm/min."""
    words = [
        f"{axis}{_mm(axis.lower(), value)}"
        for axis, value in (("X", x), ("Y", y), ("Z", z))
        if value is not None
    ]
    if not words:
        raise ValueError("x, y, z: a move needs at least one coordinate")
    if feedrate_mm_s is not None:
        if not (math.isfinite(feedrate_mm_s) and feedrate_mm_s > 0):
            raise ValueError(f"feedrate_mm_s: must be finite and > 0, got {feedrate_mm_s!r}")
        words.append(f"F{feedrate_mm_s * 60.0:.0f}")
    return " ".join(("G0" if rapid else "G1", *words))


def format_home(axes: Iterable[str] = ()) -> str:
    """``G28`` for the given axes (all when empty)."""
    chosen = [a.upper() for a in axes]
    bad = [a for a in chosen if a not in AXES]
    if bad:
        raise ValueError(f"axes: must be among {AXES}, got {bad!r}")
    return " ".join(("G28", *dict.fromkeys(chosen)))


def format_servo(index: int, angle: float | None = None) -> str:
    """``M280 P<index> S<angle>`` (set), or ``M280 P<index>`` (report the angle)."""
    if not 0 <= index <= 9:
        raise ValueError(f"index: servo index must be 0..9, got {index!r}")
    if angle is None:
        return f"M280 P{index}"
    if not (math.isfinite(angle) and 0 <= angle <= 180):
        raise ValueError(f"angle: must be 0..180 degrees, got {angle!r}")
    return f"M280 P{index} S{angle:.0f}"


# -- reply framing ----------------------------------------------------------------------
_OK = re.compile(r"^ok(?: N(-?\d+))?(?: P(\d+))?(?: B(\d+))?\s*$")
_RESEND = re.compile(r"^(?:Resend|rs):? ?N?(\d+)$")
_POSITION = re.compile(
    r"^X:(-?\d+(?:\.\d+)?) Y:(-?\d+(?:\.\d+)?) Z:(-?\d+(?:\.\d+)?) E:(-?\d+(?:\.\d+)?)"
    r" Count X:(-?\d+(?:\.\d+)?) Y:(-?\d+(?:\.\d+)?) Z:(-?\d+(?:\.\d+)?)$"
)
_ENDSTOP = re.compile(r"^([a-z][a-z0-9_]*): (open|TRIGGERED)$")
_CAP = re.compile(r"^Cap:([A-Z0-9_]+):([01])$")
_KNOWN = (
    _OK,
    _RESEND,
    _POSITION,
    _ENDSTOP,
    _CAP,
    re.compile(r"^echo:.*$"),
    re.compile(r"^Error:.*$"),
    re.compile(r"^FIRMWARE_NAME:.*$"),
    re.compile(r"^Reporting endstop status$"),
    re.compile(r"^start$"),  # printed once at boot
)
_LINE_ERRORS = ("Line Number is not", "checksum mismatch", "No Checksum", "No Line Number")


def _lines(buf: bytes) -> list[bytes]:
    """Complete LF-terminated lines of ``buf`` (a trailing CR, if any, removed)."""
    parts = buf.split(TERMINATOR)[:-1]
    return [p[:-1] if p.endswith(b"\r") else p for p in parts]


def _text(line: bytes) -> str | None:
    """The line as text if it is printable ASCII and a known Marlin reply line, else None."""
    if not line.isascii():
        return None
    text = line.decode("ascii")
    if not text.isprintable():
        return None
    return text if any(p.match(text) for p in _KNOWN) else None


def _is_halt(text: str) -> bool:
    return text.startswith(HALTED_PREFIXES)


def reply_complete_for(line_number: int | None) -> Callable[[bytes], bool]:
    """Completeness test for the reply to the line numbered ``line_number``.

    Complete at our ``ok N<line_number>`` (or any ``ok`` for unnumbered commands), at a
    ``Resend`` request's ``ok``, at a halt error, or at a line that is not Marlin output
    (line noise: stop and let :func:`decode_reply` report it). Stale ``ok``s with other
    numbers, keepalives and information lines are read past.
    """

    def complete(buf: bytes) -> bool:
        if not buf.endswith(TERMINATOR):
            return False
        resend = False
        for raw_line in _lines(buf):
            text = _text(raw_line)
            if text is None or _is_halt(text):
                return True
            if _RESEND.match(text):
                resend = True
                continue
            m = _OK.match(text)
            if m is None:
                continue
            n = m.group(1)
            if line_number is None or resend or (n is not None and int(n) == line_number):
                return True
        return False

    return complete


def only_keepalives(raw: bytes) -> bool:
    """True when ``raw`` holds keepalive lines and nothing else (busy, no ``ok`` yet)."""
    lines = _lines(raw)
    return bool(lines) and all(
        (t := _text(line)) is not None and t.startswith(KEEPALIVE_PREFIX) for line in lines
    )


@dataclass(frozen=True)
class Reply:
    """The information lines of one reply (keepalives, stale replies and ``ok`` removed)."""

    lines: tuple[str, ...]
    raw: bytes
    keepalives: int = 0
    ok: str = "ok"


def _reject(message: str, text: str, command: str, raw: bytes) -> InstrumentError:
    cmd = command.encode("ascii", errors="replace")
    body = text.split(":", 1)[1].strip() if ":" in text else text
    if body.startswith("Move out of range"):
        return LimitError(f"{message}: {body}", command=cmd, raw=raw)
    if body.startswith(("Collision", "Refusing to release")):
        return CollisionError(f"{message}: {body}", command=cmd, raw=raw)
    if body.startswith("Servo") and "out of range" in body:
        return LimitError(f"{message}: {body}", command=cmd, raw=raw)
    return CommandRejectedError(f"{message}: {body}", command=cmd, raw=raw)


def decode_reply(command: str, raw: bytes, line_number: int | None = None) -> Reply:
    """Split ``raw`` into the reply to ``command``; raise if the firmware refused it."""
    if not raw.endswith(TERMINATOR):
        if only_keepalives(raw + TERMINATOR):
            raise InstrumentBusyError("firmware busy: keepalives but no 'ok'", raw=raw)
        raise ProtocolError("reply is not terminated by LF", raw=raw)
    texts: list[str] = []
    for raw_line in _lines(raw):
        text = _text(raw_line)
        if text is None:
            raise ProtocolError(f"not a Marlin reply line: {raw_line[:40]!r}", raw=raw)
        texts.append(text)
    if any(_is_halt(t) for t in texts):
        halt = next(t for t in texts if _is_halt(t))
        raise FirmwareHaltedError(
            f"firmware halted ({halt[6:]}): reset the controller, then home",
            command=command.encode("ascii", errors="replace"),
            raw=raw,
        )
    # Our reply starts after the last stale ok and ends at our ok.
    start, end, resend = 0, None, None
    for i, text in enumerate(texts):
        if (m := _RESEND.match(text)) is not None:
            resend = int(m.group(1))
            continue
        m = _OK.match(text)
        if m is None:
            continue
        n = m.group(1)
        if line_number is None or resend is not None or (n is not None and int(n) == line_number):
            end = i
            break
        start, resend = i + 1, None  # a stale reply to an earlier line: drop it
    if end is None:
        if texts and all(t.startswith(KEEPALIVE_PREFIX) for t in texts):
            raise InstrumentBusyError("firmware busy: keepalives but no 'ok'", raw=raw)
        raise ProtocolError(f"no 'ok' for {command!r} in the reply", raw=raw)
    ours = texts[start:end]
    keepalives = sum(t.startswith(KEEPALIVE_PREFIX) for t in ours)
    lines = tuple(t for t in ours if not t.startswith(KEEPALIVE_PREFIX) and not _RESEND.match(t))
    if resend is not None:
        why = next((t for t in lines if t.startswith("Error:")), "Error:resend requested")
        raise ResendRequestedError(
            f"line not executed, firmware asks to resend line {resend}: {why[6:]}",
            line=resend,
            raw=raw,
        )
    for text in lines:
        if text.startswith("Error:"):
            raise _reject("refused", text, command, raw)
        if text.startswith("echo:Unknown command"):
            raise CommandRejectedError(
                f"unknown command: {text[5:]}", command=command.encode(), raw=raw
            )
        m = re.match(r"^echo:Home ([XYZ]+) First$", text)
        if m:
            raise NotHomedError(
                f"axis {', '.join(m.group(1))} not homed: home (G28) first",
                command=command.encode(),
                raw=raw,
            )
    return Reply(lines=lines, raw=raw, keepalives=keepalives, ok=texts[end])


# -- typed replies ----------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """``M114``: planned position (mm) and stepper counts (steps)."""

    x: float
    y: float
    z: float
    e: float
    count_x: float
    count_y: float
    count_z: float

    @property
    def planned(self) -> dict[str, float]:
        return {"X": self.x, "Y": self.y, "Z": self.z}

    def actual(self, steps_per_mm: dict[str, float]) -> dict[str, float]:
        """Where the steppers are now, in mm (lags ``planned`` while moving)."""
        counts = {"X": self.count_x, "Y": self.count_y, "Z": self.count_z}
        return {a: counts[a] / steps_per_mm[a] for a in AXES}

    def settled(self, steps_per_mm: dict[str, float]) -> bool:
        """True when every axis has reached its planned position (within a step)."""
        actual = self.actual(steps_per_mm)
        return all(abs(actual[a] - self.planned[a]) <= 1.0 / steps_per_mm[a] + 0.005 for a in AXES)


def decode_position(reply: Reply) -> Position:
    for text in reply.lines:
        m = _POSITION.match(text)
        if m:
            v = [float(g) for g in m.groups()]
            return Position(*v)
    raise ProtocolError("no position report (X:.. Y:.. Z:.. Count ...) in the reply", raw=reply.raw)


def decode_endstops(reply: Reply) -> dict[str, bool]:
    """``M119``: input name -> triggered."""
    states = {}
    for text in reply.lines:
        m = _ENDSTOP.match(text)
        if m:
            states[m.group(1)] = m.group(2) == "TRIGGERED"
    if not states:
        raise ProtocolError("no endstop states in the reply", raw=reply.raw)
    return states


@dataclass(frozen=True)
class FirmwareInfo:
    """``M115``: the firmware line as fields, plus the ``Cap:`` flags."""

    name: str
    fields: dict[str, str]
    capabilities: dict[str, bool] = field(default_factory=dict)


def decode_firmware(reply: Reply) -> FirmwareInfo:
    line = next((t for t in reply.lines if t.startswith("FIRMWARE_NAME:")), None)
    if line is None:
        raise ProtocolError("no FIRMWARE_NAME in the M115 reply", raw=reply.raw)
    fields = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"([A-Z][A-Z_]*):(.*?)(?= [A-Z][A-Z_]*:|$)", line)
    }
    caps = {}
    for text in reply.lines:
        m = _CAP.match(text)
        if m:
            caps[m.group(1)] = m.group(2) == "1"
    return FirmwareInfo(name=fields.get("FIRMWARE_NAME", ""), fields=fields, capabilities=caps)


def decode_steps_per_mm(reply: Reply) -> dict[str, float]:
    """``M92`` report: axis -> steps/mm (``echo:  M92 X80.00 Y80.00 Z400.00 E93.00``)."""
    for text in reply.lines:
        m = re.match(r"^echo:\s*M92((?: [A-Z]-?\d+(?:\.\d+)?)+)\s*$", text)
        if m:
            values = {w[0]: float(w[1:]) for w in m.group(1).split()}
            if all(values.get(a, 0.0) > 0 for a in AXES):
                return values
    raise ProtocolError("no usable 'M92 X.. Y.. Z..' steps-per-mm report", raw=reply.raw)


def decode_servo(reply: Reply) -> tuple[int, float]:
    """``M280 P<i>`` report: (servo index, angle in degrees)."""
    for text in reply.lines:
        m = re.match(r"^echo: ?Servo (\d+): (-?\d+(?:\.\d+)?)$", text)
        if m:
            return int(m.group(1)), float(m.group(2))
    raise ProtocolError("no 'Servo <i>: <angle>' report in the reply", raw=reply.raw)


# -- instrument side (for tests and simulators written against this codec) ---------------
def format_position(p: Position) -> bytes:
    return (
        f"X:{p.x:.2f} Y:{p.y:.2f} Z:{p.z:.2f} E:{p.e:.2f} "
        f"Count X:{p.count_x:.0f} Y:{p.count_y:.0f} Z:{p.count_z:.0f}"
    ).encode() + TERMINATOR


def format_ok(
    line_number: int | None = None, planner_free: int = 16, buffer_free: int = 3
) -> bytes:
    n = f" N{line_number}" if line_number is not None else ""
    return f"ok{n} P{planner_free} B{buffer_free}".encode() + TERMINATOR
