"""MT-SICS codec: round trips, error mapping, and garbage never crashing the parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import mtsics

grams = st.floats(min_value=-1000, max_value=1000, allow_nan=False).map(lambda g: round(g, 4))


@given(grams, st.sampled_from(["S", "D"]))
def test_weight_round_trip(g: float, status: str) -> None:
    reply = mtsics.decode_weight("SI", mtsics.format_weight("S", status, g))
    assert reply.grams == pytest.approx(g, abs=1e-9)
    assert reply.stable is (status == "S")


@given(st.binary(max_size=64), st.sampled_from(["S", "SI", "T", "TA"]))
def test_garbage_raises_only_instrument_errors(raw: bytes, command: str) -> None:
    try:
        mtsics.decode_weight(command, raw)
    except InstrumentError as exc:
        assert exc.raw == raw  # the raw reply is never lost
    for decode in (lambda: mtsics.decode_ack("Z", raw), lambda: mtsics.decode_serial_number(raw)):
        try:
            decode()
        except InstrumentError as exc:
            assert exc.raw == raw


@pytest.mark.parametrize(
    ("raw", "exc", "text"),
    [
        (b"S I\r\n", InstrumentBusyError, "not executable"),
        (b"S +\r\n", CommandRejectedError, "overload"),
        (b"S -\r\n", CommandRejectedError, "underload"),
        (b"ES\r\n", CommandRejectedError, "syntax"),
        (b"EL\r\n", CommandRejectedError, "logical"),
        (b"S S     1.0000 kg\r\n", ProtocolError, "unit 'kg'"),
        (b"T S     1.0000 g\r\n", ProtocolError, "reply to 'T'"),
        (b"S S     1.0000 g", ProtocolError, "not terminated"),
        (b"\xff\xfe\r\n", ProtocolError, "not a weight reply"),
    ],
)
def test_error_replies(raw: bytes, exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text) as info:
        mtsics.decode_weight("S", raw)
    assert info.value.raw == raw  # type: ignore[attr-defined]


def test_encode() -> None:
    assert mtsics.encode("S") == b"S\r\n"
    assert mtsics.encode_tare_preset(12.5) == b"TA 12.50000 g\r\n"
    with pytest.raises(ValueError, match="unknown MT-SICS command 'X'"):
        mtsics.encode("X")
    with pytest.raises(ValueError, match="grams"):
        mtsics.encode_tare_preset(float("nan"))


def test_serial_and_ack() -> None:
    assert mtsics.decode_serial_number(b'I4 A "B123"\r\n') == "B123"
    mtsics.decode_ack("Z", b"Z A\r\n")
    with pytest.raises(InstrumentBusyError):
        mtsics.decode_ack("Z", b"Z I\r\n")
