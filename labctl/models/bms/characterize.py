"""Characterization tests on the simulated fresh cell, written as a lab would have them:
a pseudo-OCV test (C/20 discharge and charge) and an HPPC pulse train, each at one
chamber temperature, as CSV ``time_s,current_a,voltage_v,temperature_c,step``
(cycler-grade measurement noise) plus one sidecar JSON describing the protocol.

Protocols (nominal capacity 5 Ah, 1C = 5 A, positive current = discharge):

* pseudo-OCV: start full (4.2 V OCV, at rest, soaked at the chamber temperature);
  rest 10 min; C/20 discharge to 2.5 V; rest 1 h; C/20 charge to 4.2 V; rest 1 h.
  Logged every 10 s.
* HPPC: start full, rest 10 min; at each SOC level (100 %, 90 %, ... 10 % of the
  nominal capacity counted from full): 10 s pulses at +1C, -1C, +2C, -2C, each followed
  by 40 s rest (a pulse ends early if the voltage reaches 2.5/4.2 V, as a cycler's
  safety limit would); then, except after the last level, a 1C discharge of 0.5 Ah
  (360 s, or to 2.5 V) and a 1 h rest. Pulses and the 40 s rests are logged every
  0.1 s, everything else every 1 s.

``step`` in the CSV indexes the sidecar's ``steps`` table (kind, set-point current,
planned duration, SOC level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labctl.models.bms import truth as tr
from labctl.models.bms.sensors import SensorModel

CSV_COLUMNS = ("time_s", "current_a", "voltage_v", "temperature_c", "step")

# A lab cycler (e.g. 0.02 % of range) and a thermocouple: far better than a BMS.
LAB_SENSOR = SensorModel(
    voltage_noise_v=1.0e-4,
    voltage_lsb_v=1.0e-4,
    current_noise_a=1.0e-3,
    current_lsb_a=1.0e-3,
    temperature_noise_c=0.05,
    temperature_lsb_c=0.01,
    gap_rate_per_s=0.0,
    nan_probability=0.0,
)


@dataclass(frozen=True)
class HppcProtocol:
    soc_levels: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    pulse_c_rates: tuple[float, ...] = (1.0, -1.0, 2.0, -2.0)  # + discharge, - charge
    pulse_s: float = 10.0
    pulse_rest_s: float = 40.0
    move_c_rate: float = 1.0
    rest_s: float = 3600.0
    initial_rest_s: float = 600.0
    pulse_dt: float = 0.1
    dt: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "soc_levels_nominal": list(self.soc_levels),
            "soc_step_ah": round(
                (self.soc_levels[0] - self.soc_levels[1]) * tr.NOMINAL_CAPACITY_AH, 6
            )
            if len(self.soc_levels) > 1
            else 0.0,
            "pulse_c_rates": list(self.pulse_c_rates),
            "pulse_currents_a": [c * tr.NOMINAL_CAPACITY_AH for c in self.pulse_c_rates],
            "pulse_s": self.pulse_s,
            "pulse_rest_s": self.pulse_rest_s,
            "soc_move_c_rate": self.move_c_rate,
            "rest_s": self.rest_s,
            "initial_rest_s": self.initial_rest_s,
            "sample_dt_pulse_s": self.pulse_dt,
            "sample_dt_s": self.dt,
            "pulse_voltage_limits_v": list(PULSE_LIMITS_V),
        }


@dataclass(frozen=True)
class OcvProtocol:
    c_rate: float = 0.05
    initial_rest_s: float = 600.0
    rest_s: float = 3600.0
    dt: float = 10.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "c_rate": self.c_rate,
            "current_a": self.c_rate * tr.NOMINAL_CAPACITY_AH,
            "initial_rest_s": self.initial_rest_s,
            "rest_s": self.rest_s,
            "sample_dt_s": self.dt,
            "voltage_limits_v": [tr.V_MIN, tr.V_MAX],
        }


# Pulse safety limits of the cycler. HPPC practice allows pulses a little past the
# operating window; with 4.2 V a 1C charge pulse would already be refused at 90 % SOC.
# A pulse that would start beyond a limit is skipped (its step has no rows); one that
# reaches a limit ends there.
PULSE_LIMITS_V = (tr.V_MIN, 4.3)

QUICK_HPPC = HppcProtocol(soc_levels=(1.0, 0.9), rest_s=600.0, initial_rest_s=60.0)


def hppc_segments(
    protocol: HppcProtocol, ambient_c: float
) -> tuple[list[tr.Segment], list[dict[str, Any]]]:
    """The HPPC as solver segments and the step table of the sidecar."""
    segments: list[tr.Segment] = []
    steps: list[dict[str, Any]] = []

    def add(kind: str, current: float, duration: float, dt: float, soc: float) -> None:
        segments.append(
            tr.Segment(
                duration_s=duration,
                value=current,
                ambient_c=ambient_c,
                stop_v={"pulse": PULSE_LIMITS_V, "soc_move": (tr.V_MIN, 100.0)}.get(kind),
                sample_dt=dt,
                label=f"{kind} {current:+.2f} A",
            )
        )
        steps.append(
            {
                "step": len(steps),
                "kind": kind,
                "current_a": current,
                "duration_s": duration,
                "soc_level_nominal": soc,
            }
        )

    cap = tr.NOMINAL_CAPACITY_AH
    add("rest", 0.0, protocol.initial_rest_s, protocol.dt, protocol.soc_levels[0])
    for n, soc in enumerate(protocol.soc_levels):
        for c in protocol.pulse_c_rates:
            add("pulse", c * cap, protocol.pulse_s, protocol.pulse_dt, soc)
            add("pulse_rest", 0.0, protocol.pulse_rest_s, protocol.pulse_dt, soc)
        if n + 1 < len(protocol.soc_levels):
            move_ah = (soc - protocol.soc_levels[n + 1]) * cap
            current = protocol.move_c_rate * cap
            add("soc_move", current, 3600.0 * move_ah / current, protocol.dt, soc)
            add("rest", 0.0, protocol.rest_s, protocol.dt, protocol.soc_levels[n + 1])
    return segments, steps


def ocv_segments(
    protocol: OcvProtocol, ambient_c: float
) -> tuple[list[tr.Segment], list[dict[str, Any]]]:
    current = protocol.c_rate * tr.NOMINAL_CAPACITY_AH
    long = 3.0 / protocol.c_rate * 3600.0  # the stop at 2.5/4.2 V ends it first
    plan = [
        ("rest", 0.0, protocol.initial_rest_s, None),
        ("discharge", current, long, (tr.V_MIN, 100.0)),
        ("rest", 0.0, protocol.rest_s, None),
        ("charge", -current, long, (-100.0, tr.V_MAX)),
        ("rest", 0.0, protocol.rest_s, None),
    ]
    segments = []
    steps = []
    for i, (kind, cur, dur, stop) in enumerate(plan):
        segments.append(
            tr.Segment(
                duration_s=dur,
                value=cur,
                ambient_c=ambient_c,
                stop_v=stop,
                sample_dt=protocol.dt,
                label=f"ocv {kind}",
            )
        )
        steps.append(
            {
                "step": i,
                "kind": kind,
                "current_a": cur,
                "duration_s": dur if kind == "rest" else None,
                "until_v": None if stop is None else (stop[0] if cur > 0 else stop[1]),
            }
        )
    return segments, steps


def run_test(
    cell: tr.CellSpec,
    segments: list[tr.Segment],
    ambient_c: float,
    out_csv: Path,
    seed: int,
) -> dict[str, Any]:
    """Simulate from full at rest and write the lab CSV; returns facts for the sidecar."""
    sim = tr.CellSim(cell, initial_soc=1.0, initial_temperature_c=ambient_c)
    trace, _ = sim.run_all(segments)
    t = trace.column("time_s")
    rng = np.random.default_rng(seed)
    _, meas = LAB_SENSOR.measure(
        t,
        trace.column("current_a"),
        trace.column("voltage_v"),
        trace.column("temperature_c"),
        rng,
    )
    step = np.concatenate(trace.step)
    # "+ 0.0" turns the -0.0 of a quantized tiny negative reading into 0.0.
    table = np.column_stack(
        [t, meas["current_a"] + 0.0, meas["voltage_v"], meas["temperature_c"], step]
    )
    write_csv(out_csv, CSV_COLUMNS, table, ("%.3f", "%.4f", "%.5f", "%.3f", "%d"))
    return {
        "rows": int(t.size),
        "duration_s": float(t[-1]),
        "terminations": trace.terminations,
        "discharged_ah_true_max": float(trace.column("discharged_ah").max()),
    }


def ocv_truth_table(cell: tr.CellSpec, capacity_ah: float, n: int = 201) -> np.ndarray:
    """The model's equilibrium OCV against true SOC (this file's definition):
    OCV = U_p(y) - U_n(x) on PyBaMM's stoichiometry window, SOC_true = 1 - Ah from
    full / capacity_ah. Chen2020 has no entropic term: the same at every temperature."""
    import pybamm

    win = tr.stoichiometry_window(cell)
    pv = tr.parameter_values(cell)
    s = np.linspace(0.0, 1.0, n)
    x = win["x_0"] + s * (win["x_100"] - win["x_0"])
    y = win["y_0"] + s * (win["y_100"] - win["y_0"])
    u_n = np.asarray(pv["Negative electrode OCP [V]"](pybamm.Vector(x)).evaluate()).ravel()
    u_p = np.asarray(pv["Positive electrode OCP [V]"](pybamm.Vector(y)).evaluate()).ravel()
    soc_true = 1.0 - (1.0 - s) * win["q_thermo_ah"] / capacity_ah
    return np.column_stack([soc_true, u_p - u_n])


def write_csv(
    path: Path, columns: tuple[str, ...], table: np.ndarray, fmt: tuple[str, ...]
) -> None:
    """Atomic CSV write (a temporary file renamed), so an interrupted run leaves no
    half file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    np.savetxt(tmp, table, fmt=list(fmt), delimiter=",", header=",".join(columns), comments="")
    tmp.replace(path)


def characterization_tasks(temperatures: tuple[float, ...], quick: bool) -> list[dict[str, Any]]:
    """One task per (test, temperature)."""
    tasks = []
    for temp in temperatures:
        tag = temperature_tag(temp)
        tasks.append({"test": "ocv", "temperature_c": temp, "file": f"ocv_{tag}.csv"})
        tasks.append({"test": "hppc", "temperature_c": temp, "file": f"hppc_{tag}.csv"})
    for i, task in enumerate(tasks):
        task["seed"] = 1000 + i
        task["quick"] = quick
    return tasks


def run_characterization_task(
    task: dict[str, Any], cell: tr.CellSpec, directory: Path
) -> dict[str, Any]:
    temp = float(task["temperature_c"])
    steps: list[dict[str, Any]]
    if task["test"] == "ocv":
        protocol: Any = OcvProtocol()
        segments, steps = ocv_segments(protocol, temp)
    elif task["test"] == "hppc":
        protocol = QUICK_HPPC if task["quick"] else HppcProtocol()
        segments, steps = hppc_segments(protocol, temp)
    else:
        raise ValueError(f"characterization test={task['test']!r}: 'ocv' or 'hppc'")
    facts = run_test(cell, segments, temp, directory / task["file"], int(task["seed"]))
    return {
        **task,
        "protocol": protocol.as_dict(),
        "steps": steps,
        **facts,
    }


def temperature_tag(temp: float) -> str:
    """-10 -> 'm10C', 25 -> '25C' (file names without minus signs)."""
    value = round(temp)
    return f"m{-value}C" if value < 0 else f"{value}C"


ProgressFn = Callable[[str], None]
