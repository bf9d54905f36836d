"""Orion Star A-series codec: records, autoranged units, framing, and garbage never crashing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import InstrumentBusyError, InstrumentError, ProtocolError
from labctl.devices.protocols import orion

RECORD = (
    "A212, X51234, 3.04, ADMIN, 01/01/24 00:10:05, , CH-1, Cond, {value}, {unit}, "
    "27.09, mS, {temp}, {tunit}, Off, 2.1, 25.0, 0.475, {status}, M100, 7"
)


def half_digit(ms_cm: float) -> float:
    """Half the last digit of the autoranged display (0.00-19.99 uS ... 200-3000 mS)."""
    us = ms_cm * 1000.0
    for limit, step in ((19.995, 0.01e-3), (199.95, 0.1e-3), (1999.5, 1e-3)):
        if us < limit:
            return step / 2
    for limit, step in ((19.995, 0.01), (199.95, 0.1)):
        if ms_cm < limit:
            return step / 2
    return 0.5


def reply(line: str, echo: bytes = b"GETMEAS", eol: bytes = b"\r") -> bytes:
    return echo + eol + line.encode() + eol + orion.PROMPT


def record(value: str = "12.87", unit: str = "mS/cm", temp: str = "25.0", **kw: str) -> str:
    fields = {"tunit": "C", "status": "Ready"} | kw
    return RECORD.format(value=value, unit=unit, temp=temp, **fields)


@given(
    st.floats(min_value=0.0, max_value=2900.0, allow_nan=False),
    st.floats(min_value=-5.0, max_value=95.0, allow_nan=False),
    st.booleans(),
)
def test_record_round_trip_in_project_units(kappa: float, temp: float, stable: bool) -> None:
    m = orion.decode_measurement(orion.format_record(kappa, temp, stable=stable))
    assert m.conductivity_ms_cm == pytest.approx(kappa, abs=half_digit(kappa) * 1.001)
    assert m.temperature_c == pytest.approx(temp, abs=0.051)
    assert m.stable is stable
    assert m.cell_constant == pytest.approx(0.475)


@pytest.mark.parametrize(
    ("value", "unit", "ms_cm"),
    [
        ("1413", "uS/cm", 1.413),
        ("0.05", "uS/cm", 5e-5),
        ("12.87", "mS/cm", 12.87),
        ("250", "mS/cm", 250.0),
    ],
)
def test_units_are_converted_to_ms_per_cm(value: str, unit: str, ms_cm: float) -> None:
    assert orion.decode_measurement(reply(record(value, unit))).conductivity_ms_cm == pytest.approx(
        ms_cm
    )


def test_fahrenheit_and_manual_temperature() -> None:
    m = orion.decode_measurement(reply(record(temp="77.0", tunit="F")))
    assert m.temperature_c == pytest.approx(25.0)
    m = orion.decode_measurement(reply(record(tunit="C (MAN)")))
    assert m.manual_temperature
    assert m.temperature_c == pytest.approx(25.0)


def test_crlf_lines_echo_and_several_records() -> None:
    raw = b"getmeas 2\r\n" + record("1.0").encode() + b"\r\n" + record("2.0").encode() + b"\r\n> "
    ms = orion.decode_measurements(raw, b"GETMEAS 2\r")
    assert [m.conductivity_ms_cm for m in ms] == [1.0, 2.0]
    assert orion.decode_measurement(raw, b"GETMEAS 2\r").conductivity_ms_cm == 2.0


@given(st.binary(max_size=200))
def test_garbage_raises_only_instrument_errors(raw: bytes) -> None:
    for decode in (
        lambda: orion.decode_measurement(raw),
        lambda: orion.decode_system(raw),
        lambda: orion.decode_mode(raw),
        lambda: orion.decode_ack(raw, b"SETCSV"),
    ):
        try:
            decode()
        except InstrumentError as exc:
            assert exc.raw == raw  # the raw reply is never lost


@given(st.lists(st.text(alphabet="0123456789.,- abcCmSu/", max_size=12), min_size=18, max_size=24))
def test_near_miss_records_raise_only_instrument_errors(fields: list[str]) -> None:
    raw = reply(", ".join(fields))
    try:
        orion.decode_measurement(raw)
    except InstrumentError as exc:
        assert exc.raw == raw


@pytest.mark.parametrize(
    ("raw", "exc", "text"),
    [
        (reply(record()).removesuffix(b"> "), ProtocolError, "prompt"),
        (b"GETMEAS\r> ", InstrumentBusyError, "not executed"),
        (reply(record(value="----", status="Overrange")), orion.OverrangeError, "range"),
        (reply(record().replace("Cond", "pH")), ProtocolError, "'pH' mode"),
        (reply(record(unit="ppm")), ProtocolError, "unit 'ppm'"),
        (reply(record(status="Maybe")), ProtocolError, "status 'Maybe'"),
        (reply(record() + ", extra"), ProtocolError, "22 fields"),
        (reply(record(value="1e400")), ProtocolError, "expected a number"),
        (b"GETMEAS\r\x01\x02\r> ", ProtocolError, "non-printable"),
    ],
)
def test_error_replies(raw: bytes, exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text) as info:
        orion.decode_measurement(raw)
    assert info.value.raw == raw  # type: ignore[attr-defined]


def test_system_mode_and_ack() -> None:
    info = orion.decode_system(b"SYSTEM\rA212, X51234, 3.04, 01/01/24 00:00:05\r> ")
    assert (info.model, info.serial_number, info.software) == ("A212", "X51234", "3.04")
    assert orion.decode_mode(b"GETMODE\rCOND\r> ") == "COND"
    orion.decode_ack(b"SETCSV\r> ", b"SETCSV")
    with pytest.raises(ProtocolError, match="unexpected output"):
        orion.decode_ack(b"SETCSV\rwhat?\r> ", b"SETCSV")
    with pytest.raises(InstrumentBusyError):
        orion.decode_mode(b"GETMODE\r> ")


def test_encode() -> None:
    assert orion.encode_getmeas() == b"GETMEAS\r"
    assert orion.encode_getmeas(3) == b"GETMEAS 3\r"
    assert orion.encode("system") == b"SYSTEM\r"
    assert orion.encode_setmode("cond") == b"SETMODE COND\r"
    with pytest.raises(ValueError, match="count"):
        orion.encode_getmeas(0)
    with pytest.raises(ValueError, match="unknown Orion Star command 'GETCAL'"):
        orion.encode("GETCAL")
    with pytest.raises(ValueError, match="operand"):
        orion.encode("SETMODE", "COND\rGETMEAS")
    with pytest.raises(ValueError, match="mode"):
        orion.encode_setmode("VOLTS")
    assert orion.reply_complete(b"GETMEAS\r> ")
    assert not orion.reply_complete(b"GETMEAS\r")
