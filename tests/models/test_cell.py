"""The cell model: Severson-style features, retention regression, ONNX export and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labctl.models.cell import (
    FEATURES,
    CellConfig,
    CellCycles,
    CellPredictor,
    TrainedCell,
    retention,
    severson_features,
    train_cell_model,
)
from labctl.models.registry import ModelRecord
from labctl.models.runtime import InputRangeError


def analytic_cell(
    dq_slope: float, fade: float = 0.01, curves: tuple[int, ...] = (2, 10)
) -> CellCycles:
    """Linear capacity fade; Q(V) of later cycles differs by ``dq_slope * (V - 3.5)``."""
    cycles = np.arange(1, 41)
    q = 5.0 - fade * (cycles - 1)
    summary = pd.DataFrame(
        {
            "cycle": cycles,
            "charge_capacity_ah": q / 0.999,
            "discharge_capacity_ah": q,
            "coulombic_efficiency": np.full(40, 0.999),
            "resistance_ohm": 0.02 * (1 + 0.001 * cycles),
        }
    )
    v = np.linspace(4.1, 3.0, 300)  # a discharge: voltage falls as capacity is delivered
    base = (4.1 - v) * 4.5
    qv = {c: (v, base + (dq_slope * (v - 3.5) if c != curves[0] else 0.0)) for c in curves}
    return CellCycles(summary=summary, qv=qv, cell_id="analytic")


def test_features_of_an_analytic_cell() -> None:
    f = severson_features(analytic_cell(dq_slope=0.02))
    grid = np.linspace(3.0, 4.1, 200)
    assert f["log10_var_dq"] == pytest.approx(np.log10(np.var(0.02 * (grid - 3.5))), abs=1e-6)
    assert f["log10_abs_min_dq"] == pytest.approx(np.log10(0.02 * 0.5), abs=1e-6)
    assert f["q_early_ah"] == pytest.approx(4.99)
    assert f["q_rise_ah"] == pytest.approx(0.0)
    assert f["fade_per_cycle"] == pytest.approx(0.01 / 4.99)
    assert f["mean_ce"] == pytest.approx(0.999)
    assert f["resistance_ohm"] == pytest.approx(0.02 * 1.002)
    assert f["resistance_growth"] == pytest.approx(1.010 / 1.002 - 1)
    assert retention(analytic_cell(0.02), 40) == pytest.approx((5.0 - 0.39) / 4.99)
    # Identical curves: the variance floor keeps the log finite.
    assert severson_features(analytic_cell(dq_slope=0.0))["log10_var_dq"] == pytest.approx(-14.0)


def test_earliest_available_pair_is_used_without_cycles_2_and_10() -> None:
    f = severson_features(analytic_cell(0.02, curves=(3, 8)))
    assert f["fade_per_cycle"] == pytest.approx(0.01 / 4.98)
    with pytest.raises(ValueError, match=r"qv: need Q\(V\) curves of 2 cycles, got \[2\]"):
        severson_features(analytic_cell(0.02, curves=(2,)))
    cell = analytic_cell(0.02)
    with pytest.raises(ValueError, match="summary: missing columns \\['resistance_ohm'\\]"):
        severson_features(CellCycles(cell.summary.drop(columns="resistance_ohm"), cell.qv))


def test_simulated_cells_features_track_the_fade(
    cells: list[CellCycles], cell_table: pd.DataFrame
) -> None:
    table = cell_table
    assert len(table) == len(cells) and set(FEATURES) <= set(table.columns)
    assert np.isfinite(table[list(FEATURES)].to_numpy()).all()
    # Faster early fade -> lower retention later (the simulator's fade is linear in EFC).
    corr = np.corrcoef(table["fade_per_cycle"], table["retention"])[0, 1]
    assert corr < -0.95
    assert table["retention"].between(0.7, 1.0).all()


def test_trained_model_predicts_held_out_cells_and_serves_from_onnx(
    cells: list[CellCycles],
    cell_table: pd.DataFrame,
    trained_cell: TrainedCell,
    cell_store: tuple[Path, ModelRecord],
) -> None:
    m = trained_cell.metrics
    assert m["n"] == 7 and m["r2"] > 0.9 and m["rmse"] < 0.01
    # Better than predicting the mean retention of the training cells.
    assert m["rmse"] < 0.5 * float(cell_table["retention"].std())
    root, rec = cell_store
    assert [i.name for i in rec.inputs] == list(FEATURES) and rec.kind == "cell"
    assert rec.metrics == m and rec.training_data.sha256 == "cd" * 32
    predictor = CellPredictor.load(root)
    assert predictor.provider == "CPUExecutionProvider"
    import torch

    x = torch.tensor(cell_table[list(FEATURES)].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        reference = trained_cell.module(*x.T).numpy()
    np.testing.assert_allclose(predictor.predict(cells), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(cells), cell_table["retention"], atol=0.03)
    spec = rec.input("log10_var_dq")
    features = {f: cell_table[f].to_numpy()[:2] for f in FEATURES}
    features["log10_var_dq"] = np.array([spec.max + 1.0, spec.min])
    with pytest.raises(InputRangeError, match=r"log10_var_dq: .* \(row 0\) is outside"):
        predictor.predict_features(features)


def test_cell_model_input_errors() -> None:
    with pytest.raises(ValueError, match=r"table: missing columns \['retention'\]"):
        train_cell_model(pd.DataFrame({f: [1.0, 2.0] for f in FEATURES}))
    with pytest.raises(ValueError, match="target_cycle"):
        CellConfig(target_cycle=1)
