"""Publish a :class:`PackSimulator`'s telemetry over MQTT at a fixed wall-clock rate.

Each tick (every ``1/rate_hz`` wall seconds) advances the simulation by ``speed /
rate_hz`` simulated seconds and publishes one message per pack. A tick that starts late
is not made up with a burst: the schedule restarts from now and the tick is counted as
``late``. aiomqtt is imported when used (it is not a dependency of the lab simulators).
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from hardware_mocks.packs.sim import PackSimulator

if TYPE_CHECKING:
    import aiomqtt


@dataclass
class PublishStats:
    ticks: int = 0
    messages: int = 0  # published
    bytes: int = 0
    late_ticks: int = 0  # ticks that started more than one period behind schedule
    wall_s: float = 0.0
    sim_s: float = 0.0  # simulated seconds advanced


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://...`` (TLS, 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL has a bad port: {url!r}") from exc
    return BrokerUrl(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def client_for_url(url: str, *, identifier: str | None = None) -> aiomqtt.Client:
    """An (unconnected) aiomqtt client for ``url``; use it as ``async with``."""
    import aiomqtt

    b = parse_broker_url(url)
    return aiomqtt.Client(
        b.host,
        b.port,
        username=b.username,
        password=b.password,
        identifier=identifier,
        tls_context=ssl.create_default_context() if b.tls else None,
        # Many packs per tick at QoS 1: do not serialise on PUBACKs.
        max_inflight_messages=1000,
        # paho leaves Nagle on: a publish behind an unacknowledged one would wait ~40 ms
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


PHASES = ("spread", "synced")


async def run_publisher(
    sim: PackSimulator,
    client_or_url: aiomqtt.Client | str,
    rate_hz: float = 1.0,
    duration: float | None = 60.0,
    *,
    speed: float = 1.0,
    qos: int = 0,
    retain: bool = False,
    progress: Callable[[PublishStats, PackSimulator], None] | None = None,
    progress_every_s: float = 5.0,
    stop: asyncio.Event | None = None,
    max_ticks: int | None = None,
    phase: str = "spread",
) -> PublishStats:
    """Publish ``sim``'s telemetry ``rate_hz`` times per wall second per pack, for
    ``duration`` wall seconds (None: until ``stop`` is set or ``max_ticks``).

    ``phase``: ``"spread"`` sends pack j's message of a tick j/n of a period after the
    tick (every pack's BMS has its own clock, as in a fleet); ``"synced"`` sends all of
    a tick at once (one master polling every pack, the worst case for a receiver).
    The sample's ``ts`` is the tick's either way.

    ``client_or_url``: a connected ``aiomqtt.Client`` (left open) or a broker URL (a
    client is connected here and closed at the end). ``speed``: simulated seconds per
    wall second, so ``ts`` advances by ``speed / rate_hz`` per message.
    """
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be finite and > 0, got {rate_hz!r}")
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be finite and > 0, got {speed!r}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    if duration is not None and not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be >= 0 or None, got {duration!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if isinstance(client_or_url, str):
        async with client_for_url(client_or_url) as client:
            return await _loop(
                sim, client, rate_hz, duration, speed, qos, retain, progress,
                progress_every_s, stop, max_ticks, phase,
            )  # fmt: skip
    return await _loop(
        sim, client_or_url, rate_hz, duration, speed, qos, retain, progress,
        progress_every_s, stop, max_ticks, phase,
    )  # fmt: skip


async def _loop(
    sim: PackSimulator,
    client: aiomqtt.Client,
    rate_hz: float,
    duration: float | None,
    speed: float,
    qos: int,
    retain: bool,
    progress: Callable[[PublishStats, PackSimulator], None] | None,
    progress_every_s: float,
    stop: asyncio.Event | None,
    max_ticks: int | None,
    phase: str,
) -> PublishStats:
    stats = PublishStats()
    period = 1.0 / rate_hz
    dt_sim = speed / rate_hz
    start = time.monotonic()
    next_tick = start
    next_progress = start + progress_every_s
    while True:
        now = time.monotonic()
        # A tick due at or after the end is not sent: duration * rate_hz ticks in all.
        if duration is not None and max(now, next_tick) - start >= duration - 1e-9:
            break
        if (stop is not None and stop.is_set()) or (
            max_ticks is not None and stats.ticks >= max_ticks
        ):
            break
        if next_tick > now:
            if stop is None:
                await asyncio.sleep(next_tick - now)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), next_tick - now)
                    break
                except TimeoutError:
                    pass
        elif now - next_tick > period:
            stats.late_ticks += 1
            next_tick = now
        next_tick += period
        if stats.ticks:  # the first message carries the initial state
            sim.advance(dt_sim)
            stats.sim_s += dt_sim
        messages = [(m.topic, m.json()) for m in sim.telemetry()]
        if phase == "spread" and len(messages) > 1:
            tick_at = next_tick - period
            for j, (topic, payload) in enumerate(messages):
                wait = tick_at + j * period / len(messages) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await client.publish(topic, payload, qos=qos, retain=retain)
        elif qos == 0:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=0, retain=retain)
        else:
            # QoS 1/2 publishes wait for their acknowledgement: let them overlap.
            await asyncio.gather(
                *(client.publish(t, p, qos=qos, retain=retain) for t, p in messages)
            )
        stats.ticks += 1
        stats.messages += len(messages)
        stats.bytes += sum(len(p) for _, p in messages)
        stats.wall_s = time.monotonic() - start
        if progress is not None and time.monotonic() >= next_progress:
            next_progress += progress_every_s
            progress(stats, sim)
    stats.wall_s = time.monotonic() - start
    return stats
