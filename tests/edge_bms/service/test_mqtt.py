"""The service over the machine's Mosquitto (127.0.0.1:1883): contract-5 topics, retained
status, rejections on the errors topic, shutdown; plus the buffer, backoff and CLI parts
that need no broker."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import random
from pathlib import Path

import pytest

from edge_bms.service.cli import PackTable, demo, main
from edge_bms.service.config import CheckpointConfig
from edge_bms.service.core import Outgoing, PackService
from edge_bms.service.mqtt import (
    PUBLISH_WINDOW,
    OutBuffer,
    backoff_delays,
    make_client,
    subscription_filters,
)
from tests.edge_bms.service.brokers import (
    collecting,
    config_for,
    free_port,
    publisher,
    require_system_broker,
    running_service,
    simulator,
    telemetry_ticks,
    unique_prefix,
)


def _out(k: int, qos: int = 0) -> Outgoing:
    return Outgoing(topic=f"t/{k}", payload=str(k).encode(), qos=qos, retain=False, ts=float(k))


# -- no broker -------------------------------------------------------------------------------
def test_out_buffer_drops_oldest_and_counts() -> None:
    buf = OutBuffer(3)
    buf.extend(_out(k) for k in range(5))
    assert [o.payload for o in buf.take(10)] == [b"2", b"3", b"4"]
    assert buf.dropped == 2
    assert buf.high_water == 3
    assert not buf


def test_out_buffer_requeue_keeps_order_and_upgrade_qos_raises_all() -> None:
    buf = OutBuffer(10)
    buf.extend(_out(k) for k in range(4))
    first = buf.take(2)
    buf.append(_out(9))
    buf.requeue(first)
    buf.upgrade_qos(1)
    held = buf.take(10)
    assert [o.payload for o in held] == [b"0", b"1", b"2", b"3", b"9"]
    assert {o.qos for o in held} == {1}
    with pytest.raises(ValueError, match="max_messages"):
        OutBuffer(0)


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    gen = iter(backoff_delays(0.5, 4.0, random.Random(1)))
    delays = [next(gen) for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    assert len({round(d, 6) for d in delays[3:]}) == 5  # jittered, not one fixed value


def test_shared_group_shares_telemetry_only() -> None:
    sim = simulator("g/bms/v1")
    config = config_for(sim, "mqtt://127.0.0.1:1883", broker={"shared_group": "gw"})
    filters = subscription_filters(config, PackService(config))
    tele = [f for f in filters if f.endswith("/telemetry")]
    assert tele
    assert all(f.startswith("$share/gw/g/bms/v1/") for f in tele)
    assert all(not f.startswith("$share/") for f in filters if "/cmd" in f)


def test_cli_run_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "pack.toml"
    bad.write_text('[broker]\nurl = "http://x"\n\n[[packs]]\nid = "p1"\nn_cells = 4\n')
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pack.toml:2" in err
    assert "broker.url" in err


def test_pack_table_renders_state_and_alarms() -> None:
    table = PackTable(["p1", "p2"])
    state = {"seq": 7, "pack_soc": 0.5123, "soc": [0.5, 0.52], "soc_sigma": [0.01, 0.02]}
    table.update("bms/v1/p1/state", json.dumps(state).encode())
    table.update("bms/v1/p1/alarms", b'{"active": [{"kind": "over_voltage", "cell": 1}]}')
    table.update("bms/v1/p2/state", b"not json")
    text = table.render()
    row = next(line for line in text.splitlines() if line.startswith("p1"))
    assert "51.2" in row
    assert "over_voltage@1" in row
    assert "2.0" in row  # max sigma, %
    assert next(line for line in text.splitlines() if line.startswith("p2")).count("-") >= 3


# -- the machine's Mosquitto --------------------------------------------------------------
@pytest.mark.broker
async def test_states_follow_contract_5() -> None:
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=2, n_cells=4)
    prefix = sim.config.topic_prefix
    config = config_for(sim, url)
    ticks = telemetry_ticks(sim, 5, dt=2.0)
    sent = {
        (json.loads(p)["seq"], t.split("/")[-2]): json.loads(p) for tick in ticks for t, p in tick
    }
    async with (
        collecting(url, [f"{prefix}/+/state"]) as col,
        running_service(config) as (service, readies),
        publisher(url) as pub,
    ):
        for tick in ticks:
            for topic, payload in tick:
                await pub.publish(topic, payload, qos=1)
        await col.wait_for(lambda c: len(c.on("/state")) >= 10, 10.0, "10 states")
        async with collecting(url, [f"{prefix}/status/+"]) as status:
            await status.wait_for(lambda c: bool(c.messages), 5.0, "the retained status")
    assert len(readies) == 1
    states = [m.json() for m in col.on("/state")]
    assert sorted((s["seq"], s["pack"]) for s in states) == sorted(sent)
    for s in states:
        tele = sent[(s["seq"], s["pack"])]
        assert s["ts"] == tele["ts"]  # the telemetry's time, not the service's
        assert len(s["soc"]) == len(s["soc_sigma"]) == 4
        assert all(0.0 <= x <= 1.0 for x in s["soc"])
        assert all(x > 0 for x in s["soc_sigma"])
        assert min(s["soc"]) - 1e-6 <= s["pack_soc"] <= max(s["soc"]) + 1e-6
        assert s["sop"]["i_discharge_a"] > 0  # config_for: a SOP with every state
        assert s["model"]["method"] == "ekf" and s["model"]["correction_used"] is False
    st = status.messages[0]
    assert st.retain
    assert st.topic == f"{prefix}/status/{config.instance}"
    assert st.json()["state"] == "online"
    assert service.counters["mqtt.published"] >= 10


@pytest.mark.broker
async def test_a_burst_of_packs_is_published_pipelined_without_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 packs on one tick: every state arrives, each pack's in order (publishes are
    pipelined, not held behind each other's PUBACK), and aiomqtt's "pending publish
    calls" warning (at more than 10 awaiting PUBACK, meant for runaway callers) is set
    to our window, so a slow broker does not log a warning per state."""
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=40, n_cells=4)
    prefix = sim.config.topic_prefix
    ticks = telemetry_ticks(sim, 2, dt=2.0)
    caplog.set_level(logging.WARNING)
    async with (
        collecting(url, [f"{prefix}/+/state"]) as col,
        running_service(config_for(sim, url)) as (service, _),
        publisher(url) as pub,
    ):
        pub.pending_calls_threshold = 100  # the test's own burst is meant
        for tick in ticks:
            await asyncio.gather(*(pub.publish(t, p, qos=1) for t, p in tick))
        await col.wait_for(lambda c: len(c.on("/state")) >= 80, 15.0, "80 states")
    assert service.counters["mqtt.published"] >= 80
    assert "pending publish calls" not in caplog.text
    assert make_client(config_for(sim, url), service).pending_calls_threshold == PUBLISH_WINDOW
    # a pack's two states arrive in order
    seqs: dict[str, list[int]] = {}
    for m in col.on("/state"):
        st = m.json()
        seqs.setdefault(st["pack"], []).append(st["seq"])
    assert len(seqs) == 40 and all(v == [0, 1] for v in seqs.values())


@pytest.mark.broker
async def test_bad_input_goes_to_errors_and_the_pack_carries_on() -> None:
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=1, n_cells=4)
    prefix = sim.config.topic_prefix
    config = config_for(sim, url)
    ticks = telemetry_ticks(sim, 2, dt=2.0)
    (t0, p0), (t1, p1) = ticks[0][0], ticks[1][0]
    good1 = json.loads(p1)
    bad = [
        (t1, b"{not json", "json"),
        (t1, json.dumps({**good1, "cell_v": good1["cell_v"][:3]}).encode(), "cell_count"),
        (t1, json.dumps({**good1, "current_a": "12"}).encode(), "type"),
        (t1, b'{"ts": 1, "seq": 1, "current_a": NaN, "cell_v": [], "temp_c": []}', "nonfinite"),
        (t1, b"x" * 70_000, "oversize"),
        (t0, p0, "duplicate"),
        (f"{prefix}/nobody/telemetry", p1, "unknown_pack"),
    ]
    async with (
        collecting(url, [f"{prefix}/+/state", f"{prefix}/+/errors"]) as col,
        running_service(config) as (service, _),
        publisher(url) as pub,
    ):
        await pub.publish(t0, p0, qos=1)
        await col.wait_for(lambda c: len(c.on("/state")) == 1, 10.0, "the first state")
        for topic, payload, _code in bad:
            await pub.publish(topic, payload, qos=1)
        await pub.publish(t1, p1, qos=1)
        await col.wait_for(lambda c: len(c.on("/state")) == 2, 10.0, "the second state")
        await col.wait_for(lambda c: len(c.on("/errors")) >= len(bad), 10.0, "all rejections")
    codes = [m.json()["code"] for m in col.on("/errors")]
    for _, _, code in bad:
        assert code in codes, (code, codes)
    assert col.on("/errors")[-1].json()["topic"].startswith(prefix)
    states = [m.json() for m in col.on("/state")]
    assert [s["seq"] for s in states] == [0, 1]
    assert all(math.isfinite(x) and 0 <= x <= 1 for x in states[1]["soc"])
    assert service.counters["rejected"] >= len(bad)


@pytest.mark.broker
async def test_stop_sets_status_offline_and_checkpoints(tmp_path: Path) -> None:
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=1, n_cells=4)
    prefix = sim.config.topic_prefix
    db = tmp_path / "state.sqlite"
    config = config_for(sim, url, checkpoint={"path": str(db), "interval_s": 3600.0})
    ticks = telemetry_ticks(sim, 3, dt=2.0)
    async with collecting(url, [f"{prefix}/+/state"]) as col:
        async with running_service(config), publisher(url) as pub:
            for tick in ticks:
                for topic, payload in tick:
                    await pub.publish(topic, payload, qos=1)
            await col.wait_for(lambda c: len(c.on("/state")) == 3, 10.0, "3 states")
        # run_service has returned: the last word is a retained "offline"
        async with collecting(url, [f"{prefix}/status/+"]) as status:
            await status.wait_for(lambda c: bool(c.messages), 5.0, "the retained status")
    assert status.messages[-1].json()["state"] == "offline"
    assert status.messages[-1].retain
    # The checkpoint written on the way out holds the last seq: a new service refuses it.
    restored = PackService(config)
    topic, payload = ticks[-1][0]
    out = restored.handle(topic, payload)
    assert [o.topic.rsplit("/", 1)[-1] for o in out] == ["errors"]
    assert json.loads(out[0].payload)["code"] in ("duplicate", "out_of_order")
    fresh = PackService(config.model_copy(update={"checkpoint": CheckpointConfig(path=None)}))
    assert fresh.handle(topic, payload)[0].topic.endswith("/state")


@pytest.mark.broker
@pytest.mark.subprocess
async def test_demo_shows_every_pack() -> None:
    out = io.StringIO()
    table = await demo(free_port(), packs=2, cells=4, rate=4.0, speed=10.0, duration=5.0, out=out)
    assert set(table.states) == {"pack-000", "pack-001"}
    for pack, state in table.states.items():
        assert state.get("seq", -1) >= 1, (pack, out.getvalue()[-500:])
        assert 0.0 <= state["pack_soc"] <= 1.0
    assert "pack-001" in out.getvalue()
    await asyncio.sleep(0)
