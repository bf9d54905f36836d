"""Two ``edge-bms run`` processes in one MQTT 5 shared-subscription group on the machine's
Mosquitto: every (pack, seq) is estimated exactly once, and when one is SIGKILLed the
other takes every later message (no gap); the dead one's last will marks it offline."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from tests.edge_bms.service.brokers import (
    clear_retained,
    collecting,
    config_for,
    kill,
    publisher,
    require_system_broker,
    service_process,
    simulator,
    telemetry_ticks,
    unique_prefix,
    write_config,
)

pytestmark = [pytest.mark.broker, pytest.mark.subprocess]


async def test_two_instances_share_packs_without_duplicates_or_gaps(tmp_path: Path) -> None:
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=3, n_cells=4)
    prefix = sim.config.topic_prefix
    group = prefix.split("/")[0]
    config = config_for(sim, url, broker={"shared_group": group, "qos": 1})
    cfg = write_config(tmp_path / "service.toml", config)
    ticks = telemetry_ticks(sim, 40, dt=2.0)
    names = ("gw-a", "gw-b")
    logs = {n: tmp_path / f"{n}.log" for n in names}
    procs = {n: service_process(cfg, "--instance", n, log=logs[n]) for n in names}
    try:
        async with (
            collecting(url, [f"{prefix}/+/state", f"{prefix}/status/+"]) as col,
            publisher(url) as pub,
        ):

            def online(c: object) -> bool:
                st = {m.topic.rsplit("/", 1)[-1]: m.json()["state"] for m in col.on("")
                      if "/status/" in m.topic}  # fmt: skip
                return all(st.get(n) == "online" for n in names)

            await col.wait_for(online, 30.0, "both instances online")

            async def send(ks: range) -> None:
                for k in ks:
                    await asyncio.gather(*(pub.publish(t, p, qos=1) for t, p in ticks[k]))
                    await asyncio.sleep(0.01)

            await send(range(20))
            n_first = 20 * sim.n_packs
            await col.wait_for(lambda c: len(c.on("/state")) >= n_first, 20.0, "20 ticks")
            kill(procs["gw-a"])
            await col.wait_for(
                lambda c: any(
                    m.topic.endswith("/status/gw-a") and m.json()["state"] == "offline"
                    for m in c.messages
                ),
                10.0,
                "gw-a's last will",
            )
            await send(range(20, 40))
            await col.wait_for(
                lambda c: len(c.on("/state")) >= 40 * sim.n_packs, 20.0, "the last 20 ticks"
            )
            await asyncio.sleep(0.3)  # anything late (a duplicate) arrives now
    finally:
        for p in procs.values():
            kill(p)
        await clear_retained(url, [f"{prefix}/status/{n}" for n in names])
    states = [m.json() for m in col.on("/state")]
    keys = [(s["pack"], s["seq"]) for s in states]
    dupes = [k for k, n in collections.Counter(keys).items() if n > 1]
    assert not dupes, f"estimated twice: {dupes[:5]}"
    want = {(p, k) for p in sim.pack_ids for k in range(40)}
    assert set(keys) == want, f"missing: {sorted(want - set(keys))[:10]}"
    by = collections.Counter(s["instance"] for s in states if s["seq"] < 20)
    assert by["gw-a"] > 0 and by["gw-b"] > 0, f"the broker did not share: {by}"
    assert {s["instance"] for s in states if s["seq"] >= 20} == {"gw-b"}
    assert all(0.0 <= s["pack_soc"] <= 1.0 for s in states)
    for n in names:
        assert "Traceback" not in logs[n].read_text(), logs[n].read_text()[-2000:]
