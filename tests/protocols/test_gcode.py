"""Marlin G-code codec: framing, checksums, reply splitting, error mapping, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.protocols import gcode

coord = st.floats(min_value=-1000, max_value=1000, allow_nan=False).map(lambda v: round(v, 2))
counts = st.integers(min_value=-(10**7), max_value=10**7)
line_numbers = st.integers(min_value=1, max_value=10**6)
words = st.lists(
    st.tuples(
        st.sampled_from("XYZFPSNE"),
        st.one_of(st.just(""), st.floats(-9999, 9999).map(lambda v: f"{v:.3f}")),
    ),
    max_size=5,
).map(lambda ws: "".join(f" {k}{v}" for k, v in ws))
commands = st.tuples(st.sampled_from("GM"), st.integers(0, 999), words).map(
    lambda t: f"{t[0]}{t[1]}{t[2]}"
)


def test_checksum_matches_the_reprap_reference_examples() -> None:
    # RepRap wiki "G-code", section "Checking": "N3 T0*57"; Marlin's docs: "N1 G28*18".
    assert gcode.checksum("N3 T0") == 57
    assert gcode.encode("G28", 1) == b"N1 G28*18\n"
    assert gcode.encode("M114") == b"M114\n"


@given(commands, line_numbers)
def test_numbered_lines_round_trip(command: str, n: int) -> None:
    frame = gcode.encode(command, n)
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    assert gcode.parse_line(frame) == (n, command)
    # Flip one bit of the body: the checksum catches it.
    body = bytearray(frame)
    body[1] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        gcode.parse_line(bytes(body))


@given(coord, coord, coord, counts, counts, counts)
def test_position_report_round_trip(
    x: float, y: float, z: float, cx: int, cy: int, cz: int
) -> None:
    p = gcode.Position(x, y, z, 0.0, cx, cy, cz)
    raw = gcode.format_position(p) + gcode.format_ok(7)
    assert gcode.decode_position(gcode.decode_reply("M114", raw, 7)) == p


@given(st.lists(st.integers(min_value=1, max_value=99), max_size=4), coord)
def test_stale_replies_to_earlier_lines_are_skipped(stale: list[int], x: float) -> None:
    old = b"".join(
        gcode.format_position(gcode.Position(-1.0, -1.0, -1.0, 0.0, 0, 0, 0)) + gcode.format_ok(n)
        for n in stale
    )
    ours = gcode.format_position(gcode.Position(x, 2.0, 3.0, 0.0, 1, 2, 3)) + gcode.format_ok(100)
    complete = gcode.reply_complete_for(100)
    assert not complete(old)
    assert complete(old + ours)
    assert gcode.decode_position(gcode.decode_reply("M114", old + ours, 100)).x == x


@given(st.binary(max_size=96), st.sampled_from([None, 1, 42]))
def test_garbage_raises_only_instrument_errors(raw: bytes, n: int | None) -> None:
    gcode.reply_complete_for(n)(raw)  # never raises
    gcode.only_keepalives(raw)
    try:
        reply = gcode.decode_reply("M114", raw, n)
    except InstrumentError as exc:
        assert exc.raw == raw
        return
    for decode in (
        gcode.decode_position,
        gcode.decode_endstops,
        gcode.decode_firmware,
        gcode.decode_steps_per_mm,
        gcode.decode_servo,
    ):
        try:
            decode(reply)
        except InstrumentError as exc:
            assert exc.raw == raw


@pytest.mark.parametrize(
    ("raw", "exc", "text"),
    [
        (
            b"Error:Move out of range: X650.00 (limits X0.00..600.00)\nok N5 P16 B3\n",
            LimitError,
            "X650.00",
        ),
        (b"echo:Home XZ First\nok N5 P16 B3\n", gcode.NotHomedError, "axis X, Z not homed"),
        (
            b"Error:Collision: station balance is occupied by V01; cannot lower V02 onto it\n"
            b"ok N5 P16 B3\n",
            gcode.CollisionError,
            "occupied",
        ),
        (b'echo:Unknown command: "G5 X1"\nok N5 P16 B3\n', CommandRejectedError, "G5 X1"),
        (b"Error:Servo 3 out of range\nok N5 P16 B3\n", LimitError, "Servo 3"),
        (b"Error:Printer halted. kill() called!\n", gcode.FirmwareHaltedError, "halted"),
        (
            b"Error:Line Number is not Last Line Number+1, Last Line: 3\nResend: 4\nok\n",
            gcode.ResendRequestedError,
            "resend line 4",
        ),
        (b"echo:busy: processing\necho:busy: processing\n", InstrumentBusyError, "busy"),
        (b"ok N5 P16 B3", ProtocolError, "not terminated"),
        (b"\xfe\x81ok\n", ProtocolError, "not a Marlin reply line"),
        (b"ok N4 P16 B3\n", ProtocolError, "no 'ok'"),
    ],
)
def test_error_replies(raw: bytes, exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text) as info:
        gcode.decode_reply("G1 X650", raw, 5)
    assert info.value.raw == raw  # type: ignore[attr-defined]


def test_resend_request_carries_the_line_the_firmware_wants() -> None:
    raw = b"Error:checksum mismatch, Last Line: 9\nResend: 10\nok\n"
    assert gcode.reply_complete_for(10)(raw)  # a plain ok after Resend ends the reply
    with pytest.raises(gcode.ResendRequestedError) as info:
        gcode.decode_reply("M114", raw, 10)
    assert info.value.line == 10


def test_completeness() -> None:
    complete = gcode.reply_complete_for(8)
    assert not complete(b"echo:busy: processing\n")
    assert not complete(b"X:1.00 Y:2.00 Z:3.00 E:0.00 Count X:1 Y:2 Z:3\nok N7 P16 B3\n")
    assert not complete(b"ok N8 P16")  # not terminated yet
    assert complete(b"echo:busy: processing\nok N8 P16 B3\n")
    assert complete(b"Error:Printer halted. kill() called!\n")
    assert complete(b"\x00\x17junk\n")  # line noise ends the wait at once
    assert gcode.reply_complete_for(None)(b"ok\n")


def test_keepalives_are_counted_not_returned() -> None:
    raw = b"echo:busy: processing\necho:busy: processing\nX:0.00 Y:0.00 Z:150.00 E:0.00 "
    raw += b"Count X:0 Y:0 Z:60000\nok N2 P16 B3\n"
    reply = gcode.decode_reply("G28", raw, 2)
    assert reply.keepalives == 2
    assert reply.lines == ("X:0.00 Y:0.00 Z:150.00 E:0.00 Count X:0 Y:0 Z:60000",)
    pos = gcode.decode_position(reply)
    assert pos.settled({"X": 80.0, "Y": 80.0, "Z": 400.0})
    assert pos.actual({"X": 80.0, "Y": 80.0, "Z": 400.0})["Z"] == pytest.approx(150.0)


def test_moving_position_is_not_settled() -> None:
    pos = gcode.Position(100.0, 0.0, 150.0, 0.0, 4000, 0, 60000)  # counts at X = 50 mm
    spm = {"X": 80.0, "Y": 80.0, "Z": 400.0}
    assert not pos.settled(spm)
    assert pos.actual(spm)["X"] == pytest.approx(50.0)


def test_information_replies() -> None:
    m115 = (
        b"FIRMWARE_NAME:Marlin 2.1.2.1 (Jun 28 2023 12:00:00) SOURCE_CODE_URL:github.com/"
        b"MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:Vial Gantry EXTRUDER_COUNT:1 "
        b"UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff\nCap:EEPROM:1\nCap:Z_PROBE:0\nok N1 P16 B3\n"
    )
    info = gcode.decode_firmware(gcode.decode_reply("M115", m115, 1))
    assert info.name == "Marlin 2.1.2.1 (Jun 28 2023 12:00:00)"
    assert info.fields["MACHINE_TYPE"] == "Vial Gantry"
    assert info.capabilities == {"EEPROM": True, "Z_PROBE": False}
    m119 = b"Reporting endstop status\nx_min: TRIGGERED\nz_max: open\nfilament: TRIGGERED\nok\n"
    assert gcode.decode_endstops(gcode.decode_reply("M119", m119)) == {
        "x_min": True,
        "z_max": False,
        "filament": True,
    }
    m92 = b"echo:; Steps per unit:\necho:  M92 X80.00 Y80.00 Z400.00 E93.00\nok\n"
    assert gcode.decode_steps_per_mm(gcode.decode_reply("M92", m92)) == {
        "X": 80.0,
        "Y": 80.0,
        "Z": 400.0,
        "E": 93.0,
    }
    assert gcode.decode_servo(gcode.decode_reply("M280 P0", b"echo: Servo 0: 90\nok\n")) == (
        0,
        90.0,
    )
    with pytest.raises(ProtocolError, match="no position report"):
        gcode.decode_position(gcode.decode_reply("M114", b"ok\n"))


def test_encode_validates_arguments() -> None:
    assert gcode.format_move(x=10, z=2.5, feedrate_mm_s=150) == "G1 X10.000 Z2.500 F9000"
    assert gcode.format_move(y=-1, rapid=True) == "G0 Y-1.000"
    assert gcode.format_home() == "G28"
    assert gcode.format_home("zx") == "G28 Z X"
    assert gcode.format_servo(0, 90) == "M280 P0 S90"
    assert gcode.format_servo(0) == "M280 P0"
    with pytest.raises(ValueError, match="x: must be a finite"):
        gcode.format_move(x=float("nan"))
    with pytest.raises(ValueError, match="feedrate_mm_s"):
        gcode.format_move(x=1, feedrate_mm_s=0)
    with pytest.raises(ValueError, match="at least one coordinate"):
        gcode.format_move()
    with pytest.raises(ValueError, match="angle"):
        gcode.format_servo(0, 200)
    with pytest.raises(ValueError, match="index"):
        gcode.format_servo(12, 10)
    with pytest.raises(ValueError, match="axes"):
        gcode.format_home("A")
    with pytest.raises(ValueError, match="command"):
        gcode.encode("G1 X1\nM112")
    with pytest.raises(ValueError, match="command"):
        gcode.encode("g1 x1")
    with pytest.raises(ValueError, match="line_number"):
        gcode.encode("M114", -1)
