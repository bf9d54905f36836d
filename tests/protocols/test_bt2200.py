"""BT2200 codec: encodings, round trips, sign convention, and garbage never crashing it."""

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
from labctl.devices.protocols import bt2200, scpi
from labctl.devices.protocols.bt2200 import CellStatus, EndTest, LogRow, Report, Step

volts = st.floats(min_value=0.0, max_value=6.0, allow_nan=False)
amps = st.floats(min_value=-6.25, max_value=6.25, allow_nan=False)

statuses = st.builds(
    CellStatus,
    state=st.sampled_from(bt2200.STATES),
    sequence=st.integers(0, 1000),
    step=st.integers(0, 100),
    voltage_v=volts,
    current_a=amps,
    result=st.sampled_from(bt2200.RESULTS),
    test=st.integers(0, 8),
    test_type=st.sampled_from((*bt2200.TEST_TYPES, "NONE")),
    limit=volts,
    measured=volts,
)

rows = st.builds(
    LogRow,
    time_s=st.floats(0, 1e6).map(lambda t: round(t, 1)),
    voltage_v=volts.map(lambda v: round(v, 5)),
    current_a=amps.map(lambda i: round(i, 5)),
    capacity_ah=st.floats(0, 10).map(lambda a: round(a, 6)),
    temperature_c=st.floats(-30, 80).map(lambda t: round(t, 2)),
    step=st.integers(0, 100),
)


@given(statuses)
def test_verbose_round_trip(status: CellStatus) -> None:
    decoded = bt2200.decode_verbose(bt2200.format_verbose(status))
    assert (decoded.state, decoded.sequence, decoded.step, decoded.result) == (
        status.state,
        status.sequence,
        status.step,
        status.result,
    )
    assert decoded.voltage_v == pytest.approx(status.voltage_v, rel=1e-6, abs=1e-9)
    assert decoded.current_a == pytest.approx(status.current_a, rel=1e-6, abs=1e-9)
    assert (decoded.test, decoded.test_type) == (status.test, status.test_type)
    assert decoded.running is (status.state == "RUNNING")


@given(st.lists(rows, max_size=20))
def test_log_round_trip(log: list[LogRow]) -> None:
    assert bt2200.decode_log(bt2200.format_log(log)) == log


def test_currents_are_discharge_positive() -> None:
    # The wire says +5 A (charging, the BT2200's sign); the project's convention is -5 A.
    status = bt2200.decode_verbose(
        b"RUNNING,1,1,+3.900000E+00,+5.000000E+00,NONE,0,NONE,+0.000000E+00,+0.000000E+00\n"
    )
    assert status.current_a == -5.0
    assert bt2200.decode_currents(b"+5.000000E+00,-2.500000E+00,+0.000000E+00\n", 3) == [
        -5.0,
        2.5,
        0.0,
    ]
    assert math.copysign(1.0, bt2200.decode_currents(b"+0.0\n", 1)[0]) == 1.0  # never -0.0
    (row,) = bt2200.decode_log(b"1,10.0,3.70000,-2.00000,0.005556,25.10,2\n")
    assert row == LogRow(10.0, 3.7, 2.0, 0.005556, 25.1, 2)


@given(st.binary(max_size=80))
def test_garbage_raises_only_instrument_errors(raw: bytes) -> None:
    decoders = [
        bt2200.decode_verbose,
        bt2200.decode_log,
        lambda r: bt2200.decode_values(r, 1),
        lambda r: bt2200.decode_currents(r, 2),
        lambda r: bt2200.decode_report(r, 3),
        lambda r: bt2200.split_compound(r, 3),
        bt2200.decode_error,
        bt2200.decode_identity,
    ]
    for decode in decoders:
        try:
            decode(raw)
        except InstrumentError as exc:
            assert exc.raw == raw  # the raw reply is never lost
    assert isinstance(bt2200.is_not_a_number(raw), bool)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"RUNNING,1,1,3.9,0,NONE,0,NONE,0\n", "10 fields"),
        (b"BUSY,1,1,3.9,0,NONE,0,NONE,0,0\n", "unknown cell state"),
        (b"IDLE,1,1,3.9,0,WEIRD,0,NONE,0,0\n", "unknown cell state/result"),
        (b"IDLE,x,1,3.9,0,OK,0,NONE,0,0\n", "integers"),
        (b"IDLE,1,1,volts,0,OK,0,NONE,0,0\n", "Vsense is not a number"),
        (b"IDLE,1,1,9.91E+37,0,OK,0,NONE,0,0\n", "not a number"),
        (b"IDLE,1,1,3.9,0,OK,0,NONE,0,0", "not terminated"),
    ],
)
def test_bad_verbose_replies(raw: bytes, text: str) -> None:
    with pytest.raises(ProtocolError, match=text) as info:
        bt2200.decode_verbose(raw)
    assert info.value.raw == raw


def test_bad_logs_and_reports() -> None:
    with pytest.raises(ProtocolError, match="announces 2 rows but holds 6"):
        bt2200.decode_log(b"2,1.0,3.7,0.0,0.0,25.0,1\n")
    with pytest.raises(ProtocolError, match="row count"):
        bt2200.decode_log(b"1.5,1.0,3.7,0.0,0.0,25.0,1\n")
    with pytest.raises(ProtocolError, match="step must be an integer"):
        bt2200.decode_log(b"1,1.0,3.7,0.0,0.0,25.0,1.5\n")
    assert bt2200.decode_log(b"0\n") == []
    assert bt2200.decode_report(b"0,1,2,3,4\n", 5) == [
        Report.NONE,
        Report.RUNNING,
        Report.OK,
        Report.FAIL,
        Report.ABORTED,
    ]
    with pytest.raises(ProtocolError, match="expected 2 status codes"):
        bt2200.decode_report(b"0,7\n", 2)


def test_step_encoding() -> None:
    assert bt2200.encode_step(1, 2, Step.charge(5.0, 4.2, 3600)) == (
        b"SEQ:STEP:DEF 1,2,CHARGE,3600,5,4.2\n"
    )
    assert bt2200.encode_step(3, 1, Step.rest(600.5)) == b"SEQ:STEP:DEF 3,1,REST,600.5\n"
    # Ten significant digits, where scpi.encode's default would round to six.
    assert bt2200.encode_step(1, 1, Step.charge(1.0, 4.1999999, 1234567)) == (
        b"SEQ:STEP:DEF 1,1,CHARGE,1234567,1,4.1999999\n"
    )
    step = Step.discharge(2.5, 2.7, 7200)
    assert step.tests == (EndTest("VOLT_LE", 2.7),)
    assert bt2200.encode_test(1, 3, 1, step.tests[0]) == (
        b"SEQ:TEST:DEF 1,3,1,VOLT_LE,2.7,NONE,0,NEXT\n"
    )
    cccv = Step.charge(5.0, 4.2, 10800, end_current_a=0.25)
    assert cccv.tests == (EndTest("CURR_LE", 0.25),)
    fail = EndTest("VOLT_LE", 0.1, action="FAIL", time_type="BEFORE", time_s=90)
    assert bt2200.encode_test(1, 2, 2, fail) == b"SEQ:TEST:DEF 1,2,2,VOLT_LE,0.1,BEFORE,90,FAIL\n"


def test_sequence_encoding_clears_then_defines() -> None:
    commands = bt2200.encode_sequence(
        4, [Step.charge(5, 4.2, 3600, end_current_a=0.1), Step.rest(60)]
    )
    assert commands == [
        b"SEQ:CLE 4\n",
        b"SEQ:STEP:DEF 4,1,CHARGE,3600,5,4.2\n",
        b"SEQ:TEST:DEF 4,1,1,CURR_LE,0.1,NONE,0,NEXT\n",
        b"SEQ:STEP:DEF 4,2,REST,60\n",
    ]
    with pytest.raises(ValueError, match="steps: a sequence needs at least one step"):
        bt2200.encode_sequence(1, [])


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Step("BOOST", 10, 1, 4), "mode"),
        (lambda: Step.charge(float("nan"), 4.2, 10), "current_a"),
        (lambda: Step.charge(-1.0, 4.2, 10), "current_a"),
        (lambda: Step.charge(1.0, 0.0, 10), "voltage_v"),
        (lambda: Step.rest(0), "duration_s"),
        (lambda: Step.rest(float("inf")), "duration_s"),
        (lambda: Step("REST", 10, 1.0), "current_a/voltage_v"),
        (lambda: Step("REST", 10, tests=(EndTest("VOLT_GE", 4),) * 9), "tests"),
        (lambda: EndTest("VOLT_ABOUT", 4.0), "type"),
        (lambda: EndTest("VOLT_GE", 4.0, action="GOTO"), "action"),
        (lambda: EndTest("VOLT_GE", 4.0, time_type="WHENEVER"), "time_type"),
        (lambda: EndTest("CURR_LE", -0.1), "value"),
        (lambda: bt2200.encode_step(0, 1, Step.rest(1)), "seq"),
        (lambda: bt2200.encode_step(1, 101, Step.rest(1)), "number"),
        (lambda: bt2200.encode_test(1, 1, 9, EndTest("VOLT_GE", 4)), "test_number"),
        (lambda: bt2200.channel_list([]), "ids"),
        (lambda: bt2200.channel_number(0), "index"),
        (lambda: bt2200.encode_measure("power", [1001]), "quantity"),
        (lambda: bt2200.encode_log(1001, 0), "max_rows"),
    ],
)
def test_encoders_validate_and_name_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: ") as info:
        build()  # type: ignore[operator]
    assert field.split("/")[0] in str(info.value)


@given(st.integers(1, 256))
def test_channel_and_cell_numbering(index: int) -> None:
    ch = bt2200.channel_number(index)
    cell = bt2200.cell_id(index)
    card, nn = divmod(ch, 100)
    assert 1 <= nn <= 32
    assert (card - 1) * 32 + nn == index
    assert cell == card * 1000 + nn


def test_measure_status_and_log_commands() -> None:
    assert bt2200.channel_number(1) == 101
    assert bt2200.cell_id(33) == 2001
    assert bt2200.encode_measure("voltage", [1001]) == b"MEAS:CELL:VOLT? (@1001)\n"
    assert bt2200.encode_measure("current", [1001, 1002]) == b"MEAS:CELL:CURR? (@1001,1002)\n"
    assert bt2200.encode_verbose(1001) == b"STAT:CELL:VERB? 1001\n"
    assert bt2200.encode_report([1001, 1003]) == b"STAT:CELL:REP? (@1001,1003)\n"
    assert bt2200.encode_define_cell(1001, 101) == b"CELL:DEF 1001,(@101)\n"
    assert bt2200.encode_enable([1001], 1) == b"CELL:ENAB (@1001),1\n"
    assert bt2200.encode_initiate([1001]) == b"CELL:INIT (@1001)\n"
    assert bt2200.encode_abort() == b"CELL:ABOR 0\n"
    assert bt2200.encode_abort([1002]) == b"CELL:ABOR (@1002)\n"
    assert bt2200.encode_log(1001, 50) == b"DATA:LOG? 1001,50\n"


def test_compound_and_checked() -> None:
    assert bt2200.checked(b"CELL:INIT (@1001)\n") == b"CELL:INIT (@1001);:SYST:ERR?\n"
    joined = bt2200.compound(bt2200.encode_verbose(1001), b":MEAS:CELL:TEMP? (@1001)\n")
    assert joined == b"STAT:CELL:VERB? 1001;:MEAS:CELL:TEMP? (@1001)\n"
    with pytest.raises(ValueError, match="commands"):
        bt2200.compound(b"A;B\n")
    assert bt2200.split_compound(b"1;+2.0E+00;x\n", 3) == [b"1\n", b"+2.0E+00\n", b"x\n"]
    with pytest.raises(ProtocolError, match="expected 2"):
        bt2200.split_compound(b"1;2;3\n", 2)


def test_not_a_number_and_error_mapping() -> None:
    assert bt2200.is_not_a_number(b"9.91E+37\n")
    assert bt2200.is_not_a_number(b"9.91E+37;9.91E+37\n")
    assert not bt2200.is_not_a_number(b"+3.7E+00\n")
    assert not bt2200.is_not_a_number(b"inf\n")
    busy = scpi.decode_error(b'-200,"Execution error;instrument busy"\n')
    exc = bt2200.error_to_exception(busy, b"MEAS:CELL:VOLT? (@1001)\n", b"9.91E+37\n")
    assert isinstance(exc, InstrumentBusyError)
    assert exc.raw == b"9.91E+37\n"
    assert "-200" in str(exc)
    limit = scpi.decode_error(b'-222,"Data out of range;current 7 A outside rating"\n')
    exc = bt2200.error_to_exception(limit, b"SEQ:STEP:DEF 1,1,CHARGE,10,7,4.2\n", b"")
    assert type(exc) is CommandRejectedError
    assert "-222" in str(exc)
    assert "SEQ:STEP:DEF" in str(exc)
