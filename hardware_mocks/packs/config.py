"""Configuration of the pack telemetry simulator, validated with errors naming field and value."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LoadKind = Literal["drive", "urban", "highway", "pulse", "constant", "rest"]
LOAD_KINDS: tuple[str, ...] = ("drive", "urban", "highway", "pulse", "constant", "rest")


class PackConfigError(ValueError):
    """A pack simulator config that does not validate; the message names field and value."""


class PackSimConfig(BaseModel):
    """N packs of M series cells (one string per pack), their loads, sensors and telemetry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Layout and identity.
    n_packs: int = Field(default=4, ge=1, le=10_000)
    n_cells: int = Field(default=96, ge=1, le=1_000)
    seed: int = 0
    pack_id_prefix: str = Field(default="pack-", pattern=r"^[A-Za-z0-9_-]*$")
    topic_prefix: str = Field(default="bms/v1", min_length=1)
    start_ts: float | None = Field(
        default=None, ge=0.0, description="epoch seconds of simulated t=0; None: wall time"
    )

    # Cells (the design of hardware_mocks.physics.cell.CellParams) and their spread.
    capacity_ah: float = Field(default=5.0, gt=0.0, le=1000.0)
    capacity_spread: float = Field(default=0.01, ge=0.0, le=0.2)  # relative std
    resistance_spread: float = Field(default=0.05, ge=0.0, le=0.3)  # relative std of R0
    soc_spread: float = Field(default=0.01, ge=0.0, le=0.2)  # std of cell SOC in a pack
    initial_soc: tuple[float, float] = (0.5, 0.9)  # pack mean SOC drawn within this range
    ageing: bool = False  # capacity fade / resistance growth with throughput

    # Thermal.
    ambient_c: float = Field(default=25.0, ge=-40.0, le=60.0)
    initial_temp_c: float | None = Field(default=None, ge=-40.0, le=80.0)  # None: ambient
    cooling_w_k: float = Field(default=0.10, gt=0.0, le=100.0)  # per cell, to ambient
    cells_per_temp_sensor: int = Field(default=8, ge=1, le=1_000)

    # Pack controller limits per cell (the ranges keep v_min below v_max).
    v_min: float = Field(default=2.8, ge=2.5, le=3.6)
    v_max: float = Field(default=4.15, ge=3.8, le=4.2)

    # Loads: pack i runs loads[i % len(loads)], from a seeded random phase if phase_offsets.
    loads: tuple[LoadKind, ...] = Field(default=("drive",), min_length=1)
    phase_offsets: bool = True
    peak_c_rate: float = Field(default=2.0, gt=0.0, le=20.0)  # drive: peak discharge power
    constant_c_rate: float = Field(default=0.5, gt=0.0, le=20.0)
    pulse_c_rate: float = Field(default=2.0, gt=0.0, le=20.0)
    charge_c_rate: float = Field(default=0.5, gt=0.0, le=10.0)  # recharge when empty

    # Sensors (contract 5 telemetry).
    v_noise_mv: float = Field(default=2.0, ge=0.0, le=1000.0)
    v_quant_mv: float = Field(default=1.0, ge=0.0, le=100.0)  # 0: no quantization
    i_gain_error: float = Field(default=0.005, ge=0.0, le=0.5)  # std of the per-pack gain error
    i_offset_a: float = Field(default=0.05, ge=0.0, le=100.0)  # std of the per-pack offset
    i_noise_a: float = Field(default=0.02, ge=0.0, le=100.0)
    t_offset_c: float = Field(default=0.5, ge=0.0, le=20.0)  # std of the per-sensor offset
    t_noise_c: float = Field(default=0.1, ge=0.0, le=20.0)
    t_quant_c: float = Field(default=0.1, ge=0.0, le=10.0)
    noise_burst_mv: float = Field(default=50.0, gt=0.0, le=5000.0)  # sigma during a burst

    # Integration and recording.
    max_step_s: float = Field(default=1.0, gt=0.0, le=60.0)  # physics sub-step
    record_every: int = Field(default=1, ge=0)  # truth every k-th advance; 0: off

    @model_validator(mode="after")
    def _ranges(self) -> PackSimConfig:
        lo, hi = self.initial_soc
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"initial_soc must be (low, high) within 0..1, got {self.initial_soc}")
        return self

    @property
    def pack_ids(self) -> list[str]:
        return [f"{self.pack_id_prefix}{i:03d}" for i in range(self.n_packs)]

    @property
    def n_temp_sensors(self) -> int:
        return -(-self.n_cells // self.cells_per_temp_sensor)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<pack config>") -> PackSimConfig:
        """Validate ``data``; a failure raises :class:`PackConfigError` listing
        ``field = value: problem`` for every bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise PackConfigError(_describe(exc, source)) from exc


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        problems.append(f"{field} = {err.get('input')!r}: {err['msg']}")
    return f"invalid pack simulator config ({source}):\n  " + "\n  ".join(problems)


def load_pack_config(path: str | Path, **overrides: Any) -> PackSimConfig:
    """A config from a TOML file (top-level keys, or a ``[packs]`` table), then ``overrides``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise PackConfigError(f"cannot read pack config {p}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PackConfigError(f"{p}: not valid TOML: {exc}") from exc
    table = data.get("packs", data)
    if not isinstance(table, dict):
        raise PackConfigError(f"{p}: [packs] must be a table, got {table!r}")
    return PackSimConfig.from_mapping({**table, **overrides}, str(p))
