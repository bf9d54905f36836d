"""SerialTransport edge cases against raw socket peers (no simulator, no codec)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from labctl.devices.errors import ConnectionLostError, DeviceTimeoutError, ProtocolError
from labctl.devices.transport import MAX_REPLY_BYTES, SerialTransport


@pytest.fixture
def streaming_peer() -> Iterator[str]:
    """A peer that answers every connection with an endless stream of lines."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    while not stop.is_set():
                        conn.sendall(b"S D      1.0000 g\r\n" * 50)
                        time.sleep(0.001)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"socket://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(2)
    srv.close()


async def test_endless_stream_ends_in_an_error_not_a_hang(streaming_peer: str) -> None:
    tr = SerialTransport(streaming_peer, name="streamer", timeout=0.5)
    await tr.open()
    t0 = time.monotonic()
    with pytest.raises((DeviceTimeoutError, ProtocolError)) as info:
        await tr.query(b"Z\r\n", lambda buf: buf.endswith(b"Z A\r\n"))
    assert time.monotonic() - t0 < 3.0
    assert info.value.raw  # the tail of what streamed in is kept
    assert len(info.value.raw) <= 256  # type: ignore[arg-type]
    await tr.close()


async def test_oversized_reply_is_a_protocol_error(streaming_peer: str) -> None:
    tr = SerialTransport(streaming_peer, name="streamer", timeout=30.0)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_REPLY_BYTES} bytes"):
        await tr.query(b"Z\r\n", lambda buf: False)
    assert time.monotonic() - t0 < 10.0  # long before the 30 s timeout
    await tr.close()


async def test_unreachable_port_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        tr = SerialTransport(f"socket://127.0.0.1:{port}", name="nobody")
        with pytest.raises(ConnectionLostError, match="nobody: cannot open"):
            await tr.open()


async def test_cancelled_query_keeps_the_line_locked_until_the_thread_is_done(
    streaming_peer: str,
) -> None:
    tr = SerialTransport(streaming_peer, name="streamer", timeout=0.4)
    task = asyncio.ensure_future(tr.query(b"Z\r\n", lambda buf: False))
    await asyncio.sleep(0.05)
    task.cancel()
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker thread ran to its own timeout before the lock was released.
    assert time.monotonic() - t0 > 0.2
    assert not tr._lock.locked()
    await tr.close()
