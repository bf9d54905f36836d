"""The conductivity ensemble: held-out accuracy, ONNX parity with torch, the graph's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hardware_mocks.physics.electrolyte import landesfeind_blend
from labctl.models.descriptors import descriptor_matrix
from labctl.models.property import (
    SOLVENTS,
    PropertyConfig,
    PropertyPredictor,
    TrainedProperty,
    regression_metrics,
    torch_predict,
    train_property_model,
)
from labctl.models.registry import ModelRecord, Registry
from labctl.models.runtime import InputRangeError


def test_held_out_metrics_are_measured_and_stored(
    trained_property: TrainedProperty, property_store: tuple[Path, ModelRecord]
) -> None:
    m = trained_property.metrics
    assert m["n"] == 48  # 20 % of 240 rows, never trained on
    assert m["r2"] > 0.98 and m["rmse"] < 0.5 and m["mae"] <= m["rmse"]
    rec = property_store[1]
    assert rec.metrics == m and rec.kind == "property" and rec.version == "v1"
    assert rec.training_data.query == "synthetic: landesfeind_blend"
    assert rec.training_data.sha256 == "ab" * 32 and rec.training_data.rows == 240
    assert rec.input("salt_molality").units == "mol/kg"
    assert (rec.input("temperature_c").min, rec.input("temperature_c").max) == (10.0, 50.0)
    assert rec.input("fractions").columns == list(SOLVENTS)
    assert [o.units for o in rec.outputs] == ["mS/cm", "mS/cm"]
    assert rec.framework["opset"] == "18" and "torch" in rec.framework


def test_metrics_formulas() -> None:
    m = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 4.0])
    assert m["mae"] == pytest.approx(0.25)
    assert m["rmse"] == pytest.approx(np.sqrt(0.125))
    assert m["r2"] == pytest.approx(1 - 0.5 / 5.0)


def test_onnx_inputs_are_the_raw_formulation_and_descriptors_are_inside(
    property_store: tuple[Path, ModelRecord],
) -> None:
    root, rec = property_store
    proto = onnx.load(Registry(root).path("conductivity", rec.version))
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert shapes == {
        "fractions": ["batch", 5],
        "salt_molality": ["batch"],
        "temperature_c": ["batch"],
    }
    assert [o.name for o in proto.graph.output] == ["mean", "std"]
    constants = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    expected = descriptor_matrix().astype(np.float32)
    assert any(c.shape == expected.shape and np.allclose(c, expected) for c in constants)


def formulations(max_rows: int = 64) -> st.SearchStrategy[tuple[np.ndarray, ...]]:
    """Valid inputs: fractions on the simplex (some exactly 0), molality and T in range."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
        n = draw(st.integers(1, max_rows))
        raw = draw(arrays(np.float64, (n, 5), elements=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5])))
        raw[raw.sum(axis=1) == 0, 0] = 1.0
        fractions = raw / raw.sum(axis=1, keepdims=True)
        molality = draw(arrays(np.float64, n, elements=st.floats(0.2, 2.0)))
        temperature = draw(arrays(np.float64, n, elements=st.floats(10.0, 50.0)))
        return fractions, molality, temperature

    return build()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=formulations())
def test_onnxruntime_matches_torch(
    inputs: tuple[np.ndarray, ...], predictor: PropertyPredictor, trained_property: TrainedProperty
) -> None:
    fractions, molality, temperature = inputs
    mean, std = predictor.predict(fractions, molality, temperature)
    ref_mean, ref_std = torch_predict(trained_property, fractions, molality, temperature)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std, ref_std, rtol=1e-3, atol=1e-4)
    assert np.isfinite(mean).all() and (std >= 0).all()


def test_predictions_follow_the_ground_truth(predictor: PropertyPredictor) -> None:
    cases = [
        ({"EC": 0.3, "EMC": 0.7}, 1.0, 25.0),
        ({"EC": 0.5, "DMC": 0.5}, 1.2, 40.0),
        ({"PC": 1.0}, 0.8, 20.0),
    ]
    fr = np.array([[c[0].get(s, 0.0) for s in SOLVENTS] for c in cases])
    mean, std = predictor.predict(fr, [c[1] for c in cases], [c[2] for c in cases])
    truth = np.array([landesfeind_blend(*c) for c in cases])
    np.testing.assert_allclose(mean, truth, rtol=0.1)
    assert (std > 0).all() and (std < 0.2 * truth).all()


def test_out_of_range_input_is_refused_naming_the_field(predictor: PropertyPredictor) -> None:
    hi = predictor.record.input("temperature_c").max
    with pytest.raises(InputRangeError, match=r"temperature_c: 80.0 \(row 0\) is outside"):
        predictor.predict([[0.3, 0, 0.7, 0, 0]], [1.0], [80.0])
    assert hi < 80.0


def test_bad_training_data_is_refused_naming_the_problem() -> None:
    frame = pd.DataFrame({s: [0.2, 0.2] for s in SOLVENTS})
    with pytest.raises(ValueError, match="missing columns"):
        train_property_model(frame)
    frame["salt_molality"] = 1.0
    frame["temperature_c"] = 25.0
    frame["conductivity_mS_cm"] = [10.0, 11.0]
    frame.loc[1, "EC"] = 0.5
    with pytest.raises(ValueError, match=r"fractions of row 1 sum to 1\.3000"):
        train_property_model(frame, PropertyConfig(epochs=1))
    with pytest.raises(ValueError, match="members"):
        PropertyConfig(members=1)
    with pytest.raises(ValueError, match=r"temperature_range\n.*low < high, got \(50\.0, 10\.0\)"):
        PropertyConfig(temperature_range=(50.0, 10.0))
