"""The MQTT side of the edge_bms service (DESIGN.md contract 5): connect, subscribe, route
every message to :class:`~edge_bms.service.core.PackService`, publish what it returns.

One connection at a time, re-made with exponential backoff and jitter when the broker goes
away. Everything the service produces goes through one bounded :class:`OutBuffer`: while
connected a publisher task drains it, while not it fills (oldest dropped first, counted),
and on reconnect it is flushed at QoS 1 in order. Payloads carry their own ``ts``, so a
state published late still says when it was estimated.

Sessions: with ``broker.shared_group`` the client speaks MQTT 5, subscribes to
``$share/<group>/<filter>`` and starts clean (a dead instance's queue must not hold packs
back from the live ones). Without it the client keeps a persistent MQTT 3.1.1 session
(fixed client id, ``clean_session=False``), so telemetry sent while the service restarts is
queued by the broker and delivered on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import replace

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

from edge_bms.service.config import BrokerConfig, ServiceConfig
from edge_bms.service.core import Outgoing, PackService

log = logging.getLogger("edge_bms.service")

# Publishes awaiting their PUBACK at once: QoS 1 waits for the acknowledgement, so
# publishing one by one would cap throughput at one round trip per message.
PUBLISH_WINDOW = 256
# paho leaves Nagle on: a small PUBLISH behind an unacknowledged one then waits for the
# peer's delayed ACK (~40 ms on Linux), which was most of a state's latency.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
# How long a stopping service tries to flush what it holds before going offline.
FLUSH_ON_STOP_S = 2.0


class OutBuffer:
    """Outgoing messages waiting for the broker: a bounded FIFO that drops the oldest.

    ``dropped`` counts messages lost to the bound; ``high_water`` the largest length seen.
    """

    def __init__(self, max_messages: int) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages!r}")
        self.max_messages = max_messages
        self._items: deque[Outgoing] = deque()
        self.dropped = 0
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, item: Outgoing) -> None:
        self._items.append(item)
        self._trim()

    def extend(self, items: Iterable[Outgoing]) -> None:
        self._items.extend(items)
        self._trim()

    def requeue(self, items: list[Outgoing]) -> None:
        """Put ``items`` (taken with :meth:`take`, not published) back at the front."""
        self._items.extendleft(reversed(items))
        self._trim()

    def take(self, n: int) -> list[Outgoing]:
        """Remove and return up to ``n`` messages from the front (oldest first)."""
        k = min(n, len(self._items))
        return [self._items.popleft() for _ in range(k)]

    def upgrade_qos(self, qos: int = 1) -> None:
        """Raise every held message to at least ``qos`` (what is held was produced while
        the broker was away and must not be lost on the way out)."""
        self._items = deque(_at_least(o, qos) for o in self._items)

    def _trim(self) -> None:
        over = len(self._items) - self.max_messages
        for _ in range(max(over, 0)):
            self._items.popleft()
        if over > 0:
            self.dropped += over
        self.high_water = max(self.high_water, len(self._items))


def _at_least(o: Outgoing, qos: int) -> Outgoing:
    return o if o.qos >= qos else replace(o, qos=qos)


def _tls_context(broker: BrokerConfig) -> ssl.SSLContext:
    tls = broker.tls
    ctx = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls is not None and tls.ca_file is not None else None
    )
    if tls is not None and tls.cert_file is not None:
        ctx.load_cert_chain(
            str(tls.cert_file), str(tls.key_file) if tls.key_file is not None else None
        )
    if tls is not None and tls.insecure:
        # A lab broker with a self-signed certificate: encrypt, do not verify.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_client(config: ServiceConfig, service: PackService) -> aiomqtt.Client:
    """An unconnected client for ``config.broker`` with the retained offline will."""
    b = config.broker
    username, password = b.credentials()
    shared = b.shared_group is not None
    client = aiomqtt.Client(
        b.host,
        b.port,
        username=username,
        password=password,
        identifier=b.client_id or f"edge-bms-{config.instance}",
        protocol=aiomqtt.ProtocolVersion.V5 if shared else aiomqtt.ProtocolVersion.V311,
        will=aiomqtt.Will(
            service.status_topic(), service.status_payload(False), qos=1, retain=True
        ),
        # MQTT 5 takes clean_start (always clean, see the module docstring); 3.1.1 takes
        # clean_session (False: a persistent session).
        clean_session=None if shared else False,
        clean_start=True if shared else MQTT_CLEAN_START_FIRST_ONLY,  # 3.1.1: must be default
        keepalive=b.keepalive_s,
        tls_context=_tls_context(b) if b.use_tls else None,
        max_inflight_messages=PUBLISH_WINDOW,
        socket_options=NO_DELAY,
    )
    # aiomqtt warns once per publish while more than 10 await their PUBACK; the window
    # allows PUBLISH_WINDOW by design (a burst of 100 packs), so warn only beyond it
    client.pending_calls_threshold = PUBLISH_WINDOW
    return client


def subscription_filters(config: ServiceConfig, service: PackService) -> list[str]:
    """The service's topic filters; with a shared group, telemetry is shared and commands
    are not: the broker balances telemetry per message, so every instance holds a state
    of every pack and a command (reset SOC, capacity) must reach all of them."""
    group = config.broker.shared_group
    filters = service.subscriptions()
    if not group:
        return list(filters)
    return [f"$share/{group}/{f}" if f.endswith("/telemetry") else f for f in filters]


def backoff_delays(min_s: float, max_s: float, rng: random.Random) -> Iterable[float]:
    """Exponential backoff with jitter: attempt k waits a uniform draw in
    [d/2, d] with d = min(max_s, min_s * 2**k), so instances that lost the same broker do
    not all come back in the same millisecond."""
    d = min_s
    while True:
        yield rng.uniform(d / 2, d)
        d = min(max_s, d * 2)


class _Runner:
    def __init__(
        self,
        config: ServiceConfig,
        service: PackService,
        stop: asyncio.Event,
        ready: Callable[[], None] | None,
    ) -> None:
        self.config = config
        self.service = service
        self.stop = stop
        self.ready = ready
        self.buffer = OutBuffer(config.buffer.max_messages)
        self.wake = asyncio.Event()
        self.counters = service.counters
        for k in ("mqtt.connects", "mqtt.disconnects", "mqtt.published", "internal_errors"):
            self.counters.setdefault(k, 0)

    # ------------------------------------------------------------------ messages in
    def route(self, topic: str, payload: bytes) -> None:
        try:
            out = self.service.handle(topic, payload)
        except Exception:  # a bug in the service must not take the gateway down
            self.counters["internal_errors"] += 1
            log.exception("handling a message on %s failed", topic)
            return
        self.buffer.extend(out)
        self._count_buffer()
        self.wake.set()

    def _count_buffer(self) -> None:
        self.counters["buffer.held"] = len(self.buffer)
        self.counters["buffer.dropped"] = self.buffer.dropped

    async def receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            p = message.payload
            payload = bytes(p) if isinstance(p, bytes | bytearray) else str(p or "").encode()
            self.route(message.topic.value, payload)
            # Let the publisher send this state before the next message is handled: when
            # many packs report on one tick, the states would otherwise leave only after
            # the whole burst (the iterator does not yield while messages are queued).
            await asyncio.sleep(0)

    async def local(self, source: AsyncIterable[tuple[str, bytes]]) -> None:
        async for topic, payload in source:
            self.route(topic, payload)
            await asyncio.sleep(0)

    # ----------------------------------------------------------------- messages out
    async def publish(self, client: aiomqtt.Client) -> None:
        """Drain the buffer while connected; once ``stop`` is set, return when empty.

        Pipelined: a message goes out as soon as it is produced, with up to
        ``PUBLISH_WINDOW`` QoS 1 publishes awaiting their PUBACK at once. (Publishing in
        batches and waiting for a batch's acknowledgements before the next held every
        state behind the previous batch's round trip through a busy event loop: 16 ms
        median, 94 ms p99 at 100 packs.) A failed publish ends the connection; what
        was not acknowledged goes back to the front of the buffer in its order.
        """
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        inflight: set[asyncio.Task[None]] = set()
        unsent: list[Outgoing] = []
        failures: list[BaseException] = []
        try:
            while not failures:
                if not self.buffer:
                    if self.stop.is_set() and not inflight:
                        return
                    self.wake.clear()
                    if self.stop.is_set():
                        await asyncio.wait(inflight)
                    else:
                        await self.wake.wait()
                    continue
                await window.acquire()
                if failures or not self.buffer:  # changed while waiting for the window
                    window.release()
                    continue
                (item,) = self.buffer.take(1)
                task = asyncio.create_task(
                    self._publish_one(client, item, window, unsent, failures)
                )
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            err = failures[0]
            raise aiomqtt.MqttError(f"publish failed: {err}") from err
        finally:
            for t in inflight:
                t.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            self.buffer.requeue(sorted(unsent, key=lambda o: o.ts))
            self._count_buffer()

    async def _publish_one(
        self,
        client: aiomqtt.Client,
        o: Outgoing,
        window: asyncio.Semaphore,
        unsent: list[Outgoing],
        failures: list[BaseException],
    ) -> None:
        try:
            await client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain)
        except asyncio.CancelledError:
            unsent.append(o)
            raise
        except Exception as exc:  # the connection is gone: the session ends
            unsent.append(o)
            failures.append(exc)
            self.wake.set()
        else:
            self.counters["mqtt.published"] += 1
        finally:
            window.release()
            self._count_buffer()

    async def checkpoints(self) -> None:
        period = max(0.05, min(1.0, self.config.checkpoint.interval_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.service.maybe_checkpoint()
            except Exception:  # a full disk must not stop the estimates
                self.counters["internal_errors"] += 1
                log.exception("checkpoint failed")

    # ------------------------------------------------------------------- connection
    async def session(self, client: aiomqtt.Client) -> bool:
        """One connection's life; True when it ended because ``stop`` was set."""
        async with client:
            self.counters["mqtt.connects"] += 1
            # what waited for this connection goes out at QoS 1 (the one place that
            # upgrades: whatever was held or requeued passes through here)
            self.buffer.upgrade_qos(1)
            log.info(
                "connected to %s (%d messages buffered)", self.config.broker.url, len(self.buffer)
            )
            await client.publish(
                self.service.status_topic(), self.service.status_payload(True), qos=1, retain=True
            )
            for f in subscription_filters(self.config, self.service):
                await client.subscribe(f, qos=self.config.broker.qos)
            if self.ready is not None:
                self.ready()
            receiver = asyncio.create_task(self.receive(client), name="receive")
            sender = asyncio.create_task(self.publish(client), name="publish")
            stopper = asyncio.create_task(self.stop.wait(), name="stop")
            tasks = (receiver, sender, stopper)
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done and not sender.done():
                    # Let the publisher finish its batch and drain the rest: cancelling it
                    # mid-batch would put back messages the broker already has (duplicates).
                    receiver.cancel()
                    self.wake.set()
                    with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
                        await asyncio.wait_for(sender, FLUSH_ON_STOP_S)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.stop.is_set():
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(
                        self.service.status_topic(),
                        self.service.status_payload(False),
                        qos=1,
                        retain=True,
                        timeout=FLUSH_ON_STOP_S,
                    )
                return True
            errors = [t.exception() for t in done if not t.cancelled() and t.exception()]
            raise aiomqtt.MqttError(f"connection lost: {errors[0] if errors else 'closed'}")

    async def run(self, local: AsyncIterable[tuple[str, bytes]] | None) -> None:
        b = self.config.broker
        side = [asyncio.create_task(self.checkpoints(), name="checkpoints")]
        if local is not None:
            side.append(asyncio.create_task(self.local(local), name="local"))
        rng = random.Random()
        delays = iter(backoff_delays(b.reconnect_min_s, b.reconnect_max_s, rng))
        try:
            while not self.stop.is_set():
                client = make_client(self.config, self.service)
                t0 = time.monotonic()
                try:
                    if await self.session(client):
                        break
                except aiomqtt.MqttError as exc:
                    self.counters["mqtt.disconnects"] += 1
                    log.warning("broker %s: %s", b.url, exc)
                # A connection that lasted is a fresh start for the backoff.
                if time.monotonic() - t0 > b.reconnect_max_s:
                    delays = iter(backoff_delays(b.reconnect_min_s, b.reconnect_max_s, rng))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), next(delays))
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            self.service.checkpoint_now()


async def run_service(
    config: ServiceConfig,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[], None] | None = None,
    service: PackService | None = None,
    local: AsyncIterable[tuple[str, bytes]] | None = None,
) -> None:
    """Serve ``config``'s packs until ``stop`` is set (forever if None).

    ``ready`` is called after every (re)connection once the subscriptions are in place.
    ``service``: a ready :class:`PackService` (default: built from ``config``, restoring
    its checkpoint). ``local``: an extra source of ``(topic, payload)`` messages read on the
    gateway itself (a CAN or serial reader); it keeps flowing while the broker is away,
    and what it produces waits in the buffer. On the way out the state is checkpointed
    and the retained status set to offline.
    """
    svc = service if service is not None else PackService(config)
    runner = _Runner(config, svc, stop or asyncio.Event(), ready)
    try:
        await runner.run(local)
    finally:
        if service is None:  # ours to close; a caller's service stays open
            svc.close()
