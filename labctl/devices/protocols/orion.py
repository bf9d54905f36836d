"""Thermo Scientific Orion Star A-series (A212 / A215) remote-control commands, conductivity.

Rules from the Star A200-A300 remote control protocol: a command is
``OPCODE [OPERANDS]`` terminated by CR; LF is ignored; commands are not case
sensitive; one command at a time: when it has finished, the meter prints the
prompt ``>`` followed by a space, and only then takes the next command. An empty
command (just CR) only returns a prompt. Incorrect commands "fail to execute": the
manual documents no error message, so a refused command shows only as a missing
output before the prompt.

Subset implemented: ``GETMEAS [n]`` (print the current measurement, ``n`` times),
``SYSTEM`` (model, serial number, software revision, date and time), ``GETMODE``,
``SETMODE <mode>`` and ``SETCSV`` (CSV output).

Reply framing, as drivers written against real A-series meters see it: the meter
echoes the command line, prints its output lines, each ended with CR (the manual
advises terminal programs to append line feeds themselves; a CR LF is accepted
too), then the prompt ``"> "``.

Measurement record (CSV; fields separated by ``", "``). The leading fields follow
the A-series CSV export (model, serial, software revision, user ID, date & time,
sample ID, channel, mode, value, unit, ...); the conductivity tail is this
project's rendering of the meter's conductivity data, plus one field the real
export does not have, the stability status (the meter shows it on screen as
"Stabilizing"/"Ready")::

    A212, X51234, 3.04, ADMIN, 01/01/24 00:10:05, , CH-1, Cond, 12.87, mS/cm,
    27.09, mS, 25.0, C, Off, 2.1, 25.0, 0.475, Ready, M100, 7

i.e. model, serial, software, user, date/time, sample ID, channel, ``Cond``,
conductivity value and unit (``uS/cm`` or ``mS/cm``, autoranging), conductance value
and unit (``uS``/``mS``), temperature value and unit (``C``, ``C (MAN)`` without an
ATC probe, or ``F``), temperature compensation (``Off``, ``Lin``, ``nLFn``), its
coefficient (%/C), reference temperature (C), cell constant (1/cm), status
(``Ready`` = stable, ``Stabilizing``, ``Overrange``), method, log number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from labctl.devices.errors import InstrumentBusyError, InstrumentError, ProtocolError

TERMINATOR = b"\r"
PROMPT = b"> "
COMMANDS = frozenset({"GETMEAS", "SYSTEM", "GETMODE", "SETMODE", "SETCSV"})
MODES = frozenset({"PH", "MV", "RMV", "ORP", "ISE", "COND", "RES", "SAL", "TDS", "DO"})
FIELDS = 21  # fields of a conductivity measurement record
STATUSES = {"Ready": True, "Stabilizing": False}
OVERRANGE = "Overrange"

_UNIT_TO_MS_CM = {"uS/cm": 1e-3, "µS/cm": 1e-3, "mS/cm": 1.0, "S/cm": 1e3}
_UNIT_TO_MS = {"uS": 1e-3, "µS": 1e-3, "mS": 1.0, "S": 1e3}
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_OPERAND = re.compile(r"^[A-Za-z0-9.,:/ -]*$")


class OverrangeError(InstrumentError):
    """The meter reports the reading outside its measuring range (or the cell's)."""


@dataclass(frozen=True)
class Measurement:
    """One conductivity record of ``GETMEAS``, in project units (mS/cm, mS, C)."""

    model: str
    serial_number: str
    software: str
    timestamp: str
    channel: str
    conductivity_ms_cm: float
    conductance_ms: float
    temperature_c: float
    manual_temperature: bool
    temperature_compensation: str
    tc_coefficient: float
    reference_temperature_c: float
    cell_constant: float
    stable: bool
    raw: bytes


@dataclass(frozen=True)
class SystemInfo:
    model: str
    serial_number: str
    software: str
    timestamp: str


def encode(command: str, *operands: str) -> bytes:
    """``OPCODE [OPERANDS]`` + CR; only the implemented opcodes are accepted."""
    opcode = command.upper()
    if opcode not in COMMANDS:
        raise ValueError(f"command: unknown Orion Star command {command!r}")
    for op in operands:
        if not op or not _OPERAND.match(op):
            raise ValueError(f"operand: must be non-empty [A-Za-z0-9.,:/ -], got {op!r}")
    return " ".join((opcode, *operands)).encode("ascii") + TERMINATOR


def encode_getmeas(count: int = 1) -> bytes:
    """``GETMEAS`` (one record) or ``GETMEAS <count>``."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 999:
        raise ValueError(f"count: must be an integer in 1..999, got {count!r}")
    return encode("GETMEAS") if count == 1 else encode("GETMEAS", str(count))


def encode_setmode(mode: str) -> bytes:
    if not isinstance(mode, str) or mode.upper() not in MODES:
        raise ValueError(f"mode: must be one of {sorted(MODES)}, got {mode!r}")
    return encode("SETMODE", mode.upper())


def reply_complete(buf: bytes) -> bool:
    """A reply is complete once the meter has printed its prompt."""
    return buf.endswith(PROMPT)


def encode_sync() -> bytes:
    """An empty command: the meter ignores it and just prints a new prompt."""
    return TERMINATOR


def sync_complete(buf: bytes) -> bool:
    """Completeness test for :func:`encode_sync` that reads past a late reply.

    After a timed-out command the meter may still print that command's output and
    prompt; the empty command's own prompt follows it. The exchange is complete at
    a lone prompt, or at a prompt that directly follows another one.
    """
    return buf == PROMPT or buf.endswith(PROMPT + PROMPT)


def output_lines(raw: bytes, command: bytes) -> list[str]:
    """The lines a command printed: prompt, command echo and blank lines removed."""
    if not raw.endswith(PROMPT):
        raise ProtocolError("reply does not end with the '> ' prompt", raw=raw)
    try:
        text = raw[: -len(PROMPT)].decode("ascii")
    except UnicodeDecodeError:
        try:
            text = raw[: -len(PROMPT)].decode("utf-8")  # the meter may print "µS/cm"
        except UnicodeDecodeError as exc:
            raise ProtocolError("reply is neither ASCII nor UTF-8", raw=raw) from exc
    echo = command.strip().decode("ascii", errors="replace").upper()
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text)]
    lines = [ln for ln in lines if ln and ln != ">"]
    if lines and lines[0].upper() == echo:
        lines = lines[1:]
    if any(not ln.isprintable() for ln in lines):
        raise ProtocolError("reply holds non-printable characters", raw=raw)
    return lines


def _number(text: str, what: str, raw: bytes) -> float:
    if not _NUMBER.match(text):
        raise ProtocolError(f"{what}: expected a number, got {text!r}", raw=raw)
    return float(text)


def decode_record(line: str, raw: bytes) -> Measurement:
    """Decode one CSV conductivity record (see the module docstring for the layout)."""
    f = [x.strip() for x in line.split(",")]
    if len(f) != FIELDS:
        raise ProtocolError(f"measurement record has {len(f)} fields, expected {FIELDS}", raw=raw)
    if f[7].lower() != "cond":
        raise ProtocolError(f"meter is in {f[7]!r} mode, not conductivity (SETMODE COND)", raw=raw)
    status = f[18]
    if status == OVERRANGE:
        raise OverrangeError(
            "conductivity outside the measuring range of meter and cell",
            command=b"GETMEAS",
            raw=raw,
        )
    if status not in STATUSES:
        raise ProtocolError(f"unknown reading status {status!r}", raw=raw)
    unit, g_unit = f[9], f[11]
    if unit not in _UNIT_TO_MS_CM:
        raise ProtocolError(f"conductivity unit {unit!r} is not uS/cm or mS/cm", raw=raw)
    if g_unit not in _UNIT_TO_MS:
        raise ProtocolError(f"conductance unit {g_unit!r} is not uS or mS", raw=raw)
    temperature = _number(f[12], "temperature", raw)
    t_unit = f[13].split()[0] if f[13] else ""
    if t_unit == "F":
        temperature = (temperature - 32.0) / 1.8
    elif t_unit != "C":
        raise ProtocolError(f"temperature unit {f[13]!r} is not C or F", raw=raw)
    kappa = _number(f[8], "conductivity", raw) * _UNIT_TO_MS_CM[unit]
    conductance = _number(f[10], "conductance", raw) * _UNIT_TO_MS[g_unit]
    values = (kappa, conductance, temperature)
    if not all(math.isfinite(v) for v in values):
        raise ProtocolError("non-finite number in measurement record", raw=raw)
    return Measurement(
        model=f[0],
        serial_number=f[1],
        software=f[2],
        timestamp=f[4],
        channel=f[6],
        conductivity_ms_cm=kappa,
        conductance_ms=conductance,
        temperature_c=temperature,
        manual_temperature="MAN" in f[13].upper(),
        temperature_compensation=f[14],
        tc_coefficient=_number(f[15], "TC coefficient", raw),
        reference_temperature_c=_number(f[16], "reference temperature", raw),
        cell_constant=_number(f[17], "cell constant", raw),
        stable=STATUSES[status],
        raw=raw,
    )


def decode_measurements(raw: bytes, command: bytes = b"GETMEAS") -> list[Measurement]:
    """All records printed by ``GETMEAS [n]``; busy if the meter printed none."""
    lines = output_lines(raw, command)
    if not lines:
        raise InstrumentBusyError(
            "meter printed no measurement: command not executed (busy in a menu or "
            "calibration, or not in remote mode)",
            command=command,
            raw=raw,
        )
    return [decode_record(line, raw) for line in lines]


def decode_measurement(raw: bytes, command: bytes = b"GETMEAS") -> Measurement:
    """The (last) record of a ``GETMEAS`` reply."""
    return decode_measurements(raw, command)[-1]


def decode_system(raw: bytes) -> SystemInfo:
    """``SYSTEM`` -> model, serial number, software revision, date and time."""
    lines = output_lines(raw, b"SYSTEM")
    if not lines:
        raise InstrumentBusyError("meter printed no system information", command=b"SYSTEM", raw=raw)
    f = [x.strip() for x in lines[-1].split(",")]
    if len(f) != 4 or not f[0] or not f[1]:
        raise ProtocolError("SYSTEM must print 'model, serial, software, date time'", raw=raw)
    return SystemInfo(model=f[0], serial_number=f[1], software=f[2], timestamp=f[3])


def decode_mode(raw: bytes) -> str:
    """``GETMODE`` -> the measurement mode, upper case (``COND``)."""
    lines = output_lines(raw, b"GETMODE")
    if not lines:
        raise InstrumentBusyError("meter printed no mode", command=b"GETMODE", raw=raw)
    mode = lines[-1].upper()
    if mode not in MODES:
        raise ProtocolError(f"unknown measurement mode {lines[-1]!r}", raw=raw)
    return mode


def decode_ack(raw: bytes, command: bytes) -> None:
    """A command without output: anything but the echo before the prompt is an error."""
    lines = output_lines(raw, command)
    if lines:
        raise ProtocolError(f"unexpected output {lines[0]!r}", command=command, raw=raw)


def format_conductivity(ms_cm: float) -> tuple[str, str]:
    """Autoranged display value and unit, as the meter prints them (4 significant digits)."""
    us = ms_cm * 1000.0
    if us < 19.995:
        return f"{us:.2f}", "uS/cm"
    if us < 199.95:
        return f"{us:.1f}", "uS/cm"
    if us < 1999.5:
        return f"{us:.0f}", "uS/cm"
    if ms_cm < 19.995:
        return f"{ms_cm:.2f}", "mS/cm"
    if ms_cm < 199.95:
        return f"{ms_cm:.1f}", "mS/cm"
    return f"{ms_cm:.0f}", "mS/cm"


def format_record(
    conductivity_ms_cm: float,
    temperature_c: float,
    *,
    stable: bool = True,
    conductance_ms: float | None = None,
    cell_constant: float = 0.475,
    timestamp: str = "01/01/24 00:00:00",
    log_number: int = 1,
) -> bytes:
    """A complete ``GETMEAS`` reply (echo, record, prompt); the instrument side, for tests."""
    value, unit = format_conductivity(conductivity_ms_cm)
    g = conductivity_ms_cm / cell_constant if conductance_ms is None else conductance_ms
    g_value, g_unit = format_conductivity(g)
    fields = [
        "A212", "X51234", "3.04", "ADMIN", timestamp, "", "CH-1", "Cond", value, unit,
        g_value, g_unit.removesuffix("/cm"), f"{temperature_c:.1f}", "C", "Off", "2.1", "25.0",
        f"{cell_constant:.3f}", "Ready" if stable else "Stabilizing", "M100", str(log_number),
    ]  # fmt: skip
    return b"GETMEAS\r" + ", ".join(fields).encode("ascii") + b"\r" + PROMPT
