"""Cell model: early-cycle features (Severson et al. 2019 style) -> capacity retention later.

Severson et al., Nature Energy 4 (2019) 383, predict cycle life from the first 100
cycles; their strongest single feature is ``log10 var(dQ(V))``, the variance over
voltage of the difference between two cycles' discharge capacity-voltage curves. Here:

* per cell, a :class:`CellCycles`: the cycler's per-cycle summary (``cycle``,
  ``charge_capacity_ah``, ``discharge_capacity_ah``, ``coulombic_efficiency``,
  ``resistance_ohm``) and Q(V) discharge curves of at least two cycles;
* :func:`severson_features` computes FEATURES from an early pair of cycles
  (``CellConfig.early_cycles``, default 2 and 10; Severson used 10 and 100): log10 var
  and log10 |min| of dQ(V), the early capacity, its rise to the window's maximum, the
  fade slope, mean coulombic efficiency, resistance and its relative growth;
* :func:`train_cell_model` fits a ridge regression (closed form, in torch) of the
  retention ``Q(target_cycle) / Q(first early cycle)`` on the standardised features,
  its penalty chosen by leave-one-out error on the training cells (few cells, eight
  correlated features: an unpenalised fit would interpolate them), measured on
  held-out cells next to the naive baseline (the training cells' mean retention);
  :func:`export_cell_model` writes it as ONNX, one input per feature so that the valid
  range of each is checked by name;
* :class:`CellPredictor` serves it with onnxruntime (no torch).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from labctl.models._export import quiet_exporter
from labctl.models.property import regression_metrics, split_holdout
from labctl.models.registry import (
    InputSpec,
    ModelRecord,
    OutputSpec,
    Registry,
    TrainingDataInfo,
)
from labctl.models.runtime import Predictor

if TYPE_CHECKING:
    import pandas
    import torch

__all__ = [
    "FEATURES",
    "SUMMARY_COLUMNS",
    "CellConfig",
    "CellCycles",
    "CellPredictor",
    "TrainedCell",
    "cell_record",
    "export_cell_model",
    "feature_table",
    "loo_rmse",
    "register_cell_model",
    "retention",
    "severson_features",
    "train_cell_model",
]

SUMMARY_COLUMNS: tuple[str, ...] = (
    "cycle",
    "charge_capacity_ah",
    "discharge_capacity_ah",
    "coulombic_efficiency",
    "resistance_ohm",
)
FEATURES: tuple[str, ...] = (
    "log10_var_dq",
    "log10_abs_min_dq",
    "q_early_ah",
    "q_rise_ah",
    "fade_per_cycle",
    "mean_ce",
    "resistance_ohm",
    "resistance_growth",
)
UNITS = {
    "log10_var_dq": "log10(Ah^2)",
    "log10_abs_min_dq": "log10(Ah)",
    "q_early_ah": "Ah",
    "q_rise_ah": "Ah",
    "fade_per_cycle": "1/cycle",
    "mean_ce": "",
    "resistance_ohm": "ohm",
    "resistance_growth": "",
}
EARLY_PAIR = (2, 10)
ALPHA_GRID: tuple[float, ...] = tuple(float(a) for a in np.logspace(-4, 2, 25))
OPSET = 18
_VAR_FLOOR = 1e-14  # Ah^2: below any real cycler's resolution; keeps log10 finite
_MIN_FLOOR = 1e-7  # Ah


@dataclass(frozen=True)
class CellCycles:
    """One cell's cycling data: per-cycle summary and discharge Q(V) curves.

    ``qv`` maps a cycle number to ``(voltage_v, discharge_capacity_ah)`` sampled during
    that cycle's discharge (any order and spacing).
    """

    summary: pandas.DataFrame
    qv: Mapping[int, tuple[ArrayLike, ArrayLike]] = field(default_factory=dict)
    cell_id: str = ""


def _pair(cell: CellCycles, cycles: tuple[int, int] | None = None) -> tuple[int, int]:
    """The early pair: ``cycles`` (both must have a Q(V) curve); without it EARLY_PAIR,
    or the earliest and latest cycles with a curve when those are missing."""
    if cycles is not None:
        missing = [c for c in cycles if c not in cell.qv]
        if missing:
            raise ValueError(
                f"cell {cell.cell_id or '?'}: qv: no Q(V) curve of early cycle(s) {missing} "
                f"(early_cycles {list(cycles)}; curves of {sorted(cell.qv)})"
            )
        return cycles
    early, late = EARLY_PAIR
    if early in cell.qv and late in cell.qv:
        return early, late
    have = sorted(cell.qv)
    if len(have) < 2:
        raise ValueError(
            f"cell {cell.cell_id or '?'}: qv: need Q(V) curves of 2 cycles, got {have}"
        )
    return have[0], have[-1]


def _q_of_v(curve: tuple[ArrayLike, ArrayLike], grid: NDArray[np.float64]) -> NDArray[np.float64]:
    v = np.asarray(curve[0], dtype=np.float64)
    q = np.asarray(curve[1], dtype=np.float64)
    order = np.argsort(v)
    v, idx = np.unique(v[order], return_index=True)
    return np.asarray(np.interp(grid, v, q[order][idx]))


def severson_features(
    cell: CellCycles, *, points: int = 200, cycles: tuple[int, int] | None = None
) -> dict[str, float]:
    """FEATURES of one cell from its early cycles ``cycles`` (default: see :func:`_pair`;
    only the summary rows from the first to the second of them are used)."""
    missing = [c for c in SUMMARY_COLUMNS if c not in cell.summary.columns]
    if missing:
        raise ValueError(f"cell {cell.cell_id or '?'}: summary: missing columns {missing}")
    early, late = _pair(cell, cycles)
    a, b = cell.qv[early], cell.qv[late]
    lo = max(float(np.min(a[0])), float(np.min(b[0])))
    hi = min(float(np.max(a[0])), float(np.max(b[0])))
    if not hi > lo:
        raise ValueError(
            f"cell {cell.cell_id or '?'}: Q(V) of cycles {early}, {late} share no voltage range"
        )
    grid = np.linspace(lo, hi, points)
    dq = _q_of_v(b, grid) - _q_of_v(a, grid)
    s = cell.summary.sort_values("cycle")
    window = s[(s["cycle"] >= early) & (s["cycle"] <= late)]
    if len(window) < 2:
        raise ValueError(
            f"cell {cell.cell_id or '?'}: summary: need cycles {early}..{late}, got {len(window)}"
        )
    cyc = window["cycle"].to_numpy(dtype=np.float64)
    qd = window["discharge_capacity_ah"].to_numpy(dtype=np.float64)
    res = window["resistance_ohm"].to_numpy(dtype=np.float64)
    q0 = float(qd[0])
    slope = float(np.polyfit(cyc, qd, 1)[0])
    return {
        "log10_var_dq": float(np.log10(max(float(np.var(dq)), _VAR_FLOOR))),
        "log10_abs_min_dq": float(np.log10(max(abs(float(np.min(dq))), _MIN_FLOOR))),
        "q_early_ah": q0,
        "q_rise_ah": float(qd.max()) - q0,
        "fade_per_cycle": -slope / q0,
        "mean_ce": float(window["coulombic_efficiency"].mean()),
        "resistance_ohm": float(res[0]),
        "resistance_growth": float(res[-1] / res[0] - 1.0),
    }


def retention(
    cell: CellCycles, target_cycle: int, early_cycles: tuple[int, int] | None = None
) -> float:
    """Discharge capacity at ``target_cycle`` over that of the features' first early cycle."""
    s = cell.summary.set_index("cycle")["discharge_capacity_ah"]
    early, late = _pair(cell, early_cycles)
    if not late < target_cycle:
        # The features would see the capacity they are meant to predict.
        raise ValueError(
            f"cell {cell.cell_id or '?'}: target_cycle {target_cycle} must come after the "
            f"early cycles ({early}, {late})"
        )
    if target_cycle not in s.index or early not in s.index:
        raise ValueError(
            f"cell {cell.cell_id or '?'}: summary: needs cycles {early} and {target_cycle}"
        )
    return float(s[target_cycle] / s[early])


def feature_table(
    cells: Sequence[CellCycles],
    target_cycle: int | None = None,
    *,
    early_cycles: tuple[int, int] | None = None,
) -> pandas.DataFrame:
    """One row of FEATURES per cell (plus ``retention`` when ``target_cycle`` is given),
    from ``early_cycles`` (default: see :func:`severson_features`)."""
    import pandas

    rows = []
    for cell in cells:
        features = severson_features(cell, cycles=early_cycles)
        row: dict[str, float | str] = {"cell_id": cell.cell_id, **features}
        if target_cycle is not None:
            row["retention"] = retention(cell, target_cycle, early_cycles)
        rows.append(row)
    return pandas.DataFrame(
        rows, columns=["cell_id", *FEATURES] + (["retention"] if target_cycle is not None else [])
    )


class CellConfig(BaseModel):
    """Training settings of the cell model."""

    model_config = ConfigDict(extra="forbid")

    target_cycle: int = Field(default=100, ge=3, description="cycle whose retention is predicted")
    early_cycles: tuple[int, int] = Field(
        default=EARLY_PAIR, description="the two cycles the features compare (before target)"
    )
    alpha: float | Literal["auto"] = Field(
        default="auto",
        description="ridge penalty (standardised units); auto: the ALPHA_GRID value with the "
        "smallest leave-one-out error on the training cells",
    )
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=0.9)
    seed: int = 0
    range_margin: float = Field(
        default=0.1, ge=0.0, le=10.0, description="valid range: data span widened by this share"
    )

    @model_validator(mode="after")
    def _cycles(self) -> CellConfig:
        a, b = self.early_cycles
        if not 1 <= a < b < self.target_cycle:
            raise ValueError(
                f"early_cycles {[a, b]}: need 1 <= first < second < target_cycle "
                f"({self.target_cycle})"
            )
        if isinstance(self.alpha, float) and not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha: must be 'auto' or finite and >= 0, got {self.alpha!r}")
        return self


@dataclass
class TrainedCell:
    """A fitted ridge model (torch module) and what goes in its record."""

    module: torch.nn.Module
    config: CellConfig
    metrics: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    training_data: TrainingDataInfo
    alpha: float = float("nan")
    """The ridge penalty fitted with (``config.alpha``, or the one ``auto`` chose)."""


def _module(
    mean: NDArray[np.float64], std: NDArray[np.float64], coef: NDArray[np.float64], bias: float
) -> torch.nn.Module:
    import torch
    from torch import nn

    class Ridge(nn.Module):
        """One input per feature -> retention."""

        mean: torch.Tensor
        std: torch.Tensor
        coef: torch.Tensor
        bias: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            f32 = torch.float32
            self.register_buffer("mean", torch.tensor(mean, dtype=f32))
            self.register_buffer("std", torch.tensor(std, dtype=f32))
            self.register_buffer("coef", torch.tensor(coef, dtype=f32))
            self.register_buffer("bias", torch.tensor(bias, dtype=f32))

        def forward(self, *features: torch.Tensor) -> torch.Tensor:
            x = (torch.stack(features, dim=-1) - self.mean) / self.std
            return x @ self.coef + self.bias

    return Ridge()


def _xy(table: pandas.DataFrame) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    missing = [c for c in (*FEATURES, "retention") if c not in table.columns]
    if missing:
        raise ValueError(f"table: missing columns {missing}")
    x = table[list(FEATURES)].to_numpy(dtype=np.float64)
    y = table["retention"].to_numpy(dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("table: features and retention must be finite")
    return x, y


def _ridge(xs: torch.Tensor, yc: torch.Tensor, alpha: float) -> torch.Tensor:
    """Coefficients of ridge on standardised ``xs`` and centred ``yc`` (float64)."""
    import torch

    n, k = xs.shape
    gram = xs.T @ xs + alpha * n * torch.eye(k, dtype=torch.float64)
    coef: torch.Tensor = torch.linalg.solve(gram, xs.T @ yc)
    return coef


def loo_rmse(xs: torch.Tensor, yc: torch.Tensor, alpha: float) -> float:
    """Leave-one-out RMSE of ridge (with intercept) from one fit: residual / (1 - leverage).

    The leverage of the intercept adds 1/n to the hat matrix's diagonal. Standardisation
    stays that of all training cells (the usual shortcut; it changes little)."""
    import torch

    n, k = xs.shape
    gram = xs.T @ xs + alpha * n * torch.eye(k, dtype=torch.float64)
    hat = xs @ torch.linalg.solve(gram, xs.T)
    resid = yc - hat @ yc
    leverage = torch.diagonal(hat) + 1.0 / n
    loo = resid / torch.clamp(1.0 - leverage, min=1e-9)
    return float(torch.sqrt((loo**2).mean()))


def train_cell_model(
    table: pandas.DataFrame,
    config: CellConfig | None = None,
    *,
    data_query: str = "",
    data_sha256: str = "",
    holdout: pandas.DataFrame | None = None,
) -> TrainedCell:
    """Fit retention on FEATURES of ``table`` (one row per cell, from :func:`feature_table`)
    by ridge regression. Metrics are on ``holdout`` when given, else on a seeded
    ``holdout_fraction`` of the cells (not fitted on): the model's (``mae``, ``rmse``,
    ``r2``, ``n``) and the naive baseline's, every held-out cell predicted at the
    training cells' mean retention (``baseline_mae``, ``baseline_rmse``)."""
    import torch

    cfg = config or CellConfig()
    x_all, y_all = _xy(table)
    if holdout is None:
        tr, ho = split_holdout(len(table), cfg.holdout_fraction, cfg.seed)
        x, y, x_ho, y_ho = x_all[tr], y_all[tr], x_all[ho], y_all[ho]
    else:
        x, y = x_all, y_all
        x_ho, y_ho = _xy(holdout)
        x_all = np.concatenate([x_all, x_ho])
    if len(y) < 3:
        raise ValueError(f"table: need at least 3 training cells, got {len(y)}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature standardises to 0, not NaN
    xs = torch.tensor((x - mean) / std, dtype=torch.float64)
    yc = torch.tensor(y - y.mean(), dtype=torch.float64)
    alpha = (
        min(ALPHA_GRID, key=lambda a: loo_rmse(xs, yc, a))
        if cfg.alpha == "auto"
        else float(cfg.alpha)
    )
    coef = _ridge(xs, yc, alpha).numpy()
    module = _module(mean, std, coef, float(y.mean())).eval()
    with torch.no_grad():
        pred = module(*torch.tensor(x_ho, dtype=torch.float32).T).numpy()
    metrics = regression_metrics(y_ho, pred)
    baseline = regression_metrics(y_ho, np.full_like(y_ho, y.mean()))
    metrics |= {"baseline_mae": baseline["mae"], "baseline_rmse": baseline["rmse"]}
    lo, hi = x_all.min(axis=0), x_all.max(axis=0)
    pad = (hi - lo) * cfg.range_margin + 1e-9
    ranges = {f: (float(lo[i] - pad[i]), float(hi[i] + pad[i])) for i, f in enumerate(FEATURES)}
    info = TrainingDataInfo(query=data_query, sha256=data_sha256, rows=len(table))
    return TrainedCell(module, cfg, metrics, ranges, info, alpha)


def export_cell_model(trained: TrainedCell) -> bytes:
    """The model as ONNX: inputs FEATURES (each (n,)), output ``retention`` (n,)."""
    import torch

    args = tuple(torch.ones(4) for _ in FEATURES)
    batch = torch.export.Dim("batch")
    with quiet_exporter():
        program = torch.onnx.export(
            trained.module.eval(),
            args,
            input_names=list(FEATURES),
            output_names=["retention"],
            dynamic_shapes=(tuple({0: batch} for _ in FEATURES),),  # forward(*features)
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    return bytes(program.model_proto.SerializeToString())


def cell_record(trained: TrainedCell, name: str = "cell_retention") -> ModelRecord:
    """The record (metadata) of a trained cell model."""
    import onnx
    import torch

    return ModelRecord(
        name=name,
        kind="cell",
        inputs=[
            InputSpec(name=f, shape=[None], units=UNITS[f], min=lo, max=hi)
            for f, (lo, hi) in trained.ranges.items()
        ],
        outputs=[
            OutputSpec(
                name="retention",
                shape=[None],
                description=f"Q(cycle {trained.config.target_cycle}) / Q(early cycle)",
            )
        ],
        training_data=trained.training_data,
        metrics=trained.metrics,
        primary_metric="rmse",
        framework={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": str(OPSET),
            "python": platform.python_version(),
        },
        extra={
            "config": trained.config.model_dump(mode="json"),
            "early_pair": list(trained.config.early_cycles),
            "alpha": trained.alpha,
        },
    )


def register_cell_model(
    registry: str | Path | Registry,
    trained: TrainedCell,
    name: str = "cell_retention",
    *,
    promote: bool = False,
) -> ModelRecord:
    """Export ``trained`` and add it to ``registry`` (promoted when ``promote``)."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    record = reg.add(export_cell_model(trained), cell_record(trained, name))
    if promote:
        reg.promote(name, record.version)
    return record


class CellPredictor(Predictor):
    """Capacity retention of cells from their early cycles, from a stored ONNX model."""

    kind = "cell"
    default_name = "cell_retention"

    def predict_features(self, features: Mapping[str, ArrayLike]) -> NDArray[np.float64]:
        """Retention for feature columns (each (n,)), checked against the valid ranges."""
        out = self.model.run(dict(features))
        return out["retention"].astype(np.float64)

    @property
    def early_cycles(self) -> tuple[int, int]:
        """The cycle pair the model's features come from (its record says which)."""
        a, b = self.record.extra.get("early_pair", EARLY_PAIR)
        return int(a), int(b)

    def predict(self, cells: Sequence[CellCycles]) -> NDArray[np.float64]:
        """Retention at the model's target cycle for each cell (features from the
        model's early cycles: each cell needs their Q(V) curves)."""
        table = feature_table(cells, early_cycles=self.early_cycles)
        return self.predict_features({f: table[f].to_numpy() for f in FEATURES})
