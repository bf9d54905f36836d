"""Serving a simulator at the wire: TCP sockets and pseudo-terminals.

A :class:`Simulator` turns one request frame (bytes, terminator stripped) into a
reply (bytes, terminator included) or ``None``. :func:`serve_tcp` and
:func:`serve_pty` put it behind what ``serial.serial_for_url`` opens:
``socket://127.0.0.1:PORT`` or a pty path. Framing, reply latency and fault
injection live here, once, for every instrument.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import termios
import tty
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from hardware_mocks.clock import SimClock
from hardware_mocks.faults import Fault, FaultInjector
from hardware_mocks.world import LabWorld

log = logging.getLogger(__name__)

MAX_FRAME = 4096  # a request longer than this without a terminator is line noise


class Simulator(abc.ABC):
    """One instrument's behaviour at the protocol level.

    Subclasses set :attr:`kind`, :attr:`protocol`, :attr:`reply_terminator`, and
    implement :meth:`handle` (and :meth:`busy_reply`). Requests are split on CR
    and/or LF (CRLF counts once); instruments with other framing override
    :meth:`split_frames`.
    """

    kind: ClassVar[str]
    protocol: ClassVar[str]
    reply_terminator: ClassVar[bytes] = b"\r\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
    ) -> None:
        self.name = name
        self.world = world
        self.clock: SimClock = world.clock
        self.faults = FaultInjector(seed)
        self.latency_s = latency_s  # wall seconds the firmware takes to answer
        self.requests = 0
        self._lock = asyncio.Lock()

    @abc.abstractmethod
    async def handle(self, request: bytes) -> bytes | None:
        """Reply to one request frame (without its terminator)."""

    def busy_reply(self, request: bytes) -> bytes | None:
        """What the instrument answers while busy/overloaded (protocol-specific)."""
        return None

    def split_frames(self, buffer: bytearray) -> list[bytes]:
        """Remove complete request frames from ``buffer`` and return them."""
        frames: list[bytes] = []
        while True:
            idx = next((i for i, b in enumerate(buffer) if b in (0x0D, 0x0A)), -1)
            if idx < 0:
                if len(buffer) > MAX_FRAME:
                    buffer.clear()
                return frames
            frame = bytes(buffer[:idx])
            end = idx + 1
            if buffer[idx] == 0x0D and end < len(buffer) and buffer[end] == 0x0A:
                end += 1
            del buffer[:end]
            if frame:
                frames.append(frame)

    async def respond(self, request: bytes) -> tuple[bytes | None, bool]:
        """Apply faults around :meth:`handle`: (reply, drop_connection)."""
        async with self._lock:
            self.requests += 1
            armed = self.faults.next()
            if armed is not None and armed.fault is Fault.DROP:
                return None, True
            if armed is not None and armed.fault is Fault.NO_REPLY:
                return None, False
            if armed is not None and armed.fault is Fault.BUSY:
                return self.busy_reply(request), False
            try:
                reply = await self.handle(request)
            except Exception:  # a simulator bug must not kill the server; log it loudly
                log.exception("%s: simulator failed on %r", self.name, request)
                reply = None
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if armed is not None and armed.fault is Fault.GARBAGE:
                return self.faults.garbage(self.reply_terminator), False
            if armed is not None and armed.fault is Fault.LATE_REPLY:
                await asyncio.sleep(armed.delay_s)
            return reply, False

    async def close(self) -> None:  # noqa: B027 - optional hook, most simulators need nothing
        """Release background tasks; called when the lab stops."""


@dataclass
class Endpoint:
    """One listening instrument: what a client opens and how to stop it."""

    simulator: Simulator
    url: str
    transport: str
    _close: Callable[[], Awaitable[None]]

    async def close(self) -> None:
        await self._close()


async def _session(
    sim: Simulator,
    read: Callable[[], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
) -> bool:
    """Serve one connection until EOF; returns True when a DROP fault ended it."""
    buffer = bytearray()
    while True:
        chunk = await read()
        if not chunk:
            return False
        buffer.extend(chunk)
        try:
            frames = sim.split_frames(buffer)
        except Exception:  # a framing bug must not end the connection for good
            log.exception("%s: cannot frame %r", sim.name, bytes(buffer[:64]))
            buffer.clear()
            continue
        for frame in frames:
            try:
                reply, drop = await sim.respond(frame)
            except Exception:  # e.g. a bad option value: log, answer nothing, keep serving
                log.exception("%s: failed on %r", sim.name, frame)
                continue
            if drop:
                return True
            if reply:
                await write(reply)


async def serve_tcp(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> Endpoint:
    """Listen on TCP; the URL is ``socket://HOST:PORT``."""

    clients: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        clients.add(task)

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            await _session(sim, lambda: reader.read(4096), write)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            clients.discard(task)
            writer.close()

    server = await asyncio.start_server(on_client, host, port)
    bound = server.sockets[0].getsockname()

    async def close() -> None:
        server.close()
        for task in list(clients):
            task.cancel()
        if clients:
            await asyncio.wait(list(clients), timeout=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        await sim.close()

    return Endpoint(sim, f"socket://{bound[0]}:{bound[1]}", "tcp", close)


class _Pty:
    """A pseudo-terminal reachable through a stable symlink.

    A DROP fault hangs the current pty up (the client's reads fail, as with an
    unplugged USB adapter) and re-points the symlink at a fresh pty, so that a
    client that reopens the same path gets the instrument back.
    """

    def __init__(self, sim: Simulator, link: str) -> None:
        self.sim = sim
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.master = -1
        self.slave = -1
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def open(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave, termios.TCSANOW)
        os.set_blocking(self.master, False)
        tmp = self.link + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.ttyname(self.slave), tmp)
        os.replace(tmp, self.link)
        self.queue = asyncio.Queue()
        self.loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.queue.put_nowait(data)
        if not data:
            self.loop.remove_reader(self.master)

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                await asyncio.sleep(0.001)

    def _hang_up(self, master: int | None = None, slave: int | None = None) -> None:
        master = self.master if master is None else master
        slave = self.slave if slave is None else slave
        with contextlib.suppress(Exception):
            self.loop.remove_reader(master)
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def run(self) -> None:
        while not self.closed:
            dropped = await _session(self.sim, self.queue.get, self._write)
            if self.closed:
                return
            if dropped:
                # Re-point the link at a fresh pty first, then hang up the old one, so
                # a client reopening the path at once never finds a dead link.
                old = (self.master, self.slave)
                self.open()
                self._hang_up(*old)

    async def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(b"")
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self._hang_up()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.link)
        await self.sim.close()


async def serve_pty(sim: Simulator, directory: str | None = None) -> Endpoint:
    """Serve on a pseudo-terminal; the URL is a stable symlink to the pty's path.

    Without ``directory`` a private temporary directory holds the link and is
    removed on close; a given directory is left in place (its owner removes it).
    """
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="labctl-pty-")
    pty = _Pty(sim, os.path.join(directory, sim.name))
    pty.open()
    pty.task = asyncio.create_task(pty.run(), name=f"pty:{sim.name}")

    async def close() -> None:
        await pty.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)

    return Endpoint(sim, pty.link, "pty", close)
