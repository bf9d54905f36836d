"""SCPI codec for a temperature chamber (the command subset of ``docs/instruments/chamber.md``).

Builds on the generic helpers of :mod:`labctl.devices.protocols.scpi` and adds what is
specific to a chamber: the temperature/ramp/output commands, the operation-condition
register with its stability bit, the compound status query, the mapping of SCPI
error codes to exceptions (``-213`` = busy), and the resynchronisation test used
after a timeout. Pure functions: bytes in, bytes out; no I/O.

Program messages (LF-terminated)::

    SOUR:TEMP 40          setpoint, deg C           SOUR:TEMP?  [MIN|MAX]
    SOUR:TEMP:RAMP 2      ramp limit, K/min         SOUR:TEMP:RAMP?
    SOUR:TEMP:TOL 0.3     stability band, K         SOUR:TEMP:TOL?     (extension)
    SOUR:TEMP:DWEL 60     stability dwell, s        SOUR:TEMP:DWEL?    (extension)
    OUTP ON|OFF           controller running        OUTP?
    MEAS:TEMP?            air temperature, deg C
    STAT:OPER:COND?       operation condition register (bits below)
    SYST:ERR?             oldest queued error, ``<code>,"<message>"``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import scpi

TERMINATOR = scpi.TERMINATOR

# Operation status condition register. Bits 1 (SETTling) and 3 (SWEeping) are the
# SCPI-99 standard meanings; bits 8 and 9 are in the instrument-defined range.
OPER_SETTLING = 1 << 1  # controller on, not yet stable
OPER_SWEEPING = 1 << 3  # the setpoint ramp is still running
OPER_RUNNING = 1 << 8  # controller on (OUTP ON)
OPER_STABLE = 1 << 9  # within the tolerance band for the dwell time
_OPER_MAX = (1 << 15) - 1  # bit 15 is always 0 in SCPI status registers

# The chamber's documented busy reply: the command is not executed, no response is
# sent, and this error is queued (defrost cycle / front-panel lock-out).
BUSY_CODE = -213
_MAX_INT_DIGITS = 12  # no register or error code is longer; int() on more is wasted work

IDN = scpi.encode("*IDN?")
CLS = scpi.encode("*CLS")
ERROR = scpi.encode("SYST:ERR?")
TEMPERATURE = scpi.encode("MEAS:TEMP?")
SETPOINT = scpi.encode("SOUR:TEMP?")
SETPOINT_MIN = scpi.encode("SOUR:TEMP?", "MIN")
SETPOINT_MAX = scpi.encode("SOUR:TEMP?", "MAX")
RAMP = scpi.encode("SOUR:TEMP:RAMP?")
TOLERANCE = scpi.encode("SOUR:TEMP:TOL?")
DWELL = scpi.encode("SOUR:TEMP:DWEL?")
OUTPUT = scpi.encode("OUTP?")
CONDITION = scpi.encode("STAT:OPER:COND?")


def compound(*messages: bytes) -> bytes:
    """Join single program messages into one: ``MEAS:TEMP?;:SOUR:TEMP?`` (one round trip).

    The leading ``:`` of each later unit resets the SCPI header path to the root;
    common commands (``*CLS``) take none, they do not touch the path.
    """
    if not messages:
        raise ValueError("messages: need at least one program message")
    units = []
    for i, m in enumerate(messages):
        if not m.endswith(TERMINATOR) or TERMINATOR in m[:-1]:
            raise ValueError(f"messages: each must be one LF-terminated message, got {m!r}")
        unit = m[:-1].lstrip(b":")
        units.append(unit if i == 0 or unit.startswith(b"*") else b":" + unit)
    return b";".join(units) + TERMINATOR


STATUS = compound(TEMPERATURE, SETPOINT, CONDITION)


@dataclass(frozen=True)
class Condition:
    """The operation condition register, bit by bit."""

    settling: bool = False
    ramping: bool = False
    running: bool = False
    stable: bool = False

    @classmethod
    def from_register(cls, value: int) -> Condition:
        return cls(
            settling=bool(value & OPER_SETTLING),
            ramping=bool(value & OPER_SWEEPING),
            running=bool(value & OPER_RUNNING),
            stable=bool(value & OPER_STABLE),
        )

    @property
    def register(self) -> int:
        return (
            OPER_SETTLING * self.settling
            + OPER_SWEEPING * self.ramping
            + OPER_RUNNING * self.running
            + OPER_STABLE * self.stable
        )


@dataclass(frozen=True)
class ChamberStatus:
    """One poll: air temperature, setpoint (deg C) and the condition register."""

    temperature_c: float
    setpoint_c: float
    condition: Condition


# -- encoders ------------------------------------------------------------------------
def _finite(field: str, value: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: must be a number, got {value!r}") from exc
    if not math.isfinite(x):
        raise ValueError(f"{field}: must be finite, got {value!r}")
    return x


def encode_setpoint(celsius: float) -> bytes:
    """``SOUR:TEMP <c>``. The range is the chamber's to judge (it queues -222)."""
    return scpi.encode("SOUR:TEMP", _finite("celsius", celsius))


def encode_ramp(kelvin_per_min: float) -> bytes:
    x = _finite("kelvin_per_min", kelvin_per_min)
    if x <= 0:
        raise ValueError(f"kelvin_per_min: ramp rate must be > 0, got {kelvin_per_min!r}")
    return scpi.encode("SOUR:TEMP:RAMP", x)


def encode_tolerance(kelvin: float) -> bytes:
    x = _finite("kelvin", kelvin)
    if x <= 0:
        raise ValueError(f"kelvin: tolerance band must be > 0, got {kelvin!r}")
    return scpi.encode("SOUR:TEMP:TOL", x)


def encode_dwell(seconds: float) -> bytes:
    x = _finite("seconds", seconds)
    if x < 0:
        raise ValueError(f"seconds: dwell time must be >= 0, got {seconds!r}")
    return scpi.encode("SOUR:TEMP:DWEL", x)


def encode_output(on: bool) -> bytes:
    if not isinstance(on, bool):
        raise ValueError(f"on: must be a bool, got {on!r}")
    return scpi.encode("OUTP", on)


# -- decoders ------------------------------------------------------------------------
def decode_temperature(raw: bytes) -> float:
    """A temperature reply (``MEAS:TEMP?``, ``SOUR:TEMP?``) in deg C."""
    value = scpi.decode_float(raw)
    if not -273.15 <= value <= 2000.0:
        raise ProtocolError(f"{value:g} is not a chamber temperature in deg C", raw=raw)
    return value


def decode_positive(raw: bytes) -> float:
    """A ramp rate, tolerance or dwell reply (>= 0)."""
    value = scpi.decode_float(raw)
    if value < 0:
        raise ProtocolError(f"expected a value >= 0, got {value:g}", raw=raw)
    return value


def decode_output(raw: bytes) -> bool:
    return scpi.decode_bool(raw)


def decode_condition(raw: bytes) -> Condition:
    body = raw[: -len(TERMINATOR)] if raw.endswith(TERMINATOR) else raw
    if len(body.strip()) > _MAX_INT_DIGITS:  # the shared decode_int would int() any length
        raise ProtocolError("condition register reply is implausibly long", raw=raw)
    value = scpi.decode_int(raw)
    if not 0 <= value <= _OPER_MAX:
        raise ProtocolError(f"condition register {value} outside 0..{_OPER_MAX}", raw=raw)
    return Condition.from_register(value)


def decode_status(raw: bytes) -> ChamberStatus:
    """The reply to :data:`STATUS`: ``<temp>;<setpoint>;<condition>``."""
    if not raw.endswith(TERMINATOR):
        raise ProtocolError("response is not terminated by LF", raw=raw)
    parts = raw[: -len(TERMINATOR)].split(b";")
    if len(parts) != 3:
        raise ProtocolError(f"expected 3 ';'-separated responses, got {len(parts)}", raw=raw)
    try:
        temperature = decode_temperature(parts[0] + TERMINATOR)
        setpoint = decode_temperature(parts[1] + TERMINATOR)
        condition = decode_condition(parts[2] + TERMINATOR)
    except InstrumentError as exc:
        raise ProtocolError(f"status reply: {exc.message}", raw=raw) from exc
    return ChamberStatus(temperature, setpoint, condition)


def decode_error(raw: bytes) -> scpi.ScpiError:
    """``SYST:ERR?`` -> code and message; guards the shared decoder against huge codes."""
    body = raw[: -len(TERMINATOR)] if raw.endswith(TERMINATOR) else raw
    code = body.split(b",", 1)[0].strip()
    if len(code) > _MAX_INT_DIGITS:
        raise ProtocolError('SYST:ERR? must answer <code>,"<message>"', raw=raw)
    return scpi.decode_error(raw)


def error_for(err: scpi.ScpiError, command: bytes, raw: bytes) -> CommandRejectedError:
    """The exception for a queued SCPI error: busy (-213) or a plain rejection."""
    cls = InstrumentBusyError if err.code == BUSY_CODE else CommandRejectedError
    return cls(f"SCPI error {err.code}: {err.message}", command=command, raw=raw)


def raise_for_error(err: scpi.ScpiError, command: bytes, raw: bytes) -> None:
    if not err.ok:
        raise error_for(err, command, raw)


# -- resynchronisation -----------------------------------------------------------------
def last_line(raw: bytes) -> bytes:
    """The final LF-terminated message of ``raw`` (stale replies before it dropped)."""
    if not raw.endswith(TERMINATOR):
        return raw
    return raw[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1] + TERMINATOR


SYNC_TOKENS = range(2, 256)  # *ESE masks; 0 and 1 are what *OPC?/*TST?/*ESR? answer


def sync_query(token: int, *, clear: bool) -> bytes:
    """``[*CLS;]*ESE <token>;*ESE?``: a resync whose answer no stale reply can carry.

    ``*ESE`` is an IEEE 488.2 mandatory register the driver does not otherwise use;
    writing a fresh token and reading it back marks the end of the line's backlog.
    An ``*IDN?`` answer cannot do that: a late one from an earlier resync is
    byte-identical to the fresh one.
    """
    if token not in SYNC_TOKENS:
        raise ValueError(f"token: must be in 2..255, got {token}")
    marker = compound(scpi.encode("*ESE", token), scpi.encode("*ESE?"))
    return compound(CLS, marker) if clear else marker


def sync_complete(token: int) -> Callable[[bytes], bool]:
    """Completeness test for :func:`sync_query`: read past stale replies to the token."""
    expected = str(token).encode("ascii") + TERMINATOR

    def complete(buf: bytes) -> bool:
        return buf.endswith(TERMINATOR) and last_line(buf) == expected

    return complete


# -- instrument side (formatting, used by property tests and docs) -----------------------
def format_number(value: float) -> bytes:
    """SCPI <NR3> as the chamber sends it: ``+4.00000E+01``."""
    return f"{value:+.5E}".encode("ascii")


def format_status(status: ChamberStatus) -> bytes:
    return (
        format_number(status.temperature_c)
        + b";"
        + format_number(status.setpoint_c)
        + b";"
        + str(status.condition.register).encode("ascii")
        + TERMINATOR
    )
