"""Load profiles for the ground-truth cell: EPA drive cycles through a vehicle model,
a synthetic urban cycle, random pulses, CC-CV charging. Pure numpy (fastsim is
imported only to read its bundled EPA cycles).

Vehicle model (:class:`Vehicle`): a mid-size EV, road-load equation at the wheels,

    F = m_eff * a + 0.5 * rho * CdA * v^2 + Crr * m * g   (while moving; grade 0)
    P_wheel = F * v
    P_battery = min(P_wheel, P_max) / eta_drive + P_aux                  (P_wheel >= 0)
    P_battery = max(P_wheel * regen_fraction * eta_regen, -P_regen_max) + P_aux  (braking)

and the pack of ``series x parallel`` identical cells shares it evenly:
P_cell = P_battery / (series * parallel). Defaults give ~130 Wh/km at the battery on
UDDS and HWFET and cell peaks of ~2.5C (UDDS) and ~2.2C (HWFET).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

# fastsim 3 ships these two EPA cycles; the others its docs mention (US06, LA92,
# WLTP) are downloads, which this project never does.
EPA_CYCLES = ("udds", "hwfet")


@dataclass(frozen=True)
class Vehicle:
    """A simple battery-electric car (SI units)."""

    mass_kg: float = 1800.0  # curb + driver + pack
    rotating_mass_factor: float = 1.05  # wheels, motor: m_eff = factor * m
    cda_m2: float = 0.62  # drag coefficient x frontal area (0.27 x 2.3 m^2)
    crr: float = 0.009  # rolling resistance coefficient
    air_density: float = 1.2
    eta_drive: float = 0.88  # battery -> wheel (inverter, motor, gear)
    eta_regen: float = 0.85  # wheel -> battery while braking
    regen_fraction: float = 0.65  # share of braking power the motor takes (rest: friction)
    regen_max_w: float = 30_000.0  # at the battery: ~1.8C per cell
    max_wheel_power_w: float = 40_000.0  # traction limit: ~2.7C per cell
    aux_w: float = 400.0  # 12 V loads, electronics (no heating/AC)
    series: int = 96
    parallel: int = 9

    @property
    def cells(self) -> int:
        return self.series * self.parallel

    def battery_power_w(self, speed_mps: FloatArray, dt_s: float = 1.0) -> FloatArray:
        """Pack power (W, positive = discharge) for a speed trace sampled every dt_s."""
        v = np.asarray(speed_mps, dtype=float)
        if v.ndim != 1 or v.size < 2:
            raise ValueError(f"speed trace: need a 1-D array of >= 2 samples, got {v.shape}")
        if np.any(v < 0):
            raise ValueError(f"speed trace: negative speed {v.min():.3f} m/s")
        accel = np.gradient(v, dt_s)
        g = 9.81
        moving = v > 0.1
        force = (
            self.rotating_mass_factor * self.mass_kg * accel
            + 0.5 * self.air_density * self.cda_m2 * v**2
            + self.crr * self.mass_kg * g * moving
        )
        p_wheel = force * v
        p_batt = np.where(
            p_wheel >= 0,
            np.minimum(p_wheel, self.max_wheel_power_w) / self.eta_drive,
            np.maximum(p_wheel * self.regen_fraction * self.eta_regen, -self.regen_max_w),
        )
        return np.asarray(p_batt + self.aux_w, dtype=float)

    def cell_power_w(self, speed_mps: FloatArray, dt_s: float = 1.0) -> FloatArray:
        return self.battery_power_w(speed_mps, dt_s) / self.cells

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def epa_cycle(name: str) -> FloatArray:
    """Speed (m/s) at 1 s of an EPA cycle bundled with fastsim ("udds", "hwfet")."""
    if name not in EPA_CYCLES:
        raise ValueError(f"cycle={name!r}: one of {EPA_CYCLES}")
    import fastsim

    data = fastsim.Cycle.from_resource(f"{name}.csv").to_dict()
    t = np.asarray(data["time_seconds"], dtype=float)
    v = np.asarray(data["speed_meters_per_second"], dtype=float)
    if not np.allclose(np.diff(t), 1.0):
        raise ValueError(f"cycle {name}: expected 1 s samples")
    return v


def synthetic_urban_cycle(
    rng: np.random.Generator, duration_s: int = 1400, vehicle: Vehicle | None = None
) -> FloatArray:
    """A stop-and-go speed trace (m/s, 1 s): idle, accelerate to a random cruise speed,
    cruise with drift and speed changes, brake to a stop; repeated. Accelerations
    0.6-1.8 m/s^2 but at most what 20-35 kW moves (``vehicle``'s mass, per trip: a
    calm or a brisk driver), decelerations 0.8-2.2 m/s^2, cruise 6-25 m/s: the range
    of urban and suburban EPA cycles, without being any of them (UDDS stays held out)."""
    vehicle = vehicle or Vehicle()
    m_eff = vehicle.rotating_mass_factor * vehicle.mass_kg
    v: list[float] = []
    while len(v) < duration_s:
        v.extend([0.0] * int(rng.integers(5, 40)))
        speed = 0.0
        power = float(rng.uniform(20e3, 35e3))
        for _ in range(int(rng.integers(1, 4))):  # 1-3 cruise levels per trip
            target = float(rng.uniform(6.0, 25.0))
            rate = float(rng.uniform(0.6, 1.8)) if target > speed else -float(rng.uniform(0.5, 1.5))
            while (target - speed) * np.sign(rate) > 0:
                if rate > 0:
                    step = min(rate, power / (m_eff * max(speed, 1.0)))
                    speed = min(speed + step, target)
                else:
                    speed = max(speed + rate, target)
                v.append(speed)
            for _ in range(int(rng.integers(10, 90))):
                speed = float(np.clip(speed + rng.normal(0.0, 0.3), 3.0, 27.0))
                v.append(speed)
        decel = float(rng.uniform(0.8, 2.2))
        while speed > 0:
            speed = max(speed - decel, 0.0)
            v.append(speed)
    trace = np.asarray(v[:duration_s], dtype=float)
    trace[-1] = 0.0
    # 3-s moving average: drivers do not change acceleration within a second.
    kernel = np.ones(3) / 3.0
    smooth = np.convolve(np.pad(trace, 1, mode="edge"), kernel, mode="valid")
    return np.asarray(np.maximum(smooth, 0.0), dtype=float)


def repeat_to(values: FloatArray, duration_s: float) -> FloatArray:
    """``values`` (1 s samples) repeated until it covers ``duration_s``."""
    n = int(np.ceil(duration_s)) + 1
    reps = int(np.ceil(n / values.size))
    return np.tile(values, reps)[:n]


def pulse_profile(
    rng: np.random.Generator,
    duration_s: float,
    capacity_ah: float = 5.0,
    mean_c_rate: float = 0.4,
) -> tuple[FloatArray, FloatArray]:
    """Random current pulses with rests (time breakpoints, current in A; hold each
    value until the next breakpoint). Discharge pulses 0.2-2C for 2-60 s, charge
    pulses 0.2-1.5C for 2-30 s, rests 2-120 s; discharge pulses are scaled so the
    average current is ~``mean_c_rate`` x capacity (a net discharge), and every level
    is clipped to [-1.5C, 2.5C]."""
    times = [0.0]
    levels: list[float] = []
    t = 0.0
    while t < duration_s:
        kind = rng.choice(3, p=[0.5, 0.2, 0.3])
        if kind == 0:
            level, dur = rng.uniform(0.2, 2.0), rng.uniform(2, 60)
        elif kind == 1:
            level, dur = -rng.uniform(0.2, 1.5), rng.uniform(2, 30)
        else:
            level, dur = 0.0, rng.uniform(2, 120)
        dur = float(np.round(dur))
        levels.append(float(level) * capacity_ah)
        t += dur
        times.append(t)
    tb = np.asarray(times)
    lv = np.asarray(levels)
    durations = np.diff(tb)
    mean = float(np.sum(lv * durations) / np.sum(durations))
    # Scale discharge pulses so the profile drains at the wanted average rate.
    want = mean_c_rate * capacity_ah
    dis = lv > 0
    charge_part = float(np.sum(lv[~dis] * durations[~dis]))
    dis_part = float(np.sum(lv[dis] * durations[dis]))
    if dis_part > 0 and mean != want:
        lv = np.where(dis, lv * (want * np.sum(durations) - charge_part) / dis_part, lv)
    lv = np.clip(lv, -1.5 * capacity_ah, 2.5 * capacity_ah)
    return tb, lv


def step_series(
    breakpoints: FloatArray, levels: FloatArray, edge_s: float = 0.05
) -> tuple[FloatArray, FloatArray]:
    """Sample-and-hold levels as a piecewise-linear series with ``edge_s`` ramps, for a
    linear interpolant: level i holds on [t_i, t_{i+1}) and ramps over edge_s."""
    if breakpoints.size != levels.size + 1:
        raise ValueError(f"{breakpoints.size} breakpoints for {levels.size} levels")
    t = [float(breakpoints[0])]
    y = [float(levels[0])]
    for i in range(1, levels.size):
        edge = float(breakpoints[i])
        t += [edge, edge + edge_s]
        y += [float(levels[i - 1]), float(levels[i])]
    t.append(float(breakpoints[-1]))
    y.append(float(levels[-1]))
    return np.asarray(t), np.asarray(y)
