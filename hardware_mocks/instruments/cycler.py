"""Battery cycler speaking SCPI like a Keysight BT2200 (BT2202A/BT2203A mainframe).

Protocol (LF-terminated program and response messages; setters have no reply; several
commands may share one message separated by ``;``, and their query replies come back
joined by ``;`` in one response). Channel lists are ``(@a,b,c:d)``; channels are
numbered ``<card><nn>`` (card 1, channels 01..32: ``101``..``132``), cells are user ids
(the usual convention, and what the labctl device uses: ``1001`` for channel ``101``).

Commands (``[...]`` optional, lower-case letters optional as in every SCPI header):

* ``*IDN?`` -> ``Keysight Technologies,BT2203A,<serial>,<firmware>``; ``*RST``, ``*CLS``,
  ``*OPC?`` (``1``), ``*OPC``, ``*ESR?``, ``*STB?``.
* ``SYSTem:ERRor[:NEXT]?`` -> ``-113,"Undefined header"`` ... ``+0,"No error"``;
  ``SYSTem:ERRor:COUNt?``; ``SYSTem:VERSion?``.
* ``CELL:DEFine <cell>,(@<channel>)``; ``CELL:DEFine? <cell>`` -> ``(@101)``;
  ``CELL:DEFine:QUICk 1`` (cell ``card*1000+nn`` on every channel); ``CELL:CLEar <cell>|0``.
* ``SEQuence:STEP:DEFine <seq>,<step>,<mode>,<duration_s>[,<current_A>,<voltage_V>]``
  with mode ``CHARGE`` or ``DISCHARGE`` (CC-CV: current magnitude, voltage limit) or
  ``REST`` (duration only); ``SEQuence:STEP:DEFine? <seq>,<step>`` -> ``CHARGE,3600,5,4.2``.
* ``SEQuence:TEST:DEFine <seq>,<step>,<test>,<type>,<value>,<time_type>,<time>,<action>``:
  type ``VOLT_GE|VOLT_LE|CURR_GE|CURR_LE`` (currents as magnitudes), time_type
  ``NONE|BEFORE|AFTER|AT`` (window relative to the step start), action ``NEXT|FAIL``.
* ``SEQuence:CLEar <seq>|0``; ``CELL:ENABle (@cells),<seq>`` (0 detaches);
  ``CELL:INITiate[:IMMediate] (@cells)``; ``CELL:ABORt (@cells)|0`` (output off).
* ``STATus:CELL:REPort? (@cells)`` -> one code per cell (below);
  ``STATus:CELL:VERBose? <cell>`` -> ``IDLE|RUNNING,<seq>,<step>,<Vsense>,<Imon>,
  NONE|OK|FAIL|ABORTED,<test>,<test_type>,<limit>,<measured>``.
* ``MEASure:CELL:VOLTage? (@cells)``, ``MEASure:CELL:CURRent? (@cells)`` -> NR3 lists
  (``+3.712345E+00,...``); ``MEASure:CELL:CAPacity:AHR? | :WHR?`` (Ah / Wh moved in the
  present or last step); ``CELL:STEP:TIME?`` (s into the step);
  ``MEASure:CELL:TEMPerature?`` (degC, extension).
* ``DATA:LOG? <cell>[,<max_rows>]``, ``DATA:LOG:FETCh? <cell>[,<max_rows>[,<from>]]``,
  ``DATA:LOG:CLEar``, ``DATA:LOG:PERiod[?]``, ``DATA:LOG:RECords:AVAilable? [<cell>]``
  (extensions, see below).

``STATus:CELL:REPort?`` codes: 0 none (idle, nothing run since clear), 1 running,
2 completed (OK), 3 failed (a test with action FAIL fired), 4 aborted. Public client
code confirms ``1`` = running; the numbering of the others is ours and mirrors the
``VERBose?`` result field. The verbose reply's 10 fields, the ``SEQ:STEP:DEF?`` reply and
the ``SEQ:TEST:DEF`` argument order follow public client code for the BT2202A/BT2203A.

Sign convention: like the BT2200, currents on the wire are **positive when charging**
(``Imon``, ``MEASure:CELL:CURRent?``, the data log); the labctl device converts to the
project's positive-discharge convention. Step currents are magnitudes; the mode sets the
direction.

Errors go to a 30-entry queue read with ``SYSTem:ERRor?`` (FIFO; a full queue replaces
its last entry with ``-350,"Queue overflow"``): -101 invalid character, -102 syntax
error, -104 data type error, -108 parameter not allowed, -109 missing parameter, -113
undefined header, -200 execution error (busy), -221 settings conflict (cell running,
empty sequence, undefined cell), -222 data out of range, -224 illegal parameter value.
A command error (-1xx) discards the rest of the message, as SCPI prescribes.

Safety: a CHARGE/DISCHARGE step whose voltage limit lies outside 2.0..4.5 V, or whose
current exceeds the channel rating (default 6.25 A, the BT2202A/BT2203A figure), is
rejected with -222 when it is defined.

Extensions and simplifications (the real instrument differs here):

* ``DATA:LOG?`` on the real instrument returns a binary block with every cell's latest
  sample; here it takes a cell and returns its rows since the last read as one flat
  ASCII list ``<n>,<t>,<V>,<I>,<Ah>,<degC>,<step>,...`` (t = seconds since
  ``CELL:INITiate``, Ah = the step's capacity, I charge positive). Rows are logged every
  ``DATA:LOG:PERiod`` simulated seconds (default 10) and at every step end, in a ring
  buffer of ``log_capacity`` rows per channel (oldest rows are overwritten).
  ``DATA:LOG?`` discards the rows it answers with, so an answer lost on the wire (a
  client timeout) loses them. ``DATA:LOG:FETCh? <cell>,<max_rows>,<from>`` (also ours)
  is the loss-free read: it answers ``<first>,<n>,<t>,...`` with the rows from index
  ``<from>`` (rows counted since power-on; ``<first>`` > ``<from>`` when rows were
  cleared or overwritten) and discards only the rows before ``<from>``, which the
  request acknowledges; asked again with the same ``<from>``, it answers the same rows.
* One channel per cell (no paralleled channels); ``CELL:DEFine:QUICk`` accepts only 1.
* ``MEASure:CELL:TEMPerature?`` is ours (the BT2200 has no per-cell thermocouples).
* In a ``;``-compound message a header without a leading ``:`` is first resolved under
  the previous command's path (the SCPI rule: ``CELL:ENAB (@1001),1;INIT (@1001)``) and,
  failing that, from the root (clients that repeat full headers without ``:``).
* Busy (the ``busy`` fault): nothing in the message is executed, ``-200,"Execution
  error;instrument busy"`` is queued, and each query in it answers the SCPI
  not-a-number value ``9.91E+37``.

Physics: each channel drives one cell of :mod:`hardware_mocks.physics.cell` (an LG-M50
class 5 Ah NMC/graphite equivalent circuit with Arrhenius and electrolyte-conductivity
dependent resistances, fade, coulombic efficiency and a lumped thermal node) in the
thermal environment of the ``cell`` station. The model is integrated lazily in simulated
time with a fixed ``internal_step_s`` (1 s) for all channels at once (numpy, no
per-channel loops). Channels that carry no current and have no test to evaluate (idle,
or resting on a step without tests) need no step of their own: with no current the
model's step is exact over any interval (the RC relaxation exactly, the lumped heat to
within mK), so while every running channel is such, one step
jumps to the next event (step end or data-log row), and with nothing running the whole
interval is one step. A step costs ~0.2 ms of CPU whatever the channel count (numpy
call overhead), so with cells under current the simulator keeps up to about speed 4000
(one core) and uses half a core at speed 2000. A background task keeps the integration
caught up so that no request has to integrate a long backlog; the integration yields
to the event loop every ~20 ms, so that a simulator that lags its clock still writes
replies and serves the other instruments while it catches up. Tests are evaluated every
internal step on the measured (noisy) voltage and current magnitude. Electrolyte: when
a channel is initiated while a vial with liquid sits at the ``cell`` station, that cell
takes the vial's conductivity at 25 C (``world.electrolyte_model``); otherwise a
10 mS/cm reference electrolyte (the initiate models a freshly filled cell).

Cells: each channel holds one cell for the simulator's life (its age carries over from
run to run). Options ``fade_per_efc`` and ``resistance_growth_per_efc`` set the
design's ageing rates; ``ageing_spread`` and ``capacity_spread`` (default 0: identical
cells) give each channel's cell its own ageing-rate and fresh-capacity factor, drawn
from ``seed`` (:func:`hardware_mocks.physics.cell.cell_variation`).

Telemetry (optional, off by default): with ``telemetry_url`` every channel whose cell has
been started publishes, each ``telemetry_period_s`` of lab time, contract-5 telemetry
(``<telemetry_prefix>/<name>-ch<N>/telemetry``, measured values, discharge positive, ``ts``
= lab time as epoch seconds) and the ground truth (``sim/v1/<name>-ch<N>/truth``: SOC and
present capacity), through :class:`hardware_mocks.telemetry.TelemetryPublisher` in this
simulator's event loop; a missing broker never holds up the SCPI side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from pydantic import ValidationError

from hardware_mocks.config import (
    BrokerUrlOption,
    CyclerTelemetryConfig,
    PeriodOption,
    TopicPrefixOption,
)
from hardware_mocks.physics import cell as cm
from hardware_mocks.server import Simulator
from hardware_mocks.telemetry import TelemetryPublisher
from hardware_mocks.world import LabWorld

MAX_SEQUENCES = 1000
MAX_STEPS = 100
MAX_TESTS = 8
MAX_ERRORS = 30
VOLTAGE_LIMITS = (2.0, 4.5)
_SLICE_CALLS = 100  # physics steps (~0.2 ms each) between yields to the event loop
MAX_DURATION_S = 1.0e7
NAN_REPLY = "9.91E+37"
_CELL_STREAM = 0xCE11  # seeds the per-cell variation apart from the measurement noise
_TELEMETRY_STREAM = 0x7E1E  # the telemetry's own noise: SCPI readings stay as they were
TRUTH_PREFIX = "sim/v1"

STATE_IDLE, STATE_RUNNING = "IDLE", "RUNNING"
RESULT_NONE, RESULT_RUNNING, RESULT_OK, RESULT_FAIL, RESULT_ABORTED = 0, 1, 2, 3, 4
RESULT_NAMES = {
    RESULT_NONE: "NONE",
    RESULT_OK: "OK",
    RESULT_FAIL: "FAIL",
    RESULT_ABORTED: "ABORTED",
}

TEST_TYPES = {"VOLT_GE": 1, "VOLT_LE": 2, "CURR_GE": 3, "CURR_LE": 4}
TEST_NAMES = {v: k for k, v in TEST_TYPES.items()}
TIME_TYPES = {"NONE": 0, "BEFORE": 1, "AFTER": 2, "AT": 3}
ACTIONS = {"NEXT": 1, "FAIL": 2}
MODES = ("CHARGE", "DISCHARGE", "REST")

_NRF = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_NR1 = re.compile(r"^[+-]?\d+$")
_MNEMONIC = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ScpiError(Exception):
    """An error the instrument queues (code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code},{message}")
        self.code = code
        self.message = message


_TEXT = {
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -350: "Queue overflow",
}


def _err(code: int, detail: str = "") -> ScpiError:
    text = _TEXT[code]
    return ScpiError(code, f"{text};{detail}" if detail else text)


@dataclass(frozen=True)
class StepDef:
    mode: str
    duration_s: float
    current_a: float = 0.0
    voltage_v: float = 0.0


@dataclass(frozen=True)
class TestDef:
    type_code: int
    value: float
    time_code: int
    time_s: float
    action: int


@dataclass
class _Compiled:
    """A sequence as one channel runs it (frozen at INITiate)."""

    seq: int
    steps: list[StepDef]
    tests: list[list[tuple[int, TestDef]]] = field(default_factory=list)  # per step


# -- SCPI header matching ------------------------------------------------------------------


def _node(spec: str) -> tuple[str, str, bool]:
    optional = spec.startswith("[")
    word = spec.strip("[]")
    short = "".join(c for c in word if c.isupper() or c.isdigit() or c in "*_")
    return short, word.upper(), optional


def _compile_pattern(pattern: str) -> tuple[list[tuple[str, str, bool]], bool]:
    query = pattern.endswith("?")
    body = pattern.rstrip("?")
    specs = re.findall(r"\[:[^\]]+\]|[^:\[\]]+", body)
    return [_node(s.replace(":", "")) if s.startswith("[") else _node(s) for s in specs], query


def _header_matches(tokens: list[str], nodes: list[tuple[str, str, bool]]) -> bool:
    if not nodes:
        return not tokens
    short, long, optional = nodes[0]
    if tokens and tokens[0].upper() in (short, long) and _header_matches(tokens[1:], nodes[1:]):
        return True
    return optional and _header_matches(tokens, nodes[1:])


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _nrf(arg: str, name: str) -> float:
    if not _NRF.match(arg.strip()):
        raise _err(-104, f"{name} must be a number, got {arg.strip()!r}")
    value = float(arg)
    if not math.isfinite(value):
        raise _err(-222, f"{name} must be finite")
    return value


def _nr1(arg: str, name: str) -> int:
    if not _NR1.match(arg.strip()):
        raise _err(-104, f"{name} must be an integer, got {arg.strip()!r}")
    return int(arg)


def _choice(arg: str, table: dict[str, int] | tuple[str, ...], name: str) -> str:
    word = arg.strip().upper()
    if not _MNEMONIC.match(word):
        raise _err(-104, f"{name} must be a mnemonic, got {arg.strip()!r}")
    if word not in table:
        raise _err(-224, f"{name} {word} is not one of {', '.join(table)}")
    return word


def _channel_entries(arg: str) -> list[tuple[int, bool]] | None:
    """``(@1001,1003:1005)`` -> [(id, came_from_a_range)]; a bare ``0`` -> None (all)."""
    text = arg.strip()
    if text == "0":
        return None
    m = re.fullmatch(r"\(@([0-9:,\s]+)\)", text)
    if not m:
        raise _err(-104, f"expected a channel list like (@1001), got {text!r}")
    out: list[tuple[int, bool]] = []
    for part in m.group(1).split(","):
        lo, _, hi = part.strip().partition(":")
        if not lo.isdigit() or (hi and not hi.strip().isdigit()):
            raise _err(-102, f"bad channel list entry {part.strip()!r}")
        a = int(lo)
        b = int(hi) if hi else a
        if b < a or b - a > 10000:
            raise _err(-222, f"bad range {part.strip()!r}")
        out.extend((i, bool(hi)) for i in range(a, b + 1))
    return out


def _channel_list(arg: str) -> list[int] | None:
    entries = _channel_entries(arg)
    return None if entries is None else [i for i, _ in entries]


def _fmt(value: float) -> str:
    return f"{value:+.6E}"


Handler = Callable[[list[str]], str | None]


class CyclerSimulator(Simulator):
    kind = "cycler"
    protocol = "scpi-bt2200"
    reply_terminator = b"\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        channels: int = 8,
        model: str = "BT2203A",
        serial_number: str = "MY59001234",
        firmware: str = "1.6.2",
        max_current_a: float = 6.25,
        internal_step_s: float = 1.0,
        log_period_s: float = 10.0,
        log_capacity: int = 10000,
        initial_soc: float = 0.5,
        capacity_ah: float = 5.0,
        fade_per_efc: float = 0.002,
        resistance_growth_per_efc: float = 0.005,
        ageing_spread: float = 0.0,
        capacity_spread: float = 0.0,
        noise_v: float = 1.0e-4,
        noise_a: float = 2.0e-4,
        telemetry_url: BrokerUrlOption | None = None,
        telemetry_prefix: TopicPrefixOption = "bms/v1",
        telemetry_period_s: PeriodOption = 30.0,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        try:
            self.telemetry_config = CyclerTelemetryConfig(
                url=telemetry_url, prefix=telemetry_prefix, period_s=telemetry_period_s
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(
                f"telemetry_{err['loc'][0]} = {err.get('input')!r}: {err['msg']}"
            ) from None
        if not 1 <= channels <= 256:
            raise ValueError(f"channels must be within 1..256, got {channels!r}")
        if not internal_step_s > 0:
            raise ValueError(f"internal_step_s must be > 0, got {internal_step_s!r}")
        if not log_period_s > 0:
            raise ValueError(f"log_period_s must be > 0, got {log_period_s!r}")
        if not 10 <= log_capacity <= 1_000_000:
            raise ValueError(f"log_capacity must be within 10..1000000, got {log_capacity!r}")
        self.n = channels
        self.model = model
        self.serial_number = serial_number
        self.firmware = firmware
        self.max_current_a = max_current_a
        self.dt = internal_step_s
        self.log_period_s = log_period_s
        self.log_capacity = log_capacity
        self.noise_v = noise_v
        self.noise_a = noise_a
        self.params = cm.CellParams(
            capacity_ah=capacity_ah,
            fade_per_efc=fade_per_efc,
            resistance_growth_per_efc=resistance_growth_per_efc,
        )
        self.rng = np.random.default_rng(seed)
        env = world.environment_c("cell")
        # The cells' own generator: drawing them leaves the noise sequence (self.rng) as
        # it was, so a lab with spread 0 measures exactly what it measured before.
        ageing, capacity = cm.cell_variation(
            channels,
            [seed, _CELL_STREAM],
            ageing_spread=ageing_spread,
            capacity_spread=capacity_spread,
        )
        self.cells = cm.init_state(
            channels,
            soc=initial_soc,
            temp_c=env,
            params=self.params,
            ageing_factor=ageing,
            capacity_factor=capacity,
        )
        self.default_kappa = self.params.kappa_ref_ms_cm
        # Channel numbers <card><nn>, in channel index order.
        self.channel_numbers = [(k // 32 + 1) * 100 + k % 32 + 1 for k in range(channels)]
        self._channel_index = {c: k for k, c in enumerate(self.channel_numbers)}
        self._t = self.clock.now()
        self.integration_steps = 0  # physics steps taken (each costs the same CPU)
        self._ticker: asyncio.Task[None] | None = None
        self.errors: list[tuple[int, str]] = []
        self.esr = 0
        self._init_channels()
        self._reset_configuration()
        self._handlers = self._build_table()
        self._init_telemetry(seed)

    # -- state --------------------------------------------------------------------------
    def _init_channels(self) -> None:
        n = self.n
        self.running = np.zeros(n, dtype=bool)
        self.direction = np.zeros(n, dtype=np.int64)
        self.i_limit = np.zeros(n)
        self.v_limit = np.full(n, 3.0)
        self.duration = np.full(n, np.inf)
        self.step_t = np.zeros(n)
        self.test_t = np.zeros(n)
        self.step_ah = np.zeros(n)
        self.step_wh = np.zeros(n)
        self.step_no = np.zeros(n, dtype=np.int64)
        self.seq_no = np.zeros(n, dtype=np.int64)
        self.result = np.zeros(n, dtype=np.int64)
        self.next_log = np.zeros(n)
        self.t_type = np.zeros((n, MAX_TESTS), dtype=np.int64)
        self.t_value = np.zeros((n, MAX_TESTS))
        self.t_timing = np.zeros((n, MAX_TESTS), dtype=np.int64)
        self.t_time = np.zeros((n, MAX_TESTS))
        self.t_action = np.zeros((n, MAX_TESTS), dtype=np.int64)
        self.t_number = np.zeros((n, MAX_TESTS), dtype=np.int64)
        self._tests_changed()
        # Mutated in place by step loading/aborts, so one Control serves every step.
        self._control = cm.Control(self.direction, self.i_limit, self.v_limit)
        self.fail_info: list[tuple[int, str, float, float]] = [(0, "NONE", 0.0, 0.0)] * n
        self.compiled: list[_Compiled | None] = [None] * n
        self.v = cm.terminal_voltage(self.cells, self.params, np.zeros(n))
        self.i = np.zeros(n)
        # Data log: ring buffer per channel of (t, V, I charge+, Ah, degC, step).
        self.log = np.zeros((n, self.log_capacity, 6))
        self.log_written = np.zeros(n, dtype=np.int64)
        self.log_read = np.zeros(n, dtype=np.int64)

    def _reset_configuration(self) -> None:
        self.cell_of: dict[int, int] = {}  # cell id -> channel index
        self.sequences: dict[int, dict[int, StepDef]] = {}
        self.tests: dict[tuple[int, int], dict[int, TestDef]] = {}
        self.enabled: dict[int, int] = {}  # cell id -> sequence

    # -- physics ------------------------------------------------------------------------
    def _ensure_ticker(self) -> None:
        if self.telemetry is not None:
            self.telemetry.start()
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_forever(), name=f"{self.name}:physics")

    async def _tick_forever(self) -> None:
        # Keeps the integration caught up while nobody asks, so that a request never has
        # to integrate a long backlog (and sequences end on time without polling).
        while True:
            await self._catch_up()
            await asyncio.sleep(0.05)

    async def _catch_up(self) -> None:
        """:meth:`advance` to now in slices, letting the event loop run in between.

        One slice is ~20 ms of CPU. A simulator that cannot keep up with its clock (a
        busy machine, a high speed) integrates a backlog of seconds; in one piece, that
        would stall every other task of the loop (replies being written, the other
        instruments) for as long, and clients time out waiting for answers.
        """
        until = self.clock.now()
        while True:
            if self.advance(until=until, max_calls=_SLICE_CALLS):
                return
            await asyncio.sleep(0)  # (a yield, not a wait: the work is ours to do)

    def advance(self, *, until: float | None = None, max_calls: int | None = None) -> bool:
        """Integrate every channel up to the present simulated time (or ``until``).

        Internal steps of ``dt`` while any channel drives a current or has tests to
        evaluate; channels that are idle, or resting with no test, need no step of their
        own: whenever *every* running channel is such, one exact step jumps to the next
        event (a step end or a data-log row), and with nothing running the whole
        interval is one step. With ``max_calls``, stop after that many steps; returns
        whether the integration got there.
        """
        target = self.clock.now() if until is None else until
        n_steps = int((target - self._t) / self.dt)
        if n_steps <= 0:
            return True
        env = self.world.environment_c("cell")
        calls = 0
        while n_steps > 0:
            if max_calls is not None and calls >= max_calls:
                return False
            k = self._quiet_steps(self._telemetry_cap(n_steps))
            self._tick(env, k)
            self._t += k * self.dt
            n_steps -= k
            calls += 1
            if self.telemetry is not None and self._t >= self._tel_next - 1e-9:
                self._sample_telemetry()
        return True

    def _quiet_steps(self, limit: int) -> int:
        """How many internal steps the next exact step may span (1 if any channel works)."""
        run = self.running
        if not run.any():
            return limit
        if self._any_tests or (self.direction[run] != cm.IDLE).any():
            return 1
        # Every running channel rests with no test: the state evolves exactly (no
        # current) up to the first step end or log row, whichever comes first.
        to_end = (self.duration[run] - 1e-9 - self.step_t[run]) / self.dt
        to_log = (self.next_log[run] - self.test_t[run]) / self.dt
        first = min(float(to_end.min()), float(to_log.min()))
        return max(1, min(limit, math.ceil(first)))

    # -- telemetry (optional) -------------------------------------------------------------
    def _init_telemetry(self, seed: int) -> None:
        cfg = self.telemetry_config
        self.telemetry: TelemetryPublisher | None = None
        if cfg.url is not None:
            self.telemetry = TelemetryPublisher(cfg.url, identifier=f"{self.name}-{id(self):x}")
        self.telemetry_period_s = cfg.period_s
        # Pack ids as the labctl device counts channels (1-based, channel order).
        self.pack_ids = [f"{self.name}-ch{k + 1}" for k in range(self.n)]
        self._tel_rng = np.random.default_rng([seed, _TELEMETRY_STREAM])
        self._tel_seq = np.zeros(self.n, dtype=np.int64)
        self._tel_next = self._t
        # Lab time as epoch seconds: the wall clock at the lab's t = 0.
        self._epoch0 = time.time() - self.clock.now()
        self.telemetry_samples = 0  # per channel and sample, whether sent or dropped

    def _telemetry_channels(self) -> np.ndarray:
        """Channels that report: a cell is defined on them and has been started (a client
        that defines a cell on every channel at connect does not make them all report)."""
        ks = [k for k in set(self.cell_of.values()) if self.result[k] != RESULT_NONE]
        return np.array(sorted(ks), dtype=np.int64)

    def _telemetry_cap(self, limit: int) -> int:
        """Steps up to the next sample while a sample is due for some cell (so that a
        quiet jump does not skip samples)."""
        if self.telemetry is None or not self.cell_of or not self.result.any():
            return limit
        return max(1, min(limit, math.ceil((self._tel_next - self._t) / self.dt - 1e-9)))

    def _sample_telemetry(self) -> None:
        """One contract-5 telemetry message and one ground-truth message per reporting
        channel: the instrument's measurements (its noise, discharge positive) at lab time."""
        assert self.telemetry is not None
        period = self.telemetry_period_s
        self._tel_next += period
        if self._tel_next <= self._t:  # after a stretch with no cell: resynchronise
            self._tel_next = self._t + period
        idx = self._telemetry_channels()
        if idx.size == 0:
            return
        rng = self._tel_rng
        v = self.v[idx] + rng.normal(0.0, self.noise_v, idx.size)
        i_noisy = self.i[idx] + rng.normal(0.0, self.noise_a, idx.size)
        i = np.where(self.direction[idx] == cm.IDLE, 0.0, i_noisy)  # open channel: no offset
        temp = self.cells.temp_c[idx]
        soc = self.cells.soc[idx]
        cap = cm.capacity_ah(self.cells, self.params)[idx]
        ts = round(self._epoch0 + self._t, 3)
        prefix = self.telemetry_config.prefix
        messages: list[tuple[str, bytes]] = []
        for j, k in enumerate(idx.tolist()):  # JSON per message: no way around a loop
            pack, seq = self.pack_ids[k], int(self._tel_seq[k])
            self._tel_seq[k] = seq + 1
            tele = {
                "ts": ts,
                "seq": seq,
                "current_a": round(float(i[j]), 6),
                "cell_v": [round(float(v[j]), 6)],
                "temp_c": [round(float(temp[j]), 3)],
            }
            truth = {"ts": ts, "seq": seq, "soc": float(soc[j]), "capacity_ah": float(cap[j])}
            messages.append((f"{prefix}/{pack}/telemetry", json.dumps(tele).encode()))
            messages.append((f"{TRUTH_PREFIX}/{pack}/truth", json.dumps(truth).encode()))
        self.telemetry_samples += idx.size
        self.telemetry.offer(messages)

    def _physics(self, env: float, dt: float) -> None:
        self.integration_steps += 1
        self.cells, self.i, self.v = cm.step(self.cells, self._control, self.params, env, dt)

    def _tests_changed(self) -> None:
        """Refresh what the per-step test evaluation precomputes (after t_* changed)."""
        active = self.t_type > 0
        self._any_tests = bool(active.any())
        self._t_active = active
        self._t_volt = self.t_type <= 2
        self._t_ge = (self.t_type == 1) | (self.t_type == 3)
        self._t_timed = bool((active & (self.t_timing > 0)).any())

    def _tick(self, env: float, k: int = 1) -> None:
        """Advance ``k`` internal steps at once (``k > 1`` only while no test can fire)."""
        h = self.dt * k
        self._physics(env, h)
        run_h = h * self.running
        self.step_t += run_h
        self.test_t += run_h
        amps = np.abs(self.i)
        self.step_ah += amps * (run_h / 3600.0)
        self.step_wh += amps * np.abs(self.v) * (run_h / 3600.0)
        done = self.step_t >= self.duration - 1e-9  # duration is inf unless running
        v_meas = self.v
        hit: np.ndarray | None = None
        if self._any_tests:
            v_meas = self.v + self.rng.normal(0.0, self.noise_v, self.n)
            i_meas = np.abs(self.i + self.rng.normal(0.0, self.noise_a, self.n))
            metric = np.where(self._t_volt, v_meas[:, None], i_meas[:, None])
            cond = np.where(self._t_ge, metric >= self.t_value, metric <= self.t_value)
            hit = cond & self._t_active  # (only running channels have tests)
            if self._t_timed:
                st = self.step_t[:, None]
                timing = self.t_timing
                hit &= (
                    (timing == 0)
                    | ((timing == 1) & (st <= self.t_time))
                    | ((timing == 2) & (st >= self.t_time))
                    | ((timing == 3) & (st - h < self.t_time) & (self.t_time <= st))
                )
            done |= hit.any(axis=1)
        due = self.running & (self.test_t >= self.next_log)
        if due.any():
            # A step that ends now logs its own final row (in _end_step).
            self._log_rows(np.flatnonzero(due & ~done))
            self.next_log[due] += self.log_period_s
        if done.any():
            for c in np.flatnonzero(done):  # rare: step ends only
                first = int(np.argmax(hit[c])) if hit is not None and hit[c].any() else -1
                self._end_step(int(c), first, float(v_meas[c]))

    def _log_rows(self, idx: np.ndarray) -> None:
        pos = self.log_written[idx] % self.log_capacity
        rows = np.stack(
            [
                self.test_t[idx],
                self.v[idx],
                -self.i[idx],  # the instrument logs charge current as positive
                self.step_ah[idx],
                self.cells.temp_c[idx],
                self.step_no[idx].astype(np.float64),
            ],
            axis=1,
        )
        self.log[idx, pos] = rows
        self.log_written[idx] += 1
        # A reader that fell a whole buffer behind loses the oldest rows.
        self.log_read[idx] = np.maximum(
            self.log_read[idx], self.log_written[idx] - self.log_capacity
        )

    def _end_step(self, k: int, test_slot: int, measured_v: float) -> None:
        self._log_rows(np.array([k]))
        comp = self.compiled[k]
        assert comp is not None
        if test_slot >= 0:
            action = int(self.t_action[k, test_slot])
            if action == ACTIONS["FAIL"]:
                ttype = int(self.t_type[k, test_slot])
                meas = measured_v if ttype <= 2 else abs(float(self.i[k]))
                self.fail_info[k] = (
                    int(self.t_number[k, test_slot]),
                    TEST_NAMES[ttype],
                    float(self.t_value[k, test_slot]),
                    meas,
                )
                self._finish(k, RESULT_FAIL)
                return
        index = int(self.step_no[k])  # 1-based number of the step that ended
        if index >= len(comp.steps):
            self._finish(k, RESULT_OK)
        else:
            self._load_step(k, index)

    def _finish(self, k: int, result: int) -> None:
        self.running[k] = False
        self.direction[k] = cm.IDLE
        self.i_limit[k] = 0.0
        self.duration[k] = np.inf
        self.t_type[k] = 0
        self._tests_changed()
        self.result[k] = result

    def _load_step(self, k: int, index: int) -> None:
        comp = self.compiled[k]
        assert comp is not None
        st = comp.steps[index]
        self.step_no[k] = index + 1
        self.step_t[k] = 0.0
        self.step_ah[k] = 0.0
        self.step_wh[k] = 0.0
        self.duration[k] = st.duration_s
        if st.mode == "REST":
            self.direction[k], self.i_limit[k] = cm.IDLE, 0.0
        else:
            self.direction[k] = cm.CHARGE if st.mode == "CHARGE" else cm.DISCHARGE
            self.i_limit[k], self.v_limit[k] = st.current_a, st.voltage_v
        self.t_type[k] = 0
        for slot, (number, test) in enumerate(comp.tests[index]):
            self.t_type[k, slot] = test.type_code
            self.t_value[k, slot] = test.value
            self.t_timing[k, slot] = test.time_code
            self.t_time[k, slot] = test.time_s
            self.t_action[k, slot] = test.action
            self.t_number[k, slot] = number
        self._tests_changed()

    def _fill_electrolyte(self, k: int) -> None:
        vial = self.world.vial_at("cell")
        kappa = self.default_kappa
        if vial is not None:
            fractions, molality = vial.composition()
            if fractions:
                kappa = max(self.world.electrolyte_model(fractions, molality, 25.0), cm.KAPPA_MIN)
        kappas = self.cells.kappa_ms_cm.copy()
        kappas[k] = kappa
        self.cells = replace(self.cells, kappa_ms_cm=kappas)

    # -- protocol plumbing ----------------------------------------------------------------
    def _push_error(self, err: ScpiError) -> None:
        self.esr |= 32 if -199 <= err.code <= -100 else 16 if -299 <= err.code <= -200 else 8
        if len(self.errors) >= MAX_ERRORS:
            self.errors[-1] = (-350, _TEXT[-350])
            return
        self.errors.append((err.code, err.message))

    def busy_reply(self, request: bytes) -> bytes | None:
        self._push_error(_err(-200, "instrument busy"))
        try:
            text = request.decode("ascii")
        except UnicodeDecodeError:
            return None
        queries = [u for u in _split_top(text, ";") if u.strip().split(" ")[0].endswith("?")]
        if not queries:
            return None
        return (";".join(NAN_REPLY for _ in queries) + "\n").encode()

    async def handle(self, request: bytes) -> bytes | None:
        self._ensure_ticker()
        await self._catch_up()
        try:
            text = request.decode("ascii")
        except UnicodeDecodeError:
            self._push_error(_err(-101))
            return None
        replies: list[str] = []
        path = ""  # SCPI header path: where a following relative header is resolved
        for unit in _split_top(text, ";"):
            unit = unit.strip()
            if not unit:
                continue
            header, _, rest = unit.partition(" ")
            relative = bool(path) and not header.startswith((":", "*"))
            header = header.lstrip(":")
            try:
                if relative:
                    # SCPI resolves "CELL:INIT (@1001);ABOR (@1001)" under CELL:. Many
                    # clients instead repeat the full header without ':'; fall back to the
                    # root for those, as lenient firmware does.
                    try:
                        handler = self._lookup(f"{path}:{header}")
                        header = f"{path}:{header}"
                    except ScpiError:
                        handler = self._lookup(header)
                else:
                    handler = self._lookup(header)
                if not header.startswith("*"):
                    path = header.rpartition(":")[0]
                args = [a.strip() for a in _split_top(rest, ",")] if rest.strip() else []
                reply = handler(args)
            except ScpiError as exc:
                self._push_error(exc)
                if -199 <= exc.code <= -100:
                    break  # a command error discards the rest of the message
                continue
            if reply is not None:
                replies.append(reply)
        if not replies:
            return None
        return (";".join(replies) + "\n").encode("ascii")

    def _lookup(self, header: str) -> Handler:
        tokens = header.split(":")
        if not header or not all(t.rstrip("?") for t in tokens):
            raise _err(-102, f"bad header {header!r}")
        query = tokens[-1].endswith("?")
        tokens[-1] = tokens[-1].rstrip("?")
        for nodes, is_query, handler in self._handlers:
            if is_query == query and _header_matches(tokens, nodes):
                return handler
        raise _err(-113)

    def _build_table(self) -> list[tuple[list[tuple[str, str, bool]], bool, Handler]]:
        table: list[tuple[str, Handler]] = [
            ("*IDN?", self._idn),
            ("*RST", self._rst),
            ("*CLS", self._cls),
            ("*OPC?", lambda a: self._noargs(a) or "1"),
            ("*OPC", lambda a: self._noargs(a)),
            ("*ESR?", self._esr),
            ("*STB?", self._stb),
            ("SYSTem:ERRor[:NEXT]?", self._syst_err),
            ("SYSTem:ERRor:COUNt?", lambda a: self._noargs(a) or str(len(self.errors))),
            ("SYSTem:VERSion?", lambda a: self._noargs(a) or "1999.0"),
            ("CELL:DEFine", self._cell_define),
            ("CELL:DEFine?", self._cell_define_q),
            ("CELL:DEFine:QUICk", self._cell_quick),
            ("CELL:CLEar", self._cell_clear),
            ("CELL:ENABle", self._cell_enable),
            ("CELL:INITiate[:IMMediate]", self._cell_init),
            ("CELL:ABORt", self._cell_abort),
            ("CELL:STEP:TIME?", lambda a: self._per_cell(a, lambda k: self.step_t[k])),
            ("SEQuence:STEP:DEFine", self._step_define),
            ("SEQuence:STEP:DEFine?", self._step_define_q),
            ("SEQuence:TEST:DEFine", self._test_define),
            ("SEQuence:CLEar", self._seq_clear),
            ("STATus:CELL:REPort?", self._report),
            ("STATus:CELL:VERBose?", self._verbose),
            ("MEASure:CELL:VOLTage[:DC]?", lambda a: self._per_cell(a, self._meas_v)),
            ("MEASure:CELL:CURRent[:DC]?", lambda a: self._per_cell(a, self._meas_i)),
            ("MEASure:CELL:CAPacity:AHR?", lambda a: self._per_cell(a, lambda k: self.step_ah[k])),
            ("MEASure:CELL:CAPacity:WHR?", lambda a: self._per_cell(a, lambda k: self.step_wh[k])),
            (
                "MEASure:CELL:TEMPerature?",
                lambda a: self._per_cell(a, lambda k: self.cells.temp_c[k]),
            ),
            ("DATA:LOG?", self._log_query),
            ("DATA:LOG:FETCh?", self._log_fetch),
            ("DATA:LOG:CLEar", self._log_clear),
            ("DATA:LOG:PERiod", self._log_period),
            ("DATA:LOG:PERiod?", lambda a: self._noargs(a) or f"{self.log_period_s:g}"),
            ("DATA:LOG:RECords:AVAilable?", self._log_available),
        ]
        out = []
        for pattern, handler in table:
            nodes, query = _compile_pattern(pattern)
            out.append((nodes, query, handler))
        return out

    @staticmethod
    def _noargs(args: list[str]) -> None:
        if args:
            raise _err(-108)

    @staticmethod
    def _nargs(args: list[str], lo: int, hi: int | None = None) -> None:
        hi = lo if hi is None else hi
        if len(args) < lo or any(not a for a in args[:lo]):
            raise _err(-109)
        if len(args) > hi:
            raise _err(-108)

    def _cells(self, arg: str) -> list[int]:
        """Channel indices of a cell list (all defined cells for ``0``)."""
        return [self.cell_of[c] for c in self._cell_ids(arg)]

    def _cell_ids(self, arg: str) -> list[int]:
        """Defined cell ids of a cell list: ``0`` means all; a range skips undefined ids
        (``(@1001:1032)`` on a partly populated card), a single undefined id is an error."""
        entries = _channel_entries(arg)
        if entries is None:
            return sorted(self.cell_of)
        missing = [c for c, ranged in entries if c not in self.cell_of and not ranged]
        if missing:
            raise _err(-222, f"cell {missing[0]} is not defined")
        ids = [c for c, _ in entries if c in self.cell_of]
        if not ids:
            raise _err(-222, "no defined cell in the list")
        return ids

    def _cell(self, arg: str) -> int:
        cell = _nr1(arg, "cell")
        if cell not in self.cell_of:
            raise _err(-222, f"cell {cell} is not defined")
        return cell

    # -- IEEE 488.2 and system ---------------------------------------------------------------
    def _idn(self, args: list[str]) -> str:
        self._noargs(args)
        return f"Keysight Technologies,{self.model},{self.serial_number},{self.firmware}"

    def _rst(self, args: list[str]) -> None:
        self._noargs(args)
        for k in range(self.n):
            if self.running[k]:
                self._finish(k, RESULT_ABORTED)
        self.result[:] = RESULT_NONE
        self.step_no[:] = 0
        self.seq_no[:] = 0
        self.fail_info = [(0, "NONE", 0.0, 0.0)] * self.n
        self.log_read[:] = self.log_written
        self.log_period_s = 10.0
        self._reset_configuration()

    def _cls(self, args: list[str]) -> None:
        self._noargs(args)
        self.errors.clear()
        self.esr = 0

    def _esr(self, args: list[str]) -> str:
        self._noargs(args)
        value, self.esr = self.esr, 0
        return str(value)

    def _stb(self, args: list[str]) -> str:
        self._noargs(args)
        return str((4 if self.errors else 0) | (32 if self.esr else 0))

    def _syst_err(self, args: list[str]) -> str:
        self._noargs(args)
        if not self.errors:
            return '+0,"No error"'
        code, message = self.errors.pop(0)
        return f'{code:+d},"{message}"'

    # -- cells ------------------------------------------------------------------------------
    def _cell_define(self, args: list[str]) -> None:
        self._nargs(args, 2)
        cell = _nr1(args[0], "cell")
        if not 1 <= cell <= 99999:
            raise _err(-222, f"cell id {cell} outside 1..99999")
        channels = _channel_list(args[1])
        if channels is None or len(channels) != 1:
            raise _err(-222, "exactly one channel per cell (no paralleling)")
        if channels[0] not in self._channel_index:
            raise _err(-222, f"channel {channels[0]} does not exist")
        k = self._channel_index[channels[0]]
        if self.cell_of.get(cell) == k:
            return  # already so: harmless even while running
        owner = next((c for c, ch in self.cell_of.items() if ch == k), None)
        for busy in (self.cell_of.get(cell), k):
            if busy is not None and self.running[busy]:
                raise _err(-221, f"channel {self.channel_numbers[busy]} is running")
        if owner is not None:
            del self.cell_of[owner]
            self.enabled.pop(owner, None)
        self.cell_of[cell] = k

    def _cell_define_q(self, args: list[str]) -> str:
        self._nargs(args, 1)
        k = self.cell_of[self._cell(args[0])]
        return f"(@{self.channel_numbers[k]})"

    def _cell_quick(self, args: list[str]) -> None:
        self._nargs(args, 1)
        if _nr1(args[0], "channels per cell") != 1:
            raise _err(-222, "only 1 channel per cell is supported")
        if self.running.any():
            raise _err(-221, "cells are running")
        self.cell_of = {(c // 100) * 1000 + c % 100: k for k, c in enumerate(self.channel_numbers)}
        self.enabled.clear()

    def _cell_clear(self, args: list[str]) -> None:
        self._nargs(args, 1)
        cell = _nr1(args[0], "cell")
        cells = list(self.cell_of) if cell == 0 else [self._cell(args[0])]
        if any(self.running[self.cell_of[c]] for c in cells):
            raise _err(-221, "cannot clear a running cell")
        for c in cells:
            del self.cell_of[c]
            self.enabled.pop(c, None)

    def _cell_enable(self, args: list[str]) -> None:
        self._nargs(args, 2)
        cells = self._cell_ids(args[0])
        seq = _nr1(args[1], "sequence")
        if seq != 0 and not self.sequences.get(seq):
            raise _err(-221, f"sequence {seq} has no steps")
        if any(self.running[self.cell_of[c]] for c in cells):
            raise _err(-221, "cell is running")
        for c in cells:
            if seq == 0:
                self.enabled.pop(c, None)
            else:
                self.enabled[c] = seq

    def _compile(self, seq: int) -> _Compiled:
        steps = self.sequences.get(seq, {})
        if not steps:
            raise _err(-221, f"sequence {seq} has no steps")
        numbers = sorted(steps)
        if numbers != list(range(1, len(numbers) + 1)):
            raise _err(-221, f"sequence {seq} steps must be numbered 1..n without gaps")
        comp = _Compiled(seq, [steps[i] for i in numbers])
        for i in numbers:
            tests = self.tests.get((seq, i), {})
            comp.tests.append(sorted(tests.items()))
        return comp

    def _cell_init(self, args: list[str]) -> None:
        self._nargs(args, 1)
        cells = self._cell_ids(args[0])
        plans = []
        for c in cells:
            k = self.cell_of[c]
            if self.running[k]:
                raise _err(-221, f"cell {c} is already running")
            if c not in self.enabled:
                raise _err(-221, f"cell {c} has no sequence enabled")
            plans.append((k, self._compile(self.enabled[c])))
        for k, comp in plans:
            self._fill_electrolyte(k)
            self.compiled[k] = comp
            self.running[k] = True
            self.seq_no[k] = comp.seq
            self.result[k] = RESULT_RUNNING
            self.fail_info[k] = (0, "NONE", 0.0, 0.0)
            self.test_t[k] = 0.0
            self.next_log[k] = 0.0
            self._load_step(k, 0)

    def _cell_abort(self, args: list[str]) -> None:
        self._nargs(args, 1)
        for k in self._cells(args[0]):
            if self.running[k]:
                self._log_rows(np.array([k]))
                self._finish(k, RESULT_ABORTED)
            self.direction[k] = cm.IDLE  # output off either way
            self.i_limit[k] = 0.0
        # The output is off from this instant, not from the next internal step.
        self.i = np.where(self.direction == cm.IDLE, 0.0, self.i)
        self.v = np.where(
            self.direction == cm.IDLE,
            cm.terminal_voltage(self.cells, self.params, np.zeros(self.n)),
            self.v,
        )

    # -- sequences --------------------------------------------------------------------------
    def _seq_and_step(self, args: list[str]) -> tuple[int, int]:
        seq = _nr1(args[0], "sequence")
        step = _nr1(args[1], "step")
        if not 1 <= seq <= MAX_SEQUENCES:
            raise _err(-222, f"sequence {seq} outside 1..{MAX_SEQUENCES}")
        if not 1 <= step <= MAX_STEPS:
            raise _err(-222, f"step {step} outside 1..{MAX_STEPS}")
        return seq, step

    def _seq_in_use(self, seq: int) -> bool:
        return bool((self.running & (self.seq_no == seq)).any())

    def _step_define(self, args: list[str]) -> None:
        self._nargs(args, 4, 6)
        seq, step = self._seq_and_step(args)
        mode = _choice(args[2], MODES, "mode")
        duration = _nrf(args[3], "duration")
        if not 0 < duration <= MAX_DURATION_S:
            raise _err(-222, f"duration {duration:g} s outside (0, {MAX_DURATION_S:g}]")
        if mode == "REST":
            if len(args) > 4:
                raise _err(-108, "REST takes only a duration")
            definition = StepDef(mode, duration)
        else:
            self._nargs(args, 6)
            current = _nrf(args[4], "current")
            voltage = _nrf(args[5], "voltage")
            if not 0 < current <= self.max_current_a:
                raise _err(
                    -222, f"current {current:g} A outside (0, {self.max_current_a:g}] A rating"
                )
            lo, hi = VOLTAGE_LIMITS
            if not lo <= voltage <= hi:
                raise _err(-222, f"voltage {voltage:g} V outside {lo:g}..{hi:g} V")
            definition = StepDef(mode, duration, current, voltage)
        if self._seq_in_use(seq):
            raise _err(-221, f"sequence {seq} is running")
        self.sequences.setdefault(seq, {})[step] = definition

    def _step_define_q(self, args: list[str]) -> str:
        self._nargs(args, 2)
        seq, step = self._seq_and_step(args)
        st = self.sequences.get(seq, {}).get(step)
        if st is None:
            raise _err(-222, f"sequence {seq} step {step} is not defined")
        return f"{st.mode},{st.duration_s:g},{st.current_a:g},{st.voltage_v:g}"

    def _test_define(self, args: list[str]) -> None:
        self._nargs(args, 8)
        seq, step = self._seq_and_step(args)
        number = _nr1(args[2], "test")
        if not 1 <= number <= MAX_TESTS:
            raise _err(-222, f"test {number} outside 1..{MAX_TESTS}")
        ttype = _choice(args[3], TEST_TYPES, "test type")
        value = _nrf(args[4], "value")
        limit = 6.0 if ttype.startswith("VOLT") else self.max_current_a
        if not 0 <= value <= limit:
            raise _err(-222, f"{ttype} value {value:g} outside 0..{limit:g}")
        timing = _choice(args[5], TIME_TYPES, "time type")
        time_s = _nrf(args[6], "time")
        if not 0 <= time_s <= MAX_DURATION_S:
            raise _err(-222, f"time {time_s:g} s outside 0..{MAX_DURATION_S:g}")
        action = _choice(args[7], ACTIONS, "action")
        if self._seq_in_use(seq):
            raise _err(-221, f"sequence {seq} is running")
        self.tests.setdefault((seq, step), {})[number] = TestDef(
            TEST_TYPES[ttype], value, TIME_TYPES[timing], time_s, ACTIONS[action]
        )

    def _seq_clear(self, args: list[str]) -> None:
        self._nargs(args, 1)
        seq = _nr1(args[0], "sequence")
        if seq == 0:
            if self.running.any():
                raise _err(-221, "sequences are running")
            self.sequences.clear()
            self.tests.clear()
            self.enabled.clear()
            return
        if not 1 <= seq <= MAX_SEQUENCES:
            raise _err(-222, f"sequence {seq} outside 1..{MAX_SEQUENCES}")
        if self._seq_in_use(seq):
            raise _err(-221, f"sequence {seq} is running")
        self.sequences.pop(seq, None)
        for key in [key for key in self.tests if key[0] == seq]:
            del self.tests[key]
        for c in [c for c, s in self.enabled.items() if s == seq]:
            del self.enabled[c]

    # -- status and measurements ------------------------------------------------------------------
    def _report(self, args: list[str]) -> str:
        self._nargs(args, 1)
        return ",".join(str(int(self.result[k])) for k in self._cells(args[0]))

    def _verbose(self, args: list[str]) -> str:
        self._nargs(args, 1)
        k = self.cell_of[self._cell(args[0])]
        state = STATE_RUNNING if self.running[k] else STATE_IDLE
        result = RESULT_NAMES.get(int(self.result[k]), "NONE")
        number, ttype, limit, measured = self.fail_info[k]
        return ",".join(
            [
                state,
                str(int(self.seq_no[k])),
                str(int(self.step_no[k])),
                _fmt(self._meas_v(k)),
                _fmt(self._meas_i(k)),
                result,
                str(number),
                ttype,
                _fmt(limit),
                _fmt(measured),
            ]
        )

    def _meas_v(self, k: int) -> float:
        return float(self.v[k]) + float(self.rng.normal(0.0, self.noise_v))

    def _meas_i(self, k: int) -> float:
        if self.direction[k] == cm.IDLE:
            return 0.0  # output off or resting: the channel is open, no offset either
        return -float(self.i[k]) + float(self.rng.normal(0.0, self.noise_a))

    def _per_cell(self, args: list[str], value: Callable[[int], float]) -> str:
        self._nargs(args, 1)
        return ",".join(_fmt(float(value(k))) for k in self._cells(args[0]))

    # -- data log ---------------------------------------------------------------------------
    def _log_query(self, args: list[str]) -> str:
        self._nargs(args, 1, 2)
        k = self.cell_of[self._cell(args[0])]
        max_rows = _nr1(args[1], "max rows") if len(args) > 1 else 1000
        if not 1 <= max_rows <= 10000:
            raise _err(-222, f"max rows {max_rows} outside 1..10000")
        start = int(self.log_read[k])
        stop = min(int(self.log_written[k]), start + max_rows)
        self.log_read[k] = stop
        out = [str(stop - start)]
        for j in range(start, stop):
            t, v, i, ah, temp, step = self.log[k, j % self.log_capacity]
            out.append(f"{t:.1f},{v:.5f},{i:.5f},{ah:.6f},{temp:.2f},{int(step)}")
        return ",".join(out)

    def _log_fetch(self, args: list[str]) -> str:
        """``DATA:LOG:FETCh? <cell>[,<max_rows>[,<from>]]``: rows from index ``<from>`` on.

        A read that survives a lost answer: asking for rows from ``<from>`` (the index of
        the first row the client still lacks, counted since power-on) acknowledges every
        row before it, and only acknowledged rows are discarded. A client that got no
        answer (a timeout, a garbled line) asks again with the same ``<from>`` and gets
        the same rows. Without ``<from>`` (a client's first read) it starts at the first
        unacknowledged row. The answer starts with the index of its first row, which is
        later than ``<from>`` when rows were cleared (``*RST``, ``DATA:LOG:CLEar``) or
        overwritten by the ring buffer. A ``<from>`` beyond the rows logged (a cursor
        from before a power cycle) reads as no ``<from>``.
        """
        self._nargs(args, 1, 3)
        k = self.cell_of[self._cell(args[0])]
        max_rows = _nr1(args[1], "max rows") if len(args) > 1 else 1000
        if not 1 <= max_rows <= 10000:
            raise _err(-222, f"max rows {max_rows} outside 1..10000")
        written = int(self.log_written[k])
        start = int(self.log_read[k])
        if len(args) > 2:
            first = _nr1(args[2], "from")
            if first < 0:
                raise _err(-222, f"from {first} must be >= 0")
            if first <= written:
                start = max(start, first)
        self.log_read[k] = start  # acknowledged: everything before start
        stop = min(written, start + max_rows)
        out = [str(start), str(stop - start)]
        for j in range(start, stop):
            t, v, i, ah, temp, step = self.log[k, j % self.log_capacity]
            out.append(f"{t:.1f},{v:.5f},{i:.5f},{ah:.6f},{temp:.2f},{int(step)}")
        return ",".join(out)

    def _log_clear(self, args: list[str]) -> None:
        self._noargs(args)
        self.log_read[:] = self.log_written

    def _log_period(self, args: list[str]) -> None:
        self._nargs(args, 1)
        period = _nrf(args[0], "period")
        if not 0.1 <= period <= 86400:
            raise _err(-222, f"period {period:g} s outside 0.1..86400")
        self.log_period_s = period

    def _log_available(self, args: list[str]) -> str:
        self._nargs(args, 0, 1)
        if args:
            k = self.cell_of[self._cell(args[0])]
            return str(int(self.log_written[k] - self.log_read[k]))
        return str(int((self.log_written - self.log_read).sum()))

    async def close(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
