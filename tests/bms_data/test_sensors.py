"""Sensor models: the statistics the manifest promises (noise, quantization, gain,
offset, dropouts), reproducibility, and validation."""

from __future__ import annotations

import numpy as np
import pytest

from labctl.models.bms.sensors import SensorModel, quantize

N = 200_000


def measure(model: SensorModel, current: np.ndarray, voltage: np.ndarray, temp: np.ndarray,
            seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    t = np.arange(current.size, dtype=float)
    return model.measure(t, current, voltage, temp, np.random.default_rng(seed))


def test_voltage_noise_and_quantization() -> None:
    model = SensorModel(voltage_noise_v=0.002, voltage_lsb_v=0.001, gap_rate_per_s=0.0,
                        nan_probability=0.0)  # fmt: skip
    true_v = np.full(N, 3.7003)
    _, m = measure(model, np.zeros(N), true_v, np.full(N, 25.0))
    err = m["voltage_v"] - true_v
    # Gaussian noise plus a uniform quantization error: sqrt(2^2 + 1^2/12) mV.
    assert np.std(err) == pytest.approx(np.sqrt(0.002**2 + 0.001**2 / 12), rel=0.01)
    assert abs(np.mean(err)) < 2e-5
    steps = m["voltage_v"] / 0.001
    assert np.max(np.abs(steps - np.round(steps))) < 1e-6  # every reading is on the 1 mV grid


def test_quantization_alone_is_within_half_an_lsb() -> None:
    x = np.linspace(2.5, 4.2, 100_001)
    q = quantize(x, 0.001)
    assert np.max(np.abs(q - x)) <= 0.0005 + 1e-12
    assert np.std(q - x) == pytest.approx(0.001 / np.sqrt(12), rel=0.02)
    assert np.array_equal(quantize(x, 0.0), x)


def test_current_gain_offset_and_noise_recovered_by_a_fit() -> None:
    model = SensorModel(current_gain=1.01, current_offset_a=0.04, current_noise_a=0.02,
                        current_lsb_a=0.01, gap_rate_per_s=0.0, nan_probability=0.0)  # fmt: skip
    true_i = np.linspace(-10.0, 15.0, N)
    _, m = measure(model, true_i, np.full(N, 3.7), np.full(N, 25.0))
    slope, intercept = np.polyfit(true_i, m["current_a"], 1)
    assert slope == pytest.approx(1.01, abs=2e-4)
    assert intercept == pytest.approx(0.04, abs=5e-4)
    resid = m["current_a"] - (slope * true_i + intercept)
    assert np.std(resid) == pytest.approx(np.sqrt(0.02**2 + 0.01**2 / 12), rel=0.02)


def test_temperature_offset_and_noise() -> None:
    model = SensorModel(temperature_offset_c=1.2, temperature_noise_c=0.2,
                        temperature_lsb_c=0.1, gap_rate_per_s=0.0, nan_probability=0.0)  # fmt: skip
    true_t = np.full(N, 24.97)
    _, m = measure(model, np.zeros(N), np.full(N, 3.7), true_t)
    err = m["temperature_c"] - true_t
    assert np.mean(err) == pytest.approx(1.2, abs=0.01)
    assert np.std(err) == pytest.approx(np.sqrt(0.2**2 + 0.1**2 / 12), rel=0.02)


def test_dropouts_gaps_and_nans() -> None:
    model = SensorModel(gap_rate_per_s=0.01, gap_max_s=10, nan_probability=0.01)
    keep, m = measure(model, np.ones(N), np.full(N, 3.7), np.full(N, 25.0), seed=3)
    assert keep[0] and keep[-1]
    dropped = 1.0 - keep.mean()
    # ~2000 gaps of 1-10 rows (mean 5.5) in 200k rows, minus overlaps: ~5 %.
    assert 0.04 < dropped < 0.06
    gaps = np.diff(np.flatnonzero(keep)) - 1
    assert gaps.max() <= 20 and (gaps > 0).sum() > 1500
    for name in ("current_a", "voltage_v", "temperature_c"):
        assert np.isnan(m[name]).mean() == pytest.approx(0.01, rel=0.1)


def test_seeded_and_drawn_within_documented_ranges() -> None:
    rng = np.random.default_rng(7)
    a = measure(SensorModel.draw(rng), np.ones(1000), np.full(1000, 3.7), np.full(1000, 25.0), 5)
    b = measure(SensorModel.draw(np.random.default_rng(7)), np.ones(1000), np.full(1000, 3.7),
                np.full(1000, 25.0), 5)  # fmt: skip
    assert np.array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1]["voltage_v"], b[1]["voltage_v"])
    draws = [SensorModel.draw(np.random.default_rng(s)) for s in range(200)]
    assert all(0.001 <= d.voltage_noise_v <= 0.003 for d in draws)
    assert all(abs(d.current_gain - 1) <= 0.01 + 1e-12 for d in draws)
    assert all(abs(d.current_offset_a) <= 0.05 for d in draws)
    assert all(abs(d.temperature_offset_c) <= 1.5 for d in draws)


def test_ideal_sensor_is_the_truth() -> None:
    i = np.linspace(-5, 5, 101)
    keep, m = measure(SensorModel.ideal(), i, np.full(101, 3.7), np.full(101, 25.0))
    assert keep.all()
    np.testing.assert_array_equal(m["current_a"], i)


def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="current_gain=2"):
        SensorModel(current_gain=2.0)
    with pytest.raises(ValueError, match=r"voltage_noise_v=-0\.1"):
        SensorModel(voltage_noise_v=-0.1)
    with pytest.raises(ValueError, match="voltage_v: 3 samples for 2 times"):
        SensorModel().measure(np.arange(2.0), np.zeros(2), np.zeros(3), np.zeros(2),
                              np.random.default_rng(0))  # fmt: skip
