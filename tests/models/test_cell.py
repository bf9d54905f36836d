"""The cell model: Severson-style features, retention regression, ONNX export and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labctl.models.cell import (
    ALPHA_GRID,
    FEATURES,
    CellConfig,
    CellCycles,
    CellPredictor,
    TrainedCell,
    feature_table,
    loo_rmse,
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


def test_early_cycles_are_explicit_and_the_features_never_see_the_target() -> None:
    cell = analytic_cell(0.02, curves=(2, 6, 10))
    explicit = severson_features(cell, cycles=(2, 6))
    assert explicit["fade_per_cycle"] == pytest.approx(0.01 / 4.99)
    assert explicit != severson_features(cell)  # the default pair is (2, 10)
    table = feature_table([cell], 20, early_cycles=(2, 6))
    assert list(table.columns) == ["cell_id", *FEATURES, "retention"]
    assert table["retention"].iloc[0] == pytest.approx((5.0 - 0.19) / 4.99)
    with pytest.raises(ValueError, match=r"qv: no Q\(V\) curve of early cycle\(s\) \[3\]"):
        feature_table([cell], 20, early_cycles=(3, 6))
    # Without the default pair the fallback (earliest, latest curve) would include the
    # target cycle itself: refused.
    leaky = analytic_cell(0.02, curves=(2, 40))
    with pytest.raises(ValueError, match=r"target_cycle 40 must come after the early cycles"):
        feature_table([leaky], 40)
    with pytest.raises(ValueError, match=r"early_cycles \[2, 12\]: need 1 <= first < second"):
        CellConfig(target_cycle=12, early_cycles=(2, 12))
    with pytest.raises(ValueError, match="alpha: must be 'auto' or finite and >= 0"):
        CellConfig(alpha=-1.0)


def test_auto_alpha_is_the_leave_one_out_minimum_and_metrics_carry_the_baseline() -> None:
    import torch

    rng = np.random.default_rng(5)
    x = rng.normal(size=(14, len(FEATURES)))
    y = 0.9 + 0.02 * x[:, 0] - 0.01 * x[:, 3] + 0.004 * rng.normal(size=14)
    table = pd.DataFrame(x, columns=list(FEATURES)).assign(retention=y)
    xs = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float64)
    yc = torch.tensor(y - y.mean(), dtype=torch.float64)
    for alpha in (1e-3, 0.3):
        # Brute force: refit without each cell (same penalty, unpenalised intercept).
        errors = []
        for i in range(14):
            keep = np.arange(14) != i
            a = torch.cat([torch.ones(13, 1, dtype=torch.float64), xs[keep]], dim=1)
            pen = alpha * 14 * torch.eye(a.shape[1], dtype=torch.float64)
            pen[0, 0] = 0.0
            beta = torch.linalg.solve(a.T @ a + pen, a.T @ yc[keep])
            errors.append(float(beta[0] + xs[i] @ beta[1:] - yc[i]))
        assert loo_rmse(xs, yc, alpha) == pytest.approx(float(np.sqrt(np.mean(np.square(errors)))))
    holdout = table.iloc[10:]
    fit = train_cell_model(table.iloc[:10], CellConfig(target_cycle=40), holdout=holdout)
    xt = torch.tensor((x[:10] - x[:10].mean(0)) / x[:10].std(0), dtype=torch.float64)
    yt = torch.tensor(y[:10] - y[:10].mean(), dtype=torch.float64)
    assert fit.alpha == min(ALPHA_GRID, key=lambda a: loo_rmse(xt, yt, a))
    naive = np.full(4, y[:10].mean())
    assert fit.metrics["baseline_rmse"] == pytest.approx(np.sqrt(np.mean((naive - y[10:]) ** 2)))
    assert fit.metrics["baseline_mae"] == pytest.approx(np.mean(np.abs(naive - y[10:])))
    assert fit.metrics["rmse"] < fit.metrics["baseline_rmse"]
    fixed = train_cell_model(
        table.iloc[:10], CellConfig(target_cycle=40, alpha=0.5), holdout=holdout
    )
    assert fixed.alpha == 0.5 and fixed.metrics["rmse"] != fit.metrics["rmse"]


class _CyclingStore:
    """The Store methods cell_cycles uses, over one cycle_cell run whose discharges start
    at different phases of the data log (first row 5..55 s in, every 60 s)."""

    url = "memory://"
    R, SLOPE, I = 0.05, 1e-4, 4.0  # ohm, ohm/s (polarisation building up), A

    def __init__(self) -> None:
        from labctl.data import RunInfo, RunSummary, StreamInfo

        rows, cycles = [], []
        for n, phase in enumerate((5.0, 30.0, 55.0), start=1):
            t0 = 1000.0 * n
            rows.append((t0 - 600.0, 4.1, -2.0, 1.9, 1, n))  # charge
            rows.append((t0, 4.15, 0.0, 0.0, 2, n))  # the rest's last row: the step change
            for k in range(30):
                t = phase + 60.0 * k
                v = 4.15 - self.I * (self.R + self.SLOPE * t)  # linear in t: exact interp
                rows.append((t0 + t, v, self.I, self.I * t / 3600.0, 3, n))
            cycles.append({"cycle": n, "charge_ah": 1.9, "discharge_ah": 1.9 - 0.01 * n,
                           "coulombic_efficiency": 0.99})  # fmt: skip
        frame = pd.DataFrame(rows, columns=["time_", "voltage", "current", "capacity", "step",
                                            "segment"])  # fmt: skip
        # ``time`` is the event's timestamp (wall clock), ``time_`` the cycler's clock.
        self.frames = {
            "cycling": frame.assign(time=frame["time_"] * 1e-3 + 1.7e9, attempt=1),
            "cycles": pd.DataFrame(cycles),
        }
        summary = RunSummary("r1", 1.0, "cycle_cell", "", "C", "op", "success", "", 1.0)
        start = {"cell_id": "C-1", "plan_args": {"log_period_s": 60.0}}
        streams = {k: StreamInfo(k, len(v), list(v), {}) for k, v in self.frames.items()}
        self.info = RunInfo(summary, start, None, streams)

    def runs(self, **_: object) -> list[object]:
        return [self.info.summary]

    def run(self, uid: str) -> object:
        return self.info

    def read(self, uid: str, stream: str) -> pd.DataFrame:
        return self.frames[stream]


def test_dc_resistance_is_read_at_a_fixed_time_into_each_discharge() -> None:
    from labctl.models.training_data import cell_cycles, cell_cycles_table

    store = _CyclingStore()
    cell = cell_cycles(store, "r1")  # type: ignore[arg-type]
    assert cell.cell_id == "C-1" and sorted(cell.qv) == [1, 2, 3]
    # Default: 1.5 log periods (90 s); the same in every cycle whatever the log's phase.
    r = cell.summary["resistance_ohm"].to_numpy()
    np.testing.assert_allclose(r, store.R + store.SLOPE * 90.0, rtol=1e-9)
    at_30 = cell_cycles(store, "r1", dcir_s=30.0).summary["resistance_ohm"]  # type: ignore[arg-type]
    # Cycle 3's first row comes 55 s in: no row before 30 s, the median of the others.
    np.testing.assert_allclose(at_30, store.R + store.SLOPE * 30.0, rtol=1e-9)
    with pytest.raises(ValueError, match="dcir_s: must be finite and > 0, got -1"):
        cell_cycles(store, "r1", dcir_s=-1.0)  # type: ignore[arg-type]
    cells, skipped = cell_cycles_table(store, dcir_s=1.0)  # type: ignore[arg-type]
    assert (
        cells == [] and "no rest-to-discharge step with data-log rows around 1 s" in skipped["r1"]
    )
