"""The small exception hierarchy of instrument I/O.

Every error names the instrument and the command, and carries the raw bytes the
instrument sent (``raw``), so a garbled or unexpected reply is never lost.
"""

from __future__ import annotations


class InstrumentError(Exception):
    """Base class: something went wrong talking to an instrument."""

    def __init__(
        self,
        message: str,
        *,
        instrument: str = "",
        command: bytes | None = None,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.instrument = instrument  # filled in by the device when a codec raised
        self.command = command
        self.raw = raw

    def __str__(self) -> str:
        parts = [f"{self.instrument}: " if self.instrument else "", self.message]
        if self.command is not None:
            parts.append(f" (command {self.command!r}")
            parts.append(f", reply {self.raw!r})" if self.raw is not None else ")")
        elif self.raw is not None:
            parts.append(f" (reply {self.raw!r})")
        return "".join(parts)


class ProtocolError(InstrumentError):
    """The reply does not parse: garbled bytes, wrong framing, unexpected fields."""


class DeviceTimeoutError(InstrumentError, TimeoutError):
    """No complete reply within the timeout (``raw`` holds any partial bytes)."""


class ConnectionLostError(InstrumentError, ConnectionError):
    """The port or socket went away (cable pulled, server closed)."""


class CommandRejectedError(InstrumentError):
    """The instrument understood the frame but refused the command (syntax, range, state)."""


class InstrumentBusyError(CommandRejectedError):
    """The instrument is busy or overloaded and cannot execute the command now."""


class LimitError(CommandRejectedError):
    """A requested value is outside what the instrument can do (checked before sending)."""
