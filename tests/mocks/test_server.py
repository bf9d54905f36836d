"""Framing, faults and transports shared by every simulator."""

from __future__ import annotations

import asyncio
import os

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from hardware_mocks.clock import SimClock
from hardware_mocks.faults import Fault, FaultInjector
from hardware_mocks.server import Simulator, serve_pty, serve_tcp
from hardware_mocks.world import LabWorld


class Echo(Simulator):
    kind = "echo"
    protocol = "echo"

    async def handle(self, request: bytes) -> bytes | None:
        return b"<" + request + b">\r\n"

    def busy_reply(self, request: bytes) -> bytes | None:
        return b"BUSY\r\n"


def _world() -> LabWorld:
    return LabWorld(SimClock(10.0), lambda f, m, t: 1.0, rack_slots=2)


frames = st.lists(
    st.binary(min_size=1, max_size=20)
    .map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    .filter(bool),
    max_size=10,
)


@given(frames, st.sampled_from([b"\r", b"\n", b"\r\n"]), st.lists(st.integers(1, 7), max_size=50))
def test_split_frames_is_independent_of_chunking(
    messages: list[bytes], term: bytes, cuts: list[int]
) -> None:
    sim = Echo("echo", _world())
    wire = b"".join(m + term for m in messages)
    buffer = bytearray()
    out: list[bytes] = []
    pos = 0
    for n in [*cuts, len(wire)]:
        buffer.extend(wire[pos : pos + n])
        pos += n
        out.extend(sim.split_frames(buffer))
    assert out == messages


def test_overlong_garbage_is_discarded() -> None:
    sim = Echo("echo", _world())
    buf = bytearray(b"x" * 5000)
    assert sim.split_frames(buf) == []
    assert len(buf) == 0


def test_fault_injector_counts_and_clears() -> None:
    f = FaultInjector(seed=1)
    f.inject("garbage", count=2)
    assert f.next() is not None and f.next() is not None and f.next() is None
    f.inject(Fault.BUSY, count=None)
    assert all(f.next() is not None for _ in range(10))
    f.clear()
    assert f.next() is None
    assert f.fired[Fault.BUSY] == 10
    with pytest.raises(ValueError, match="count"):
        f.inject("busy", count=0)
    with pytest.raises(ValueError, match="'melt'"):
        f.inject("melt")
    g = f.garbage(b"\r\n")
    assert g.endswith(b"\r\n") and b"\r" not in g[:-2] and b"\n" not in g[:-2]


async def test_tcp_serves_several_clients_and_busy_fault() -> None:
    sim = Echo("echo", _world())
    ep = await serve_tcp(sim)
    try:
        host, port = ep.url.removeprefix("socket://").split(":")
        streams = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        for i, (r, w) in enumerate(streams):
            w.write(b"hi%d\r\n" % i)
            await w.drain()
            assert await asyncio.wait_for(r.readline(), 2) == b"<hi%d>\r\n" % i
        sim.faults.inject("busy")
        r, w = streams[0]
        w.write(b"x\n")
        assert await asyncio.wait_for(r.readline(), 2) == b"BUSY\r\n"
        for _, w in streams:
            w.close()
    finally:
        await ep.close()


async def test_pty_drop_hangs_up_and_the_same_path_reopens() -> None:
    sim = Echo("echo", _world())
    ep = await serve_pty(sim)
    try:
        assert os.path.islink(ep.url)
        first_target = os.path.realpath(ep.url)
        port = serial.serial_for_url(ep.url, timeout=1)
        port.write(b"a\r")
        assert await asyncio.to_thread(port.read_until, b"\r\n") == b"<a>\r\n"
        sim.faults.inject("drop")
        port.write(b"b\r")
        with pytest.raises(serial.SerialException):
            await asyncio.to_thread(port.read, 1)  # hung up, like an unplugged adapter
        port.close()
        await asyncio.sleep(0.05)
        assert os.path.realpath(ep.url) != first_target
        port = serial.serial_for_url(ep.url, timeout=1)
        port.write(b"c\r")
        assert await asyncio.to_thread(port.read_until, b"\r\n") == b"<c>\r\n"
        port.close()
    finally:
        await ep.close()
    assert not os.path.exists(ep.url)


async def test_a_simulator_that_raises_keeps_serving() -> None:
    class Flaky(Echo):
        def busy_reply(self, request: bytes) -> bytes | None:
            raise RuntimeError("bug in a busy reply")

    sim = Flaky("flaky", _world())
    ep = await serve_pty(sim)
    try:
        port = serial.serial_for_url(ep.url, timeout=1)
        sim.faults.inject("busy")
        port.write(b"a\r")
        assert await asyncio.to_thread(port.read_until, b"\r\n") == b""  # no reply, logged
        port.write(b"b\r")
        assert await asyncio.to_thread(port.read_until, b"\r\n") == b"<b>\r\n"
        port.close()
    finally:
        await ep.close()
    assert not os.path.exists(os.path.dirname(ep.url))  # its private directory is gone
