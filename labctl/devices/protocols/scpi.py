"""SCPI / IEEE 488.2 message helpers shared by SCPI instruments.

Program messages end with LF; response messages end with LF. Setters have no
reply: the driver confirms them with ``*OPC?`` or reads the error queue with
``SYST:ERR?`` (``-113,"Undefined header"``; ``0,"No error"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from labctl.devices.errors import CommandRejectedError, ProtocolError

TERMINATOR = b"\n"
_HEADER = re.compile(r"^\*?[A-Za-z][A-Za-z0-9]*(:[A-Za-z][A-Za-z0-9]*)*\??$")
_NUMBER = re.compile(rb"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_ERROR = re.compile(rb'^([+-]?\d{1,9}),"([^"]*)"$')


@dataclass(frozen=True)
class Identity:
    manufacturer: str
    model: str
    serial: str
    firmware: str


@dataclass(frozen=True)
class ScpiError:
    code: int
    message: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def _arg(value: object) -> str:
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"argument: SCPI numbers must be finite, got {value!r}")
        return f"{value:.6g}"
    text = str(value)
    if any(c in text for c in "\r\n;") or not text.isascii():
        raise ValueError(f"argument: must be ASCII without CR, LF or ';', got {text!r}")
    return text


def encode(header: str, *args: object) -> bytes:
    """``encode("SOUR:TEMP", 25.0)`` -> ``b"SOUR:TEMP 25\\n"``."""
    if not _HEADER.fullmatch(header):
        raise ValueError(f"header: not a SCPI header: {header!r}")
    body = header + (" " + ",".join(_arg(a) for a in args) if args else "")
    return body.encode("ascii") + TERMINATOR


def reply_complete(buf: bytes) -> bool:
    return buf.endswith(TERMINATOR)


def _text(raw: bytes) -> bytes:
    if not raw.endswith(TERMINATOR):
        raise ProtocolError("response is not terminated by LF", raw=raw)
    body = raw[: -len(TERMINATOR)].rstrip(b"\r")
    if b"\n" in body:
        raise ProtocolError("response holds more than one message", raw=raw)
    return body


def decode_float(raw: bytes) -> float:
    body = _text(raw).strip()
    if not _NUMBER.match(body):
        raise ProtocolError("expected a number", raw=raw)
    value = float(body)
    if abs(value) >= 9.9e37:  # SCPI's NaN / overflow marker
        raise ProtocolError("instrument returned the SCPI 'not a number' marker", raw=raw)
    return value


def decode_floats(raw: bytes, count: int | None = None) -> list[float]:
    body = _text(raw).strip()
    parts = body.split(b",") if body else []
    if count is not None and len(parts) != count:
        raise ProtocolError(f"expected {count} comma-separated numbers, got {len(parts)}", raw=raw)
    out = []
    for p in parts:
        if not _NUMBER.match(p.strip()):
            raise ProtocolError(f"expected a number, got {p!r}", raw=raw)
        out.append(float(p))
    return out


def decode_int(raw: bytes) -> int:
    body = _text(raw).strip()
    if not re.fullmatch(rb"[+-]?\d{1,18}", body):
        raise ProtocolError("expected an integer (at most 18 digits)", raw=raw)
    return int(body)


def decode_bool(raw: bytes) -> bool:
    body = _text(raw).strip().upper()
    if body in (b"1", b"ON"):
        return True
    if body in (b"0", b"OFF"):
        return False
    raise ProtocolError("expected a boolean (0/1/ON/OFF)", raw=raw)


def decode_string(raw: bytes) -> str:
    body = _text(raw)
    if len(body) >= 2 and body[:1] == body[-1:] == b'"':
        body = body[1:-1]
    try:
        return body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("response is not ASCII", raw=raw) from exc


def decode_identity(raw: bytes) -> Identity:
    """``*IDN?`` -> manufacturer, model, serial, firmware."""
    parts = decode_string(raw).split(",")
    if len(parts) != 4 or not all(p.strip() for p in parts[:2]):
        raise ProtocolError("*IDN? must answer 'maker,model,serial,firmware'", raw=raw)
    return Identity(*(p.strip() for p in parts))


def decode_error(raw: bytes) -> ScpiError:
    """``SYST:ERR?`` -> code and message (code 0 = no error)."""
    m = _ERROR.fullmatch(_text(raw).strip())
    if not m:
        raise ProtocolError('SYST:ERR? must answer <code>,"<message>"', raw=raw)
    return ScpiError(int(m.group(1)), m.group(2).decode("ascii", errors="replace"))


def raise_for_error(err: ScpiError, command: bytes, raw: bytes) -> None:
    if not err.ok:
        raise CommandRejectedError(
            f"SCPI error {err.code}: {err.message}", command=command, raw=raw
        )
