"""NE-1000 codec: framing, round trips, error mapping, and garbage never crashing it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import ne1000
from labctl.devices.protocols.ne1000 import Alarm, Status

addresses = st.integers(min_value=0, max_value=99)
numbers = st.floats(min_value=0, max_value=9999.4, allow_nan=False)
data_text = st.text(alphabet="0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZ?", max_size=20)


def test_encode_basic_and_safe() -> None:
    assert ne1000.encode(0, "DIA", "14.43") == b"0DIA14.43\r"
    assert ne1000.encode(12) == b"12\r"  # a packet without a command is a status query
    assert ne1000.encode(None, "VER") == b"VER\r"
    # The manual's own example: the packet that returns a pump to basic mode.
    assert ne1000.encode(None, "SAF", "0", safe=True) == bytes(
        [0x02, 0x08, *b"SAF0", 0x55, 0x43, 0x03]
    )
    assert ne1000.encode_safe_mode(3, 0)[2:-3] == b"3SAF0"
    assert ne1000.encode_rate(1, 5000.0, ne1000.RateUnits.UL_PER_MIN) == b"1RAT5000UM\r"
    assert ne1000.encode_volume(0, 1.5) == b"0VOL1.500\r"
    assert ne1000.encode_volume_units(0, ne1000.VolumeUnits.UL) == b"0VOLUL\r"
    assert ne1000.encode_direction(4, ne1000.Direction.WITHDRAW) == b"4DIRWDR\r"
    assert ne1000.encode_clear(4, ne1000.Direction.INFUSE) == b"4CLDINF\r"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: ne1000.encode(100, "DIA"), "address"),
        (lambda: ne1000.encode(0, "XYZ"), "command"),
        (lambda: ne1000.encode(0, "DIA", "1\r"), "data"),
        (lambda: ne1000.encode_diameter(0, 60.0), "diameter"),
        (lambda: ne1000.encode_diameter(0, float("nan")), "diameter"),
        (lambda: ne1000.encode_volume(0, 12345.0), "volume"),
        (lambda: ne1000.encode_volume(0, -1.0), "volume"),
        (lambda: ne1000.best_rate_units(0.0), "rate"),
        (lambda: ne1000.best_volume_units(float("inf")), "volume"),
        (lambda: ne1000.encode_safe_mode(0, 256), "timeout_s"),
    ],
)
def test_encoders_reject_bad_arguments_naming_the_field(call: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("ml_min", "value", "units"),
    [(0.1, 6000.0, "UH"), (5.0, 5000.0, "UM"), (50.0, 3000.0, "MH"), (500.0, 500.0, "MM")],
)
def test_rate_units_keep_the_most_digits(ml_min: float, value: float, units: str) -> None:
    got, got_units = ne1000.best_rate_units(ml_min)
    assert got == pytest.approx(value)
    assert got_units == units
    assert got * got_units.ml_per_min == pytest.approx(ml_min)


@given(numbers)
def test_float_format_keeps_four_digits(value: float) -> None:
    text = ne1000.format_float(value)
    assert sum(c.isdigit() for c in text) <= 4
    assert "." not in text or len(text) - text.index(".") - 1 <= 3
    assert float(text) == pytest.approx(value, abs=ne1000.float_resolution(value) / 2 + 1e-12)
    assert ne1000.format_float(value, trailing_point=True).count(".") == 1


@given(addresses, st.sampled_from(list(Status)), data_text, st.booleans())
def test_reply_round_trip(address: int, status: Status, data: str, safe: bool) -> None:
    raw = ne1000.format_reply(address, status, data, safe=safe)
    reply = ne1000.decode_reply(raw, safe=safe)
    assert (reply.address, reply.status, reply.alarm, reply.data) == (address, status, None, data)
    assert ne1000.reply_complete(raw, safe=safe)
    # Every strict prefix is incomplete, even when the CRC holds 0x02 or 0x03 bytes.
    if safe:
        assert not any(ne1000.reply_complete(raw[:n], safe=True) for n in range(len(raw)))


@given(addresses, st.sampled_from(list(Alarm)), st.booleans())
def test_alarm_round_trip_and_mapping(address: int, alarm: Alarm, safe: bool) -> None:
    raw = ne1000.format_reply(address, alarm, safe=safe)
    reply = ne1000.decode_reply(raw, safe=safe)
    assert (reply.status, reply.alarm) == (None, alarm)
    if not safe:
        with pytest.raises(ne1000.PumpAlarmError) as info:
            ne1000.decode_status(raw, address)
        assert info.value.alarm is alarm
        assert info.value.raw == raw


@given(st.binary(max_size=48), st.booleans())
def test_garbage_raises_only_instrument_errors(raw: bytes, safe: bool) -> None:
    try:
        ne1000.decode_reply(raw, safe=safe)
    except InstrumentError as exc:
        assert exc.raw == raw  # the raw reply is never lost
    decoders = [
        ne1000.decode_status,
        ne1000.decode_float,
        ne1000.decode_rate,
        ne1000.decode_volume,
        ne1000.decode_direction,
        ne1000.decode_dispensed,
        ne1000.decode_version,
        ne1000.decode_safe_timeout,
    ]
    for decode in decoders:
        try:
            decode(raw, 0)
        except InstrumentError as exc:
            assert exc.raw == raw
    ne1000.reply_complete(raw, safe=safe)  # never raises
    ne1000.reply_complete_for(0, ne1000.EXPECT_STATUS)(raw)


@given(addresses, st.integers(min_value=2, max_value=20), st.integers(min_value=0, max_value=255))
def test_corrupted_safe_reply_fails_its_crc(address: int, index: int, flip: int) -> None:
    raw = bytearray(ne1000.format_reply(address, Status.STOPPED, "14.43", safe=True))
    index = index % (len(raw) - 3) + 2  # somewhere in the text or the CRC
    raw[index] ^= flip or 1
    # CRC-16 catches every single-byte error, in the text or in the CRC itself.
    with pytest.raises(ProtocolError, match="CRC"):
        ne1000.decode_reply(bytes(raw), safe=True)


@pytest.mark.parametrize(
    ("data", "exc", "text"),
    [
        ("?", CommandRejectedError, "not recognised"),
        ("?NA", CommandRejectedError, "not currently applicable"),
        ("?OOR", CommandRejectedError, "out of range"),
        ("?COM", ProtocolError, "invalid communications packet"),
        ("?IGN", InstrumentBusyError, "ignored"),
        ("?XYZ", ProtocolError, "unknown error code"),
    ],
)
def test_error_replies(data: str, exc: type[Exception], text: str) -> None:
    raw = ne1000.format_reply(3, Status.STOPPED, data)
    with pytest.raises(exc, match=text) as info:
        ne1000.decode_status(raw, 3)
    assert info.value.raw == raw  # type: ignore[attr-defined]


def test_query_decoders() -> None:
    def reply(data: str, status: Status = Status.STOPPED) -> bytes:
        return ne1000.format_reply(2, status, data)

    assert ne1000.decode_float(reply("14.43"), 2) == 14.43
    value, units = ne1000.decode_rate(reply("5000.UM"), 2)
    assert value * units.ml_per_min == pytest.approx(5.0)
    assert ne1000.decode_volume(reply("1.500ML"), 2) == (1.5, ne1000.VolumeUnits.ML)
    assert ne1000.decode_direction(reply("WDR"), 2) is ne1000.Direction.WITHDRAW
    dis = ne1000.decode_dispensed(reply("I1000.W2.500UL", Status.INFUSING), 2)
    assert dis.infused_ml == pytest.approx(1.0)
    assert dis.withdrawn_ml == pytest.approx(0.0025)
    version = ne1000.decode_version(reply("NE1000V3.928"), 2)
    assert (version.model, version.major, version.minor, version.upgrade) == (1000, 3, 928, 0)
    assert ne1000.decode_version(reply("NE1000X2V3.934"), 2).upgrade == 2
    assert ne1000.decode_safe_timeout(reply("10"), 2) == 10
    assert ne1000.decode_status(reply("", Status.PURGING), 2) is Status.PURGING
    with pytest.raises(ProtocolError, match="unexpected data"):
        ne1000.decode_rate(reply("5000.XX"), 2)
    with pytest.raises(ProtocolError, match="from pump 2 while talking to pump 5"):
        ne1000.decode_status(reply(""), 5)


def test_stale_replies_are_read_past() -> None:
    stale_other_pump = ne1000.format_reply(1, Status.STOPPED, "")
    stale_query = ne1000.format_reply(0, Status.STOPPED, "I1.000W0.000ML")
    mine = ne1000.format_reply(0, Status.INFUSING, "")
    complete = ne1000.reply_complete_for(0, ne1000.EXPECT_STATUS)
    assert not complete(stale_other_pump)
    assert not complete(stale_other_pump + stale_query)
    assert not complete(stale_other_pump + stale_query + mine[:-1])
    buf = stale_other_pump + stale_query + mine
    assert complete(buf)
    assert ne1000.decode_status(ne1000.last_frame(buf), 0) is Status.INFUSING
    # An error or an alarm ends the wait whatever shape was expected.
    assert ne1000.reply_complete_for(0, ne1000.EXPECT_DISPENSED)(
        ne1000.format_reply(0, Status.STOPPED, "?NA")
    )
    assert ne1000.reply_complete_for(0, ne1000.EXPECT_FLOAT)(b"\x01\xff\x03")  # garbage


def test_resolution_of_the_display() -> None:
    assert ne1000.float_resolution(1.0) == pytest.approx(0.001)
    assert ne1000.float_resolution(12.34) == pytest.approx(0.01)
    assert ne1000.float_resolution(1000.0) == 1.0
    assert math.isclose(float(ne1000.format_float(9.9996)), 10.0)
