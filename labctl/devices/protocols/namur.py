"""NAMUR commands of IKA hotplate stirrers (RCT digital, C-MAG HS 7, RET control-visc).

Serial settings: 9600 baud, 7 data bits, even parity, 1 stop bit. Commands are ASCII
and end with CR LF; so do replies. The subset used here:

=================  ======================================  ==================
command            meaning                                 reply
=================  ======================================  ==================
``IN_NAME``        device name                             ``RCT digital``
``IN_PV_1``        medium temperature (external PT 1000)   ``25.3 1``
``IN_PV_2``        hotplate temperature                    ``80.1 2``
``IN_PV_3``        safety-circuit temperature              ``80.4 3``
``IN_PV_4``        actual stirring speed, rpm              ``299.0 4``
``IN_SP_1``        temperature setpoint                    ``80.0 1``
``IN_SP_3``        safety temperature limit                ``350.0 3``
``IN_SP_4``        speed setpoint, rpm                     ``300.0 4``
``OUT_SP_1 <t>``   set the temperature setpoint            none
``OUT_SP_4 <n>``   set the speed setpoint                  none
``START_1/STOP_1`` heater on/off                           none
``START_4/STOP_4`` motor on/off                            none
``RESET``          switch every function off               none
=================  ======================================  ==================

A value reply is ``<value> <channel>`` (one space, the channel digit of the
command). NAMUR has **no acknowledgement and no error reply**: setters and
START/STOP answer nothing, an out-of-range setpoint is silently ignored, and an
unknown command is ignored too. A driver therefore confirms every setter by reading
the setpoint back. Newer IKA firmware also accepts ``OUT_SP_4@300``; this codec
sends the space form that the RCT digital documents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from labctl.devices.errors import ProtocolError

TERMINATOR = b"\r\n"

# NAMUR channel numbers as IKA hotplates use them.
MEDIUM_TEMPERATURE = 1  # external PT 1000 probe in the medium
PLATE_TEMPERATURE = 2  # hotplate sensor
SAFETY_TEMPERATURE = 3  # independent safety circuit
SPEED = 4  # stirring motor, rpm

READ_CHANNELS = frozenset({MEDIUM_TEMPERATURE, PLATE_TEMPERATURE, SAFETY_TEMPERATURE, SPEED})
SETPOINT_CHANNELS = frozenset({MEDIUM_TEMPERATURE, SPEED})
READ_SETPOINT_CHANNELS = frozenset({MEDIUM_TEMPERATURE, SAFETY_TEMPERATURE, SPEED})
FUNCTIONS = frozenset({MEDIUM_TEMPERATURE, SPEED})  # START_x / STOP_x: heater, motor

_VALUE = re.compile(rb"^(-?\d+(?:\.\d+)?) (\d{1,2})$")
_NAME = re.compile(rb"^[\x20-\x7e]{1,40}$")


def _check_channel(channel: int, allowed: frozenset[int], what: str) -> None:
    if isinstance(channel, bool) or not isinstance(channel, int) or channel not in allowed:
        raise ValueError(f"channel: {what} takes one of {sorted(allowed)}, got {channel!r}")


def _number(value: float) -> str:
    """A setpoint as IKA firmware parses it: an integer, or one decimal."""
    rounded = round(float(value), 1)
    return str(int(rounded)) if rounded.is_integer() else f"{rounded:.1f}"


def encode_read_value(channel: int) -> bytes:
    """``IN_PV_<channel>``: read the actual value of a channel."""
    _check_channel(channel, READ_CHANNELS, "IN_PV")
    return f"IN_PV_{channel}".encode() + TERMINATOR


def encode_read_setpoint(channel: int) -> bytes:
    """``IN_SP_<channel>``: read the setpoint of a channel."""
    _check_channel(channel, READ_SETPOINT_CHANNELS, "IN_SP")
    return f"IN_SP_{channel}".encode() + TERMINATOR


def encode_setpoint(channel: int, value: float) -> bytes:
    """``OUT_SP_<channel> <value>``: set a setpoint (no reply; read it back to confirm)."""
    _check_channel(channel, SETPOINT_CHANNELS, "OUT_SP")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"value: setpoint must be a number, got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value < 10000.0:
        raise ValueError(f"value: setpoint must be finite and in [0, 10000), got {value!r}")
    return f"OUT_SP_{channel} {_number(value)}".encode() + TERMINATOR


def encode_start(function: int) -> bytes:
    """``START_<function>``: switch the heater (1) or the motor (4) on."""
    _check_channel(function, FUNCTIONS, "START")
    return f"START_{function}".encode() + TERMINATOR


def encode_stop(function: int) -> bytes:
    """``STOP_<function>``: switch the heater (1) or the motor (4) off."""
    _check_channel(function, FUNCTIONS, "STOP")
    return f"STOP_{function}".encode() + TERMINATOR


def encode_name() -> bytes:
    return b"IN_NAME" + TERMINATOR


def encode_reset() -> bytes:
    return b"RESET" + TERMINATOR


def reply_complete(buf: bytes) -> bool:
    return buf.endswith(TERMINATOR)


def reply_complete_for(channel: int) -> Callable[[bytes], bool]:
    """Completeness test that reads past stale value replies for *other* channels.

    A reply names its channel, so a late answer to an earlier, timed-out ``IN_PV_4``
    arriving while we wait for ``IN_PV_2`` is skipped. Anything that is not a value
    reply ends the wait at once (decode reports it). A stale reply for the *same*
    channel cannot be told apart: NAMUR has no sequence numbers.
    """
    wanted = str(channel).encode()

    def complete(buf: bytes) -> bool:
        if not buf.endswith(TERMINATOR):
            return False
        last = buf[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1]
        m = _VALUE.match(last)
        return m is None or m.group(2) == wanted

    return complete


def last_reply(raw: bytes) -> bytes:
    """The final CR LF-terminated line of ``raw`` (earlier stale replies dropped)."""
    if not raw.endswith(TERMINATOR):
        return raw
    return raw[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1] + TERMINATOR


def _line(raw: bytes) -> bytes:
    if not raw.endswith(TERMINATOR):
        raise ProtocolError("reply is not terminated by CR LF", raw=raw)
    line = raw[: -len(TERMINATOR)]
    if b"\r" in line or b"\n" in line:
        raise ProtocolError("reply holds more than one line", raw=raw)
    return line


def decode_value(raw: bytes, channel: int) -> float:
    """Decode ``<value> <channel>`` and check that it answers ``channel``."""
    line = _line(raw)
    m = _VALUE.match(line)
    if not m:
        raise ProtocolError(f"not a NAMUR value reply for channel {channel}", raw=raw)
    got = int(m.group(2))
    if got != channel:
        raise ProtocolError(f"reply for channel {got} while waiting for channel {channel}", raw=raw)
    return float(m.group(1))


def decode_name(raw: bytes) -> str:
    """Decode the reply to ``IN_NAME`` (printable ASCII, e.g. ``RCT digital``)."""
    line = _line(raw).strip()
    if not _NAME.match(line):
        raise ProtocolError("not a device name (printable ASCII, 1..40 characters)", raw=raw)
    if _VALUE.match(line):
        raise ProtocolError("a value reply where the device name was expected", raw=raw)
    return line.decode("ascii")


def format_value(value: float, channel: int) -> bytes:
    """Encode a value reply (the instrument side; used by property tests)."""
    return f"{value:.1f} {channel}".encode() + TERMINATOR
