"""New Era Pump Systems NE-1000 family (NE-1000, NE-500, Aladdin, LA-...) RS-232 protocol.

Source: *NE-1000 Multi-Phaser User Manual*, publication #1200-01, section 10 (RS-232
protocol: basic mode, safe mode, common syntax, command errors and alarms, command set),
cross-checked against the independent client ``nesp_lib`` 2.0.

Framing
-------
Basic mode, to the pump: ``[address] [command [data]] CR``; spaces and control characters
are ignored and text is case-insensitive. From the pump: ``STX address status [data] ETX``,
the address always as two digits. Safe mode wraps the same text as
``STX length text CRC16(hi, lo) ETX``, ``length`` counting the bytes after STX (itself,
text, CRC, ETX) and the CRC being the 16-bit CCITT CRC (XMODEM: poly 0x1021, init 0) of
the text; the manual's example ``02 08 "SAF0" 55 43 03`` returns a pump to basic mode.

Status characters: ``I`` infusing, ``W`` withdrawing, ``S`` program stopped, ``P``
paused, ``T`` pause phase, ``U`` user wait, ``X`` purging; an alarm replaces the status
with ``A?`` + ``R`` (reset), ``S`` (motor stalled), ``T`` (safe-mode timeout), ``E``
(program error), ``O`` (phase out of range). Reporting an alarm acknowledges it, and the
command that received it was *not* executed. Errors follow the status: ``?`` (not
recognised), ``?NA`` (not applicable now), ``?OOR`` (data out of range), ``?COM`` (bad
packet), ``?IGN`` (ignored: a new phase started at the same moment).

Numbers are ``<float>``: at most 4 digits and one decimal point, at most 3 decimals.
"""

from __future__ import annotations

import binascii
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)

STX = 0x02
ETX = 0x03
CR = b"\r"
MAX_ADDRESS = 99
MAX_SAFE_TIMEOUT_S = 255

# Commands this codec speaks (the subset the simulator implements); "" is the status query.
COMMANDS = frozenset(
    {"", "DIA", "RAT", "VOL", "DIR", "RUN", "STP", "PUR", "DIS", "CLD", "VER", "SAF"}
)


class Status(enum.StrEnum):
    INFUSING = "I"
    WITHDRAWING = "W"
    STOPPED = "S"
    PAUSED = "P"
    PAUSE_PHASE = "T"
    USER_WAIT = "U"
    PURGING = "X"

    @property
    def running(self) -> bool:
        return self in (Status.INFUSING, Status.WITHDRAWING, Status.PURGING)


class Alarm(enum.StrEnum):
    RESET = "R"
    STALLED = "S"
    TIMEOUT = "T"
    PROGRAM_ERROR = "E"
    PHASE_OUT_OF_RANGE = "O"


ALARM_TEXT = {
    Alarm.RESET: "pump was reset (power was interrupted)",
    Alarm.STALLED: "pump motor stalled (syringe at its end of travel or blocked)",
    Alarm.TIMEOUT: "safe-mode communications time out",
    Alarm.PROGRAM_ERROR: "pumping program error",
    Alarm.PHASE_OUT_OF_RANGE: "pumping program phase is out of range",
}


class RateUnits(enum.StrEnum):
    UL_PER_MIN = "UM"
    ML_PER_MIN = "MM"
    UL_PER_HR = "UH"
    ML_PER_HR = "MH"

    @property
    def ml_per_min(self) -> float:
        """mL/min per one of these units."""
        return {"UM": 1e-3, "MM": 1.0, "UH": 1e-3 / 60.0, "MH": 1.0 / 60.0}[self.value]


class VolumeUnits(enum.StrEnum):
    UL = "UL"
    ML = "ML"

    @property
    def ml(self) -> float:
        return 1e-3 if self is VolumeUnits.UL else 1.0


class Direction(enum.StrEnum):
    INFUSE = "INF"
    WITHDRAW = "WDR"


_ERROR_TEXT = {
    "": "command not recognised",
    "NA": "command not currently applicable",
    "OOR": "command data out of range",
    "COM": "invalid communications packet received by the pump",
    "IGN": "command ignored (a new phase started at the same moment)",
}


class PumpAlarmError(CommandRejectedError):
    """The pump answered with an alarm; the command was not executed (and the alarm is
    now acknowledged)."""

    def __init__(
        self,
        alarm: Alarm,
        *,
        instrument: str = "",
        command: bytes | None = None,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(
            f"alarm {alarm.value}: {ALARM_TEXT[alarm]}",
            instrument=instrument,
            command=command,
            raw=raw,
        )
        self.alarm = alarm


@dataclass(frozen=True)
class Reply:
    """One decoded reply packet."""

    address: int
    status: Status | None  # None when the packet carries an alarm
    alarm: Alarm | None
    data: str

    @property
    def error(self) -> str | None:
        """The error code after ``?`` ("" for a bare ``?``), or None."""
        return self.data[1:] if self.data.startswith("?") else None


@dataclass(frozen=True)
class Dispensed:
    """Reply to ``DIS``: volumes moved since the last clear, in the pump's volume units."""

    infused: float
    withdrawn: float
    units: VolumeUnits

    @property
    def infused_ml(self) -> float:
        return self.infused * self.units.ml

    @property
    def withdrawn_ml(self) -> float:
        return self.withdrawn * self.units.ml


@dataclass(frozen=True)
class Version:
    """Reply to ``VER``, e.g. ``NE1000V3.928``."""

    model: int
    major: int
    minor: int
    upgrade: int  # 0 without a firmware upgrade ("X" suffix)
    text: str


# -- numbers ---------------------------------------------------------------------------


def format_float(value: float, field: str = "value", *, trailing_point: bool = False) -> str:
    """A ``<float>``: at most 4 digits (most significant kept) and at most 3 decimals.

    ``trailing_point`` writes whole numbers of 4 digits as ``1234.`` (the pump's own
    replies always carry the point).
    """
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{field}: must be a finite number >= 0, got {value!r}")
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if sum(c.isdigit() for c in text) <= 4:
            if decimals == 0 and trailing_point:
                text += "."
            return text
    raise ValueError(f"{field}: {value!r} does not fit 4 digits (maximum 9999)")


def float_resolution(value: float) -> float:
    """The step of the last digit :func:`format_float` keeps for ``value``."""
    text = format_float(value)
    return 10.0 ** -(len(text) - text.index(".") - 1) if "." in text else 1.0


_FLOAT = r"(\d+\.?\d*|\.\d+)"


# -- encoding --------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """16-bit CCITT CRC as the pump computes it (XMODEM: polynomial 0x1021, init 0)."""
    return binascii.crc_hqx(data, 0)


def _text(address: int | None, command: str, data: str) -> bytes:
    if address is not None and not (
        isinstance(address, int) and not isinstance(address, bool) and 0 <= address <= MAX_ADDRESS
    ):
        raise ValueError(f"address: must be an integer 0..{MAX_ADDRESS}, got {address!r}")
    if command not in COMMANDS:
        raise ValueError(f"command: unknown NE-1000 command {command!r}")
    if not all(c.isascii() and c.isprintable() for c in data):
        raise ValueError(f"data: must be printable ASCII, got {data!r}")
    return f"{'' if address is None else address}{command}{data}".encode("ascii")


def encode(address: int | None, command: str = "", data: str = "", *, safe: bool = False) -> bytes:
    """One command packet: basic mode (``text CR``) or safe mode (length, CRC)."""
    text = _text(address, command, data)
    if not safe:
        return text + CR
    crc = crc16(text)
    return bytes([STX, len(text) + 4]) + text + bytes([crc >> 8, crc & 0xFF, ETX])


def encode_diameter(address: int, mm: float) -> bytes:
    if not (isinstance(mm, int | float) and 0.1 <= mm <= 50.0):
        raise ValueError(f"diameter: must be 0.1..50.0 mm, got {mm!r}")
    return encode(address, "DIA", format_float(mm, "diameter"))


def best_rate_units(ml_per_min: float) -> tuple[float, RateUnits]:
    """The rate in the units that keep the most of its 4 digits (as the keypad would)."""
    if not (isinstance(ml_per_min, int | float) and math.isfinite(ml_per_min) and ml_per_min > 0):
        raise ValueError(f"rate: must be a finite number > 0 mL/min, got {ml_per_min!r}")
    for units in (RateUnits.UL_PER_HR, RateUnits.UL_PER_MIN, RateUnits.ML_PER_HR):
        value = ml_per_min / units.ml_per_min
        if value < 9999.5:
            return value, units
    return ml_per_min, RateUnits.ML_PER_MIN


def encode_rate(address: int, value: float, units: RateUnits) -> bytes:
    return encode(address, "RAT", format_float(value, "rate") + RateUnits(units).value)


def best_volume_units(ml: float) -> tuple[float, VolumeUnits]:
    if not (isinstance(ml, int | float) and math.isfinite(ml) and ml >= 0):
        raise ValueError(f"volume: must be a finite number >= 0 mL, got {ml!r}")
    if ml * 1000.0 < 9999.5:
        return ml * 1000.0, VolumeUnits.UL
    return ml, VolumeUnits.ML


def encode_volume(address: int, value: float) -> bytes:
    """``VOL <float>``: volume to be dispensed, in the pump's current volume units."""
    return encode(address, "VOL", format_float(value, "volume"))


def encode_volume_units(address: int, units: VolumeUnits) -> bytes:
    return encode(address, "VOL", VolumeUnits(units).value)


def encode_direction(address: int, direction: Direction) -> bytes:
    return encode(address, "DIR", Direction(direction).value)


def encode_clear(address: int, direction: Direction) -> bytes:
    """``CLD INF|WDR``: zero the infused or withdrawn volume."""
    return encode(address, "CLD", Direction(direction).value)


def encode_safe_mode(address: int, timeout_s: int) -> bytes:
    """``SAF n`` as a safe-mode packet, which the pump accepts in either mode; 0 = basic."""
    if not (isinstance(timeout_s, int) and 0 <= timeout_s <= MAX_SAFE_TIMEOUT_S):
        raise ValueError(
            f"timeout_s: must be an integer 0..{MAX_SAFE_TIMEOUT_S}, got {timeout_s!r}"
        )
    return encode(address, "SAF", str(timeout_s), safe=True)


# -- reply framing ---------------------------------------------------------------------


def _safe_frame_end(buf: bytes, start: int) -> int | None:
    """Index one past the safe-mode packet starting at ``start``, if complete."""
    if len(buf) < start + 2:
        return None
    end = start + 1 + buf[start + 1]
    return end if len(buf) >= end else None


def reply_complete(buf: bytes, *, safe: bool = False) -> bool:
    """True once ``buf`` holds a whole reply packet (or line noise ending in ETX)."""
    if not safe:
        return buf.endswith(bytes([ETX]))
    # The CRC bytes may be 0x02 or 0x03: walk packet by packet using the length bytes.
    start = buf.find(bytes([STX]))
    while start >= 0:
        end = _safe_frame_end(buf, start)
        if end is None:
            return False
        if end == len(buf):
            return True
        start = buf.find(bytes([STX]), end)
    return buf.endswith(bytes([ETX]))  # trailing line noise


def last_frame(raw: bytes) -> bytes:
    """The last basic-mode packet of ``raw`` (stale earlier replies dropped)."""
    if not raw.endswith(bytes([ETX])):
        return raw
    start = raw.rfind(bytes([STX]), 0, len(raw) - 1)
    return raw[start:] if start >= 0 else raw


_REPLY = re.compile(r"^(\d{2})(?:A\?([RSTEO])|([IWSPTUX])(.*))$", re.DOTALL)


def _parse(text_bytes: bytes, raw: bytes) -> Reply:
    try:
        text = text_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("reply is not ASCII", raw=raw) from None
    m = _REPLY.match(text)
    if not m or not all(c.isprintable() for c in text):
        raise ProtocolError("not an NE-1000 reply (address, status, data)", raw=raw)
    address = int(m.group(1))
    if m.group(2):
        return Reply(address, None, Alarm(m.group(2)), "")
    return Reply(address, Status(m.group(3)), None, m.group(4))


def decode_reply(raw: bytes, *, safe: bool = False) -> Reply:
    """Decode one reply packet (basic by default; ``safe`` checks length and CRC)."""
    if not isinstance(raw, bytes | bytearray):
        raise ProtocolError("reply is not bytes", raw=None)
    raw = bytes(raw)
    if len(raw) < 2 or raw[0] != STX or raw[-1] != ETX:
        raise ProtocolError("reply is not framed by STX ... ETX", raw=raw)
    if not safe:
        return _parse(raw[1:-1], raw)
    if raw[1] != len(raw) - 1 or len(raw) < 5:
        raise ProtocolError("safe-mode reply length byte does not match the packet", raw=raw)
    text, crc = raw[2:-3], (raw[-3] << 8) | raw[-2]
    if crc16(text) != crc:
        raise ProtocolError("safe-mode reply fails its CRC check", raw=raw)
    return _parse(text, raw)


def check(reply: Reply, raw: bytes, command: bytes | None = None) -> Reply:
    """Raise for an alarm or a command error; return the reply otherwise."""
    if reply.alarm is not None:
        raise PumpAlarmError(reply.alarm, command=command, raw=raw)
    code = reply.error
    if code is None:
        return reply
    text = _ERROR_TEXT.get(code)
    if text is None:
        raise ProtocolError(f"unknown error code {reply.data!r}", command=command, raw=raw)
    if code == "IGN":
        raise InstrumentBusyError(text, command=command, raw=raw)
    if code == "COM":
        raise ProtocolError(text, command=command, raw=raw)
    raise CommandRejectedError(text, command=command, raw=raw)


def _decode_checked(raw: bytes, address: int | None, command: bytes | None) -> Reply:
    reply = check(decode_reply(last_frame(raw)), raw, command)
    if address is not None and reply.address != address:
        raise ProtocolError(
            f"reply from pump {reply.address} while talking to pump {address}",
            command=command,
            raw=raw,
        )
    return reply


def _data(raw: bytes, address: int | None, command: bytes | None, pattern: str) -> re.Match[str]:
    reply = _decode_checked(raw, address, command)
    m = re.fullmatch(pattern, reply.data)
    if m is None:
        raise ProtocolError(f"unexpected data {reply.data!r}", command=command, raw=raw)
    return m


def decode_status(raw: bytes, address: int | None = None, command: bytes | None = None) -> Status:
    """A status-only reply (status query, or a set command that was accepted)."""
    reply = _decode_checked(raw, address, command)
    if reply.data:
        raise ProtocolError(f"unexpected data {reply.data!r}", command=command, raw=raw)
    assert reply.status is not None
    return reply.status


def decode_float(raw: bytes, address: int | None = None, command: bytes | None = None) -> float:
    """A bare ``<float>`` (``DIA`` query)."""
    return float(_data(raw, address, command, _FLOAT).group(1))


def decode_rate(
    raw: bytes, address: int | None = None, command: bytes | None = None
) -> tuple[float, RateUnits]:
    m = _data(raw, address, command, _FLOAT + "(UM|MM|UH|MH)")
    return float(m.group(1)), RateUnits(m.group(2))


def decode_volume(
    raw: bytes, address: int | None = None, command: bytes | None = None
) -> tuple[float, VolumeUnits]:
    m = _data(raw, address, command, _FLOAT + "(UL|ML)")
    return float(m.group(1)), VolumeUnits(m.group(2))


def decode_direction(
    raw: bytes, address: int | None = None, command: bytes | None = None
) -> Direction:
    return Direction(_data(raw, address, command, "(INF|WDR)").group(1))


def decode_dispensed(
    raw: bytes, address: int | None = None, command: bytes | None = None
) -> Dispensed:
    m = _data(raw, address, command, "I" + _FLOAT + "W" + _FLOAT + "(UL|ML)")
    return Dispensed(float(m.group(1)), float(m.group(2)), VolumeUnits(m.group(3)))


def decode_version(raw: bytes, address: int | None = None, command: bytes | None = None) -> Version:
    m = _data(raw, address, command, r"NE(\d{1,6})(X(\d{0,3}))?V(\d{1,3})\.(\d{1,4})")
    upgrade = 0 if m.group(2) is None else int(m.group(3) or 1)
    return Version(int(m.group(1)), int(m.group(4)), int(m.group(5)), upgrade, m.group(0))


def decode_safe_timeout(
    raw: bytes, address: int | None = None, command: bytes | None = None
) -> int:
    return int(_data(raw, address, command, r"(\d{1,3})").group(1))


# -- completeness with stale-reply skipping ---------------------------------------------

# What the data of a good reply looks like, per expectation; errors/alarms always match.
EXPECT_STATUS = ""
EXPECT_FLOAT = _FLOAT
EXPECT_RATE = _FLOAT + "(UM|MM|UH|MH)"
EXPECT_VOLUME = _FLOAT + "(UL|ML)"
EXPECT_DIRECTION = "(INF|WDR)"
EXPECT_DISPENSED = "I" + _FLOAT + "W" + _FLOAT + "(UL|ML)"
EXPECT_VERSION = r"NE\d+.*"


def reply_complete_for(address: int, expect: str) -> Callable[[bytes], bool]:
    """Completeness test that reads past stale replies.

    NE-1000 replies do not echo the command, so a late answer to an earlier, timed-out
    command is recognised by its address or by the shape of its data (``expect``, a
    regular expression over the data field) and read past. Errors, alarms and
    unparseable packets end the wait at once, to be reported by the decoder.
    """
    shape = re.compile(expect)

    def complete(buf: bytes) -> bool:
        if not buf.endswith(bytes([ETX])):
            return False
        try:
            reply = decode_reply(last_frame(buf))
        except InstrumentError:
            return True  # garbage: stop and let the decoder report it
        if reply.address != address:
            return False
        if reply.alarm is not None or reply.error is not None:
            return True
        return shape.fullmatch(reply.data) is not None

    return complete


# -- the instrument side (used by property tests) ---------------------------------------


def format_reply(
    address: int, status: Status | Alarm, data: str = "", *, safe: bool = False
) -> bytes:
    """Encode a reply packet as the pump sends it."""
    if not 0 <= address <= MAX_ADDRESS:
        raise ValueError(f"address: must be 0..{MAX_ADDRESS}, got {address!r}")
    head = f"A?{status.value}" if isinstance(status, Alarm) else status.value
    text = f"{address:02d}{head}{data}".encode("ascii")
    if not safe:
        return bytes([STX]) + text + bytes([ETX])
    crc = crc16(text)
    return bytes([STX, len(text) + 4]) + text + bytes([crc >> 8, crc & 0xFF, ETX])
