"""Broker loss: a private Mosquitto is SIGKILLed under the running service and restarted.

The service must notice, retry with backoff, keep estimating what reaches it meanwhile (a
gateway-local source), hold those estimates in its bounded buffer and publish them, in
order, with their original ``ts``, at QoS 1, once the broker is back; then carry on over
MQTT. The broker keeps the subscriber's session on disk (autosave every second), so the
test's subscriber receives what was published before it came back itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.edge_bms.service.brokers import (
    Mosquitto,
    collecting,
    config_for,
    publisher,
    running_service,
    simulator,
    telemetry_ticks,
    unique_prefix,
)

pytestmark = [pytest.mark.broker, pytest.mark.subprocess]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    (tmp_path / "db").mkdir()
    m = Mosquitto(
        tmp_path,
        [
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {tmp_path / 'db'}/",
            "autosave_interval 1",
        ],
    )
    m.start()
    yield m
    m.stop()


async def _queue_source(q: asyncio.Queue[tuple[str, bytes]]) -> AsyncIterator[tuple[str, bytes]]:
    while True:
        yield await q.get()


async def test_estimates_survive_broker_loss(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = simulator(unique_prefix(), n_packs=1, n_cells=4)
    prefix = sim.config.topic_prefix
    # QoS 0 while connected, so the QoS 1 of the buffered ones is the service's doing.
    config = config_for(
        sim, broker.url, broker={"qos": 0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    )
    ticks = [tick[0] for tick in telemetry_ticks(sim, 10, dt=2.0)]
    sent_ts = {json.loads(p)["seq"]: json.loads(p)["ts"] for _, p in ticks}
    local: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    sub_id = f"sub-{prefix.split('/')[0]}"  # a persistent session: the broker keeps it

    async with running_service(config, local=_queue_source(local)) as (service, readies):
        async with collecting(
            broker.url, [f"{prefix}/+/state"], identifier=sub_id, persistent=True
        ) as col:
            for k in range(3):  # connected: over MQTT
                await local.put(ticks[k])
            await col.wait_for(lambda c: len(c.on("/state")) == 3, 10.0, "3 states")
            await _saved(broker, time.time())  # the subscriber's session is on disk
            t_kill = loop.time()
            broker.kill()
            await _until(lambda: service.counters["mqtt.disconnects"] >= 1, 5.0, "the loss")
            t_noticed = loop.time()
        for k in range(3, 8):  # broker down: estimated, buffered
            await local.put(ticks[k])
        await _until(lambda: service.counters.get("buffer.held", 0) == 5, 5.0, "5 held")
        assert service.counters["mqtt.published"] == 3
        await asyncio.sleep(1.0)  # a few failed reconnection attempts
        mono_up = broker.start()
        t_up = loop.time() - (time.monotonic() - mono_up)
        await _until(lambda: len(readies) == 2, 10.0, "the reconnection")
        t_back = readies[1]
        async with (
            collecting(
                broker.url, [f"{prefix}/+/state"], identifier=sub_id, persistent=True
            ) as col2,
            publisher(broker.url) as pub,
        ):
            await col2.wait_for(lambda c: len(c.on("/state")) >= 5, 10.0, "the buffered states")
            for k in (8, 9):  # and over MQTT again
                await pub.publish(*ticks[k], qos=1)
            await col2.wait_for(lambda c: len(c.on("/state")) >= 7, 10.0, "fresh states")
        assert service.counters["buffer.held"] == 0
        assert service.counters["buffer.dropped"] == 0

    got = col2.on("/state")
    buffered = [m for m in got if m.json()["seq"] in range(3, 8)]
    assert [m.json()["seq"] for m in buffered] == [3, 4, 5, 6, 7]  # in order, none lost
    assert [m.json()["ts"] for m in buffered] == [sent_ts[k] for k in range(3, 8)]
    assert {m.qos for m in buffered} == {1}
    assert sorted(m.json()["seq"] for m in got if m.json()["seq"] >= 8) == [8, 9]
    with capsys.disabled():
        print(
            f"\nbroker loss: noticed after {1000 * (t_noticed - t_kill):.0f} ms; "
            f"reconnected {1000 * (t_back - t_up):.0f} ms after the broker was back "
            f"(backoff {config.broker.reconnect_min_s}..{config.broker.reconnect_max_s} s)"
        )
    assert t_back - t_up < config.broker.reconnect_max_s + 1.0


async def test_buffer_bound_drops_oldest(broker: Mosquitto) -> None:
    sim = simulator(unique_prefix(), n_packs=1, n_cells=4)
    prefix = sim.config.topic_prefix
    config = config_for(sim, broker.url, buffer={"max_messages": 3})
    ticks = [tick[0] for tick in telemetry_ticks(sim, 8, dt=2.0)]
    local: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    sub_id = f"sub-{prefix.split('/')[0]}"  # a persistent session: sees the whole flush
    async with running_service(config, local=_queue_source(local)) as (service, readies):
        async with collecting(
            broker.url, [f"{prefix}/+/state"], identifier=sub_id, persistent=True
        ):
            await _saved(broker, time.time())  # the subscriber's session is on disk
        broker.kill()
        await _until(lambda: service.counters["mqtt.disconnects"] >= 1, 5.0, "the loss")
        for t in ticks:
            await local.put(t)
        await _until(lambda: service.counters.get("buffer.dropped", 0) == 5, 5.0, "5 dropped")
        broker.start()
        await _until(lambda: len(readies) == 2, 10.0, "the reconnection")
        async with collecting(
            broker.url, [f"{prefix}/+/state"], identifier=sub_id, persistent=True
        ) as col:
            await col.wait_for(lambda c: len(c.on("/state")) >= 3, 10.0, "the kept states")
            await _until(lambda: service.counters["buffer.held"] == 0, 5.0, "the flush")
    assert service.counters["mqtt.published"] >= 3
    seqs = sorted(m.json()["seq"] for m in col.on("/state"))
    assert seqs == [5, 6, 7]  # the newest 3 were kept, the 5 oldest dropped


async def _saved(broker: Mosquitto, after: float) -> None:
    """Wait for the broker's next autosave (every second) after ``after`` (epoch s)."""
    db = broker.workdir / "db" / "mosquitto.db"
    await _until(lambda: db.exists() and db.stat().st_mtime > after + 0.01, 5.0, "an autosave")


async def _until(cond: object, timeout: float, what: str) -> None:
    assert callable(cond)
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
