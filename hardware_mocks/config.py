"""The lab configuration (TOML), validated with errors that point at the line."""

from __future__ import annotations

import importlib
import math
import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from hardware_mocks.physics.materials import SOLVENTS
from hardware_mocks.world import ElectrolyteModel

DEFAULT_LAB = "default_lab.toml"

# kind -> "module:Class". Lazy so that a lab without a cycler never imports it.
SIMULATORS: dict[str, str] = {
    "balance": "hardware_mocks.instruments.balance:BalanceSimulator",
    "pump": "hardware_mocks.instruments.pump:PumpNetworkSimulator",
    "robot": "hardware_mocks.instruments.robot:RobotSimulator",
    "stirrer": "hardware_mocks.instruments.stirrer:StirrerSimulator",
    "chamber": "hardware_mocks.instruments.chamber:ChamberSimulator",
    "meter": "hardware_mocks.instruments.meter:ConductivityMeterSimulator",
    "cycler": "hardware_mocks.instruments.cycler:CyclerSimulator",
}


class ConfigError(ValueError):
    """A lab config that does not validate; the message names file, line, field and value."""


class ReagentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    solvent_fractions: dict[str, float]
    salt_molality: float = Field(default=0.0, ge=0.0, le=6.0)
    density_g_ml: float | None = Field(default=None, gt=0.3, lt=3.0)

    @field_validator("solvent_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SOLVENTS))
        if unknown:
            raise ValueError(f"unknown solvent(s) {unknown}; allowed {list(SOLVENTS)}")
        if not all(math.isfinite(x) and x >= 0 for x in v.values()):
            raise ValueError(f"fractions must be finite and >= 0, got {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {v}")
        return v


class InstrumentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in SIMULATORS:
            raise ValueError(f"unknown instrument kind {v!r}; known: {sorted(SIMULATORS)}")
        return v


_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")


def _broker_url(v: str) -> str:
    from hardware_mocks.packs.publisher import parse_broker_url

    parse_broker_url(v)  # raises ValueError naming what is wrong
    return v


def _topic_prefix(v: str) -> str:
    if not all(_TOPIC_LEVEL.match(level) for level in v.split("/")):
        raise ValueError(
            f"must be topic levels of letters, digits, '_', '.', '-' joined by '/' "
            f"(no wildcards, no empty level), got {v!r}"
        )
    return v


# The cycler's telemetry options, as annotations the lab's option check validates (so a
# bad value in lab.toml is reported as `options.telemetry_url = ...: <why>`).
BrokerUrlOption = Annotated[str, AfterValidator(_broker_url)]
TopicPrefixOption = Annotated[str, AfterValidator(_topic_prefix)]
PeriodOption = Annotated[float, Field(gt=0.0, le=86400.0, allow_inf_nan=False)]


class CyclerTelemetryConfig(BaseModel):
    """The cycler's optional MQTT telemetry (its options ``telemetry_url``,
    ``telemetry_prefix``, ``telemetry_period_s``): contract-5 telemetry of every channel
    that has a cell on ``<prefix>/<name>-ch<N>/telemetry`` and the simulator's ground truth
    on ``sim/v1/<name>-ch<N>/truth``, one sample per ``period_s`` of lab time."""

    model_config = ConfigDict(extra="forbid")
    url: BrokerUrlOption | None = None  # None: off
    prefix: TopicPrefixOption = "bms/v1"
    period_s: PeriodOption = 30.0


class LabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    speed: float = Field(default=1.0, gt=0.0, le=1e6)
    ambient_c: float = Field(default=25.0, ge=-40.0, le=60.0)
    rack_slots: int = Field(default=12, ge=1, le=96)
    electrolyte_model: str = "hardware_mocks.physics.electrolyte:landesfeind_blend"
    transport: Literal["pty", "tcp"] = "tcp"
    reagents: list[ReagentConfig] = Field(default_factory=list)
    instruments: list[InstrumentConfig] = Field(default_factory=list)

    @field_validator("electrolyte_model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        if not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"must look like 'package.module:function', got {v!r}")
        return v

    @field_validator("reagents")
    @classmethod
    def _unique_reagents(cls, v: list[ReagentConfig]) -> list[ReagentConfig]:
        names = [r.name for r in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reagent names must be unique, repeated: {dupes}")
        return v

    @field_validator("instruments")
    @classmethod
    def _unique(cls, v: list[InstrumentConfig]) -> list[InstrumentConfig]:
        names = [i.name for i in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"instrument names must be unique, repeated: {dupes}")
        return v

    def load_electrolyte_model(self) -> ElectrolyteModel:
        module, _, func = self.electrolyte_model.partition(":")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"electrolyte_model = {self.electrolyte_model!r}: {exc}") from exc
        if not callable(fn):
            raise ConfigError(f"electrolyte_model = {self.electrolyte_model!r} is not callable")
        return fn  # type: ignore[no-any-return]


def _line_of(text: str, loc: Sequence[int | str]) -> int | None:
    """Best-effort line number (1-based) of a pydantic error location in TOML text."""
    lines = text.splitlines()
    start = 0
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
        header = re.compile(rf"^\s*\[\[\s*{re.escape(loc[0])}\s*\]\]")
        seen = -1
        for i, line in enumerate(lines):
            if header.match(line):
                seen += 1
                if seen == loc[1]:
                    start = i
                    break
        else:
            return None
        keys = [k for k in loc[2:] if isinstance(k, str)]
        if not keys:
            return start + 1
        key = keys[0]
    elif loc and isinstance(loc[0], str):
        key = loc[0]
    else:
        return None
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|[{{,]\s*{re.escape(key)}\s*=")
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[[") and len(loc) >= 2:
            break
        if pattern.search(lines[i]):
            return i + 1
    return start + 1 if len(loc) >= 2 else None


def parse_lab_config(text: str, source: str = "<lab config>") -> LabConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return LabConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            line = _line_of(text, loc)
            where = f"{source}:{line}" if line else source
            field = ".".join(str(p) for p in loc)
            problems.append(f"{where}: {field} = {err.get('input')!r}: {err['msg']}")
        raise ConfigError("invalid lab config:\n  " + "\n  ".join(problems)) from exc


def load_lab_config(path: str | Path | None = None) -> LabConfig:
    """Load a lab config from ``path``, or the default lab shipped with the package."""
    if path is None:
        text = resources.files("hardware_mocks").joinpath(DEFAULT_LAB).read_text()
        return parse_lab_config(text, f"hardware_mocks/{DEFAULT_LAB}")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read lab config {p}: {exc.strerror}") from exc
    return parse_lab_config(text, str(p))
