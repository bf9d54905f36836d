"""A synthetic 5 Ah cell and an ECM simulator that generates data the filters can be
judged on exactly (the simulator uses CellModel.lookup, not the filters' fast path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.filters import FilterNoise

SOC_GRID = np.linspace(0.0, 1.0, 21)
T_GRID = np.array([0.0, 25.0, 45.0])


# The noise the filter tests run with (a 5 Ah test cell, its current sensor included):
# shared by test_filters.py and test_capacity_consider.py.
FILTER_NOISE = FilterNoise(
    soc_per_sqrt_s=1e-5, v1_v_per_sqrt_s=1e-4, v2_v_per_sqrt_s=5e-5, voltage_v=2e-3, current_a=0.05
)


def synthetic_cell_dict(capacity_ah: float = 5.0) -> dict[str, object]:
    """An NMC-like cell: OCV 3.0-4.2 V with a knee at low SOC, resistances rising in
    the cold and at low SOC. Smooth closed forms sampled on a 21 x 3 grid."""
    s = SOC_GRID[None, :]
    t = T_GRID[:, None]
    ocv = (
        3.3
        + 0.85 * s
        - 0.25 * np.exp(-s / 0.06)
        + 0.05 * np.tanh((s - 0.55) / 0.08)
        + 5e-4 * (t - 25.0)
    )
    cold = np.exp(0.025 * (25.0 - t))
    ones = np.ones_like(ocv)
    return {
        "name": "synthetic-5ah",
        "capacity_ah": capacity_ah,
        "soc": SOC_GRID.tolist(),
        "temperature_c": T_GRID.tolist(),
        "ocv_v": ocv.tolist(),
        "r0_ohm": (0.015 * (1 + 0.4 * (1 - s) ** 2) * cold).tolist(),
        "r1_ohm": (0.008 * (1 + 0.5 * (1 - s)) * cold).tolist(),
        "tau1_s": ((8.0 + 4.0 * s) * ones).tolist(),
        "r2_ohm": (0.012 * (1 + 0.3 * (1 - s)) * cold).tolist(),
        "tau2_s": ((150.0 + 50.0 * s) * ones).tolist(),
        "limits": {"v_min": 2.5, "v_max": 4.2, "i_discharge_max_a": 15, "i_charge_max_a": 7.5},
        "source": {"kind": "synthetic test cell"},
    }


@pytest.fixture(scope="session")
def cell() -> CellModel:
    return CellModel.from_dict(synthetic_cell_dict())


@pytest.fixture
def cell_file(cell: CellModel, tmp_path: Path) -> Path:
    return cell.save(tmp_path / "synthetic.json")


def pulse_profile(
    rng: np.random.Generator, n_steps: int, lo: float = -5.0, hi: float = 10.0
) -> np.ndarray:
    """Piecewise-constant current (A, + = discharge): random levels held 10-120 samples,
    a third of them rests."""
    out = np.empty(n_steps)
    k = 0
    while k < n_steps:
        hold = int(rng.integers(10, 120))
        level = 0.0 if rng.random() < 1 / 3 else float(rng.uniform(lo, hi))
        out[k : k + hold] = level
        k += hold
    return out


@dataclass
class Simulated:
    t: np.ndarray  # [K] seconds
    current: np.ndarray  # [K, n] measured current (true + sensor noise)
    voltage: np.ndarray  # [K, n] measured voltage
    temperature: np.ndarray  # [K, n]
    soc: np.ndarray  # [K, n] true SOC


def simulate(
    model: CellModel,
    current: np.ndarray,
    soc0: np.ndarray,
    rng: np.random.Generator,
    *,
    dt: np.ndarray | float = 1.0,
    temperature: float | np.ndarray = 25.0,
    noise: FilterNoise | None = None,
) -> Simulated:
    """True ECM trajectories of n cells for a current profile [K] or [K, n], with the
    process noise, current-sensor noise and voltage noise that ``noise`` describes (the
    same discretisation as the filters: sample k-1's current held over interval k)."""
    # a synthetic cell with little slow model error (the filters default to more)
    noise = noise or FilterNoise(v2_v_per_sqrt_s=2e-4)
    k_steps = current.shape[0]
    n = soc0.size
    i_true = np.broadcast_to(current.reshape(k_steps, -1), (k_steps, n))
    dts = np.broadcast_to(np.asarray(dt, dtype=float), (k_steps,))
    temp = np.broadcast_to(np.asarray(temperature, dtype=float), (k_steps, n))
    soc = np.array(soc0, dtype=float)
    v1 = np.zeros(n)
    v2 = np.zeros(n)
    out_soc = np.empty((k_steps, n))
    out_v = np.empty((k_steps, n))
    i_prev = np.zeros(n)
    for k in range(k_steps):
        d = dts[k] if k else 0.0
        soc = soc - d * i_prev / (3600 * model.capacity_ah)
        soc = soc + rng.normal(0, noise.soc_per_sqrt_s * np.sqrt(d), n)
        p = model.lookup(soc, temp[k])
        a1, a2 = np.exp(-d / p.tau1), np.exp(-d / p.tau2)
        v1 = (
            a1 * v1
            + p.r1 * (1 - a1) * i_prev
            + rng.normal(0, noise.v1_v_per_sqrt_s * np.sqrt(d), n)
        )
        v2 = (
            a2 * v2
            + p.r2 * (1 - a2) * i_prev
            + rng.normal(0, noise.v2_v_per_sqrt_s * np.sqrt(d), n)
        )
        out_soc[k] = soc
        out_v[k] = p.ocv - i_true[k] * p.r0 - v1 - v2 + rng.normal(0, noise.voltage_v, n)
        i_prev = i_true[k]
    measured_i = (
        i_true + rng.normal(0, noise.current_a, i_true.shape) if noise.current_a else i_true
    )
    t = np.concatenate([[0.0], np.cumsum(dts[1:])])
    return Simulated(t, np.array(measured_i), out_v, np.array(temp), out_soc)
