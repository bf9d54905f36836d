"""Test data for the cell model: cells cycled on the simulated cycler's physics.

Only tests import this (labctl runtime code never imports hardware_mocks). Each cell
gets its own fade and resistance-growth rate and electrolyte conductivity; all cells
step together (numpy arrays, one entry per cell) through CC-CV charge to 4.2 V and CC
discharge to 2.5 V at 1C, with a coarse time step (exact for the RC pairs at any dt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hardware_mocks.physics import cell as phys
from labctl.models.cell import CellCycles

CURVE_CYCLES = (2, 10)


def simulate_cells(
    n: int,
    cycles: int,
    *,
    seed: int = 0,
    dt: float = 120.0,
    fine_dt: float = 5.0,
    noise_ah: float = 2e-4,
) -> list[CellCycles]:
    """``n`` cells cycled ``cycles`` times; Q(V) kept for CURVE_CYCLES."""
    rng = np.random.default_rng(seed)
    fade = rng.uniform(0.0005, 0.004, n)
    growth = rng.uniform(0.001, 0.02, n)
    # CellParams fields are used elementwise, so per-cell arrays broadcast through step().
    params: Any = phys.CellParams(
        fade_per_efc=fade,  # type: ignore[arg-type]
        resistance_growth_per_efc=growth,  # type: ignore[arg-type]
    )
    kappa = rng.uniform(6.0, 12.0, n)
    state = phys.init_state(n, soc=0.0, params=params)
    state = phys.CellState(**{**state.__dict__, "kappa_ms_cm": kappa})
    cap = params.capacity_ah
    rows: list[dict[str, Any]] = []
    curves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    ids = np.arange(n)
    for cycle in range(1, cycles + 1):
        # Charge: CC 1C to 4.2 V, CV until the current falls below C/20 (or 3 h).
        start_charge = state.charge_ah.copy()
        r0, _, _ = phys.resistances(state, params)
        ctl = phys.Control(
            direction=np.full(n, phys.CHARGE), current_a=np.full(n, cap), voltage_v=np.full(n, 4.2)
        )
        for _ in range(int(3 * 3600 / dt)):
            state, current, _v = phys.step(state, ctl, params, 25.0, dt)
            done = (np.abs(current) < cap / 20) & (_v >= 4.19)
            ctl = phys.Control(
                direction=np.where(done, phys.IDLE, ctl.direction),
                current_a=ctl.current_a,
                voltage_v=ctl.voltage_v,
            )
            if (ctl.direction == phys.IDLE).all():
                break
        charged = start_charge - state.charge_ah
        # Discharge: CC 1C to 2.5 V.
        start = state.charge_ah.copy()
        ctl = phys.Control(
            direction=np.full(n, phys.DISCHARGE),
            current_a=np.full(n, cap),
            voltage_v=np.full(n, 2.5),
        )
        vs, qs = [], []
        v = np.full(n, 4.2)
        for _ in range(int(2 * 3600 / fine_dt)):
            # Coarse steps on the plateau, fine ones near the cutoff: the capacity a cell
            # delivers is resolved to about fine_dt * 1C (a few mAh), the fade signal.
            step_dt = dt if v.min() > 3.45 else fine_dt
            state, current, v = phys.step(state, ctl, params, 25.0, step_dt)
            vs.append(v)
            qs.append(state.charge_ah - start)
            # CC only: a cell stops once the limit clipped its current (it reached 2.5 V).
            ctl = phys.Control(
                direction=np.where(current < 0.999 * cap, phys.IDLE, ctl.direction),
                current_a=ctl.current_a,
                voltage_v=ctl.voltage_v,
            )
            if (ctl.direction == phys.IDLE).all():
                break
        discharged = state.charge_ah - start
        if cycle in CURVE_CYCLES:
            curves[cycle] = [(np.array(vs)[:, i], np.array(qs)[:, i]) for i in ids]
        q_meas = discharged + rng.normal(0.0, noise_ah, n)
        c_meas = charged + rng.normal(0.0, noise_ah, n)
        for i in ids:
            rows.append(
                {
                    "cell": int(i),
                    "cycle": cycle,
                    "charge_capacity_ah": float(c_meas[i]),
                    "discharge_capacity_ah": float(q_meas[i]),
                    "coulombic_efficiency": float(q_meas[i] / c_meas[i]),
                    "resistance_ohm": float(r0[i]),
                }
            )
    frame = pd.DataFrame(rows)
    return [
        CellCycles(
            summary=frame[frame["cell"] == i].drop(columns="cell").reset_index(drop=True),
            qv={c: curves[c][i] for c in CURVE_CYCLES},
            cell_id=f"cell-{i}",
        )
        for i in ids
    ]
