"""Pack load profiles: synthetic drive cycles through a simple vehicle model, pulses, CC, rest.

Every profile is a 1-s table of a signed C-rate (positive = discharge) that loops. A
drive profile is *power*-like: its C-rate is scaled at the nominal cell voltage, and the
simulator turns it into current at the pack's present voltage (constant power, as an
inverter draws). The other profiles are current profiles. Nothing is downloaded: the
speed traces are generated here from a seed (stop-and-go urban trips, highway cruising),
so they look like drive cycles without being any standard cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

V_NOMINAL = 3.7  # V per cell: the voltage at which power profiles are scaled to C-rates

# A mid-size EV; only the shape of the power trace matters (it is rescaled to peak_c_rate).
MASS_KG = 1800.0
CDA_M2 = 0.65  # drag coefficient x frontal area
CRR = 0.011
RHO_AIR = 1.2
G = 9.81
ETA_DRIVE = 0.90
ETA_REGEN = 0.60  # fraction of braking power that reaches the battery
AUX_W = 500.0


def _append_trip(
    speeds: list[float], rng: np.random.Generator, v_peak: float, cruise_s: float, stop_s: float
) -> None:
    """Accelerate to ``v_peak`` m/s, cruise with small fluctuations, brake, stand still."""
    accel = rng.uniform(0.8, 1.6)
    decel = rng.uniform(0.9, 1.8)
    v = speeds[-1] if speeds else 0.0
    while v < v_peak:
        v = min(v_peak, v + accel)
        speeds.append(v)
    phase = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(20.0, 60.0)
    for k in range(int(cruise_s)):
        wobble = 0.06 * v_peak * np.sin(2 * np.pi * k / period + phase)
        speeds.append(max(0.0, v_peak + wobble + rng.normal(0.0, 0.15)))
    v = speeds[-1]
    while v > 0.0:
        v = max(0.0, v - decel)
        speeds.append(v)
    speeds.extend([0.0] * int(stop_s))


def speed_trace(kind: str, seed: int, duration_s: int = 1800) -> FloatArray:
    """A synthetic speed trace in m/s at 1 s: ``urban``, ``highway`` or ``drive`` (both)."""
    rng = np.random.default_rng(seed)
    speeds: list[float] = [0.0]
    while len(speeds) < duration_s:
        if kind == "urban" or (kind == "drive" and (len(speeds) // 600) % 2 == 0):
            _append_trip(
                speeds,
                rng,
                v_peak=rng.uniform(20.0, 55.0) / 3.6,
                cruise_s=rng.uniform(5.0, 60.0),
                stop_s=rng.uniform(5.0, 40.0),
            )
        elif kind in ("highway", "drive"):
            _append_trip(
                speeds,
                rng,
                v_peak=rng.uniform(85.0, 125.0) / 3.6,
                cruise_s=rng.uniform(150.0, 500.0),
                stop_s=rng.uniform(0.0, 10.0),
            )
        else:
            raise ValueError(f"kind must be urban, highway or drive, got {kind!r}")
    return np.asarray(speeds[:duration_s], dtype=np.float64)


def battery_power_w(speed_m_s: FloatArray) -> FloatArray:
    """Battery power of the reference vehicle along a 1-s speed trace, W (discharge > 0)."""
    v = speed_m_s
    a = np.gradient(v)
    force = MASS_KG * a + 0.5 * RHO_AIR * CDA_M2 * v**2 + MASS_KG * G * CRR * (v > 0.1)
    wheel = force * v
    battery = np.where(wheel > 0.0, wheel / ETA_DRIVE, wheel * ETA_REGEN) + AUX_W
    return np.asarray(battery, dtype=np.float64)


def drive_c_rate(kind: str, seed: int, peak_c_rate: float, duration_s: int = 1800) -> FloatArray:
    """A power profile as C-rate at nominal voltage, scaled so that its peak discharge is
    ``peak_c_rate``; regen keeps the same scale (so it is typically 0.5-1x the peak)."""
    power = battery_power_w(speed_trace(kind, seed, duration_s))
    return np.asarray(power / power.max() * peak_c_rate)


def pulse_c_rate(c_rate: float) -> FloatArray:
    """An HPPC-like loop: discharge pulse, rest, charge pulse, rest, a CC block, long rest."""
    blocks = [
        (10, c_rate),
        (40, 0.0),
        (10, -0.75 * c_rate),
        (40, 0.0),
        (300, 0.25 * c_rate),
        (200, 0.0),
    ]
    return np.concatenate([np.full(n, v) for n, v in blocks]).astype(np.float64)


@dataclass(frozen=True)
class LoadTable:
    """The looped profiles of every pack, batched: ``c_rate(t)`` gives one value per pack."""

    table: FloatArray  # (n_profiles, L) C-rate at 1 s, padded by looping each profile
    lengths: NDArray[np.int64]  # (n_profiles,) true loop length of each profile, s
    profile: NDArray[np.int64]  # (n_packs,) which profile each pack runs
    offset_s: FloatArray  # (n_packs,) phase offset, s
    constant_power: NDArray[np.bool_]  # (n_packs,) drive profiles are power profiles

    def c_rate(self, t: float) -> FloatArray:
        """Signed C-rate each pack asks for at simulated time ``t`` (linear in between)."""
        length = self.lengths[self.profile].astype(np.float64)
        pos = np.mod(t + self.offset_s, length)
        i0 = np.floor(pos).astype(np.int64)
        frac = pos - i0
        i1 = np.where(i0 + 1 >= length, 0, i0 + 1)
        # index the table directly: table[profile] would copy [packs, length] per call
        p = self.profile
        return np.asarray(self.table[p, i0] * (1.0 - frac) + self.table[p, i1] * frac)


def build_loads(
    kinds: list[str],
    n_packs: int,
    seed: int,
    *,
    peak_c_rate: float,
    constant_c_rate: float,
    pulse_c_rate_: float,
    phase_offsets: bool,
) -> LoadTable:
    """Pack ``i`` runs ``kinds[i % len(kinds)]``; each kind is generated once from the seed."""
    unique = list(dict.fromkeys(kinds))
    profiles: list[FloatArray] = []
    for j, kind in enumerate(unique):
        if kind in ("drive", "urban", "highway"):
            profiles.append(drive_c_rate(kind, seed * 1000 + j, peak_c_rate))
        elif kind == "pulse":
            profiles.append(pulse_c_rate(pulse_c_rate_))
        elif kind == "constant":
            profiles.append(np.full(60, constant_c_rate))
        elif kind == "rest":
            profiles.append(np.zeros(60))
        else:
            raise ValueError(f"unknown load kind {kind!r}")
    lengths = np.array([p.shape[0] for p in profiles], dtype=np.int64)
    table = np.stack([np.resize(p, int(lengths.max())) for p in profiles])
    profile = np.array([unique.index(kinds[i % len(kinds)]) for i in range(n_packs)])
    rng = np.random.default_rng([seed, 7])
    offset = (
        rng.uniform(0.0, 1.0, n_packs) * lengths[profile] if phase_offsets else np.zeros(n_packs)
    )
    power = np.array([unique[k] in ("drive", "urban", "highway") for k in profile], dtype=np.bool_)
    return LoadTable(table, lengths, profile.astype(np.int64), np.asarray(offset), power)
