"""Telemetry of a small pack from the shipped cell model (OCV - I*R0, coulomb-counted SOC),
for the service tests; and a helper to build a config without a file."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edge_bms.cell import load_cell
from edge_bms.service.config import ServiceConfig

T0 = 1_700_000_000.0  # telemetry ts of the first sample (the fake service clock starts here)


def service_config(n_cells: int = 8, **over: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "instance": "test",
        "packs": [{"id": "p1", "n_cells": n_cells}],
        "estimator": {"correction": "none"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ServiceConfig.model_validate(data)


def samples(
    n_steps: int, n_cells: int = 8, *, seed: int = 0, dt: float = 1.0, t0: float = T0
) -> list[dict[str, Any]]:
    """Telemetry dicts: a 3 A discharge with 7 A pulses, cells from 70 % to 90 % SOC."""
    cell = load_cell()
    rng = np.random.default_rng(seed)
    soc = np.linspace(0.7, 0.9, n_cells)
    out = []
    for k in range(n_steps):
        i = 7.0 if (k // 20) % 3 == 0 else 3.0
        r0 = cell.lookup(soc, 25.0).r0
        v = cell.ocv(soc, 25.0) - i * r0 + 0.002 * rng.standard_normal(n_cells)
        out.append(
            {
                "ts": t0 + k * dt,
                "seq": k,
                "current_a": i,
                "cell_v": np.round(v, 4).tolist(),
                "temp_c": [25.0] * n_cells,
            }
        )
        soc = soc - i * dt / 3600.0 / cell.capacity_ah
    return out


def encode(sample: dict[str, Any]) -> bytes:
    return json.dumps(sample).encode()


class Clock:
    """A fake service clock."""

    def __init__(self, t: float = T0 + 100_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
