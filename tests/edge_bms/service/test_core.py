"""PackService without a broker: telemetry -> state, rejections -> errors (state
untouched), order rules, unknown packs, commands with acks, alarms."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_bms import PackEstimator, load_cell
from edge_bms.service.core import Outgoing, PackService

from .packdata import T0, Clock, encode, samples, service_config

TOPIC = "bms/v1/p1/telemetry"


def svc(**over: Any) -> PackService:
    return PackService(service_config(**over), now=Clock(T0 + 10_000))


def errors(out: list[Outgoing]) -> list[dict[str, Any]]:
    return [json.loads(o.payload) for o in out if o.topic.endswith("/errors")]


def reject(s: PackService, payload: bytes | dict[str, Any], topic: str = TOPIC) -> str:
    raw = payload if isinstance(payload, bytes) else encode(payload)
    before = s.estimator("p1").state_dict()
    out = s.handle(topic, raw)
    assert s.estimator("p1").state_dict() == before  # untouched
    assert len(out) == 1
    (err,) = errors(out)
    assert err["topic"] == topic
    return str(err["code"])


def test_state_messages_match_a_plain_estimator_fed_the_same_data() -> None:
    s = svc()
    ref = PackEstimator(load_cell(), 8)
    for d in samples(30):
        out = s.handle(TOPIC, encode(d))
        e = ref.step(d["ts"], d["current_a"], d["cell_v"], d["temp_c"])
    assert [o.topic for o in out] == ["bms/v1/p1/state"]
    assert out[0].qos == 1
    state = json.loads(out[0].payload)
    assert state["seq"] == 29
    assert state["ts"] == d["ts"]
    assert state["soc"] == np.round(e.soc, 6).tolist()
    assert state["pack_soc"] == round(e.pack_soc, 6)
    assert state["model"] == {
        "cell": "lg-m50",
        "correction": None,
        "correction_used": False,
        "method": "ekf",
    }
    assert state["sop"]["i_discharge_a"] > 0
    assert np.array_equal(s.estimator("p1").state.x, ref.state.x)  # type: ignore[union-attr]
    assert s.counters["accepted"] == 30


def test_rejections_leave_the_state_untouched_and_are_counted() -> None:
    s = svc()
    good = samples(3)
    for d in good[:2]:
        s.handle(TOPIC, encode(d))
    nxt = good[2]
    cases: dict[str, bytes | dict[str, Any]] = {
        "json": b"{not json",
        "type": {**nxt, "current_a": "5"},
        "nonfinite": encode(nxt).replace(b'"ts": ', b'"ts": NaN, "x": '),
        "range": {**nxt, "cell_v": [3.7] * 7 + [9.0]},
        "cell_count": {**nxt, "cell_v": [3.7] * 9},
        "duplicate": good[1],
        "out_of_order": {**nxt, "seq": 5, "ts": good[1]["ts"] - 0.5},
        "future": {**nxt, "ts": T0 + 10_000 + 301},
        "oversize": b" " * 70_000,
    }
    for code, payload in cases.items():
        assert reject(s, payload) == code, code
    assert s.counters["rejected"] == len(cases)
    assert all(s.counters[f"rejected.{c}"] == 1 for c in cases)
    assert s.counters["accepted"] == 2
    assert errors(s.handle(TOPIC, encode(nxt))) == []  # the next good sample goes through


def test_order_rules_and_a_restarted_publisher() -> None:
    s = svc()
    d = samples(6)
    for k in (0, 1, 2):
        s.handle(TOPIC, encode(d[k]))
    assert reject(s, {**d[3], "seq": 1}) == "out_of_order"  # lower seq, newer ts
    assert reject(s, {**d[3], "ts": d[2]["ts"]}) == "out_of_order"  # same ts
    assert reject(s, {**d[3], "seq": 2}) == "duplicate"
    # a publisher restart: seq 0 again with a ts after the last accepted one
    out = s.handle(TOPIC, encode({**d[3], "seq": 0}))
    assert json.loads(out[0].payload)["seq"] == 0
    assert s.counters["seq_reset"] == 1
    assert reject(s, {**d[4], "seq": 0}) == "duplicate"
    assert errors(s.handle(TOPIC, encode({**d[4], "seq": 1}))) == []


def test_unknown_packs_topics_and_commands() -> None:
    s = svc()
    out = s.handle("bms/v1/p9/telemetry", encode(samples(1)[0]))
    assert out[0].topic == "bms/v1/p9/errors"
    assert json.loads(out[0].payload)["code"] == "unknown_pack"
    for topic in ("bms/v1/p1/telemetry/x", "other/p1/telemetry", "bms/v1/p+1/telemetry"):
        (o,) = s.handle(topic, b"{}")
        assert o.topic == "bms/v1/status/test/errors"
        assert json.loads(o.payload)["code"] == "topic"
    (o,) = s.handle("bms/v1/p1/cmd/explode", b"{}")
    assert json.loads(o.payload)["code"] == "unknown_command"
    assert s.counters["rejected"] == 5


def test_accept_unknown_packs_sizes_them_from_the_first_message() -> None:
    s = PackService(
        service_config(packs=[], accept_unknown_packs=True, limits={"max_unknown_packs": 1}),
        now=Clock(T0 + 10_000),
    )
    d = samples(2, 16)[0]
    d["temp_c"] = [25.0, 25.0, 26.0]  # 3 sensors over 16 cells: 6, 6, 4
    out = s.handle("bms/v1/new/telemetry", encode(d))
    assert out[0].topic == "bms/v1/new/state"
    assert s.pack_ids == ["new"]
    assert s.pack_state("new")["cells_per_temp_sensor"] == 6
    (o,) = s.handle("bms/v1/other/telemetry", encode(d))
    assert json.loads(o.payload)["code"] == "too_many_packs"


def test_temperature_sensors_cover_groups_of_cells() -> None:
    s = svc(packs=[{"id": "p1", "n_cells": 20, "cells_per_temp_sensor": 8}])
    d = samples(1, 20)[0]
    assert reject(s, d) == "cell_count"  # 20 temperatures, 3 expected
    d["temp_c"] = [10.0, 20.0, 30.0]
    s.handle(TOPIC, encode(d))
    ref = PackEstimator(load_cell(), 20)
    e = ref.step(d["ts"], d["current_a"], d["cell_v"], [10.0] * 8 + [20.0] * 8 + [30.0] * 4)
    assert np.array_equal(s.estimator("p1").state.x, ref.state.x)  # type: ignore[union-attr]
    assert e.temp_c[15] == 20.0


def command(s: PackService, name: str, body: Any) -> list[dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return [
        json.loads(o.payload) | {"_topic": o.topic} for o in s.handle(f"bms/v1/p1/cmd/{name}", raw)
    ]


def test_reset_soc_and_set_capacity_are_validated_and_acknowledged() -> None:
    s = svc()
    d = samples(5)
    for x in d[:3]:
        s.handle(TOPIC, encode(x))
    (ack,) = command(s, "reset_soc", {"soc": 0.25, "id": "r1"})
    assert ack["_topic"] == "bms/v1/p1/cmd_ack"
    assert (ack["ok"], ack["id"], ack["command"]) == (True, "r1", "reset_soc")
    assert s.estimator("p1").state.x[0].tolist() == [0.25] * 8  # type: ignore[union-attr]
    before = s.estimator("p1").state_dict()
    for bad in ({"soc": 1.5}, {"soc": [0.5] * 7}, {"soc": "0.5"}, {"sock": 0.5}, {}, [0.5], b"{x"):
        (err,) = command(s, "reset_soc", bad)
        assert err["_topic"] == "bms/v1/p1/errors"
        assert err["code"] in ("bad_command", "json"), bad
    assert s.estimator("p1").state_dict() == before
    (ack,) = command(s, "set_capacity", {"capacity_ah": [4.0] * 4 + [5.0] * 4})
    assert ack["result"]["capacity_ah"] == [4.0] * 4 + [5.0] * 4
    state = json.loads(s.handle(TOPIC, encode(d[3]))[0].payload)
    assert state["capacity_ah"] == [4.0] * 4 + [5.0] * 4
    assert 0.25 < state["soc"][0] < 0.3  # the reset SOC carried on (the filter moves it)
    (err,) = command(s, "set_capacity", {"capacity_ah": 0})
    assert err["code"] == "bad_command"


def test_a_latched_alarm_is_published_retained_and_cleared_by_command() -> None:
    s = svc()
    d = samples(10)
    s.handle(TOPIC, encode(d[0]))
    high = [4.4, *d[1]["cell_v"][1:]]
    out = s.handle(TOPIC, encode({**d[1], "cell_v": high}))
    assert len(out) == 1  # debounce: 2 samples and 1 s
    out = s.handle(TOPIC, encode({**d[2], "cell_v": high}))
    alarms = [o for o in out if o.topic == "bms/v1/p1/alarms"]
    assert len(alarms) == 1
    assert alarms[0].retain
    msg = json.loads(alarms[0].payload)
    assert msg["events"][0]["kind"] == "over_voltage"
    assert msg["events"][0]["cell"] == 0
    assert json.loads(out[0].payload)["alarms_active"] == 1
    # still high: the clear is refused (hysteresis) but acknowledged
    (ack,) = command(s, "clear_alarm", {"alarm": "over_voltage"})
    assert ack["ok"] is False
    assert "hysteresis" in ack["result"]["refused"][0]["reason"]
    s.handle(TOPIC, encode(d[3]))
    msgs = command(s, "clear_alarm", {"alarm": "all"})
    assert [m["_topic"] for m in msgs] == ["bms/v1/p1/cmd_ack", "bms/v1/p1/alarms"]
    assert msgs[0]["ok"] is True
    assert msgs[1]["active"] == []
    (err,) = command(s, "clear_alarm", {"alarm": "over_pressure"})
    assert err["code"] == "bad_command"


def test_status_and_subscriptions() -> None:
    s = svc()
    assert s.subscriptions() == ["bms/v1/+/telemetry", "bms/v1/+/cmd/#"]
    assert s.status_topic() == "bms/v1/status/test"
    st = json.loads(s.status_payload(False))
    assert st == {"instance": "test", "state": "offline", "ts": T0 + 10_000, "packs": ["p1"]}


def test_an_internal_error_costs_one_message_not_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = svc()
    est = s.estimator("p1")

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(est, "step", boom)
    (o,) = s.handle(TOPIC, encode(samples(1)[0]))
    assert json.loads(o.payload)["code"] == "internal"
    assert s.counters["rejected.internal"] == 1


def test_sop_is_computed_once_per_interval_spread_over_packs() -> None:
    packs = [{"id": f"p{j}", "n_cells": 8} for j in range(20)]
    s = svc(packs=packs)
    per_tick = []
    for d in samples(31):
        before = s.counters.get("sop", 0)
        for j in range(20):
            out = s.handle(f"bms/v1/p{j}/telemetry", encode(d))
            sop = json.loads(out[0].payload)["sop"]
            assert sop is None or sop["ts"] <= d["ts"]
        per_tick.append(s.counters.get("sop", 0) - before)
    assert per_tick[0] == 0  # no burst of SOPs when every pack starts on one tick
    assert sum(per_tick[1:]) == 60  # one per pack per 10 s, at the pack's own slot
    assert max(per_tick[1:]) <= 8  # not all 20 on the same tick
