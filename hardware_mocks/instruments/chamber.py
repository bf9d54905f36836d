"""Environmental test chamber with a SCPI (IEEE 488.2 / SCPI-99) remote interface.

Protocol
--------
Program and response messages end with LF (CR LF is accepted). Headers have a short
and a long form (``SOUR`` / ``SOURce``), are case-insensitive, may start with ``:``,
and several units can share one message separated by ``;`` (SCPI-99's header-path
rule for compound messages applies; common ``*`` commands do not change the path).
Queries in one message answer in one response, ``;``-separated. Setters never
answer; problems go to the error queue (FIFO, 10 deep, ``-350`` on overflow) and
set the matching IEEE 488.2 event status bit (CME/EXE/DDE/QYE).

Common commands: ``*IDN? *RST *CLS *OPC *OPC? *ESR? *ESE[?] *SRE[?] *STB? *TST? *WAI``.
Subsystems (optional nodes in brackets)::

    [SOURce:]TEMPerature[:LEVel][:IMMediate][:AMPLitude] <NRf>|MIN|MAX|DEF  and ? [MIN|MAX|DEF]
    [SOURce:]TEMPerature:RAMP[:RATE] <K/min>|MIN|MAX|DEF                   and ? [MIN|MAX|DEF]
    [SOURce:]TEMPerature:TOLerance <K>     stability band       (extension) and ?
    [SOURce:]TEMPerature:DWELl <s>         stability dwell time (extension) and ?
    OUTPut[:STATe] ON|OFF|1|0                                               and ?
    MEASure[:SCALar]:TEMPerature?          air temperature, deg C (NR3)
    STATus:OPERation:CONDition?            bit 1 SETTling, 3 SWEeping (ramp), 8 running, 9 stable
    SYSTem:ERRor[:NEXT]?  SYSTem:ERRor:COUNt?  SYSTem:VERSion?

Errors used: -101 invalid character, -102 syntax error, -104 data type error,
-108 parameter not allowed, -109 missing parameter, -113 undefined header,
-114 header suffix out of range, -138 suffix not allowed, -213 (busy, below),
-222 data out of range, -224 illegal parameter value, -350 queue overflow.
After a command error (-1xx) the rest of the message is abandoned, as many
instruments do; an execution error (-2xx) only skips the unit that caused it.

Busy (the ``busy`` fault, e.g. a defrost cycle or a front-panel lock-out): the
command is not executed, nothing is answered, and ``-213,"Init ignored;controller
busy"`` is queued. SCPI-99 has no dedicated busy code; -213 ("Init ignored": a
request was ignored because another operation is in progress) is the closest
standard meaning. A driver sees a query time
out, or a setter's ``SYST:ERR?`` check report -213.

This is a generic SCPI front end, not a vendor's wire protocol: ESPEC controllers
speak their own ASCII command set and Binder chambers Modbus; labs put a SCPI
gateway in front of them or use controllers that speak SCPI. The command tree
follows SCPI-99 conventions; ``TOLerance``/``DWELl`` are extensions (modelled on
the in-tolerance criterion "within <tol> for <time>" of temperature controllers such
as Arroyo Instruments' ``TEC:TOLerance``). The default ``*IDN?`` is the simulator's own.

Physics
-------
With the controller on (``OUTP ON``), an internal ramp setpoint starts from the
current air temperature and moves toward the setpoint at the ramp limit (the
smaller of ``SOUR:TEMP:RAMP`` and the plant's heating/cooling capacity, a few K/min
as catalogued for bench-top chambers; cooling capacity falls toward -40 deg C).
The air follows that ramp as a closed loop with natural frequency ``loop_omega``
(rad/s) and damping ``loop_damping`` (0.7: the air lags a 2 K/min ramp by ~2.8 K
and overshoots by ~0.15 K when it ends, then settles like a first-order system:
25 -> 40 deg C is in band after ~9 min, stable after ~10). With the controller
off, the air relaxes toward the lab's ambient with time constant ``drift_tau_s``
(an insulated box). The sensor (Pt100) reads with white noise ``noise_c`` at
0.01 deg C resolution. Stability is judged on the noise-free controller value:
within ``tolerance`` of the setpoint, ramp finished, for ``dwell`` seconds. The
chamber is the thermal zone of ``stations`` (default: the conductivity meter's
sample position and the cell station), so vials there follow its air temperature.
Times are simulated seconds of the lab clock. Integration is lazy: with the
controller off the drift is one exact step, and with it on the loop is stepped every
``step_s`` (1 s) only until the air rests on the setpoint; then any interval is one
step, so a chamber left holding a temperature for hours costs O(1) per request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hardware_mocks.server import Simulator
from hardware_mocks.world import LabWorld

_NRF = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_NRF_SUFFIX = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*[A-Za-z]+$")
_NODE = re.compile(r"^([A-Za-z]+)(\d*)$")
_COMMON = re.compile(r"^\*[A-Za-z]+\??$")
_UNIT = re.compile(r"^(\S+)(?:\s+(.*))?$", re.DOTALL)

ERROR_TEXT = {
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -114: "Header suffix out of range",
    -138: "Suffix not allowed",
    -213: "Init ignored",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -350: "Queue overflow",
}

# IEEE 488.2 standard event status register bits.
ESR_OPC, ESR_QYE, ESR_DDE, ESR_EXE, ESR_CME, ESR_PON = 1, 4, 8, 16, 32, 128
# Below this deviation from the setpoint (K; and rate, K per 1/omega) the air counts as
# at rest: the loop's transient has decayed far below the sensor's 0.01 K resolution.
SETTLED_C = 1e-6
# Operation condition register bits (see module docstring).
OPER_SETTLING, OPER_SWEEPING, OPER_RUNNING, OPER_STABLE = 1 << 1, 1 << 3, 1 << 8, 1 << 9


class ScpiError(Exception):
    """An error to queue: code and optional device-dependent text."""

    def __init__(self, code: int, info: str = "") -> None:
        super().__init__(code, info)
        self.code = code
        self.info = info


@dataclass(frozen=True)
class _Node:
    short: str
    long: str
    optional: bool


def _pattern(spec: str) -> tuple[_Node, ...]:
    """``"[SOURce] TEMPerature [LEVel]"`` -> nodes (short form = the upper-case part)."""
    nodes = []
    for word in spec.split():
        optional = word.startswith("[")
        name = word.strip("[]")
        short = "".join(c for c in name if c.isupper())
        nodes.append(_Node(short, name.upper(), optional))
    return tuple(nodes)


def _matches(tokens: tuple[str, ...], nodes: tuple[_Node, ...]) -> bool:
    if not nodes:
        return not tokens
    head = nodes[0]
    if tokens and tokens[0] in (head.short, head.long) and _matches(tokens[1:], nodes[1:]):
        return True
    return head.optional and _matches(tokens, nodes[1:])


Handler = Callable[[list[str]], str | None]


@dataclass(frozen=True)
class _Command:
    nodes: tuple[_Node, ...]
    setter: Handler | None
    query: Handler | None


class ChamberSimulator(Simulator):
    kind = "chamber"
    protocol = "scpi"
    reply_terminator = b"\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        manufacturer: str = "LABCTL",
        model: str = "TC-150",
        serial_number: str = "TC150-0042",
        firmware: str = "1.4.0",
        stations: Iterable[str] = ("meter", "cell"),
        min_c: float = -40.0,
        max_c: float = 150.0,
        default_setpoint_c: float = 25.0,
        default_ramp_k_per_min: float = 2.0,
        max_ramp_k_per_min: float = 10.0,
        heat_capacity_k_per_min: float = 5.0,
        cool_capacity_k_per_min: float = 3.0,
        tolerance_k: float = 0.3,
        dwell_s: float = 60.0,
        loop_omega: float = 1.0 / 60.0,
        loop_damping: float = 0.7,
        drift_tau_s: float = 1200.0,
        noise_c: float = 0.02,
        error_queue_size: int = 10,
        step_s: float = 1.0,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        if not min_c < default_setpoint_c < max_c:
            raise ValueError(f"default_setpoint_c: {default_setpoint_c} outside ({min_c}, {max_c})")
        if loop_omega <= 0 or loop_damping <= 0 or drift_tau_s <= 0 or step_s <= 0:
            raise ValueError("loop_omega, loop_damping, drift_tau_s and step_s must be > 0")
        if error_queue_size < 2:
            raise ValueError(f"error_queue_size: SCPI requires >= 2, got {error_queue_size}")
        self.identity = f"{manufacturer},{model},{serial_number},{firmware}"
        self.min_c, self.max_c = min_c, max_c
        self.default_setpoint_c = default_setpoint_c
        self.default_ramp = default_ramp_k_per_min
        self.max_ramp = max_ramp_k_per_min
        self.heat_capacity = heat_capacity_k_per_min
        self.cool_capacity = cool_capacity_k_per_min
        self.default_tolerance = tolerance_k
        self.default_dwell = dwell_s
        self.omega = loop_omega
        self.damping = loop_damping
        self.drift_tau_s = drift_tau_s
        self.noise_c = noise_c
        self.error_queue_size = error_queue_size
        self.step_s = step_s
        self._rng = world.rng

        # Physical state (simulated seconds): air temperature and its rate, the
        # controller's internal ramp setpoint, and since when the air is in band.
        self.air_c = world.ambient_c
        self._rate = 0.0
        self._ramp_sp = world.ambient_c
        self._updated = self.clock.now()
        self._in_band_since: float | None = None
        self.integration_steps = 0  # steps taken by advance() (its CPU cost)
        # Status model.
        self.errors: list[tuple[int, str]] = []
        self.esr = ESR_PON
        self.ese = 0
        self.sre = 0
        self._reset_settings()

        self._commands = self._build_tree()
        for station in stations:
            if station not in world.stations:
                raise ValueError(f"stations: no station {station!r} in this lab")
            world.zones[station] = self

    def _reset_settings(self) -> None:
        self.setpoint_c = self.default_setpoint_c
        self.ramp = self.default_ramp
        self.tolerance = self.default_tolerance
        self.dwell = self.default_dwell
        self.running = False
        self._in_band_since = None

    # -- physics ------------------------------------------------------------------------
    def _cool_limit(self, temp: float) -> float:
        """Refrigeration loses capacity as the evaporator gets colder (K/min)."""
        frac = min(1.0, max(0.0, (temp - self.min_c) / (0.0 - self.min_c)))
        return self.cool_capacity * (0.35 + 0.65 * frac)

    def advance(self) -> None:
        """Integrate the chamber up to the lab clock's now.

        Controller off: one exact step, whatever the interval. Controller on: fixed
        semi-implicit steps of ``step_s`` while the ramp or the loop's transient is under
        way; once the air rests on the setpoint (the transient decayed below
        ``SETTLED_C``) the rest of the interval is one step. A long idle therefore costs
        O(1), and a move costs steps for its ramp and ~20 min of settling only.
        """
        now = self.clock.now()
        if now <= self._updated:
            return
        ambient = self.world.ambient_c
        if not self.running:
            # Newtonian drift is linear: the exact solution covers any interval.
            self.integration_steps += 1
            decay = math.exp(-(now - self._updated) / self.drift_tau_s)
            self.air_c = ambient + (self.air_c - ambient) * decay
            self._rate = (ambient - self.air_c) / self.drift_tau_s
            self._updated = now
            self._in_band_since = None
            return
        w, z = self.omega, self.damping
        while self._updated < now:
            self.integration_steps += 1
            if (
                self._ramp_sp == self.setpoint_c
                and abs(self.air_c - self.setpoint_c) < SETTLED_C
                and abs(self._rate) < SETTLED_C * w
            ):
                # At rest on the setpoint: nothing changes any more (in band, if not yet).
                self.air_c, self._rate = self.setpoint_c, 0.0
                if self._in_band_since is None:
                    self._in_band_since = self._updated
                self._updated = now
                return
            h = min(self.step_s, now - self._updated)
            if self._ramp_sp < self.setpoint_c:
                up = min(self.ramp, self.heat_capacity) / 60.0
                self._ramp_sp = min(self.setpoint_c, self._ramp_sp + up * h)
            elif self._ramp_sp > self.setpoint_c:
                down = min(self.ramp, self._cool_limit(self.air_c)) / 60.0
                self._ramp_sp = max(self.setpoint_c, self._ramp_sp - down * h)
            accel = w * w * (self._ramp_sp - self.air_c) - 2.0 * z * w * self._rate
            self._rate += accel * h
            self.air_c += self._rate * h
            self._updated += h
            in_band = (
                self._ramp_sp == self.setpoint_c
                and abs(self.air_c - self.setpoint_c) <= self.tolerance
            )
            if not in_band:
                self._in_band_since = None
            elif self._in_band_since is None:
                self._in_band_since = self._updated

    def temperature_c(self) -> float:
        """Air temperature now (the thermal zone interface of the world)."""
        self.advance()
        return self.air_c

    def measured_c(self) -> float:
        """What the sensor reads: noise, then the display resolution of 0.01 deg C."""
        return round(self.temperature_c() + self._rng.gauss(0.0, self.noise_c), 2)

    @property
    def stable(self) -> bool:
        self.advance()
        return self._in_band_since is not None and self._updated - self._in_band_since >= self.dwell

    @property
    def condition(self) -> int:
        self.advance()
        reg = 0
        if self.running:
            reg |= OPER_RUNNING
            reg |= OPER_STABLE if self.stable else OPER_SETTLING
            if self._ramp_sp != self.setpoint_c:
                reg |= OPER_SWEEPING
        return reg

    # -- status model ---------------------------------------------------------------------
    def push_error(self, code: int, info: str = "") -> None:
        text = ERROR_TEXT.get(code, "Device-specific error") + (f";{info}" if info else "")
        if len(self.errors) >= self.error_queue_size:
            self.errors[-1] = (-350, ERROR_TEXT[-350])
        else:
            self.errors.append((code, text))
        if -199 <= code <= -100:
            self.esr |= ESR_CME
        elif -299 <= code <= -200:
            self.esr |= ESR_EXE
        elif -399 <= code <= -300 or code > 0:
            self.esr |= ESR_DDE
        elif -499 <= code <= -400:
            self.esr |= ESR_QYE

    def busy_reply(self, request: bytes) -> bytes | None:
        self.push_error(-213, "controller busy")
        return None

    # -- parameters -------------------------------------------------------------------------
    @staticmethod
    def _one(params: list[str]) -> str:
        if not params or not params[0]:
            raise ScpiError(-109)
        if len(params) > 1:
            raise ScpiError(-108)
        return params[0]

    @staticmethod
    def _none(params: list[str]) -> None:
        if params:
            raise ScpiError(-108)

    def _number(self, text: str, lo: float, hi: float, default: float) -> float:
        word = text.upper()
        if word in ("MIN", "MINIMUM"):
            return lo
        if word in ("MAX", "MAXIMUM"):
            return hi
        if word in ("DEF", "DEFAULT"):
            return default
        if _NRF_SUFFIX.match(text):
            raise ScpiError(-138)
        if not _NRF.match(text):
            raise ScpiError(-104)
        value = float(text)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ScpiError(-222)
        return value

    def _limit_query(
        self, params: list[str], lo: float, hi: float, default: float, now: float
    ) -> str:
        if not params:
            return _nr3(now)
        word = self._one(params).upper()
        for names, value in ((("MIN", "MINIMUM"), lo), (("MAX", "MAXIMUM"), hi)):
            if word in names:
                return _nr3(value)
        if word in ("DEF", "DEFAULT"):
            return _nr3(default)
        raise ScpiError(-224)

    @staticmethod
    def _bool(params: list[str]) -> bool:
        word = ChamberSimulator._one(params).upper()
        if word in ("ON", "1"):
            return True
        if word in ("OFF", "0"):
            return False
        if _NRF.match(word):  # IEEE 488.2 booleans: any number, rounded, non-zero = ON
            return round(float(word)) != 0
        raise ScpiError(-224)

    # -- command handlers ----------------------------------------------------------------------
    def _set_setpoint(self, params: list[str]) -> None:
        value = self._number(self._one(params), self.min_c, self.max_c, self.default_setpoint_c)
        self.advance()
        if value != self.setpoint_c:
            self.setpoint_c = value
            self._in_band_since = None

    def _q_setpoint(self, params: list[str]) -> str:
        lo, hi, dflt = self.min_c, self.max_c, self.default_setpoint_c
        return self._limit_query(params, lo, hi, dflt, self.setpoint_c)

    def _set_ramp(self, params: list[str]) -> None:
        self.advance()
        self.ramp = self._number(self._one(params), 0.01, self.max_ramp, self.default_ramp)

    def _q_ramp(self, params: list[str]) -> str:
        return self._limit_query(params, 0.01, self.max_ramp, self.default_ramp, self.ramp)

    def _set_tolerance(self, params: list[str]) -> None:
        value = self._number(self._one(params), 0.05, 10.0, self.default_tolerance)
        self.advance()
        if value != self.tolerance:
            self.tolerance = value
            self._in_band_since = None

    def _q_tolerance(self, params: list[str]) -> str:
        return self._limit_query(params, 0.05, 10.0, self.default_tolerance, self.tolerance)

    def _set_dwell(self, params: list[str]) -> None:
        self.advance()
        self.dwell = self._number(self._one(params), 0.0, 86400.0, self.default_dwell)

    def _q_dwell(self, params: list[str]) -> str:
        return self._limit_query(params, 0.0, 86400.0, self.default_dwell, self.dwell)

    def _set_output(self, params: list[str]) -> None:
        on = self._bool(params)
        self.advance()
        if on and not self.running:
            self._ramp_sp = self.air_c  # ramps start from the process value, not a jump
            self._in_band_since = None
        self.running = on

    def _q_output(self, params: list[str]) -> str:
        self._none(params)
        return "1" if self.running else "0"

    def _q_measure(self, params: list[str]) -> str:
        self._none(params)
        return _nr3(self.measured_c())

    def _q_condition(self, params: list[str]) -> str:
        self._none(params)
        return str(self.condition)

    def _q_error(self, params: list[str]) -> str:
        self._none(params)
        if not self.errors:
            return '0,"No error"'
        code, text = self.errors.pop(0)
        return f'{code},"{text}"'

    def _q_error_count(self, params: list[str]) -> str:
        self._none(params)
        return str(len(self.errors))

    def _q_version(self, params: list[str]) -> str:
        self._none(params)
        return "1999.0"

    def _build_tree(self) -> list[_Command]:
        temp = "[SOURce] TEMPerature"
        spec: list[tuple[str, Handler | None, Handler | None]] = [
            (f"{temp} [LEVel] [IMMediate] [AMPLitude]", self._set_setpoint, self._q_setpoint),
            (f"{temp} RAMP [RATE]", self._set_ramp, self._q_ramp),
            (f"{temp} TOLerance", self._set_tolerance, self._q_tolerance),
            (f"{temp} DWELl", self._set_dwell, self._q_dwell),
            ("OUTPut [STATe]", self._set_output, self._q_output),
            ("MEASure [SCALar] TEMPerature", None, self._q_measure),
            ("STATus OPERation CONDition", None, self._q_condition),
            ("SYSTem ERRor [NEXT]", None, self._q_error),
            ("SYSTem ERRor COUNt", None, self._q_error_count),
            ("SYSTem VERSion", None, self._q_version),
        ]
        return [_Command(_pattern(s), setter, query) for s, setter, query in spec]

    def _common(self, header: str, params: list[str]) -> str | None:
        h = header.upper()
        if h == "*IDN?":
            self._none(params)
            return self.identity
        if h == "*RST":
            self._none(params)
            self.advance()
            self._reset_settings()
            return None
        if h == "*CLS":
            self._none(params)
            self.errors.clear()
            self.esr = 0
            return None
        if h == "*OPC":
            self._none(params)
            self.esr |= ESR_OPC  # no overlapped commands: everything is complete at once
            return None
        if h == "*OPC?":
            self._none(params)
            return "1"
        if h == "*WAI":
            self._none(params)
            return None
        if h == "*TST?":
            self._none(params)
            return "0"
        if h == "*ESR?":
            self._none(params)
            reg, self.esr = self.esr, 0
            return str(reg)
        if h in ("*ESE", "*SRE"):
            mask = self._number(self._one(params), 0, 255, 0)
            setattr(self, h[1:].lower(), round(mask))
            return None
        if h in ("*ESE?", "*SRE?"):
            self._none(params)
            return str(getattr(self, h[1:-1].lower()))
        if h == "*STB?":
            self._none(params)
            stb = (4 if self.errors else 0) | (32 if self.esr & self.ese else 0)
            return str(stb | (64 if stb & self.sre else 0))
        raise ScpiError(-113)

    # -- parsing --------------------------------------------------------------------------------
    def _execute(self, unit: str, path: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
        """Run one program message unit; returns (response, new header path)."""
        m = _UNIT.match(unit)
        if m is None:
            raise ScpiError(-102)
        header, rest = m.group(1), (m.group(2) or "").strip()
        params = [p.strip() for p in rest.split(",")] if rest else []
        if header.startswith("*"):
            if not _COMMON.match(header):
                raise ScpiError(-102)
            return self._common(header, params), path
        is_query = header.endswith("?")
        absolute = header.startswith(":")
        body = header[1:] if absolute else header
        body = body[:-1] if is_query else body
        tokens: list[str] = []
        for word in body.split(":"):
            node = _NODE.match(word)
            if node is None:
                raise ScpiError(-102)
            if node.group(2) not in ("", "1"):  # single-channel: only suffix 1 exists
                raise ScpiError(-114)
            tokens.append(node.group(1).upper())
        full = tuple(tokens) if absolute else path + tuple(tokens)
        for cmd in self._commands:
            if _matches(full, cmd.nodes):
                handler = cmd.query if is_query else cmd.setter
                if handler is None:
                    raise ScpiError(-113)
                return handler(params), full[:-1]
        raise ScpiError(-113)

    async def handle(self, request: bytes) -> bytes | None:
        try:
            text = request.decode("ascii")
        except UnicodeDecodeError:
            self.push_error(-101)
            return None
        if any(ord(c) < 32 and c not in "\t" for c in text):
            self.push_error(-101)
            return None
        responses: list[str] = []
        path: tuple[str, ...] = ()
        units = _split_units(text)
        for index, raw_unit in enumerate(units):
            unit = raw_unit.strip()
            if not unit:
                if index == len(units) - 1 and index > 0:
                    break  # a trailing ';' before the terminator is tolerated
                self.push_error(-102, "empty message unit")
                break
            try:
                response, path = self._execute(unit, path)
            except ScpiError as fault:
                self.push_error(fault.code, fault.info)
                if -199 <= fault.code <= -100:
                    break
                continue
            if response is not None:
                responses.append(response)
        if not responses:
            return None
        return ";".join(responses).encode("ascii") + self.reply_terminator


def _nr3(value: float) -> str:
    return f"{value:+.5E}"


def _split_units(text: str) -> list[str]:
    """Split a program message on ``;`` outside quoted strings."""
    units, current, quote = [], [], ""
    for c in text:
        if quote:
            current.append(c)
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            current.append(c)
        elif c == ";":
            units.append("".join(current))
            current = []
        else:
            current.append(c)
    units.append("".join(current))
    return units
