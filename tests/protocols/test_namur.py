"""IKA NAMUR codec: round trips, argument validation, and garbage never crashing the parser."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import InstrumentError, ProtocolError
from labctl.devices.protocols import namur

values = st.floats(min_value=-50.0, max_value=5000.0, allow_nan=False)
channels = st.sampled_from(sorted(namur.READ_CHANNELS))


@given(values, channels)
def test_value_round_trip(value: float, channel: int) -> None:
    decoded = namur.decode_value(namur.format_value(value, channel), channel)
    assert decoded == pytest.approx(value, abs=0.05 + 1e-9)


@given(st.floats(min_value=0.0, max_value=9999.9, allow_nan=False), st.sampled_from([1, 4]))
def test_setpoint_encoding_is_what_ika_firmware_parses(value: float, channel: int) -> None:
    frame = namur.encode_setpoint(channel, value)
    m = re.fullmatch(rb"OUT_SP_([14]) (\d+(?:\.\d)?)\r\n", frame)
    assert m is not None, frame
    assert int(m.group(1)) == channel
    assert float(m.group(2)) == pytest.approx(value, abs=0.05 + 1e-9)


@given(st.binary(max_size=64), channels)
def test_garbage_raises_only_instrument_errors(raw: bytes, channel: int) -> None:
    for decode in (lambda: namur.decode_value(raw, channel), lambda: namur.decode_name(raw)):
        try:
            decode()
        except InstrumentError as exc:
            assert exc.raw == raw  # the raw reply is never lost


@pytest.mark.parametrize(
    ("raw", "channel", "text"),
    [
        (b"25.3 2\r\n", 1, "channel 2 while waiting for channel 1"),
        (b"25.3 1", 1, "not terminated"),
        (b"25.3 1\r\n300.0 4\r\n", 1, "more than one line"),
        (b"25.3\r\n", 1, "not a NAMUR value reply"),
        (b"RCT digital\r\n", 4, "not a NAMUR value reply"),
    ],
)
def test_malformed_value_replies(raw: bytes, channel: int, text: str) -> None:
    with pytest.raises(ProtocolError, match=text) as info:
        namur.decode_value(raw, channel)
    assert info.value.raw == raw


def test_commands_on_the_wire() -> None:
    assert namur.encode_read_value(namur.SPEED) == b"IN_PV_4\r\n"
    assert namur.encode_read_value(namur.PLATE_TEMPERATURE) == b"IN_PV_2\r\n"
    assert namur.encode_read_setpoint(namur.MEDIUM_TEMPERATURE) == b"IN_SP_1\r\n"
    assert namur.encode_setpoint(namur.SPEED, 300) == b"OUT_SP_4 300\r\n"
    assert namur.encode_setpoint(namur.MEDIUM_TEMPERATURE, 60.5) == b"OUT_SP_1 60.5\r\n"
    assert namur.encode_start(4) == b"START_4\r\n"
    assert namur.encode_stop(1) == b"STOP_1\r\n"
    assert namur.encode_name() == b"IN_NAME\r\n"
    assert namur.encode_reset() == b"RESET\r\n"
    assert namur.decode_value(b"299.8 4\r\n", 4) == pytest.approx(299.8)
    assert namur.decode_value(b"-0.5 1\r\n", 1) == pytest.approx(-0.5)
    assert namur.decode_name(b"RCT digital\r\n") == "RCT digital"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: namur.encode_setpoint(2, 50.0), "channel"),  # the plate has no setpoint
        (lambda: namur.encode_setpoint(4, -1.0), "value"),
        (lambda: namur.encode_setpoint(4, float("nan")), "value"),
        (lambda: namur.encode_setpoint(4, True), "value"),
        (lambda: namur.encode_read_value(7), "channel"),
        (lambda: namur.encode_start(2), "channel"),
    ],
)
def test_encode_validates_arguments(call: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()  # type: ignore[operator]


def test_a_value_is_not_a_name() -> None:
    with pytest.raises(ProtocolError, match="value reply"):
        namur.decode_name(b"25.0 1\r\n")
