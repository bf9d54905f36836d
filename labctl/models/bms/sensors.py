"""What a BMS measures of the true cell signals: noise, ADC quantization, gain and
offset errors, dropouts. Pure numpy, reproducible from a seed.

    voltage_meas     = Q(v_true + v_offset + N(0, v_noise), v_lsb)
    current_meas     = Q(gain * i_true + i_offset + N(0, i_noise), i_lsb)
    temperature_meas = Q(T_true + T_offset + N(0, T_noise), T_lsb)

``Q(x, lsb) = lsb * round(x / lsb)`` (a mid-tread ADC). Dropouts: whole rows missing
(logging gaps, a Poisson process of ``gap_rate_per_s`` with gaps of 1..``gap_max_s``
samples; the first and last rows are always kept) and single readings lost as NaN
(each channel independently, probability ``nan_probability`` per row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


def quantize(x: FloatArray, lsb: float) -> FloatArray:
    """Mid-tread quantization to multiples of ``lsb`` (lsb <= 0: unchanged)."""
    if lsb <= 0:
        return np.asarray(x, dtype=float)
    return np.asarray(np.round(np.asarray(x, dtype=float) / lsb) * lsb, dtype=float)


@dataclass(frozen=True)
class SensorModel:
    """One cell's measurement chain (SI units: V, A, deg C, s)."""

    voltage_noise_v: float = 0.002
    voltage_lsb_v: float = 0.001
    voltage_offset_v: float = 0.0
    current_gain: float = 1.0
    current_offset_a: float = 0.0
    current_noise_a: float = 0.02
    current_lsb_a: float = 0.01
    temperature_offset_c: float = 0.0
    temperature_noise_c: float = 0.2
    temperature_lsb_c: float = 0.1
    gap_rate_per_s: float = 1.0 / 1800.0
    gap_max_s: int = 10
    nan_probability: float = 1.0e-3

    def __post_init__(self) -> None:
        for name in (
            "voltage_noise_v",
            "voltage_lsb_v",
            "current_noise_a",
            "current_lsb_a",
            "temperature_noise_c",
            "temperature_lsb_c",
            "gap_rate_per_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0.5 < self.current_gain < 1.5:
            raise ValueError(f"current_gain={self.current_gain}: must be in (0.5, 1.5)")
        if not 0.0 <= self.nan_probability < 1.0:
            raise ValueError(f"nan_probability={self.nan_probability}: must be in [0, 1)")
        if self.gap_max_s < 1:
            raise ValueError(f"gap_max_s={self.gap_max_s}: must be >= 1")

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SensorModel:
        """A plausible automotive BMS chain: cell-voltage AFE noise 1-3 mV with a 1 mV
        LSB and +-1 mV offset; a shunt/Hall current sensor with +-1 % gain error,
        +-50 mA offset, 20 mA noise, 10 mA LSB; an NTC with +-1.5 C offset, 0.2 C noise,
        0.1 C LSB; a gap every ~30 min, a lost reading per ~1000."""
        return cls(
            voltage_noise_v=float(rng.uniform(0.001, 0.003)),
            voltage_lsb_v=0.001,
            voltage_offset_v=float(rng.uniform(-0.001, 0.001)),
            current_gain=float(1.0 + np.clip(rng.normal(0.0, 0.005), -0.01, 0.01)),
            current_offset_a=float(rng.uniform(-0.05, 0.05)),
            current_noise_a=0.02,
            current_lsb_a=0.01,
            temperature_offset_c=float(rng.uniform(-1.5, 1.5)),
            temperature_noise_c=0.2,
            temperature_lsb_c=0.1,
        )

    @classmethod
    def ideal(cls) -> SensorModel:
        """No error at all (for tests and reference runs)."""
        return cls(
            voltage_noise_v=0.0,
            voltage_lsb_v=0.0,
            current_noise_a=0.0,
            current_lsb_a=0.0,
            temperature_noise_c=0.0,
            temperature_lsb_c=0.0,
            gap_rate_per_s=0.0,
            nan_probability=0.0,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def measure(
        self,
        time_s: FloatArray,
        current_a: FloatArray,
        voltage_v: FloatArray,
        temperature_c: FloatArray,
        rng: np.random.Generator,
    ) -> tuple[BoolArray, dict[str, FloatArray]]:
        """Measured signals for every row and the mask of rows that were logged.

        Returns ``(keep, {"current_a", "voltage_v", "temperature_c"})``; the arrays
        have the input length (select ``[keep]`` with the true columns alike)."""
        n = int(np.asarray(time_s).size)
        for name, arr in (("current_a", current_a), ("voltage_v", voltage_v)):
            if np.asarray(arr).size != n:
                raise ValueError(f"{name}: {np.asarray(arr).size} samples for {n} times")
        if np.asarray(temperature_c).size != n:
            raise ValueError(f"temperature_c: {np.asarray(temperature_c).size} for {n} times")
        v = quantize(
            np.asarray(voltage_v) + self.voltage_offset_v + rng.normal(0, self.voltage_noise_v, n),
            self.voltage_lsb_v,
        )
        i = quantize(
            self.current_gain * np.asarray(current_a)
            + self.current_offset_a
            + rng.normal(0, self.current_noise_a, n),
            self.current_lsb_a,
        )
        temp = quantize(
            np.asarray(temperature_c)
            + self.temperature_offset_c
            + rng.normal(0, self.temperature_noise_c, n),
            self.temperature_lsb_c,
        )
        measured = {"current_a": i, "voltage_v": v, "temperature_c": temp}
        if self.nan_probability > 0:
            for arr in measured.values():
                arr[rng.random(n) < self.nan_probability] = np.nan
        keep = self.logged_rows(np.asarray(time_s, dtype=float), rng)
        return keep, measured

    def logged_rows(self, time_s: FloatArray, rng: np.random.Generator) -> BoolArray:
        """Mask of rows kept after logging gaps."""
        n = time_s.size
        keep = np.ones(n, dtype=bool)
        if n < 3 or self.gap_rate_per_s <= 0:
            return keep
        span = float(time_s[-1] - time_s[0])
        n_gaps = int(rng.poisson(self.gap_rate_per_s * span))
        for _ in range(n_gaps):
            start = int(rng.integers(1, n - 1))
            length = int(rng.integers(1, self.gap_max_s + 1))
            keep[start : min(start + length, n - 1)] = False
        return keep
