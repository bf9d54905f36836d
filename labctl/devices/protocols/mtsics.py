"""MT-SICS (Mettler Toledo Standard Interface Command Set), level 0/1 subset.

Commands end with CR LF; so do replies. A reply is ``ID Status [Value Unit]``, e.g.
``S S     12.3456 g``. Statuses: ``S`` stable, ``D`` dynamic (SI only), ``A``
executed, ``I`` not executable now (busy / no stability), ``L`` logical error
(bad parameter), ``+``/``-`` over/underload. Bare ``ES`` (syntax), ``ET``
(transmission) and ``EL`` (logical) are command-independent errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from labctl.devices.errors import CommandRejectedError, InstrumentBusyError, ProtocolError

TERMINATOR = b"\r\n"
COMMANDS = frozenset({"S", "SI", "Z", "T", "TA", "TAC", "I4", "@"})

_WEIGHT = re.compile(rb"^(S|T|TA) ([SDA]) +(-?\d+(?:\.\d+)?) ([A-Za-z]{1,3})$")
_STATUS = re.compile(rb"^(S|SI|Z|T|TA|TAC|I4) ([AIL+\-])$")
_I4 = re.compile(rb'^I4 A "([^"\r\n]*)"$')

_ERRORS = {
    b"ES": "syntax error: command not recognised",
    b"ET": "transmission error",
    b"EL": "logical error: command cannot be executed",
}
_STATUS_TEXT = {
    "I": "not executable at present (busy or no stable weight)",
    "L": "parameter rejected (logical error)",
    "+": "overload: weighing range exceeded",
    "-": "underload: pan missing or weight below zero range",
}


@dataclass(frozen=True)
class WeightReply:
    grams: float
    stable: bool


def encode(command: str, *args: str) -> bytes:
    """Encode a command; rejects anything that is not a known level-0/1 command."""
    if command not in COMMANDS:
        raise ValueError(f"command: unknown MT-SICS command {command!r}")
    for a in args:
        if any(c in a for c in "\r\n") or not a.isascii():
            raise ValueError(f"argument: must be printable ASCII without CR/LF, got {a!r}")
    return " ".join((command, *args)).encode("ascii") + TERMINATOR


def encode_tare_preset(grams: float) -> bytes:
    if not (math.isfinite(grams) and grams >= 0):
        raise ValueError(f"grams: tare preset must be finite and >= 0, got {grams!r}")
    return encode("TA", f"{grams:.5f}", "g")


def reply_complete(buf: bytes) -> bool:
    return buf.endswith(TERMINATOR)


_REPLY_ID = {
    "S": b"S",
    "SI": b"S",
    "Z": b"Z",
    "T": b"T",
    "TA": b"TA",
    "TAC": b"TAC",
    "I4": b"I4",
    "@": b"I4",
}
_WELL_FORMED = re.compile(rb"^(S|Z|T|TA|TAC|I4|SI) ")


def reply_complete_for(command: str) -> Callable[[bytes], bool]:
    """Completeness test that skips stale replies to *other* commands.

    MT-SICS replies carry the command's identifier, so a late answer to an earlier,
    timed-out command (``S S ...`` arriving while we wait for ``Z``) is recognised
    and read past. Errors and unparseable lines end the wait at once.
    """
    wanted = _REPLY_ID[command]

    def complete(buf: bytes) -> bool:
        if not buf.endswith(TERMINATOR):
            return False
        last = buf[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1]
        if last in _ERRORS or last.split(b" ", 1)[0] == wanted:
            return True
        return not _WELL_FORMED.match(last)  # garbage: stop and let decode report it

    return complete


def last_reply(raw: bytes) -> bytes:
    """The final CRLF-terminated line of ``raw`` (earlier stale replies dropped)."""
    if not raw.endswith(TERMINATOR):
        return raw
    body = raw[: -len(TERMINATOR)]
    return body.rsplit(TERMINATOR, 1)[-1] + TERMINATOR


def _line(raw: bytes) -> bytes:
    if not raw.endswith(TERMINATOR):
        raise ProtocolError("reply is not terminated by CR LF", raw=raw)
    line = raw[: -len(TERMINATOR)]
    if b"\r" in line or b"\n" in line:
        raise ProtocolError("reply holds more than one line", raw=raw)
    return line


def _check_errors(command: str, line: bytes, raw: bytes) -> None:
    if line in _ERRORS:
        raise CommandRejectedError(_ERRORS[line], command=command.encode(), raw=raw)
    m = _STATUS.match(line)
    if m:
        ident, status = m.group(1).decode(), m.group(2).decode()
        if ident != command and not (command == "SI" and ident == "S"):
            raise ProtocolError(f"reply to {ident!r} while waiting for {command!r}", raw=raw)
        if status == "A":
            return
        cls = InstrumentBusyError if status == "I" else CommandRejectedError
        raise cls(_STATUS_TEXT[status], command=command.encode(), raw=raw)


def decode_weight(command: str, raw: bytes) -> WeightReply:
    """Decode the reply to ``S``, ``SI``, ``T`` or ``TA`` into grams."""
    line = _line(raw)
    _check_errors(command, line, raw)
    m = _WEIGHT.match(line)
    if not m:
        raise ProtocolError(f"not a weight reply to {command!r}", raw=raw)
    ident, status, value, unit = (g.decode() for g in m.groups())
    expected = "S" if command in ("S", "SI") else command
    if ident != expected:
        raise ProtocolError(f"reply to {ident!r} while waiting for {command!r}", raw=raw)
    if unit != "g":
        raise ProtocolError(f"unit {unit!r}: set the balance to grams", raw=raw)
    grams = float(value)
    return WeightReply(grams=grams, stable=status in ("S", "A"))


def decode_ack(command: str, raw: bytes) -> None:
    """Decode a plain acknowledgement (``Z A``, ``TAC A``)."""
    line = _line(raw)
    _check_errors(command, line, raw)
    if line != f"{command} A".encode():
        raise ProtocolError(f"unexpected reply to {command!r}", raw=raw)


def decode_serial_number(raw: bytes) -> str:
    """Decode the reply to ``I4`` (and ``@``, which answers like ``I4``)."""
    line = _line(raw)
    _check_errors("I4", line, raw)
    m = _I4.match(line)
    if not m:
        raise ProtocolError("not an I4 serial-number reply", raw=raw)
    return m.group(1).decode("ascii", errors="replace")


def format_weight(ident: str, status: str, grams: float) -> bytes:
    """Encode a weight reply (the instrument side; used by property tests)."""
    return f"{ident} {status} {grams:>10.4f} g".encode() + TERMINATOR
