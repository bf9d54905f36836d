"""Cycle cells on the battery cycler and run HPPC pulse tests, streaming the data log.

* :func:`cycle_cell`: formation, rate test and CC-CV cycling on one channel of a
  BT2200-class cycler (:class:`labctl.devices.cycler.BatteryCycler`), with the
  instrument's own step tests (CC-CV taper, cut-off, FAIL on a voltage outside the
  safety window) and the plan's stop conditions (capacity retention ends the cycling,
  a cell temperature above ``max_temperature_c`` fails the run).
* :func:`hppc`: a hybrid pulse power characterisation: full charge, then at each state
  of charge a rest and a discharge and a charge pulse with rests; the pulses are fitted
  (:mod:`labctl.plans.ecm`) to ``R0``, ``R1``, ``C1`` per state of charge.

The work is cut into **segments**, one cycler sequence each (a cycle, an HPPC state of
charge). While a segment runs, the plan fetches the cycler's data log every ``poll_s``
wall seconds and writes each row as an event of the ``cycling`` stream (``time``,
``voltage``, ``current`` (positive = discharge), ``capacity``, ``temperature``,
``step``, ``cycle``, ``segment``, ``attempt``). After each segment a summary event goes
to ``cycles`` (capacities, coulombic efficiency, energy, retention) or, for HPPC, one
event per pulse to ``pulses``.

Pauses (see docs/decisions/0009-cycler-segments-as-movable.md): the RunEngine stops
every moved device when it pauses; here that aborts the running segment (output off).
On resume the interrupted segment runs again from its first step (its rows keep their
``attempt`` number); finished segments are never repeated. A deferred pause
(``request_pause(defer=True)``) waits for the running segment to end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg
from ophyd_async.core import AsyncStatus, WatchableAsyncStatus
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labctl.devices.cycler import (
    BatteryCycler,
    CyclerChannel,
    EndTest,
    LogRow,
    SequenceAbortedError,
    Step,
)
from labctl.devices.errors import (
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    InstrumentError,
    LimitError,
    ProtocolError,
)
from labctl.devices.lab import LabDevices
from labctl.devices.protocols import scpi
from labctl.plans.common import (
    CommonParams,
    Plan,
    PlanError,
    PlanParameterError,
    Record,
    base_metadata,
    call,
    emit,
    lab_run,
    read_signal,
    validate,
)
from labctl.plans.ecm import PulseFit, PulseFitError, fit_pulse, instantaneous_r0

__all__ = [
    "PRESETS",
    "ChannelRunner",
    "CycleCellParams",
    "CyclingProtocol",
    "CyclingSpec",
    "FormationSpec",
    "HppcParams",
    "RateTestSpec",
    "Segment",
    "cycle_cell",
    "hppc",
    "protocol_segments",
]

# The BT2202A/BT2203A channel rating and the voltage window the instrument accepts for
# a CHARGE/DISCHARGE limit (it refuses anything else with -222).
RATING_A = 6.25
VOLTAGE_WINDOW_V = (2.0, 4.5)
_TRANSIENT = (ProtocolError, DeviceTimeoutError, ConnectionLostError, InstrumentBusyError)


# -- the channel as a pausable Movable -----------------------------------------------------


class ChannelRunner:
    """One cycler channel as a Movable whose ``set(steps)`` runs a sequence.

    The RunEngine stops every moved device at a pause and at the end of every run;
    :meth:`stop` aborts the channel's sequence (output off) and lets the status finish
    *successfully* with :attr:`interrupted` set, so that a pause does not fail the run:
    the plan sees the flag and runs the segment again. Any other end of the sequence
    (a FAIL test, someone else's abort, lost communication) fails the status as the
    channel reports it. :meth:`fetch` reads the data log into a buffer that the plan
    drains with :meth:`take_rows`; transient wire errors are retried.
    """

    def __init__(self, channel: CyclerChannel, *, rating_a: float = RATING_A) -> None:
        self.channel = channel
        self.rating_a = rating_a
        self.interrupted = False
        self.pauses = 0
        self._active = False  # a sequence was started and has not been seen to end OK
        self._inner: WatchableAsyncStatus[int] | None = None
        self._rows: list[LogRow] = []
        self._error: InstrumentError | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        return f"{self.channel.name}-run"

    @property
    def parent(self) -> None:
        return None

    # Movable / Checkable --------------------------------------------------------------
    def check_value(self, value: Sequence[Step]) -> None:
        """Refuse steps the instrument would refuse (bluesky.simulators.check_limits)."""
        lo, hi = VOLTAGE_WINDOW_V
        for n, step in enumerate(value, 1):
            if not isinstance(step, Step):
                raise LimitError(f"step {n}: not a Step: {step!r}", instrument=self.name)
            if step.mode == "REST":
                continue
            if step.current_a > self.rating_a:
                raise LimitError(
                    f"step {n}: {step.current_a:g} A above the channel rating {self.rating_a:g} A",
                    instrument=self.name,
                )
            if not lo <= step.voltage_v <= hi:
                raise LimitError(
                    f"step {n}: voltage limit {step.voltage_v:g} V outside {lo:g}..{hi:g} V",
                    instrument=self.name,
                )

    def set(self, value: Sequence[Step]) -> AsyncStatus[None]:
        steps = tuple(value)
        self.check_value(steps)
        self.interrupted = False
        inner = self.channel.run_sequence(steps)
        self._inner = inner
        self._active = True

        async def run() -> None:
            try:
                await inner
            except SequenceAbortedError:
                if self.interrupted:
                    return  # our own stop: a pause, or the plan's safe state
                raise
            self._active = False

        return AsyncStatus(run(), name=self.name)

    async def stop(self, success: bool = True) -> None:
        """Abort the running sequence (output off); a no-op when none is running."""
        if not self._active:
            return
        if self._inner is not None and not self._inner.done:
            self.interrupted = True
        last: InstrumentError | None = None
        for _ in range(3):
            try:
                await self.channel.stop()
            except InstrumentError as exc:
                last = exc
                await asyncio.sleep(0.05)
                continue
            self._active = False
            return
        assert last is not None
        raise last

    # Pausable -------------------------------------------------------------------------
    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        """Nothing to do: the plan reruns the interrupted segment."""

    # data log -------------------------------------------------------------------------
    async def fetch(self, attempts: int = 3) -> None:
        """Append the data-log rows recorded since the last fetch to the buffer."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            last: InstrumentError | None = None
            for _ in range(attempts):
                try:
                    self._rows.extend(await self.channel.fetch_log())
                    return
                except _TRANSIENT as exc:
                    last = exc
                    await asyncio.sleep(0.05)
                except InstrumentError as exc:
                    last = exc
                    break
            self._error = last

    def take_rows(self) -> list[LogRow]:
        """The buffered rows (oldest first); raises the last fetch's error if it failed."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        rows, self._rows = self._rows, []
        return rows


# -- protocols ----------------------------------------------------------------------------


class FormationSpec(BaseModel):
    """Slow first cycles that form the SEI."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cycles: int = Field(default=1, ge=1, le=10)
    c_rate: float = Field(default=0.1, gt=0.0, le=2.0)


class RateTestSpec(BaseModel):
    """One cycle per discharge rate, each after a charge at ``charge_c_rate``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Up to 1C: 2C of a 5 Ah cell is above a BT2200 channel's 6.25 A.
    discharge_c_rates: list[float] = Field(
        default_factory=lambda: [0.2, 0.5, 1.0], min_length=1, max_length=10
    )
    charge_c_rate: float = Field(default=0.5, gt=0.0, le=5.0)

    @field_validator("discharge_c_rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not (math.isfinite(r) and 0.0 < r <= 10.0)]
        if bad:
            raise ValueError(f"C-rates must be within (0, 10], got {bad}")
        return v


class CyclingSpec(BaseModel):
    """Repeated CC-CV charge / CC discharge cycles."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cycles: int = Field(default=100, ge=1, le=100000)
    charge_c_rate: float = Field(default=0.5, gt=0.0, le=5.0)
    discharge_c_rate: float = Field(default=1.0, gt=0.0, le=10.0)


class CyclingProtocol(BaseModel):
    """What :func:`cycle_cell` runs; currents as C-rates of ``nominal_capacity_ah``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nominal_capacity_ah: float = Field(default=5.0, gt=0.0, le=1000.0)
    charge_voltage_v: float = Field(default=4.2, ge=2.0, le=4.5)
    discharge_cutoff_v: float = Field(default=2.5, ge=2.0, le=4.5)
    cv_end_c_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    rest_s: float = Field(default=600.0, ge=0.0, le=1.0e6)
    safety_max_v: float = Field(default=4.3, ge=2.0, le=5.0)
    safety_min_v: float = Field(default=2.0, ge=0.0, le=4.5)
    max_temperature_c: float = Field(default=60.0, ge=0.0, le=120.0)
    min_capacity_retention: float = Field(default=0.8, gt=0.0, le=1.0)
    formation: FormationSpec | None = Field(default_factory=FormationSpec)
    rate_test: RateTestSpec | None = Field(default_factory=RateTestSpec)
    cycling: CyclingSpec | None = Field(default_factory=CyclingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> CyclingProtocol:
        if not self.discharge_cutoff_v < self.charge_voltage_v:
            raise ValueError(
                f"discharge_cutoff_v ({self.discharge_cutoff_v}) must be below "
                f"charge_voltage_v ({self.charge_voltage_v})"
            )
        if not self.safety_min_v < self.discharge_cutoff_v:
            raise ValueError("safety_min_v must be below discharge_cutoff_v")
        if not self.safety_max_v > self.charge_voltage_v:
            raise ValueError("safety_max_v must be above charge_voltage_v")
        if self.formation is None and self.rate_test is None and self.cycling is None:
            raise ValueError("nothing to run: formation, rate_test and cycling are all null")
        return self

    def current(self, c_rate: float) -> float:
        return c_rate * self.nominal_capacity_ah


PRESETS: dict[str, dict[str, Any]] = {
    # A few brisk cycles: the demo, a smoke test of a new cell.
    "quick": {
        "rest_s": 300.0,
        "formation": None,
        "rate_test": {"discharge_c_rates": [0.5, 1.0], "charge_c_rate": 1.0},
        "cycling": {"cycles": 3, "charge_c_rate": 1.0, "discharge_c_rate": 1.0},
    },
    # Formation at C/10, a rate test from C/5 to 1C, 100 cycles at C/2 - 1C.
    "standard": {},
    "formation": {"formation": {"cycles": 2, "c_rate": 0.1}, "rate_test": None, "cycling": None},
}


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _load_protocol(value: Any) -> Any:
    """A preset name, a JSON object, or a ``.json``/``.toml`` file; else unchanged.

    An object with ``"preset": NAME`` changes that preset (nested keys merge).
    """
    if isinstance(value, Mapping) and "preset" in value:
        changes = {k: v for k, v in value.items() if k != "preset"}
        return _merge(_load_protocol(value["preset"]), changes)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in PRESETS:
        return dict(PRESETS[text])
    if text.startswith("{"):
        return _load_protocol(json.loads(text))
    path = Path(text)
    if path.suffix in (".json", ".toml") and path.is_file():
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import tomllib

        return tomllib.loads(path.read_text())
    raise ValueError(
        f"not a protocol: {value!r}; use a preset ({', '.join(PRESETS)}), a JSON object "
        "or a .json/.toml file"
    )


@dataclass(frozen=True)
class Segment:
    """One cycler sequence of a plan."""

    index: int
    kind: str  # formation | rate | cycling | charge | approach | pulses
    cycle: int  # 1-based cycle (or HPPC point) number
    label: str
    steps: tuple[Step, ...]
    charge_c_rate: float = 0.0
    discharge_c_rate: float = 0.0
    soc: float = math.nan

    def mode(self, step: int) -> str:
        return self.steps[step - 1].mode if 1 <= step <= len(self.steps) else "REST"


def _h(hours: float) -> float:
    return min(hours * 3600.0, 1.0e7)


def _charge(p: CyclingProtocol, c_rate: float) -> Step:
    return Step(
        "CHARGE",
        _h(1.3 / c_rate + 3.0),  # CC plus a generous CV taper; the taper test ends it
        p.current(c_rate),
        p.charge_voltage_v,
        (
            EndTest("CURR_LE", p.current(p.cv_end_c_rate)),
            EndTest("VOLT_GE", p.safety_max_v, "FAIL"),
        ),
    )


def _discharge(p: CyclingProtocol, c_rate: float) -> Step:
    return Step(
        "DISCHARGE",
        _h(1.3 / c_rate + 0.5),
        p.current(c_rate),
        p.discharge_cutoff_v,
        (
            EndTest("VOLT_LE", p.discharge_cutoff_v),
            EndTest("VOLT_LE", p.safety_min_v, "FAIL"),
        ),
    )


def _cycle_steps(p: CyclingProtocol, charge_c: float, discharge_c: float) -> tuple[Step, ...]:
    rest = (Step.rest(p.rest_s),) if p.rest_s > 0 else ()
    return (_charge(p, charge_c), *rest, _discharge(p, discharge_c), *rest)


def protocol_segments(p: CyclingProtocol) -> list[Segment]:
    """The cycler sequences of a protocol, in order (one cycle each)."""
    out: list[Segment] = []

    def add(kind: str, label: str, charge_c: float, discharge_c: float) -> None:
        n = len(out) + 1
        steps = _cycle_steps(p, charge_c, discharge_c)
        out.append(Segment(n, kind, n, label, steps, charge_c, discharge_c))

    if p.formation is not None:
        for k in range(p.formation.cycles):
            c = p.formation.c_rate
            add("formation", f"formation {k + 1} ({c:g}C)", c, c)
    if p.rate_test is not None:
        for c in p.rate_test.discharge_c_rates:
            add("rate", f"rate test {c:g}C", p.rate_test.charge_c_rate, c)
    if p.cycling is not None:
        for k in range(p.cycling.cycles):
            cyc = p.cycling
            add("cycling", f"cycle {k + 1}", cyc.charge_c_rate, cyc.discharge_c_rate)
    return out


# -- parameters ---------------------------------------------------------------------------


class _CellParams(CommonParams):
    channel: int = Field(ge=1, le=256, description="cycler channel (1-based)")
    cell_id: str = Field(default="", max_length=100, description="the cell's label")
    electrolyte_station: str | None = Field(
        default=None, description="station of a vial to put at the 'cell' station first"
    )
    log_period_s: float = Field(default=10.0, ge=0.1, le=86400.0, description="data log, lab s")
    poll_s: float = Field(default=0.5, gt=0.0, le=600.0, description="log fetch, wall s")


class CycleCellParams(_CellParams):
    """Parameters of :func:`cycle_cell`."""

    protocol: CyclingProtocol = Field(
        default="quick",
        validate_default=True,
        description="a preset (quick, standard, formation), JSON, or a .json/.toml file",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        return _load_protocol(v)


class HppcParams(_CellParams):
    """Parameters of :func:`hppc` (currents as C-rates of ``nominal_capacity_ah``)."""

    nominal_capacity_ah: float = Field(default=5.0, gt=0.0, le=1000.0)
    soc_points: list[float] = Field(
        default_factory=lambda: [0.9, 0.7, 0.5, 0.3, 0.1], min_length=1, max_length=20
    )
    charge_c_rate: float = Field(default=0.5, gt=0.0, le=5.0, description="initial charge")
    step_c_rate: float = Field(default=0.5, gt=0.0, le=5.0, description="between SOC points")
    discharge_pulse_c_rate: float = Field(default=1.0, gt=0.0, le=10.0)
    charge_pulse_c_rate: float = Field(default=0.75, gt=0.0, le=10.0)
    pulse_s: float = Field(default=10.0, gt=0.0, le=600.0)
    pulse_rest_s: float = Field(default=40.0, gt=0.0, le=3600.0)
    soc_rest_s: float = Field(default=3600.0, gt=0.0, le=1.0e6, description="before pulses")
    charge_voltage_v: float = Field(default=4.2, ge=2.0, le=4.5)
    discharge_cutoff_v: float = Field(default=2.5, ge=2.0, le=4.5)
    cv_end_c_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    pulse_log_period_s: float = Field(default=1.0, ge=0.1, le=60.0, description="during pulses")
    initial_charge: bool = Field(default=True, description="charge to full first (SOC 1)")

    @field_validator("soc_points", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip().startswith("["):
            return [float(x) for x in v.split(",") if x.strip()]
        return v

    @field_validator("soc_points")
    @classmethod
    def _descending(cls, v: list[float]) -> list[float]:
        if any(not (0.0 < s < 1.0) for s in v):
            raise ValueError(f"every SOC point must be within (0, 1), got {v}")
        if any(b >= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"SOC points must be strictly decreasing, got {v}")
        return v


# -- records ------------------------------------------------------------------------------

ROW_FIELDS: dict[str, tuple[Any, str]] = {
    "time": ("number", "s"),
    "voltage": ("number", "V"),
    "current": ("number", "A"),
    "capacity": ("number", "Ah"),
    "temperature": ("number", "degC"),
    "step": ("integer", ""),
    "cycle": ("integer", ""),
    "segment": ("integer", ""),
    "attempt": ("integer", ""),
}
CYCLE_FIELDS: dict[str, tuple[Any, str]] = {
    "cycle": ("integer", ""),
    "kind": ("string", ""),
    "label": ("string", ""),
    "charge_c_rate": ("number", "1/h"),
    "discharge_c_rate": ("number", "1/h"),
    "charge_ah": ("number", "Ah"),
    "discharge_ah": ("number", "Ah"),
    "coulombic_efficiency": ("number", ""),
    "discharge_energy_wh": ("number", "Wh"),
    "retention": ("number", ""),
    "max_temperature_c": ("number", "degC"),
    "end_voltage_v": ("number", "V"),
    "duration_s": ("number", "s"),
    "attempts": ("integer", ""),
}
PULSE_FIELDS: dict[str, tuple[Any, str]] = {
    "soc": ("number", ""),
    "direction": ("string", ""),
    "current_a": ("number", "A"),
    "temperature_c": ("number", "degC"),
    "r0_ohm": ("number", "ohm"),
    "r0_edge_ohm": ("number", "ohm"),
    "r1_ohm": ("number", "ohm"),
    "c1_f": ("number", "F"),
    "tau1_s": ("number", "s"),
    "ocv_v": ("number", "V"),
    "rmse_v": ("number", "V"),
}


# -- running segments ---------------------------------------------------------------------


class _Cycler:
    """Segment execution and row streaming shared by cycle_cell and hppc."""

    def __init__(self, lab: LabDevices, plan: str, p: _CellParams) -> None:
        lab.require("cycler")
        cycler = lab.cycler
        assert cycler is not None
        if p.channel not in cycler.channels:
            raise PlanParameterError(
                plan, [("channel", p.channel, f"the cycler has channels 1..{len(cycler.channels)}")]
            )
        if p.electrolyte_station is not None:
            lab.require("robot")
            deck = getattr(lab.robot, "deck", {})
            if p.electrolyte_station not in deck:
                raise PlanParameterError(
                    plan,
                    [("electrolyte_station", p.electrolyte_station, "unknown station")],
                )
        self.lab = lab
        self.cycler: BatteryCycler = cycler
        self.p = p
        self.runner = ChannelRunner(cycler.channels[p.channel])
        self.rows = Record("cycler_row", ROW_FIELDS)
        self.offset = 0.0

    def check_segments(self, plan: str, field: str, segments: Sequence[Segment]) -> None:
        """Refuse, before the run, steps the instrument would refuse mid-run (the error
        names the segment as the value)."""
        for seg in segments:
            try:
                self.runner.check_value(seg.steps)
            except LimitError as exc:
                raise PlanParameterError(plan, [(field, seg.label, exc.message)]) from None

    def set_log_period(self, seconds: float, live: bool) -> Plan:
        command = scpi.encode("DATA:LOG:PER", seconds)
        yield from call(lambda: self.cycler.send(command), live=live)

    def stream(self, seg: Segment, attempt: int, live: bool) -> Generator[Msg, Any, list[LogRow]]:
        """Fetch the new log rows and write each as a ``cycling`` event."""
        yield from call(self.runner.fetch, live=live)
        rows = self.runner.take_rows()
        for row in rows:
            yield from emit(
                self.rows,
                "cycling",
                time=self.offset + row.time_s,
                voltage=row.voltage_v,
                current=row.current_a,
                capacity=row.capacity_ah,
                temperature=row.temperature_c,
                step=row.step,
                cycle=seg.cycle,
                segment=seg.index,
                attempt=attempt,
            )
        return rows

    def check_rows(self, rows: Sequence[LogRow], limit_c: float | None) -> Plan:
        if limit_c is None:
            return
        hot = [r for r in rows if r.temperature_c > limit_c]
        if hot:
            yield from bps.stop(self.runner)
            raise PlanError(
                f"stop condition: cell temperature {hot[0].temperature_c:.2f} degC above "
                f"{limit_c:g} degC (channel {self.p.channel}, t = {hot[0].time_s:g} s)"
            )

    def run_segment(
        self, seg: Segment, live: bool, *, max_temperature_c: float | None = None
    ) -> Generator[Msg, Any, tuple[list[LogRow], int]]:
        """Run one segment to its end; rerun it when a pause interrupted it."""
        attempt = 0
        while True:
            attempt += 1
            pauses = self.runner.pauses
            group = f"{self.runner.name}-{uuid.uuid4().hex[:8]}"
            status = yield from bps.abs_set(self.runner, seg.steps, group=group)
            rows: list[LogRow] = []
            while live and status is not None and not status.done:
                yield from bps.sleep(self.p.poll_s)
                new = yield from self.stream(seg, attempt, live)
                rows.extend(new)
                yield from self.check_rows(new, max_temperature_c)
            yield from bps.wait(group=group)
            new = yield from self.stream(seg, attempt, live)
            rows.extend(new)
            yield from self.check_rows(new, max_temperature_c)
            if rows:
                self.offset += rows[-1].time_s
            if live and self.runner.interrupted and self.runner.pauses > pauses:
                continue  # a pause aborted it: run the whole segment again
            return rows, attempt

    def move_electrolyte(self, source: str, destination: str, live: bool) -> Plan:
        robot = self.lab.robot
        assert robot is not None
        homed = yield from read_signal(robot.homed, live=live)
        if not homed:
            yield from bps.trigger(robot.home, wait=True)
        yield from bps.checkpoint()
        yield from bps.mv(robot.transfer, (source, destination))

    def safe_state(self) -> list[Callable[[], Plan]]:
        return [lambda: bps.stop(self.runner)]

    def metadata(self) -> dict[str, Any]:
        return {
            "cell_id": self.p.cell_id,
            "channel": self.p.channel,
            "cycler": self.cycler.name,
            "electrolyte_station": self.p.electrolyte_station,
        }


def summarize_segment(seg: Segment, rows: Sequence[LogRow]) -> dict[str, float]:
    """Capacities, coulombic efficiency, discharge energy of one segment's rows."""
    last: dict[int, LogRow] = {}
    for r in rows:
        last[r.step] = r  # the step's final capacity is on its last row
    charge = sum((r.capacity_ah for s, r in last.items() if seg.mode(s) == "CHARGE"), 0.0)
    discharge = sum((r.capacity_ah for s, r in last.items() if seg.mode(s) == "DISCHARGE"), 0.0)
    energy = 0.0
    for a, b in itertools.pairwise(rows):
        if b.step == a.step and seg.mode(b.step) == "DISCHARGE":
            energy += (
                0.5
                * (a.voltage_v * a.current_a + b.voltage_v * b.current_a)
                * (b.time_s - a.time_s)
            )
    return {
        "charge_ah": charge,
        "discharge_ah": discharge,
        "coulombic_efficiency": discharge / charge if charge > 0 else 0.0,
        "discharge_energy_wh": energy / 3600.0,
        "max_temperature_c": max((r.temperature_c for r in rows), default=math.nan),
        "end_voltage_v": rows[-1].voltage_v if rows else math.nan,
        "duration_s": rows[-1].time_s if rows else 0.0,
    }


# -- cycle_cell ---------------------------------------------------------------------------


def cycle_cell(
    lab: LabDevices,
    channel: int,
    protocol: CyclingProtocol | Mapping[str, Any] | str = "quick",
    *,
    cell_id: str = "",
    electrolyte_station: str | None = None,
    log_period_s: float = 10.0,
    poll_s: float = 0.5,
    sample_id: str = "",
    campaign_id: str = "",
    operator: str | None = None,
    time_scale: float = 1.0,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Formation, rate test and cycling of the cell on ``channel``.

    ``protocol``: a :class:`CyclingProtocol`, its JSON, a preset name (``quick``,
    ``standard``, ``formation``) or a .json/.toml file. Each cycle is one cycler
    sequence: CC-CV charge (ends when the current tapers to ``cv_end_c_rate``), rest,
    CC discharge to ``discharge_cutoff_v``, rest; a voltage outside the safety window
    fails the step on the instrument. Cycling stops early (successfully) once a
    discharge delivers less than ``min_capacity_retention`` of the first cycling
    discharge; a cell above ``max_temperature_c`` fails the run. With
    ``electrolyte_station`` the vial there is moved to the ``cell`` station first (the
    cycler's cell takes its electrolyte) and back at the end. Returns the per-cycle
    summaries and the stop reason.
    """
    values = {k: v for k, v in locals().items() if k != "lab" and v is not None}
    p = validate(CycleCellParams, "cycle_cell", values)
    cyc = _Cycler(lab, "cycle_cell", p)
    segments = protocol_segments(p.protocol)
    cyc.check_segments("cycle_cell", "protocol", segments)
    cycles = Record("cycle_summary", CYCLE_FIELDS)
    md = base_metadata(
        "cycle_cell",
        p,
        **cyc.metadata(),
        protocol=p.protocol.model_dump(mode="json"),
        segments=[s.label for s in segments],
        expected_events={"cycles": len(segments)},
    )

    def body(live: bool) -> Generator[Msg, Any, dict[str, Any]]:
        if p.electrolyte_station is not None:
            yield from cyc.move_electrolyte(p.electrolyte_station, "cell", live)
        yield from cyc.set_log_period(p.log_period_s, live)
        summaries: list[dict[str, Any]] = []
        reference: float | None = None
        stop_reason = "protocol complete"
        for seg in segments:
            yield from bps.checkpoint()  # a deferred pause waits for the segment to end
            rows, attempts = yield from cyc.run_segment(
                seg, live, max_temperature_c=p.protocol.max_temperature_c
            )
            s = summarize_segment(seg, rows) if live else summarize_segment(seg, [])
            if seg.kind == "cycling" and reference is None and s["discharge_ah"] > 0:
                reference = s["discharge_ah"]
            retention = s["discharge_ah"] / reference if reference else 1.0
            summary = {
                "cycle": seg.cycle,
                "kind": seg.kind,
                "label": seg.label,
                "charge_c_rate": seg.charge_c_rate,
                "discharge_c_rate": seg.discharge_c_rate,
                **s,
                "retention": retention,
                "attempts": attempts,
            }
            yield from emit(cycles, "cycles", **summary)
            summaries.append(summary)
            if seg.kind == "cycling" and live and retention < p.protocol.min_capacity_retention:
                stop_reason = (
                    f"capacity retention {retention:.4f} below "
                    f"{p.protocol.min_capacity_retention:g} after {seg.label}"
                )
                break
        if p.electrolyte_station is not None:
            yield from cyc.move_electrolyte("cell", p.electrolyte_station, live)
        return {
            "channel": p.channel,
            "cell_id": p.cell_id,
            "cycles": summaries,
            "stop_reason": stop_reason,
        }

    return lab_run(
        body,
        md,
        safe_state=cyc.safe_state,
        streams=[("cycling", [cyc.rows]), ("cycles", [cycles])],
    )


# -- hppc ---------------------------------------------------------------------------------


def hppc_segments(p: HppcParams) -> list[Segment]:
    """Initial charge, then per SOC point: the approach (discharge + rest) and the pulses."""
    q = p.nominal_capacity_ah
    out: list[Segment] = []
    if p.initial_charge:
        charge = Step(
            "CHARGE",
            _h(1.3 / p.charge_c_rate + 3.0),
            p.charge_c_rate * q,
            p.charge_voltage_v,
            (EndTest("CURR_LE", p.cv_end_c_rate * q),),
        )
        steps = (charge, Step.rest(p.soc_rest_s))
        out.append(Segment(1, "charge", 0, "charge to full", steps, soc=1.0))
    soc = 1.0
    for k, target in enumerate(p.soc_points, 1):
        i_step = p.step_c_rate * q
        seconds = (soc - target) * q / i_step * 3600.0
        approach = (
            Step(
                "DISCHARGE",
                seconds,
                i_step,
                p.discharge_cutoff_v,
                (EndTest("VOLT_LE", p.discharge_cutoff_v),),
            ),
            Step.rest(p.soc_rest_s),
        )
        out.append(Segment(len(out) + 1, "approach", k, f"to SOC {target:g}", approach, soc=target))
        pulses = (
            Step.rest(min(10.0, p.pulse_rest_s)),  # a rest row right before the pulse
            Step(
                "DISCHARGE",
                p.pulse_s,
                p.discharge_pulse_c_rate * q,
                p.discharge_cutoff_v,
                (EndTest("VOLT_LE", p.discharge_cutoff_v),),
            ),
            Step.rest(p.pulse_rest_s),
            Step("CHARGE", p.pulse_s, p.charge_pulse_c_rate * q, p.charge_voltage_v),
            Step.rest(p.pulse_rest_s),
        )
        out.append(
            Segment(len(out) + 1, "pulses", k, f"pulses at SOC {target:g}", pulses, soc=target)
        )
        soc = target
    return out


def fit_pulses(rows: Sequence[LogRow]) -> list[tuple[str, float, float, PulseFit, float]]:
    """Fit the discharge (step 2) and charge (step 4) pulses of a pulses segment.

    Each window runs from the rest row right before the discharge pulse through the rest
    after the pulse, so the charge pulse's fit also sees the polarisation the discharge
    pulse left. Returns ``(direction, current, temperature, fit, edge R0)`` per pulse.
    """
    out = []
    for direction, pulse_step, last_step in (("discharge", 2, 3), ("charge", 4, 5)):
        idx = [n for n, r in enumerate(rows) if 2 <= r.step <= last_step]
        in_pulse = [n for n in idx if rows[n].step == pulse_step]
        if not in_pulse:
            continue
        window = rows[max(idx[0] - 1, 0) : idx[-1] + 1]
        fit = fit_pulse(
            [r.time_s for r in window], [r.voltage_v for r in window], [r.current_a for r in window]
        )
        edge_window = rows[max(in_pulse[0] - 1, 0) : idx[-1] + 1]
        try:
            edge = instantaneous_r0(
                [r.time_s for r in edge_window],
                [r.voltage_v for r in edge_window],
                [r.current_a for r in edge_window],
            )
        except PulseFitError:
            edge = math.nan
        pulse = [rows[n] for n in in_pulse]
        temperature = sum(r.temperature_c for r in pulse) / len(pulse)
        out.append((direction, pulse[0].current_a, temperature, fit, edge))
    return out


def hppc(
    lab: LabDevices,
    channel: int,
    *,
    nominal_capacity_ah: float = 5.0,
    soc_points: Sequence[float] | str = (0.9, 0.7, 0.5, 0.3, 0.1),
    charge_c_rate: float = 0.5,
    step_c_rate: float = 0.5,
    discharge_pulse_c_rate: float = 1.0,
    charge_pulse_c_rate: float = 0.75,
    pulse_s: float = 10.0,
    pulse_rest_s: float = 40.0,
    soc_rest_s: float = 3600.0,
    charge_voltage_v: float = 4.2,
    discharge_cutoff_v: float = 2.5,
    cv_end_c_rate: float = 0.05,
    pulse_log_period_s: float = 1.0,
    initial_charge: bool = True,
    cell_id: str = "",
    electrolyte_station: str | None = None,
    log_period_s: float = 10.0,
    poll_s: float = 0.5,
    sample_id: str = "",
    campaign_id: str = "",
    operator: str | None = None,
    time_scale: float = 1.0,
) -> Generator[Msg, Any, dict[str, Any]]:
    """HPPC pulse test on ``channel``: equivalent-circuit parameters per state of charge.

    Charges to full (CC-CV, SOC 1) and rests ``soc_rest_s``; then for each SOC in
    ``soc_points`` (decreasing) discharges ``(previous - soc) x nominal capacity`` at
    ``step_c_rate``, rests ``soc_rest_s``, and applies a ``pulse_s`` discharge pulse at
    ``discharge_pulse_c_rate``, a ``pulse_rest_s`` rest, a charge pulse at
    ``charge_pulse_c_rate`` and another rest, logged every ``pulse_log_period_s``. Each
    pulse is fitted to R0 + one RC pair (:func:`labctl.plans.ecm.fit_pulse`): one event
    per pulse in the ``pulses`` stream and in the result, the raw data in ``cycling``.
    """
    values = {
        k: (list(v) if k == "soc_points" and not isinstance(v, str) else v)
        for k, v in locals().items()
        if k != "lab" and v is not None
    }
    p = validate(HppcParams, "hppc", values)
    cyc = _Cycler(lab, "hppc", p)
    segments = hppc_segments(p)
    cyc.check_segments("hppc", "currents", segments)
    pulses = Record("pulse_fit", PULSE_FIELDS)
    md = base_metadata(
        "hppc",
        p,
        **cyc.metadata(),
        segments=[s.label for s in segments],
        expected_events={"pulses": 2 * len(p.soc_points)},
    )

    def body(live: bool) -> Generator[Msg, Any, dict[str, Any]]:
        if p.electrolyte_station is not None:
            yield from cyc.move_electrolyte(p.electrolyte_station, "cell", live)
        fits: list[dict[str, Any]] = []
        for seg in segments:
            yield from bps.checkpoint()
            period = p.pulse_log_period_s if seg.kind == "pulses" else p.log_period_s
            yield from cyc.set_log_period(period, live)
            rows, _ = yield from cyc.run_segment(seg, live)
            if seg.kind != "pulses":
                continue
            found = fit_pulses(rows) if live else []
            if live and len(found) < 2:
                raise PlanError(f"{seg.label}: the data log holds too few pulse rows to fit")
            for direction, current, temperature, fit, edge in found:
                point = {
                    "soc": seg.soc,
                    "direction": direction,
                    "current_a": current,
                    "temperature_c": temperature,
                    "r0_ohm": fit.r0_ohm,
                    "r0_edge_ohm": edge,
                    "r1_ohm": fit.r1_ohm,
                    "c1_f": fit.c1_f,
                    "tau1_s": fit.tau1_s,
                    "ocv_v": fit.ocv_v,
                    "rmse_v": fit.rmse_v,
                }
                yield from emit(pulses, "pulses", **point)
                fits.append(point)
        yield from cyc.set_log_period(p.log_period_s, live)
        if p.electrolyte_station is not None:
            yield from cyc.move_electrolyte("cell", p.electrolyte_station, live)
        return {"channel": p.channel, "cell_id": p.cell_id, "pulses": fits}

    return lab_run(
        body,
        md,
        safe_state=cyc.safe_state,
        streams=[("cycling", [cyc.rows]), ("pulses", [pulses])],
    )
