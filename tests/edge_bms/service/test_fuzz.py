"""At least 10,000 bad payloads through PackService.handle: each is rejected with one
errors message and leaves the pack as it was; good telemetry in between still gives
exactly the SOC of a fresh estimator fed only the good data."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_bms import PackEstimator, load_cell
from edge_bms.service.core import PackService

from .packdata import Clock, samples, service_config

N = 8
TOPIC = "bms/v1/p1/telemetry"
BATCHES, BATCH = 100, 110  # 11,000 bad payloads
BAD_VALUES = ["x", True, None, [], {}, -1.0, 1e999, 7.5, 0.0, 1e5, 2**70, -(2**70)]
FIELDS = ["ts", "seq", "current_a", "cell_v", "temp_c"]


def mutate(
    good: dict[str, Any], kind: int, field: str, value: Any, j: int, raw: bytes
) -> tuple[str, bytes]:
    """One bad (topic, payload) from a good sample that would otherwise be accepted."""
    d = json.loads(json.dumps(good))
    if kind == 0:  # random bytes
        return TOPIC, raw
    if kind == 1:  # a wrong value in a field (a list field gets it in one element)
        if type(value) is float and -1.0 <= value <= 7.5:  # plausible here: out of range
            value = {"ts": -value - 1, "current_a": 1e4, "temp_c": 151.0}.get(field, value)
        if field == "cell_v" and value is None:  # a null voltage is a valid dropout
            value = "3.7"
        if field in ("cell_v", "temp_c"):
            d[field][j % len(d[field])] = value
        else:
            d[field] = value
    elif kind == 2:  # a wrong length
        d[field if field in ("cell_v", "temp_c") else "cell_v"] = [3.7] * (
            N + 1 + j % 3 if j % 2 else j % N
        )
    elif kind == 3:  # a missing field
        del d[field]
    elif kind == 4:  # NaN / Infinity tokens
        text = json.dumps(d).replace("25.0", ["NaN", "Infinity", "-Infinity"][j % 3], 1)
        return TOPIC, text.encode()
    elif kind == 5:  # truncated
        whole = json.dumps(d).encode()
        return TOPIC, whole[: j % len(whole)]
    elif kind == 6:  # a whole payload of the wrong shape
        return TOPIC, json.dumps([d, value]).encode()
    elif kind == 7:  # a different pack, a different topic
        return ["bms/v1/p2/telemetry", "bms/v1/p1/cmd/nope", "bms/v1/p1/x", "x/y"][
            j % 4
        ], json.dumps(d).encode()
    elif kind == 8:  # a bad command
        body = [{"soc": 2.0}, {"soc": [0.5] * (N - 1)}, {"capacity_ah": -1}, {"alarm": "x"}][j % 4]
        name = ["reset_soc", "reset_soc", "set_capacity", "clear_alarm"][j % 4]
        return f"bms/v1/p1/cmd/{name}", json.dumps(body).encode()
    elif kind == 9:  # oversize
        return TOPIC, json.dumps(d).encode() + b" " * 4096
    return TOPIC, json.dumps(d).encode()


bad_item = st.tuples(
    st.integers(0, 10),  # 10: a replay of an earlier accepted sample
    st.sampled_from(FIELDS),
    st.sampled_from(BAD_VALUES),
    st.integers(0, 1000),
    st.binary(max_size=24),
)


def test_ten_thousand_bad_payloads_change_nothing() -> None:
    good = samples(BATCHES * 3 + 1, N, seed=3)
    cell = load_cell()
    sent: list[int] = []

    @settings(
        max_examples=BATCHES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(st.lists(bad_item, min_size=BATCH, max_size=BATCH))
    def run(batch: list[tuple[int, str, Any, int, bytes]]) -> None:
        s = PackService(service_config(N, limits={"max_payload_bytes": 4096}), now=Clock())
        ref = PackEstimator(cell, N)
        accepted: list[dict[str, Any]] = []
        k = 0
        for b, (kind, field, value, j, raw) in enumerate(batch):
            if b % 40 == 0:  # good telemetry every 40 bad payloads
                d = good[k]
                k += 1
                out = s.handle(TOPIC, json.dumps(d).encode())
                assert out[0].topic == "bms/v1/p1/state"
                ref.step(d["ts"], d["current_a"], d["cell_v"], d["temp_c"])
                accepted.append(d)
            if kind == 10:
                topic, payload = TOPIC, json.dumps(accepted[j % len(accepted)]).encode()
            else:
                topic, payload = mutate(good[k], kind, field, value, j, raw)
            before = s.estimator("p1").state_dict()
            out = s.handle(topic, payload)
            assert len(out) == 1, (topic, payload)
            assert out[0].topic.endswith("/errors"), (topic, payload, out[0].payload)
            assert s.estimator("p1").state_dict() == before
        assert s.counters["rejected"] == len(batch)
        assert s.counters["accepted"] == k
        for d in good[k : k + 5]:  # and on it goes
            s.handle(TOPIC, json.dumps(d).encode())
            ref.step(d["ts"], d["current_a"], d["cell_v"], d["temp_c"])
        st_ = s.estimator("p1").state
        assert st_ is not None and ref.state is not None
        assert np.array_equal(st_.x[0], ref.state.x[0])  # identical SOC
        sent.append(len(batch))

    run()
    assert sum(sent) >= 10_000
