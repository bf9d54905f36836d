"""Telemetry decoding: every malformed input is a Rejected with a stable code, never
another exception; what passes is what the estimator takes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_bms import PackEstimator, load_cell
from edge_bms.service.codec import (
    Rejected,
    decode_telemetry,
    encode_ack,
    encode_error,
    encode_state,
)
from edge_bms.service.config import LimitsConfig

LIMITS = LimitsConfig()
GOOD: dict[str, Any] = {
    "ts": 100.5,
    "seq": 7,
    "current_a": -2,
    "cell_v": [3.7, 3.71, 3.69],
    "temp_c": [25.0, 26],
}


def decode(obj: Any, n_cells: int = 3, n_temp: int = 2, **limits: Any) -> Any:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return decode_telemetry(
        raw, n_cells=n_cells, n_temp=n_temp, limits=LimitsConfig(**limits) if limits else LIMITS
    )


def code_of(obj: Any, **kw: Any) -> str:
    with pytest.raises(Rejected) as info:
        decode(obj, **kw)
    return info.value.code


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def test_a_good_sample_decodes_to_float_arrays() -> None:
    t = decode(GOOD)
    assert (t.ts, t.seq, t.current_a) == (100.5, 7, -2.0)
    assert t.cell_v.dtype == np.float64
    assert t.cell_v.tolist() == [3.7, 3.71, 3.69]
    assert t.temp_c.tolist() == [25.0, 26.0]


def test_null_is_a_missing_voltage_that_the_estimator_predicts_through() -> None:
    t = decode({**GOOD, "cell_v": [3.7, None, 3.69], "temp_c": [25.0, 25.0, 25.0]}, n_temp=3)
    assert np.isnan(t.cell_v[1])
    est = PackEstimator(load_cell(), 3)
    est.step(t.ts, t.current_a, t.cell_v, t.temp_c)
    e = est.step(t.ts + 1, t.current_a, t.cell_v, t.temp_c)
    assert e.flags.dropout == (1,)


def test_unknown_keys_are_ignored() -> None:
    assert decode(with_(extra={"x": 1})).seq == 7


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "json"),
        (b"{", "json"),
        (b"\xff\xfe\x00garbage", "json"),
        (b"[" * 5000 + b"]" * 5000, "json"),
        (b"[1, 2]", "schema"),
        (b"null", "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "cell_v"}).encode(), "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "seq"}).encode(), "schema"),
        (json.dumps(with_(seq="7")).encode(), "type"),
        (json.dumps(with_(seq=7.0)).encode(), "type"),
        (json.dumps(with_(seq=True)).encode(), "type"),
        (json.dumps(with_(seq=-1)).encode(), "range"),
        (json.dumps(with_(seq=2**64)).encode(), "range"),
        (json.dumps(with_(ts="100")).encode(), "type"),
        (json.dumps(with_(ts=-1.0)).encode(), "range"),
        (json.dumps(with_(current_a=None)).encode(), "type"),
        (json.dumps(with_(current_a=False)).encode(), "type"),
        (json.dumps(with_(current_a=5000.0)).encode(), "range"),
        (json.dumps(with_(current_a=10**400)).encode(), "range"),
        (
            b'{"ts": NaN, "seq": 1, "current_a": 0, "cell_v": [3.7,3.7,3.7], "temp_c": [25,25]}',
            "nonfinite",
        ),
        (json.dumps(with_(ts=1e999)).encode().replace(b"Infinity", b"1e999"), "nonfinite"),
        (json.dumps(with_(cell_v=[3.7, "3.7", 3.7])).encode(), "type"),
        (json.dumps(with_(cell_v=[3.7, True, 3.7])).encode(), "type"),
        (json.dumps(with_(cell_v=[3.7, [3.7], 3.7])).encode(), "type"),
        (json.dumps(with_(cell_v="3.7,3.7,3.7")).encode(), "type"),
        (json.dumps(with_(cell_v=[3.7, 3.7])).encode(), "cell_count"),
        (json.dumps(with_(cell_v=[3.7, 3.7, 3.7, 3.7])).encode(), "cell_count"),
        (json.dumps(with_(cell_v=[3.7, 0.0, 3.7])).encode(), "range"),
        (json.dumps(with_(cell_v=[3.7, 6.0, 3.7])).encode(), "range"),
        (json.dumps(with_(cell_v=[3.7, -1, 3.7])).encode(), "range"),
        (json.dumps(with_(cell_v=[None, None, None])).encode(), "range"),
        (
            b'{"ts": 1, "seq": 1, "current_a": 0, "cell_v": [3.7,-Infinity,3.7], '
            b'"temp_c": [25,25]}',
            "nonfinite",
        ),
        (
            b'{"ts": 1, "seq": 1, "current_a": 0, "cell_v": [3.7,1e999,3.7], "temp_c": [25,25]}',
            "nonfinite",
        ),
        (json.dumps(with_(temp_c=[25.0])).encode(), "cell_count"),
        (json.dumps(with_(temp_c=[25.0, None])).encode(), "type"),
        (json.dumps(with_(temp_c=[25.0, 151.0])).encode(), "range"),
        (json.dumps(with_(temp_c=[-61, 25])).encode(), "range"),
    ],
)
def test_bad_payloads_are_rejected_with_a_stable_code(payload: bytes, code: str) -> None:
    assert code_of(payload) == code


def test_oversize_is_refused_before_parsing() -> None:
    raw = json.dumps(with_(pad="x" * 100)).encode()
    with pytest.raises(Rejected) as info:
        decode_telemetry(raw, n_cells=3, n_temp=2, limits=LimitsConfig(max_payload_bytes=100))
    assert info.value.code == "oversize"
    assert str(len(raw)) in info.value.detail


def test_the_rejection_carries_the_seq_and_a_short_detail() -> None:
    with pytest.raises(Rejected) as info:
        decode(with_(cell_v=[3.7, "x" * 10_000, 3.7]))
    assert info.value.seq == 7
    assert len(info.value.detail) < 250
    assert "cell_v[1]" in info.value.detail


def test_codec_limits_lie_within_the_estimators() -> None:
    # what the codec lets through at its edges, the estimator takes
    lim = LimitsConfig(voltage_v=(0.0, 10.0), current_a_abs=1e4)
    t = decode_telemetry(
        json.dumps(with_(cell_v=[1e-9, 9.999, 3.7], current_a=1e4, temp_c=[-60, 150])).encode(),
        n_cells=3,
        n_temp=2,
        limits=lim,
    )
    PackEstimator(load_cell(), 3).step(t.ts, t.current_a, t.cell_v, np.repeat(t.temp_c, 2)[:3])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_rejected(raw: bytes) -> None:
    with pytest.raises(Rejected):
        decode(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.sampled_from(sorted(GOOD)), json_values)
def test_any_json_in_any_field_is_either_valid_or_rejected(key: str, value: Any) -> None:
    obj = with_(**{key: value})
    try:
        t = decode(obj)
    except Rejected as exc:
        assert exc.code in {"json", "schema", "type", "nonfinite", "range", "cell_count"}
        return
    # accepted: then the estimator takes it
    PackEstimator(load_cell(), 3).step(t.ts, t.current_a, t.cell_v, np.repeat(t.temp_c, 2)[:3])


def test_outgoing_payloads_are_compact_json() -> None:
    state = json.loads(
        encode_state(
            pack="p1",
            ts=1.0,
            seq=3,
            soc=np.array([0.5123456789, np.nan]),
            soc_sigma=np.array([0.01, 0.02]),
            pack_soc=0.4,
            capacity_ah=np.array([5.0, 5.0]),
            sop=None,
            model={"cell": "lg-m50", "correction": None, "correction_used": False},
            instance="gw",
        )
    )
    assert state["soc"] == [0.512346, None]
    assert {"ts", "seq", "pack", "soc", "soc_sigma", "pack_soc", "sop", "model"} <= set(state)
    err = encode_error(ts=1.0, pack="p1", topic="t", code="json", detail="d", seq=4)
    assert b" " not in err
    assert json.loads(err) == {
        "ts": 1.0,
        "pack": "p1",
        "topic": "t",
        "code": "json",
        "detail": "d",
        "seq": 4,
    }
    ack = json.loads(
        encode_ack(ts=1.0, pack="p1", command="c", ok=True, result={}, request_id="r1")
    )
    assert ack["id"] == "r1"


def test_payloads_other_than_bytes() -> None:
    raw = json.dumps(GOOD).encode()
    assert decode_telemetry(memoryview(raw), n_cells=3, n_temp=2, limits=LIMITS).seq == 7  # type: ignore[arg-type]
    assert decode_telemetry(bytearray(raw), n_cells=3, n_temp=2, limits=LIMITS).seq == 7  # type: ignore[arg-type]
    with pytest.raises(Rejected) as info:
        decode_telemetry(None, n_cells=3, n_temp=2, limits=LIMITS)  # type: ignore[arg-type]
    assert info.value.code == "json"
