"""Keysight BT2200 battery-cycler SCPI: encode commands, decode replies (pure, no I/O).

Generic SCPI framing (LF terminators, numbers, ``SYST:ERR?``, ``*IDN?``) comes from
:mod:`labctl.devices.protocols.scpi`; this module adds the BT2200's cells, sequences,
tests, status and data-log messages (see docs/instruments/cycler.md for the subset).

Conventions:

* Channels are numbered ``<card><nn>`` (``101`` = card 1, channel 1) and cells by the
  convention ``<card>0<nn>`` (``1001``); :func:`channel_number` and :func:`cell_id`
  map a 1-based channel index to both.
* **Signs.** The BT2200 reports charging current as positive. Every decoder here returns
  the project's convention, **positive = discharge** (``CellStatus.current_a``,
  ``LogRow.current_a``, :func:`decode_currents`). Step currents are magnitudes.
* Setters have no reply. :func:`checked` turns a setter into the compound message
  ``<setter>;:SYST:ERR?`` so that one round trip both executes it and reports whether
  the instrument accepted it.
* An instrument that cannot execute a query now (busy) answers the SCPI not-a-number
  value ``9.91E+37`` and queues ``-200,"Execution error;instrument busy"``;
  :func:`is_not_a_number` spots such a reply and :func:`error_to_exception` maps the
  queued error to :class:`~labctl.devices.errors.InstrumentBusyError`.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labctl.devices.errors import (
    CommandRejectedError,
    InstrumentBusyError,
    InstrumentError,
    ProtocolError,
)
from labctl.devices.protocols import scpi

TERMINATOR = scpi.TERMINATOR
MODES = ("CHARGE", "DISCHARGE", "REST")
TEST_TYPES = ("VOLT_GE", "VOLT_LE", "CURR_GE", "CURR_LE")
TIME_TYPES = ("NONE", "BEFORE", "AFTER", "AT")
ACTIONS = ("NEXT", "FAIL")
STATES = ("IDLE", "RUNNING")
RESULTS = ("NONE", "OK", "FAIL", "ABORTED")
MAX_SEQUENCE = 1000
MAX_STEP = 100
MAX_TEST = 8
# Loose sanity bounds only: the instrument itself enforces its rating and the 2.0..4.5 V
# safety window (and answers -222), so that the limits live in one place.
MAX_CURRENT_A = 100.0
MAX_VOLTAGE_V = 10.0
MAX_DURATION_S = 1.0e7
NAN_MARKER = 9.9e37
_INT = re.compile(r"\d{1,6}")
_NR = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

reply_complete = scpi.reply_complete
decode_error = scpi.decode_error
decode_identity = scpi.decode_identity


class Report(enum.IntEnum):
    """``STATus:CELL:REPort?`` codes."""

    NONE = 0
    RUNNING = 1
    OK = 2
    FAIL = 3
    ABORTED = 4


@dataclass(frozen=True)
class EndTest:
    """A step test: ``type`` compared with ``value`` (V or A magnitude) in a time window."""

    type: str
    value: float
    action: str = "NEXT"
    time_type: str = "NONE"
    time_s: float = 0.0

    def __post_init__(self) -> None:
        _member("type", self.type, TEST_TYPES)
        _member("action", self.action, ACTIONS)
        _member("time_type", self.time_type, TIME_TYPES)
        bound = MAX_VOLTAGE_V if self.type.startswith("VOLT") else MAX_CURRENT_A
        _bounded("value", self.value, 0.0, bound)
        _bounded("time_s", self.time_s, 0.0, MAX_DURATION_S)


@dataclass(frozen=True)
class Step:
    """One sequence step: CC-CV ``CHARGE``/``DISCHARGE`` (current magnitude, voltage
    limit) or ``REST``, for at most ``duration_s``, ended early by its ``tests``."""

    mode: str
    duration_s: float
    current_a: float = 0.0
    voltage_v: float = 0.0
    tests: tuple[EndTest, ...] = ()

    def __post_init__(self) -> None:
        _member("mode", self.mode, MODES)
        if not (_finite(self.duration_s) and 0 < self.duration_s <= MAX_DURATION_S):
            raise ValueError(
                f"duration_s: must be within (0, {MAX_DURATION_S:g}] s, got {self.duration_s!r}"
            )
        if self.mode == "REST":
            if self.current_a != 0 or self.voltage_v != 0:
                raise ValueError(
                    f"current_a/voltage_v: a REST step takes neither, got "
                    f"{self.current_a!r} A, {self.voltage_v!r} V"
                )
        else:
            if not (_finite(self.current_a) and 0 < self.current_a <= MAX_CURRENT_A):
                raise ValueError(
                    f"current_a: must be a magnitude in (0, {MAX_CURRENT_A:g}] A, "
                    f"got {self.current_a!r}"
                )
            _bounded("voltage_v", self.voltage_v, 0.0, MAX_VOLTAGE_V)
            if self.voltage_v <= 0:
                raise ValueError(f"voltage_v: must be > 0, got {self.voltage_v!r}")
        if len(self.tests) > MAX_TEST:
            raise ValueError(f"tests: at most {MAX_TEST} per step, got {len(self.tests)}")
        for t in self.tests:
            if not isinstance(t, EndTest):
                raise ValueError(f"tests: expected EndTest items, got {t!r}")

    @classmethod
    def charge(
        cls,
        current_a: float,
        voltage_v: float,
        duration_s: float,
        *,
        end_current_a: float | None = None,
    ) -> Step:
        """CC at ``current_a`` up to ``voltage_v``, then CV; ends when the current has
        tapered below ``end_current_a`` (if given) or after ``duration_s``."""
        tests = () if end_current_a is None else (EndTest("CURR_LE", end_current_a),)
        return cls("CHARGE", duration_s, current_a, voltage_v, tests)

    @classmethod
    def discharge(
        cls,
        current_a: float,
        voltage_v: float,
        duration_s: float,
        *,
        end_current_a: float | None = None,
    ) -> Step:
        """CC discharge at ``current_a``; ends at the cut-off ``voltage_v`` (or, with
        ``end_current_a``, holds CV there until the current tapers below it)."""
        test = (
            EndTest("VOLT_LE", voltage_v)
            if end_current_a is None
            else EndTest("CURR_LE", end_current_a)
        )
        return cls("DISCHARGE", duration_s, current_a, voltage_v, (test,))

    @classmethod
    def rest(cls, duration_s: float) -> Step:
        """Open circuit (no current) for ``duration_s``."""
        return cls("REST", duration_s)


@dataclass(frozen=True)
class CellStatus:
    """``STATus:CELL:VERBose?``: state, position in the sequence, V, I and test result."""

    state: str  # IDLE | RUNNING
    sequence: int
    step: int
    voltage_v: float
    current_a: float  # positive = discharge
    result: str  # NONE | OK | FAIL | ABORTED
    test: int  # number of the test that failed (0: none)
    test_type: str
    limit: float
    measured: float

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


@dataclass(frozen=True)
class LogRow:
    """One data-log row (time since the sequence started)."""

    time_s: float
    voltage_v: float
    current_a: float  # positive = discharge
    capacity_ah: float  # charge moved in the step so far
    temperature_c: float
    step: int


# -- helpers --------------------------------------------------------------------------------


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _member(field: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}: must be one of {', '.join(allowed)}, got {value!r}")


def _bounded(field: str, value: object, lo: float, hi: float) -> None:
    if not (_finite(value) and lo <= float(value) <= hi):  # type: ignore[arg-type]
        raise ValueError(f"{field}: must be within {lo:g}..{hi:g}, got {value!r}")


def _int_in(field: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{field}: must be an integer within {lo}..{hi}, got {value!r}")
    return value


def _num(value: float) -> str:
    """An NRf number with 10 significant digits (scpi.encode's 6 would round 4.1999999)."""
    return f"{value:.10g}"


def channel_number(index: int) -> int:
    """Channel number of the 1-based channel ``index``: 1 -> 101, 33 -> 201."""
    _int_in("index", index, 1, 256)
    return ((index - 1) // 32 + 1) * 100 + (index - 1) % 32 + 1


def cell_id(index: int) -> int:
    """Cell id the device gives channel ``index``: 1 -> 1001, 33 -> 2001."""
    ch = channel_number(index)
    return (ch // 100) * 1000 + ch % 100


def channel_list(ids: Sequence[int]) -> str:
    """``[1001, 1002]`` -> ``(@1001,1002)``."""
    if not ids:
        raise ValueError("ids: need at least one cell or channel")
    for i in ids:
        _int_in("ids", i, 1, 99999)
    return "(@" + ",".join(str(i) for i in ids) + ")"


# -- encoders -------------------------------------------------------------------------------------


def encode_define_cell(cell: int, channel: int) -> bytes:
    _int_in("cell", cell, 1, 99999)
    return scpi.encode("CELL:DEF", cell, channel_list([channel]))


def encode_clear_sequence(seq: int) -> bytes:
    return scpi.encode("SEQ:CLE", _int_in("seq", seq, 0, MAX_SEQUENCE))


def encode_step(seq: int, number: int, step: Step) -> bytes:
    """``SEQ:STEP:DEF <seq>,<step>,<mode>,<s>[,<A>,<V>]``."""
    _int_in("seq", seq, 1, MAX_SEQUENCE)
    _int_in("number", number, 1, MAX_STEP)
    if not isinstance(step, Step):
        raise ValueError(f"step: expected a Step, got {step!r}")
    args: list[object] = [seq, number, step.mode, _num(step.duration_s)]
    if step.mode != "REST":
        args += [_num(step.current_a), _num(step.voltage_v)]
    return scpi.encode("SEQ:STEP:DEF", *args)


def encode_test(seq: int, number: int, test_number: int, test: EndTest) -> bytes:
    """``SEQ:TEST:DEF <seq>,<step>,<test>,<type>,<value>,<time_type>,<time>,<action>``."""
    _int_in("seq", seq, 1, MAX_SEQUENCE)
    _int_in("number", number, 1, MAX_STEP)
    _int_in("test_number", test_number, 1, MAX_TEST)
    return scpi.encode(
        "SEQ:TEST:DEF",
        seq,
        number,
        test_number,
        test.type,
        _num(test.value),
        test.time_type,
        _num(test.time_s),
        test.action,
    )


def encode_sequence(seq: int, steps: Sequence[Step]) -> list[bytes]:
    """Every command that (re)defines sequence ``seq``: clear, steps, their tests."""
    if not steps:
        raise ValueError("steps: a sequence needs at least one step")
    if len(steps) > MAX_STEP:
        raise ValueError(f"steps: at most {MAX_STEP}, got {len(steps)}")
    out = [encode_clear_sequence(seq)]
    for n, step in enumerate(steps, start=1):
        out.append(encode_step(seq, n, step))
        out.extend(encode_test(seq, n, t, test) for t, test in enumerate(step.tests, start=1))
    return out


def encode_enable(cells: Sequence[int], seq: int) -> bytes:
    return scpi.encode("CELL:ENAB", channel_list(cells), _int_in("seq", seq, 0, MAX_SEQUENCE))


def encode_initiate(cells: Sequence[int]) -> bytes:
    return scpi.encode("CELL:INIT", channel_list(cells))


def encode_abort(cells: Sequence[int] | None = None) -> bytes:
    """Abort ``cells`` (all cells when None): their outputs turn off."""
    return scpi.encode("CELL:ABOR", "0" if cells is None else channel_list(cells))


_MEASURE = {
    "voltage": "MEAS:CELL:VOLT?",
    "current": "MEAS:CELL:CURR?",
    "capacity_ah": "MEAS:CELL:CAP:AHR?",
    "energy_wh": "MEAS:CELL:CAP:WHR?",
    "temperature": "MEAS:CELL:TEMP?",
    "step_time": "CELL:STEP:TIME?",
}


def encode_measure(quantity: str, cells: Sequence[int]) -> bytes:
    """One value per cell of ``quantity`` (voltage, current, capacity_ah, ...)."""
    _member("quantity", quantity, tuple(_MEASURE))
    return scpi.encode(_MEASURE[quantity], channel_list(cells))


def encode_verbose(cell: int) -> bytes:
    return scpi.encode("STAT:CELL:VERB?", _int_in("cell", cell, 1, 99999))


def encode_report(cells: Sequence[int]) -> bytes:
    return scpi.encode("STAT:CELL:REP?", channel_list(cells))


def encode_log(cell: int, max_rows: int = 1000) -> bytes:
    """``DATA:LOG? <cell>,<max_rows>``: the cell's new data-log rows (extension)."""
    _int_in("cell", cell, 1, 99999)
    return scpi.encode("DATA:LOG?", cell, _int_in("max_rows", max_rows, 1, 10000))


def encode_log_fetch(cell: int, max_rows: int = 1000, first: int | None = None) -> bytes:
    """``DATA:LOG:FETC? <cell>,<max_rows>[,<first>]`` (extension): the rows from index
    ``first`` on, acknowledging (letting the instrument discard) every row before it;
    without ``first``, from the first unacknowledged row. Answered by
    :func:`decode_log_fetch`. Unlike ``DATA:LOG?`` it loses nothing when an answer is lost:
    asking again with the same ``first`` gets the same rows."""
    _int_in("cell", cell, 1, 99999)
    _int_in("max_rows", max_rows, 1, 10000)
    if first is None:
        return scpi.encode("DATA:LOG:FETC?", cell, max_rows)
    return scpi.encode("DATA:LOG:FETC?", cell, max_rows, _int_in("first", first, 0, 2**62))


def compound(*commands: bytes) -> bytes:
    """Join LF-terminated commands into one message (``A;:B;:C``) evaluated from the root."""
    if not commands:
        raise ValueError("commands: need at least one")
    bodies = []
    for c in commands:
        if not c.endswith(TERMINATOR) or b"\n" in c[:-1] or b";" in c:
            raise ValueError(f"commands: each must be one LF-terminated command, got {c!r}")
        bodies.append(c[: -len(TERMINATOR)].lstrip(b":"))
    return b";:".join(bodies) + TERMINATOR


def checked(command: bytes) -> bytes:
    """``<setter>;:SYST:ERR?``: execute and read back the first queued error."""
    return compound(command, scpi.encode("SYST:ERR?"))


# -- reply framing: recognising stale replies ------------------------------------------------
# SCPI replies carry no command id, so a reply that arrives after its command timed out
# could be read as the answer to the next query. Each query therefore says what shape its
# answer has; a line that is a well-formed reply of *another* shape is stale and skipped,
# while anything that is no BT2200 reply at all (line noise) ends the wait so that the
# decoder reports it. (Two queries with the same shape remain indistinguishable; the
# transport's drain after a timeout covers most of those.)

_NR_TEXT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SECTION_SHAPES = {
    "numbers": rf"{_NR_TEXT}(?:,{_NR_TEXT})*",
    "error": r'[+-]?\d+,"[^"\r\n]*"',
    "verbose": rf"(?:IDLE|RUNNING),\d+,\d+,{_NR_TEXT},{_NR_TEXT},[A-Z]+,\d+,[A-Z_]+,"
    rf"{_NR_TEXT},{_NR_TEXT}",
    "identity": r"[^,;\r\n]+,[^,;\r\n]+,[^,;\r\n]*,[^,;\r\n]*",
    "channels": r"\(@[0-9,:]+\)",
    "step": rf"[A-Z]+,{_NR_TEXT},{_NR_TEXT},{_NR_TEXT}",
    # DATA:LOG:FETC?: first index and count as plain integers, rows ending in their step.
    # Stricter than "numbers", so that the tail of an earlier, longer reply (a client
    # that timed out and flushed its input mid-reply) is read past as stale, not decoded.
    "log": rf"\d+,\d+(?:(?:,{_NR_TEXT}){{5}},\d+)*",
}
_KNOWN_SECTION = re.compile("|".join(f"(?:{p})" for p in _SECTION_SHAPES.values()))
_NAN_SECTION = re.compile(r"[+]?9\.9\d*E\+?37", re.IGNORECASE)


def expect(*sections: str) -> re.Pattern[bytes]:
    """The shape of a reply: one named section per query in the message
    (``numbers``, ``error``, ``verbose``, ``identity``, ``channels``, ``step``, ``log``)."""
    if not sections:
        raise ValueError("sections: need at least one")
    for name in sections:
        _member("sections", name, tuple(_SECTION_SHAPES))
    return re.compile(";".join(f"(?:{_SECTION_SHAPES[n]})" for n in sections).encode("ascii"))


def _known_reply(line: bytes) -> bool:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(_KNOWN_SECTION.fullmatch(part) for part in text.split(";"))


def _nan_reply(line: bytes) -> bool:
    parts = line.split(b";")
    return all(_NAN_SECTION.fullmatch(p.decode("ascii", "replace")) for p in parts)


def reply_complete_for(shape: re.Pattern[bytes]) -> Callable[[bytes], bool]:
    """Completeness test that reads past stale replies of another shape."""

    def complete(buf: bytes) -> bool:
        if not buf.endswith(TERMINATOR):
            return False
        last = buf[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1].rstrip(b"\r")
        if shape.fullmatch(last) or _nan_reply(last):
            return True
        return not _known_reply(last)  # line noise: stop here and let the decoder say so

    return complete


EXPECT_NUMBERS = expect("numbers")
EXPECT_ERROR = expect("error")
EXPECT_IDENTITY = expect("identity")
EXPECT_VERBOSE = expect("verbose")
EXPECT_LOG = expect("log")


def last_reply(raw: bytes) -> bytes:
    """The final LF-terminated line of ``raw`` (stale replies before it dropped)."""
    if not raw.endswith(TERMINATOR):
        return raw
    return raw[: -len(TERMINATOR)].rsplit(TERMINATOR, 1)[-1] + TERMINATOR


# -- decoders --------------------------------------------------------------------------------------


def is_not_a_number(raw: bytes) -> bool:
    """True for a reply made only of the SCPI not-a-number value (9.91E+37)."""
    try:
        text = scpi.decode_string(raw)
    except InstrumentError:
        return False
    parts = [p.strip() for p in re.split(r"[;,]", text)]
    return all(_NR.fullmatch(p) and abs(float(p)) >= NAN_MARKER for p in parts)


def split_compound(raw: bytes, count: int) -> list[bytes]:
    """Split the reply to a compound query into ``count`` LF-terminated replies."""
    text = scpi.decode_string(raw)
    parts = text.split(";")
    if len(parts) != count:
        raise ProtocolError(f"expected {count} ';'-separated replies, got {len(parts)}", raw=raw)
    return [p.encode("ascii") + TERMINATOR for p in parts]


def _floats(raw: bytes, count: int | None) -> list[float]:
    values = scpi.decode_floats(raw, count)
    if any(not math.isfinite(v) or abs(v) >= NAN_MARKER for v in values):
        raise ProtocolError("reply holds the SCPI 'not a number' value", raw=raw)
    return values


def _negate(value: float) -> float:
    return 0.0 - value  # (0.0 - 0.0 is 0.0, where -0.0 would print as "-0.0")


def decode_values(raw: bytes, count: int) -> list[float]:
    """``count`` comma-separated numbers (voltages, capacities, temperatures)."""
    return _floats(raw, count)


def decode_currents(raw: bytes, count: int) -> list[float]:
    """``MEAS:CELL:CURR?`` in the project's convention (positive = discharge)."""
    return [_negate(v) for v in _floats(raw, count)]


def decode_report(raw: bytes, count: int) -> list[Report]:
    parts = scpi.decode_string(raw).split(",")
    if len(parts) != count or not all(re.fullmatch(r"[0-4]", p.strip()) for p in parts):
        raise ProtocolError(f"expected {count} status codes 0..4", raw=raw)
    return [Report(int(p)) for p in parts]


def _number(text: str, what: str, raw: bytes) -> float:
    if not _NR.fullmatch(text):
        raise ProtocolError(f"{what} is not a number: {text!r}", raw=raw)
    value = float(text)
    if not math.isfinite(value) or abs(value) >= NAN_MARKER:
        raise ProtocolError(f"{what} is the SCPI 'not a number' value", raw=raw)
    return value


def decode_verbose(raw: bytes) -> CellStatus:
    """``IDLE|RUNNING,<seq>,<step>,<V>,<I>,<result>,<test>,<type>,<limit>,<measured>``."""
    parts = [p.strip() for p in scpi.decode_string(raw).split(",")]
    if len(parts) != 10:
        raise ProtocolError(f"STAT:CELL:VERB? must answer 10 fields, got {len(parts)}", raw=raw)
    state, seq, step, volt, curr, result, test, ttype, limit, measured = parts
    if state not in STATES or result not in RESULTS:
        raise ProtocolError(f"unknown cell state/result {state!r}/{result!r}", raw=raw)
    if ttype not in (*TEST_TYPES, "NONE"):
        raise ProtocolError(f"unknown test type {ttype!r}", raw=raw)
    if not all(_INT.fullmatch(p) for p in (seq, step, test)):
        raise ProtocolError("sequence, step and test must be integers", raw=raw)
    return CellStatus(
        state=state,
        sequence=int(seq),
        step=int(step),
        voltage_v=_number(volt, "Vsense", raw),
        current_a=_negate(_number(curr, "Imon", raw)),
        result=result,
        test=int(test),
        test_type=ttype,
        limit=_number(limit, "limit", raw),
        measured=_number(measured, "measured value", raw),
    )


def decode_log(raw: bytes) -> list[LogRow]:
    """``<n>,t,V,I,Ah,degC,step,...`` -> rows (current converted to discharge-positive)."""
    return _log_rows(_floats(raw, None), raw)


@dataclass(frozen=True)
class LogBatch:
    """An answer to ``DATA:LOG:FETC?``: ``rows`` are the log's rows ``first``,
    ``first + 1``, ... (indices count every row the channel logged)."""

    first: int
    rows: list[LogRow]

    @property
    def next(self) -> int:
        """The index of the row after these (what the next read asks for)."""
        return self.first + len(self.rows)


def decode_log_fetch(raw: bytes) -> LogBatch:
    """``<first>,<n>,t,V,I,Ah,degC,step,...`` -> :class:`LogBatch`."""
    values = _floats(raw, None)
    if not values or values[0] != int(values[0]) or values[0] < 0:
        raise ProtocolError("data log must start with the index of its first row", raw=raw)
    return LogBatch(int(values[0]), _log_rows(values[1:], raw))


def _log_rows(values: list[float], raw: bytes) -> list[LogRow]:
    """``<n>,t,V,I,Ah,degC,step,...`` (numbers) -> rows."""
    if not values or values[0] != int(values[0]) or values[0] < 0:
        raise ProtocolError("data log must start with its row count", raw=raw)
    n = int(values[0])
    if len(values) != 1 + 6 * n:
        raise ProtocolError(
            f"data log announces {n} rows but holds {len(values) - 1} values", raw=raw
        )
    rows = []
    for j in range(n):
        t, v, i, ah, temp, step = values[1 + 6 * j : 7 + 6 * j]
        if step != int(step) or step < 0:
            raise ProtocolError(f"data log row {j}: step must be an integer", raw=raw)
        rows.append(LogRow(t, v, _negate(i), ah, temp, int(step)))
    return rows


def error_to_exception(err: scpi.ScpiError, command: bytes, raw: bytes) -> CommandRejectedError:
    """The exception for a queued SCPI error (busy -> InstrumentBusyError)."""
    cls = (
        InstrumentBusyError
        if err.code == -200 and "busy" in err.message.lower()
        else (CommandRejectedError)
    )
    return cls(f"SCPI error {err.code}: {err.message}", command=command, raw=raw)


# -- instrument side (the simulator's formats; used by property tests) --------------------------


def format_verbose(status: CellStatus) -> bytes:
    fields = [
        status.state,
        str(status.sequence),
        str(status.step),
        f"{status.voltage_v:+.6E}",
        f"{-status.current_a:+.6E}",
        status.result,
        str(status.test),
        status.test_type,
        f"{status.limit:+.6E}",
        f"{status.measured:+.6E}",
    ]
    return ",".join(fields).encode("ascii") + TERMINATOR


def format_log_fetch(first: int, rows: Sequence[LogRow]) -> bytes:
    """The ``DATA:LOG:FETC?`` answer: ``<first>,`` then :func:`format_log`."""
    return f"{first},".encode("ascii") + format_log(rows)


def format_log(rows: Sequence[LogRow]) -> bytes:
    out = [str(len(rows))]
    for r in rows:
        out.append(
            f"{r.time_s:.1f},{r.voltage_v:.5f},{-r.current_a:.5f},{r.capacity_ah:.6f},"
            f"{r.temperature_c:.2f},{r.step}"
        )
    return ",".join(out).encode("ascii") + TERMINATOR
