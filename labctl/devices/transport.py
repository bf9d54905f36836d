"""Byte transport to an instrument: anything ``serial.serial_for_url`` opens.

Real RS-232/USB ports (``/dev/ttyUSB0``), pseudo-terminals, and raw TCP
(``socket://host:port``, e.g. a serial device server or a simulator) all go through
one class. Blocking pyserial calls run in a worker thread; one lock per transport
keeps request/reply pairs from interleaving. The transport knows nothing of any
protocol: the codec tells it when a reply is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import types
from collections.abc import Callable
from typing import Any

import serial

from labctl.devices.errors import ConnectionLostError, DeviceTimeoutError, ProtocolError

ReplyComplete = Callable[[bytes], bool]
MAX_REPLY_BYTES = 64 * 1024

try:  # POSIX: a hung-up pty makes pyserial's flush raise termios.error (EIO)
    import termios

    _PORT_ERRORS: tuple[type[BaseException], ...] = (
        serial.SerialException,
        OSError,
        termios.error,
    )
except ImportError:  # pragma: no cover - Windows
    _PORT_ERRORS = (serial.SerialException, OSError)


def _fast_close(port: Any) -> None:
    """Close a ``socket://`` port without pyserial's 0.3 s courtesy sleep.

    pyserial sleeps in ``close()`` "in case of quick reconnects"; when the garbage
    collector finalises a forgotten port that sleep lands in whatever thread runs it
    (often the event loop's), so we close the socket ourselves.
    """
    sock = getattr(port, "_socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        port._socket = None
    port.is_open = False


def ends_with(terminator: bytes) -> ReplyComplete:
    """A completeness test for replies that end with ``terminator``."""
    return lambda buf: buf.endswith(terminator)


class SerialTransport:
    """Request/reply over a serial URL, with timeouts and automatic reopen."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "",
        baudrate: int = 9600,
        timeout: float = 2.0,
        serial_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.name = name or url
        self.baudrate = baudrate
        self.timeout = timeout
        self.serial_kwargs = serial_kwargs or {}
        self._port: Any = None
        self._lock = asyncio.Lock()
        self._dirty = False  # a reply may still be in flight from a timed-out command
        self.stats = {"requests": 0, "timeouts": 0, "reconnects": 0}

    # -- lifecycle ------------------------------------------------------------------
    def _open_blocking(self) -> None:
        try:
            port = serial.serial_for_url(
                self.url, baudrate=self.baudrate, timeout=0.05, **self.serial_kwargs
            )
            if self.url.startswith("socket://"):
                port.close = types.MethodType(_fast_close, port)
            self._port = port
        except (serial.SerialException, OSError, ValueError) as exc:
            self._port = None
            raise ConnectionLostError(
                f"cannot open {self.url}: {exc}", instrument=self.name
            ) from exc

    async def open(self) -> None:
        async with self._lock:
            if self._port is None:
                await asyncio.to_thread(self._open_blocking)

    async def close(self) -> None:
        async with self._lock:
            port, self._port = self._port, None
            if port is not None:
                await asyncio.to_thread(port.close)

    @property
    def is_open(self) -> bool:
        return self._port is not None

    # -- I/O ------------------------------------------------------------------------
    def _exchange_blocking(
        self, payload: bytes, complete: ReplyComplete | None, timeout: float
    ) -> bytes:
        if self._port is None:
            self._open_blocking()
            self.stats["reconnects"] += 1
        port = self._port
        try:
            if self._dirty:
                self._drain(port, quiet_s=0.1, limit_s=timeout)
            port.reset_input_buffer()  # a late reply to an earlier command must not answer this one
            port.write(payload)
            port.flush()
            self._dirty = False
            if complete is None:
                return b""
            buf = bytearray()
            deadline = time.monotonic() + timeout
            while True:
                waiting = port.in_waiting
                chunk = port.read(waiting or 1)
                if chunk:
                    buf.extend(chunk)
                    if complete(bytes(buf)):
                        return bytes(buf)
                    if len(buf) > MAX_REPLY_BYTES:
                        # An instrument streaming without end (e.g. a balance left in
                        # continuous mode) must not grow this buffer forever.
                        self._dirty = True
                        raise ProtocolError(
                            f"reply exceeds {MAX_REPLY_BYTES} bytes without completing",
                            instrument=self.name,
                            command=payload,
                            raw=bytes(buf[-256:]),
                        )
                # Checked after every chunk, so a steady stream of bytes that never
                # completes a reply still times out.
                if time.monotonic() >= deadline:
                    self.stats["timeouts"] += 1
                    self._dirty = True
                    raise DeviceTimeoutError(
                        f"no complete reply within {timeout:g} s",
                        instrument=self.name,
                        command=payload,
                        raw=bytes(buf[-256:]),
                    )
        except (DeviceTimeoutError, ProtocolError):
            raise  # (a TimeoutError is an OSError, but not a lost connection)
        except _PORT_ERRORS as exc:
            # The port is gone (pty hung up, socket closed): drop it; the next call reopens.
            self._port = None
            with contextlib.suppress(Exception):  # already broken: closing is best effort
                port.close()
            raise ConnectionLostError(
                f"connection lost: {exc}", instrument=self.name, command=payload
            ) from exc

    @staticmethod
    def _drain(port: Any, quiet_s: float, limit_s: float) -> None:
        """Discard input until the line has been quiet for ``quiet_s``."""
        end = time.monotonic() + limit_s
        quiet_since = time.monotonic()
        while time.monotonic() < end and time.monotonic() - quiet_since < quiet_s:
            if port.read(port.in_waiting or 1):
                quiet_since = time.monotonic()

    async def query(
        self, payload: bytes, complete: ReplyComplete, *, timeout: float | None = None
    ) -> bytes:
        """Send ``payload`` and return the reply once ``complete(reply)`` is true."""
        async with self._lock:
            self.stats["requests"] += 1
            return await self._in_thread(payload, complete, timeout or self.timeout)

    async def _in_thread(
        self, payload: bytes, complete: ReplyComplete | None, timeout: float
    ) -> bytes:
        """Run one exchange in a worker thread, holding the lock until the thread is done.

        A worker thread cannot be interrupted: if the awaiting task is cancelled, the
        line stays locked until the exchange finishes, so no second exchange can
        interleave with it on the same port.
        """
        job = asyncio.ensure_future(
            asyncio.to_thread(self._exchange_blocking, payload, complete, timeout)
        )
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait({job})
            if not job.cancelled():
                job.exception()  # retrieved: the caller was cancelled, not failed
            raise

    async def write(self, payload: bytes) -> None:
        """Send a command that has no reply (e.g. NAMUR and SCPI setters)."""
        async with self._lock:
            self.stats["requests"] += 1
            await self._in_thread(payload, None, self.timeout)
