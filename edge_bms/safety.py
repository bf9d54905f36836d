"""Deterministic limit checks, independent of every learned or estimated quantity.

The checks read only the measured cell voltages, temperatures and current and compare them
with fixed limits; no filter state, no network, no SOC enters. What a BMS does with a trip
(open the contactor, request a derate) is the caller's; this module decides *when*.

Each kind of alarm (``KINDS``) is watched on a group of channels, all channels of a group in
one numpy step (no per-cell Python):

* ``over_voltage`` / ``under_voltage``: one channel per cell voltage;
* ``over_temperature`` / ``under_temperature``: one channel per temperature sensor (a pack
  may have fewer sensors than cells; the alarm's ``cell`` is then the sensor index);
* ``over_current_discharge`` / ``over_current_charge``: one channel per current sensor (a
  series string has one: its alarms carry ``cell=None``). Currents are signed, positive =
  discharge, so a charge over-current is a current *below* ``-limit``; alarm records carry
  the signed current and the signed limit.

Debounce: a condition (value beyond the limit) must hold on ``debounce_samples`` consecutive
samples *and* for ``debounce_s`` seconds (from the first violating sample's timestamp to the
current one) before it trips, so a spike shorter than the debounce never trips.

Latching and hysteresis: a tripped latching alarm stays active until :meth:`SafetyMonitor.clear`,
which is refused while the value is still within ``hysteresis`` of the limit (or unknown).
A non-latching alarm clears by itself once the value is back beyond the hysteresis band.

Missing samples (NaN, a sensor dropout) neither confirm nor reset a pending condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_bms.cell import Limits
from edge_bms.errors import InputError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

Kind = Literal[
    "over_voltage",
    "under_voltage",
    "over_temperature",
    "under_temperature",
    "over_current_discharge",
    "over_current_charge",
]
KINDS: tuple[Kind, ...] = (
    "over_voltage",
    "under_voltage",
    "over_temperature",
    "under_temperature",
    "over_current_discharge",
    "over_current_charge",
)
Group = Literal["voltage", "temperature", "current"]
# (measured group, +1: above the limit is bad / -1: below is bad, signed limit multiplier)
_KIND_SPEC: dict[Kind, tuple[Group, int, float]] = {
    "over_voltage": ("voltage", +1, 1.0),
    "under_voltage": ("voltage", -1, 1.0),
    "over_temperature": ("temperature", +1, 1.0),
    "under_temperature": ("temperature", -1, 1.0),
    "over_current_discharge": ("current", +1, 1.0),
    # configured as a magnitude (like Limits.i_charge_max_a), compared as a signed current
    "over_current_charge": ("current", -1, -1.0),
}
STATE_FORMAT = "edge_bms.safety/1"


class Threshold(BaseModel):
    """One alarm kind's limit, hysteresis and debounce."""

    model_config = ConfigDict(extra="forbid")

    limit: float = Field(description="V, degC or A; charge current as a positive magnitude")
    hysteresis: float = Field(ge=0, description="how far back past the limit before clearing")
    debounce_s: float = Field(0.0, ge=0, description="the condition must hold this long")
    debounce_samples: int = Field(1, ge=1, description="... and on this many samples in a row")
    latching: bool = True


class SafetyConfig(BaseModel):
    """Thresholds of every kind; :meth:`from_limits` derives them from a cell's limits."""

    model_config = ConfigDict(extra="forbid")

    over_voltage: Threshold
    under_voltage: Threshold
    over_temperature: Threshold
    under_temperature: Threshold
    over_current_discharge: Threshold
    over_current_charge: Threshold

    @model_validator(mode="after")
    def _ordered(self) -> SafetyConfig:
        if self.under_voltage.limit >= self.over_voltage.limit:
            raise ValueError(
                f"under_voltage.limit ({self.under_voltage.limit}) must be below "
                f"over_voltage.limit ({self.over_voltage.limit})"
            )
        if self.under_temperature.limit >= self.over_temperature.limit:
            raise ValueError(
                f"under_temperature.limit ({self.under_temperature.limit}) must be below "
                f"over_temperature.limit ({self.over_temperature.limit})"
            )
        for kind in ("over_current_discharge", "over_current_charge"):
            if getattr(self, kind).limit <= 0:
                raise ValueError(f"{kind}.limit must be a positive magnitude")
        return self

    def threshold(self, kind: Kind) -> Threshold:
        t: Threshold = getattr(self, kind)
        return t

    @classmethod
    def from_limits(
        cls,
        limits: Limits,
        *,
        voltage_margin_v: float = 0.05,
        current_margin: float = 0.2,
        temperature_margin_c: float = 0.0,
        debounce_s: float = 1.0,
        debounce_samples: int = 2,
    ) -> SafetyConfig:
        """Trip limits a margin outside the operating limits.

        The operating limits (what SOP keeps to) sit inside the safety limits (what trips
        the pack): a cell briefly at 4.2 V under CV charge must not trip, one at 4.25 V must.
        Currents get a relative margin (a 20 % overshoot for ``debounce_s`` trips).
        Hysteresis: 50 mV, 5 degC, 10 % of the current limit.
        """

        def th(limit: float, hyst: float) -> Threshold:
            return Threshold(
                limit=limit,
                hysteresis=hyst,
                debounce_s=debounce_s,
                debounce_samples=debounce_samples,
            )

        return cls(
            over_voltage=th(limits.v_max + voltage_margin_v, 0.05),
            under_voltage=th(limits.v_min - voltage_margin_v, 0.05),
            over_temperature=th(limits.t_max_c + temperature_margin_c, 5.0),
            under_temperature=th(limits.t_min_c - temperature_margin_c, 5.0),
            over_current_discharge=th(
                limits.i_discharge_max_a * (1 + current_margin), 0.1 * limits.i_discharge_max_a
            ),
            over_current_charge=th(
                limits.i_charge_max_a * (1 + current_margin), 0.1 * limits.i_charge_max_a
            ),
        )


@dataclass(frozen=True)
class Alarm:
    """One alarm event: ``event`` is ``trip`` or ``clear``; ``cell`` is the channel index
    (cell, temperature sensor, or current sensor; ``None`` for a pack's single current)."""

    kind: Kind
    cell: int | None
    value: float
    limit: float
    ts: float
    event: Literal["trip", "clear"] = "trip"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cell": self.cell,
            "value": self.value,
            "limit": self.limit,
            "ts": self.ts,
            "event": self.event,
        }

    def message(self) -> str:
        where = "pack" if self.cell is None else f"cell {self.cell}"
        return f"{self.kind} {self.event} at {where}: {self.value:g} vs limit {self.limit:g}"


class ClearResult(NamedTuple):
    cleared: list[Alarm]
    refused: list[tuple[Alarm, str]]  # the active alarm and why it stays


class _KindState:
    """Arrays of one kind over its channels."""

    def __init__(self, n: int) -> None:
        self.count: IntArray = np.zeros(n, dtype=np.int64)  # violating samples in a row
        self.since: FloatArray = np.full(n, np.nan)  # ts of the first of them
        self.active: BoolArray = np.zeros(n, dtype=bool)
        self.trip_ts: FloatArray = np.full(n, np.nan)
        self.trip_value: FloatArray = np.full(n, np.nan)
        self.last: FloatArray = np.full(n, np.nan)  # last valid value (for clear)


def _nan_to_none(a: FloatArray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in a]


def _none_to_nan(values: list[float | None]) -> FloatArray:
    return np.array([np.nan if x is None else float(x) for x in values], dtype=float)


class SafetyMonitor:
    """Debounced, latching limit checks for one pack, batched over channels."""

    def __init__(
        self,
        config: SafetyConfig,
        n_cells: int,
        *,
        n_temperature: int | None = None,
        n_current: int = 1,
    ) -> None:
        if n_cells < 1 or n_current < 1:
            raise InputError(f"n_cells ({n_cells}) and n_current ({n_current}) must be >= 1")
        self.config = config
        self.sizes: dict[Group, int] = {
            "voltage": n_cells,
            "temperature": n_cells if n_temperature is None else n_temperature,
            "current": n_current,
        }
        if self.sizes["temperature"] < 1:
            raise InputError(f"n_temperature must be >= 1, got {n_temperature}")
        self._state = {k: _KindState(self.sizes[_KIND_SPEC[k][0]]) for k in KINDS}
        self.last_ts = -np.inf

    # -- the limit of a kind, signed as the measured value is ----------------------
    def _signed_limit(self, kind: Kind) -> float:
        return self.config.threshold(kind).limit * _KIND_SPEC[kind][2]

    def _channel(self, kind: Kind, j: int) -> int | None:
        group = _KIND_SPEC[kind][0]
        if group == "current" and self.sizes["current"] == 1:
            return None
        return j

    def _as_group(self, name: str, value: npt.ArrayLike, group: Group) -> FloatArray:
        a = np.asarray(value, dtype=float)
        n = self.sizes[group]
        if a.ndim == 0:
            a = np.full(n, float(a))
        if a.shape != (n,):
            raise InputError(f"{name} must have {n} values, got shape {list(a.shape)}")
        return a

    # -- the step ---------------------------------------------------------------------
    def update(
        self,
        ts: float,
        cell_v: npt.ArrayLike,
        temp_c: npt.ArrayLike,
        current_a: npt.ArrayLike,
    ) -> list[Alarm]:
        """Check one sample of every channel; returns the alarms that tripped or (for
        non-latching kinds) cleared at this sample."""
        ts = float(ts)
        if not np.isfinite(ts):
            raise InputError(f"ts must be finite, got {ts}")
        if ts < self.last_ts:
            raise InputError(f"ts went backwards: {ts} after {self.last_ts}")
        values: dict[Group, FloatArray] = {
            "voltage": self._as_group("cell_v", cell_v, "voltage"),
            "temperature": self._as_group("temp_c", temp_c, "temperature"),
            "current": self._as_group("current_a", current_a, "current"),
        }
        self.last_ts = ts
        # the usual sample: every channel valid and inside its limits (min/max are NaN,
        # so not "inside", when a channel is missing)
        bounds = {g: (float(a.min()), float(a.max())) for g, a in values.items()}
        events: list[Alarm] = []
        for kind in KINDS:
            group, direction, _ = _KIND_SPEC[kind]
            th = self.config.threshold(kind)
            limit = self._signed_limit(kind)
            v = values[group]
            st = self._state[kind]
            lo, hi = bounds[group]
            inside = hi <= limit if direction > 0 else lo >= limit
            if inside and not st.count.any() and not st.active.any():
                # nothing pending, nothing active, nothing beyond: only the last value
                # moves (count == 0 implies since is NaN; see below)
                st.last = v.copy()
                continue
            valid = np.isfinite(v)
            excess = direction * (v - limit)  # > 0: beyond the limit
            viol = valid & (excess > 0)
            ok = valid & ~viol
            # a dropout (NaN) leaves the pending count and its start as they were
            st.count = np.where(viol, st.count + 1, np.where(ok, 0, st.count))
            st.since = np.where(viol & np.isnan(st.since), ts, np.where(ok, np.nan, st.since))
            st.last = np.where(valid, v, st.last)
            held = viol & (st.count >= th.debounce_samples) & (ts - st.since >= th.debounce_s)
            new = held & ~st.active
            if new.any():
                st.active = st.active | new
                st.trip_ts = np.where(new, ts, st.trip_ts)
                st.trip_value = np.where(new, v, st.trip_value)
                events += [
                    Alarm(kind, self._channel(kind, int(j)), float(v[j]), limit, ts)
                    for j in np.flatnonzero(new)
                ]
            if not th.latching:
                back = st.active & valid & (excess < -th.hysteresis)
                if back.any():
                    st.active = st.active & ~back
                    events += [
                        Alarm(kind, self._channel(kind, int(j)), float(v[j]), limit, ts, "clear")
                        for j in np.flatnonzero(back)
                    ]
        return events

    # -- queries and the operator's clear -------------------------------------------
    def active(self) -> list[Alarm]:
        """The alarms now active, each with the value and time at which it tripped."""
        out: list[Alarm] = []
        for kind in KINDS:
            st = self._state[kind]
            limit = self._signed_limit(kind)
            out += [
                Alarm(
                    kind,
                    self._channel(kind, int(j)),
                    float(st.trip_value[j]),
                    limit,
                    float(st.trip_ts[j]),
                )
                for j in np.flatnonzero(st.active)
            ]
        return out

    def active_mask(self, kind: Kind) -> BoolArray:
        """Which channels of ``kind`` are tripped (a copy)."""
        return self._state[kind].active.copy()

    @property
    def tripped(self) -> bool:
        return any(self._state[k].active.any() for k in KINDS)

    def clear(self, kind: Kind | None = None, cell: int | None = None) -> ClearResult:
        """Clear active alarms (all, one kind, and/or one channel).

        Refused for a channel whose last value is still within the hysteresis band of the
        limit (the condition still holds) or is unknown (no valid sample since the trip).
        """
        if kind is not None and kind not in KINDS:
            raise InputError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        cleared: list[Alarm] = []
        refused: list[tuple[Alarm, str]] = []
        for k in KINDS if kind is None else (kind,):
            group, direction, _ = _KIND_SPEC[k]
            st = self._state[k]
            th = self.config.threshold(k)
            limit = self._signed_limit(k)
            sel = st.active.copy()
            if cell is not None:
                if not 0 <= cell < self.sizes[group]:
                    raise InputError(
                        f"cell must be in 0..{self.sizes[group] - 1} for {k}, got {cell}"
                    )
                only = np.zeros_like(sel)
                only[cell] = True
                sel &= only
            last = st.last
            beyond = np.isfinite(last) & (direction * (last - limit) < -th.hysteresis)
            for j in np.flatnonzero(sel):
                alarm = Alarm(k, self._channel(k, int(j)), float(last[j]), limit, self.last_ts)
                if beyond[j]:
                    cleared.append(
                        Alarm(k, alarm.cell, alarm.value, limit, float(self.last_ts), "clear")
                    )
                elif not np.isfinite(last[j]):
                    refused.append((alarm, "no valid sample since the trip"))
                else:
                    refused.append(
                        (
                            alarm,
                            f"value {last[j]:g} is not back past {limit:g} by the "
                            f"hysteresis {th.hysteresis:g}",
                        )
                    )
            st.active = st.active & ~(sel & beyond)
        return ClearResult(cleared, refused)

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (config, channel counts and every kind's arrays)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.model_dump(),
            "sizes": dict(self.sizes),
            "last_ts": None if not np.isfinite(self.last_ts) else self.last_ts,
            "kinds": {
                k: {
                    "count": self._state[k].count.tolist(),
                    "since": _nan_to_none(self._state[k].since),
                    "active": self._state[k].active.tolist(),
                    "trip_ts": _nan_to_none(self._state[k].trip_ts),
                    "trip_value": _nan_to_none(self._state[k].trip_value),
                    "last": _nan_to_none(self._state[k].last),
                }
                for k in KINDS
            },
        }

    @classmethod
    def from_state_dict(cls, data: dict[str, Any]) -> SafetyMonitor:
        if data.get("format") != STATE_FORMAT:
            raise InputError(f"format must be {STATE_FORMAT!r}, got {data.get('format')!r}")
        try:
            config = SafetyConfig.model_validate(data["config"])
            sizes = data["sizes"]
            mon = cls(
                config,
                int(sizes["voltage"]),
                n_temperature=int(sizes["temperature"]),
                n_current=int(sizes["current"]),
            )
            mon.last_ts = -np.inf if data["last_ts"] is None else float(data["last_ts"])
            for k in KINDS:
                src = data["kinds"][k]
                st = mon._state[k]
                n = st.count.size
                st.count = np.asarray(src["count"], dtype=np.int64)
                st.since = _none_to_nan(src["since"])
                st.active = np.asarray(src["active"], dtype=bool)
                st.trip_ts = _none_to_nan(src["trip_ts"])
                st.trip_value = _none_to_nan(src["trip_value"])
                st.last = _none_to_nan(src["last"])
                for name in ("count", "since", "active", "trip_ts", "trip_value", "last"):
                    if getattr(st, name).shape != (n,):
                        raise InputError(f"kinds.{k}.{name} must have {n} values")
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"invalid safety state: {exc!r}") from exc
        return mon
