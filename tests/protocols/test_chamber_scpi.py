"""SCPI helpers and the chamber codec: round trips, error mapping, garbage never crashing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import chamber, scpi

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
temps = st.floats(min_value=-273.0, max_value=1999.0, allow_nan=False)
# Printable ASCII without the characters SCPI strings/fields cannot carry unescaped.
field = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='",;'),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip() == s and s != "")
HEADERS = ["SOUR:TEMP", "SOURce:TEMPerature:RAMP", "OUTP", "MEAS:TEMP?", "*RST", "SYST:ERR?"]


def _assert_only_instrument_errors(decode: Callable[[bytes], Any], raw: bytes) -> None:
    try:
        decode(raw)
    except InstrumentError as exc:
        assert exc.raw == raw  # the raw reply always travels with the error


# -- scpi.py -----------------------------------------------------------------------------------
@given(st.sampled_from(HEADERS), finite)
def test_scpi_encode_number_round_trips_to_6_significant_digits(header: str, x: float) -> None:
    payload = scpi.encode(header, x)
    assert payload.endswith(b"\n")
    assert payload.count(b"\n") == 1
    head, _, arg = payload[:-1].partition(b" ")
    assert head == header.encode()
    assert float(arg) == pytest.approx(x, rel=5e-6, abs=1e-300)


@given(finite)
def test_scpi_decode_float_round_trips_nr1_nr2_nr3(x: float) -> None:
    for text in (f"{x:+.5E}", f"{x:.6g}", repr(x)):
        if abs(float(text)) >= 9.9e37:  # SCPI's NaN/overflow marker is refused by design
            with pytest.raises(ProtocolError, match="not a number"):
                scpi.decode_float(text.encode() + b"\n")
            continue
        assert scpi.decode_float(text.encode() + b"\r\n") == float(text)


@given(st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=8))
def test_scpi_decode_floats_round_trip(values: list[float]) -> None:
    raw = ",".join(f"{v:+.5E}" for v in values).encode() + b"\n"
    out = scpi.decode_floats(raw, count=len(values))
    assert out == [float(f"{v:+.5E}") for v in values]
    with pytest.raises(ProtocolError, match=f"expected {len(values) + 1}"):
        scpi.decode_floats(raw, count=len(values) + 1)


@given(st.integers(-(10**9), 10**9), st.booleans())
def test_scpi_int_and_bool_round_trip(n: int, b: bool) -> None:
    assert scpi.decode_int(f"{n:+d}\n".encode()) == n
    assert scpi.decode_bool(b"1\n" if b else b"0\n") is b
    assert scpi.decode_bool(b"ON\n" if b else b"OFF\n") is b


@given(st.integers(-999, 999), field)
def test_scpi_error_round_trip(code: int, message: str) -> None:
    err = scpi.decode_error(f'{code},"{message}"\n'.encode())
    assert (err.code, err.message, err.ok) == (code, message, code == 0)


@given(field, field, field, field)
def test_scpi_identity_round_trip(maker: str, model: str, serial: str, fw: str) -> None:
    ident = scpi.decode_identity(f"{maker},{model},{serial},{fw}\n".encode())
    assert ident == scpi.Identity(maker.strip(), model.strip(), serial.strip(), fw.strip())


@given(st.binary(max_size=64))
def test_scpi_garbage_raises_only_instrument_errors(raw: bytes) -> None:
    for decode in (
        scpi.decode_float,
        scpi.decode_floats,
        scpi.decode_int,
        scpi.decode_bool,
        scpi.decode_string,
        scpi.decode_identity,
        scpi.decode_error,
    ):
        _assert_only_instrument_errors(decode, raw)
        _assert_only_instrument_errors(decode, raw + b"\n")  # terminated garbage parses further


@given(st.from_regex(rb"\A[+-]?[0-9]{1,30}(\.[0-9]{0,10})?([eE][+-]?[0-9]{1,4})?\n\Z"))
def test_scpi_number_like_garbage_raises_only_instrument_errors(raw: bytes) -> None:
    for decode in (scpi.decode_float, scpi.decode_int, scpi.decode_error):
        _assert_only_instrument_errors(decode, raw)


def test_scpi_encode_validates() -> None:
    assert scpi.encode("OUTP", True) == b"OUTP ON\n"
    assert scpi.encode("*IDN?") == b"*IDN?\n"
    with pytest.raises(ValueError, match="header"):
        scpi.encode("SOUR TEMP")
    with pytest.raises(ValueError, match="finite"):
        scpi.encode("SOUR:TEMP", math.nan)
    with pytest.raises(ValueError, match="';'"):
        scpi.encode("SYST:ERR?", "1;*RST")


def test_scpi_raise_for_error() -> None:
    scpi.raise_for_error(scpi.ScpiError(0, "No error"), b"X\n", b'0,"No error"\n')
    with pytest.raises(CommandRejectedError, match="-113: Undefined header") as info:
        scpi.raise_for_error(scpi.ScpiError(-113, "Undefined header"), b"X\n", b"r\n")
    assert info.value.raw == b"r\n"


# Regressions: defects of scpi.py found by the property tests above.
def test_scpi_decode_int_on_a_5000_digit_reply_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        scpi.decode_int(b"1" * 5000 + b"\n")


def test_scpi_encode_refuses_a_header_with_a_line_feed() -> None:
    with pytest.raises(ValueError, match="header"):
        scpi.encode("SOUR:TEMP\n", 1.0)  # would send two program messages


# -- chamber codec ------------------------------------------------------------------------------
@given(st.floats(-40.0, 150.0, allow_nan=False))
def test_setpoint_encoding_round_trip(celsius: float) -> None:
    payload = chamber.encode_setpoint(celsius)
    assert payload.startswith(b"SOUR:TEMP ")
    # scpi.encode sends 6 significant digits: 1 mK resolution above 100 degC
    assert float(payload.split()[1]) == pytest.approx(celsius, abs=5.0001e-4)


@given(st.integers(0, (1 << 15) - 1))
def test_condition_register_round_trip(register: int) -> None:
    cond = chamber.decode_condition(f"{register}\n".encode())
    known = chamber.OPER_SETTLING | chamber.OPER_SWEEPING | chamber.OPER_RUNNING
    known |= chamber.OPER_STABLE
    assert cond.register == register & known
    assert cond.stable is bool(register & 512)
    assert cond.running is bool(register & 256)


@given(temps, temps, st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_status_round_trip(
    t: float, sp: float, settling: bool, ramping: bool, running: bool, stable: bool
) -> None:
    status = chamber.ChamberStatus(t, sp, chamber.Condition(settling, ramping, running, stable))
    out = chamber.decode_status(chamber.format_status(status))
    assert out.temperature_c == pytest.approx(t, rel=1e-5, abs=1e-9)
    assert out.setpoint_c == pytest.approx(sp, rel=1e-5, abs=1e-9)
    assert out.condition == status.condition


@given(st.binary(max_size=64))
def test_chamber_garbage_raises_only_instrument_errors(raw: bytes) -> None:
    for decode in (
        chamber.decode_temperature,
        chamber.decode_positive,
        chamber.decode_output,
        chamber.decode_condition,
        chamber.decode_status,
        chamber.decode_error,
    ):
        _assert_only_instrument_errors(decode, raw)
        _assert_only_instrument_errors(decode, raw + b"\n")


@given(st.from_regex(rb"\A[0-9;+.eE-]{0,40}\n\Z"))
def test_status_like_garbage_raises_only_protocol_errors(raw: bytes) -> None:
    try:
        chamber.decode_status(raw)
    except ProtocolError as exc:
        assert exc.raw == raw


@pytest.mark.parametrize(
    "raw",
    [b"1" * 5000 + b"\n", b"1" * 5000 + b',"x"\n', b"-" + b"9" * 40 + b',"x"\n'],
)
def test_chamber_decoders_refuse_absurdly_long_integers(raw: bytes) -> None:
    for decode in (chamber.decode_condition, chamber.decode_error):
        _assert_only_instrument_errors(decode, raw)
    with pytest.raises(ProtocolError):
        chamber.decode_condition(raw)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"+2.5E+01;+4.0E+01\n", "expected 3"),
        (b"+2.5E+01;+4.0E+01;770", "not terminated"),
        (b"+2.5E+01;9.91E37;770\n", "not a number"),
        (b"+2.5E+01;+4.0E+01;65536\n", "outside 0..32767"),
        (b"+9.0E+03;+4.0E+01;0\n", "not a chamber temperature"),
    ],
)
def test_status_errors_name_the_problem(raw: bytes, text: str) -> None:
    with pytest.raises(ProtocolError, match=text) as info:
        chamber.decode_status(raw)
    assert info.value.raw == raw


def test_error_mapping() -> None:
    raw = b'-222,"Data out of range"\n'
    with pytest.raises(CommandRejectedError, match="SCPI error -222: Data out of range") as info:
        chamber.raise_for_error(chamber.decode_error(raw), b"SOUR:TEMP 200\n", raw)
    assert not isinstance(info.value, InstrumentBusyError)
    assert (info.value.raw, info.value.command) == (raw, b"SOUR:TEMP 200\n")
    busy = b'-213,"Init ignored;controller busy"\n'
    err = chamber.error_for(chamber.decode_error(busy), b"OUTP ON\n", busy)
    assert isinstance(err, InstrumentBusyError)
    assert "controller busy" in str(err)
    chamber.raise_for_error(chamber.decode_error(b'+0,"No error"\n'), b"X\n", b"")


def test_encoders_validate_and_name_the_field() -> None:
    assert chamber.encode_setpoint(40) == b"SOUR:TEMP 40\n"
    assert chamber.encode_ramp(2.5) == b"SOUR:TEMP:RAMP 2.5\n"
    assert chamber.encode_output(False) == b"OUTP OFF\n"
    assert chamber.encode_dwell(0) == b"SOUR:TEMP:DWEL 0\n"
    with pytest.raises(ValueError, match="celsius: must be finite"):
        chamber.encode_setpoint(math.inf)
    with pytest.raises(ValueError, match="kelvin_per_min: ramp rate must be > 0, got -1"):
        chamber.encode_ramp(-1)
    with pytest.raises(ValueError, match="kelvin: tolerance band must be > 0"):
        chamber.encode_tolerance(0.0)
    with pytest.raises(ValueError, match="seconds: dwell time must be >= 0"):
        chamber.encode_dwell(-5)
    with pytest.raises(ValueError, match="on: must be a bool"):
        chamber.encode_output(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="celsius: must be a number"):
        chamber.encode_setpoint("hot")  # type: ignore[arg-type]


def test_compound_query_is_one_message_with_root_resets() -> None:
    assert chamber.STATUS == b"MEAS:TEMP?;:SOUR:TEMP?;:STAT:OPER:COND?\n"
    with pytest.raises(ValueError, match="one LF-terminated message"):
        chamber.compound(b"A?\nB?\n")
    with pytest.raises(ValueError, match="at least one"):
        chamber.compound()


def test_resync_reads_past_stale_replies_to_its_own_token() -> None:
    assert chamber.sync_query(7, clear=True) == b"*CLS;*ESE 7;*ESE?\n"
    assert chamber.sync_query(255, clear=False) == b"*ESE 255;*ESE?\n"
    for bad in (0, 1, 256):
        with pytest.raises(ValueError, match=f"token: must be in 2..255, got {bad}"):
            chamber.sync_query(bad, clear=False)
    complete = chamber.sync_complete(7)
    assert not complete(b"+2.50000E+01\n")  # a late answer to an earlier query
    assert not complete(b"6\n")  # the token of an earlier resync, answered late
    assert not complete(b"6\n7")
    assert complete(b'0,"No error"\n6\n7\n')
    assert chamber.last_line(b"+2.50000E+01\n7\n") == b"7\n"
