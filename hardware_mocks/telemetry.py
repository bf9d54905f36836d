"""Publishing a simulator's telemetry over MQTT from its own event loop, best effort.

The physics produces messages synchronously (:meth:`TelemetryPublisher.offer`, called
while integrating); one task of the simulator's event loop sends them, a tick's batch at
once. The broker is never in the way of the instrument: while it is unreachable, offered
messages are dropped and counted (a real cycler does not hold its telemetry back either),
the first failure is logged once, and the connection is retried with backoff. Before the
first connection attempt has ended, messages wait (bounded): the broker is not known to be
down yet.
aiomqtt is imported when the task starts (the lab runs without it while telemetry is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from typing import TYPE_CHECKING

from hardware_mocks.packs.publisher import client_for_url

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger(__name__)

MAX_PENDING = 20_000  # messages waiting for the sender while connected (oldest dropped)
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0


class TelemetryPublisher:
    """Send ``(topic, payload)`` messages at QoS 0 to ``url``; never blocks the caller."""

    def __init__(self, url: str, *, identifier: str, max_pending: int = MAX_PENDING) -> None:
        self.url = url
        self.identifier = identifier
        self.max_pending = max_pending
        self.connected = False
        self.down = False  # the last connection attempt failed or the connection was lost
        self.published = 0  # handed to the broker connection
        self.dropped = 0  # offered while disconnected, or beyond max_pending
        self.connects = 0
        self.failures = 0
        self._pending: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def offer(self, messages: list[tuple[str, bytes]]) -> None:
        """Queue one batch for the sender, or count it dropped while disconnected."""
        if self.down:
            self.dropped += len(messages)
            return
        self._pending.extend(messages)
        over = len(self._pending) - self.max_pending
        for _ in range(max(over, 0)):
            self._pending.popleft()
            self.dropped += 1
        self._wake.set()

    def start(self) -> None:
        """Start the sender task in the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"{self.identifier}:telemetry")

    async def _run(self) -> None:
        import aiomqtt  # the `lab` extra; only a lab with telemetry on needs it

        rng = random.Random(self.identifier)
        delay = BACKOFF_MIN_S
        while True:
            try:
                client = client_for_url(self.url, identifier=self.identifier)
                # A tick's batch is published concurrently; aiomqtt would warn beyond 10.
                client.pending_calls_threshold = 2 * self.max_pending
                async with client:
                    self.connected = True
                    self.down = False
                    self.connects += 1
                    if self.failures:
                        log.info("%s: telemetry broker %s reachable again", self.identifier,
                                 self.url)  # fmt: skip
                    delay = BACKOFF_MIN_S
                    await self._send(client)
            except (aiomqtt.MqttError, OSError) as exc:
                self.failures += 1
                if self.failures == 1:  # once: a lab without its broker must not spam
                    log.warning("%s: telemetry broker %s unreachable (%s); dropping samples "
                                "and retrying", self.identifier, self.url, exc)  # fmt: skip
            finally:
                self.connected = False
                self.down = True
                self.dropped += len(self._pending)
                self._pending.clear()
            await asyncio.sleep(delay * (0.5 + rng.random()))
            delay = min(delay * 2.0, BACKOFF_MAX_S)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), 500))]
                # QoS 0: each publish completes once written; let a tick's batch overlap.
                await asyncio.gather(*(client.publish(t, p, qos=0) for t, p in batch))
                self.published += len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected = False
        self.down = True
