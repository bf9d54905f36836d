"""Electrolyte property model: formulation -> conductivity (mean and spread of an ensemble).

Inputs are the raw formulation: ``fractions`` (n, 5) solvent mass fractions in SOLVENTS
order summing to 1, ``salt_molality`` (n,) mol/kg of LiPF6, ``temperature_c`` (n,) degC.
Inside the model (torch and the exported ONNX graph alike):

1. rdkit descriptors of the solvents weighted by the fractions: one constant matrix
   multiply (``labctl.models.descriptors``);
2. features ``[descriptors, molality, temperature]`` standardised with the training
   set's mean and std (constants);
3. an ensemble of small MLPs (one bootstrap resample and seed each), run as batched
   matrix multiplies; outputs ``mean`` and ``std`` over the members, in mS/cm.

:func:`train_property_model` and :func:`export_property_model` need torch;
:class:`PropertyPredictor` serves the ONNX file with onnxruntime and never imports torch.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from labctl.models._export import quiet_exporter
from labctl.models.descriptors import DESCRIPTOR_NAMES, SOLVENTS, descriptor_matrix
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
    "COLUMNS",
    "SOLVENTS",
    "TARGET",
    "PropertyConfig",
    "PropertyPredictor",
    "TrainedProperty",
    "data_ranges",
    "export_property_model",
    "property_record",
    "register_property_model",
    "regression_metrics",
    "split_holdout",
    "torch_predict",
    "train_property_model",
]

TARGET = "conductivity_mS_cm"
COLUMNS: tuple[str, ...] = (*SOLVENTS, "salt_molality", "temperature_c", TARGET)
INPUT_NAMES = ("fractions", "salt_molality", "temperature_c")
OUTPUT_NAMES = ("mean", "std")
OPSET = 18


class PropertyConfig(BaseModel):
    """Training settings of the property model."""

    model_config = ConfigDict(extra="forbid")

    members: int = Field(default=5, ge=2, le=64, description="ensemble size")
    hidden: int = Field(default=32, ge=2, le=1024, description="units per hidden layer")
    epochs: int = Field(default=1500, ge=1, le=200_000, description="full-batch Adam steps")
    lr: float = Field(default=1e-2, gt=0.0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(default=1e-5, ge=0.0, le=1.0)
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    seed: int = 0
    molality_range: tuple[float, float] | None = Field(
        default=None, description="valid salt molality, mol/kg (default: the data's range)"
    )
    temperature_range: tuple[float, float] | None = Field(
        default=None, description="valid temperature, degC (default: the data's range)"
    )

    @field_validator("molality_range", "temperature_range")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (np.isfinite(v).all() and v[0] < v[1]):
            raise ValueError(f"must be a finite (low, high) with low < high, got {v!r}")
        return v


@dataclass
class TrainedProperty:
    """A trained ensemble (torch module) and what goes in its record."""

    module: torch.nn.Module
    config: PropertyConfig
    metrics: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    training_data: TrainingDataInfo


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """MAE, RMSE and R^2 of predictions (R^2 is NaN for a constant target)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(
            f"y_true and y_pred: need equal, non-empty shapes, got {t.shape}, {p.shape}"
        )
    err = p - t
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "n": float(t.size),
    }


def split_holdout(
    n: int, fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices (train, holdout) of a seeded random split; holdout has >= 1 row."""
    if n < 2:
        raise ValueError(f"data: need at least 2 rows to hold some out, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    k = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def _check_frame(df: pandas.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"data: missing columns {missing}; need {list(COLUMNS)}")
    values = df[list(COLUMNS)].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        row = int(np.argwhere(~np.isfinite(values))[0][0])
        raise ValueError(f"data: row {row} has a non-finite value: {df.iloc[row].to_dict()}")
    sums = values[:, : len(SOLVENTS)].sum(axis=1)
    if (np.abs(sums - 1.0) > 1e-3).any():
        row = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(f"data: fractions of row {row} sum to {sums[row]:.4f}, not 1")


def data_ranges(df: pandas.DataFrame) -> dict[str, tuple[float, float]]:
    """The valid ranges the data supports: molality and temperature min..max."""
    return {
        "salt_molality": (float(df["salt_molality"].min()), float(df["salt_molality"].max())),
        "temperature_c": (float(df["temperature_c"].min()), float(df["temperature_c"].max())),
    }


def _arrays(df: pandas.DataFrame) -> tuple[NDArray[np.float64], ...]:
    return (
        df[list(SOLVENTS)].to_numpy(dtype=np.float64),
        df["salt_molality"].to_numpy(dtype=np.float64),
        df["temperature_c"].to_numpy(dtype=np.float64),
        df[TARGET].to_numpy(dtype=np.float64),
    )


def _build_module(
    members: int, hidden: int, stats: dict[str, NDArray[np.float64]], seed: int
) -> torch.nn.Module:
    import torch
    from torch import nn

    n_feat = len(DESCRIPTOR_NAMES) + 2

    class Ensemble(nn.Module):
        """fractions, molality, temperature -> (mean, std) over the members."""

        descriptors: torch.Tensor
        x_mean: torch.Tensor
        x_std: torch.Tensor
        y_mean: torch.Tensor
        y_std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(seed)

            def init(*shape: int, fan_in: int) -> nn.Parameter:
                bound = 1.0 / fan_in**0.5
                return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

            f32 = torch.float32
            self.register_buffer("descriptors", torch.tensor(descriptor_matrix(), dtype=f32))
            self.register_buffer("x_mean", torch.tensor(stats["x_mean"], dtype=f32))
            self.register_buffer("x_std", torch.tensor(stats["x_std"], dtype=f32))
            self.register_buffer("y_mean", torch.tensor(stats["y_mean"], dtype=f32))
            self.register_buffer("y_std", torch.tensor(stats["y_std"], dtype=f32))
            self.w1 = init(members, n_feat, hidden, fan_in=n_feat)
            self.b1 = init(members, 1, hidden, fan_in=n_feat)
            self.w2 = init(members, hidden, hidden, fan_in=hidden)
            self.b2 = init(members, 1, hidden, fan_in=hidden)
            self.w3 = init(members, hidden, 1, fan_in=hidden)
            self.b3 = init(members, 1, 1, fan_in=hidden)

        def members_out(
            self, fractions: torch.Tensor, salt: torch.Tensor, temp: torch.Tensor
        ) -> torch.Tensor:
            """Each member's prediction, (members, n), mS/cm."""
            desc = fractions @ self.descriptors
            x = torch.cat([desc, salt.unsqueeze(-1), temp.unsqueeze(-1)], dim=-1)
            x = (x - self.x_mean) / self.x_std
            h = torch.tanh(torch.matmul(x.unsqueeze(0), self.w1) + self.b1)
            h = torch.tanh(torch.matmul(h, self.w2) + self.b2)
            y = (torch.matmul(h, self.w3) + self.b3).squeeze(-1)
            return y * self.y_std + self.y_mean

        def forward(
            self, fractions: torch.Tensor, salt_molality: torch.Tensor, temperature_c: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.members_out(fractions, salt_molality, temperature_c)
            mean = y.mean(dim=0)
            # Population std over members, written out so the ONNX graph is plain ops.
            std = torch.sqrt(((y - mean) ** 2).mean(dim=0))
            return mean, std

    return Ensemble()


def train_property_model(
    df: pandas.DataFrame,
    config: PropertyConfig | None = None,
    *,
    data_query: str = "",
    data_sha256: str = "",
    holdout: pandas.DataFrame | None = None,
) -> TrainedProperty:
    """Train the ensemble on ``df`` (columns COLUMNS) and measure it on held-out rows.

    Held-out rows are ``holdout`` when given, else a seeded ``holdout_fraction`` of
    ``df`` (those rows are then not trained on). Metrics (MAE, RMSE, R^2 of the
    ensemble mean, mS/cm) are on the held-out rows only.
    """
    import torch

    cfg = config or PropertyConfig()
    _check_frame(df)
    if holdout is None:
        tr_idx, ho_idx = split_holdout(len(df), cfg.holdout_fraction, cfg.seed)
        train, held = df.iloc[tr_idx], df.iloc[ho_idx]
    else:
        _check_frame(holdout)
        train, held = df, holdout
    fr, m, t, y = _arrays(train)
    feats = np.column_stack([fr @ descriptor_matrix(), m, t])
    x_std = feats.std(axis=0)
    stats = {
        "x_mean": feats.mean(axis=0),
        # Constant features (TPSA, H-bond acceptors are equal for all five carbonates)
        # get std 1 so standardising them gives 0, not NaN.
        "x_std": np.where(x_std > 1e-9, x_std, 1.0),
        "y_mean": np.array(y.mean()),
        "y_std": np.array(max(float(y.std()), 1e-6)),
    }
    torch.manual_seed(cfg.seed)
    module = _build_module(cfg.members, cfg.hidden, stats, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # Bootstrap: each member sees its own resample of the rows, as multiplicity weights.
    counts = np.stack(
        [rng.multinomial(len(y), np.full(len(y), 1 / len(y))) for _ in range(cfg.members)]
    )
    weights = torch.tensor(counts / counts.sum(axis=1, keepdims=True), dtype=torch.float32)
    tf = torch.tensor(fr, dtype=torch.float32)
    tm = torch.tensor(m, dtype=torch.float32)
    tt = torch.tensor(t, dtype=torch.float32)
    ty = torch.tensor((y - stats["y_mean"]) / stats["y_std"], dtype=torch.float32)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    module.train()
    y_mean, y_std = float(stats["y_mean"]), float(stats["y_std"])
    for _ in range(cfg.epochs):
        opt.zero_grad()
        pred = (module.members_out(tf, tm, tt) - y_mean) / y_std  # type: ignore[operator]
        loss = (weights * (pred - ty) ** 2).sum()
        loss.backward()
        opt.step()
        sched.step()
    module.eval()
    hf, hm, ht, hy = _arrays(held)
    with torch.no_grad():
        mean, _ = module(
            torch.tensor(hf, dtype=torch.float32),
            torch.tensor(hm, dtype=torch.float32),
            torch.tensor(ht, dtype=torch.float32),
        )
    metrics = regression_metrics(hy, mean.numpy())
    import pandas

    ranges = data_ranges(pandas.concat([train, held]))
    if cfg.molality_range is not None:
        ranges["salt_molality"] = cfg.molality_range
    if cfg.temperature_range is not None:
        ranges["temperature_c"] = cfg.temperature_range
    info = TrainingDataInfo(query=data_query, sha256=data_sha256, rows=len(df))
    return TrainedProperty(module, cfg, metrics, ranges, info)


def export_property_model(trained: TrainedProperty) -> bytes:
    """The ensemble as one ONNX graph (inputs INPUT_NAMES, outputs mean and std)."""
    import torch

    module = trained.module.eval()
    args = (torch.full((4, 5), 0.2), torch.ones(4), torch.full((4,), 25.0))
    batch = torch.export.Dim("batch")
    with quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    return bytes(program.model_proto.SerializeToString())


def property_record(trained: TrainedProperty, name: str = "conductivity") -> ModelRecord:
    """The record (metadata) of a trained property model."""
    import onnx
    import torch

    m_lo, m_hi = trained.ranges["salt_molality"]
    t_lo, t_hi = trained.ranges["temperature_c"]
    return ModelRecord(
        name=name,
        kind="property",
        inputs=[
            InputSpec(
                name="fractions",
                shape=[None, len(SOLVENTS)],
                units="mass fraction",
                min=0.0,
                max=1.0,
                columns=list(SOLVENTS),
                sums_to_one=True,
                description="solvent mass fractions, rows sum to 1",
            ),
            InputSpec(
                name="salt_molality",
                shape=[None],
                units="mol/kg",
                min=m_lo,
                max=m_hi,
                description="LiPF6 molality, mol per kg of solvent",
            ),
            InputSpec(name="temperature_c", shape=[None], units="degC", min=t_lo, max=t_hi),
        ],
        outputs=[
            OutputSpec(name="mean", shape=[None], units="mS/cm", description="ensemble mean"),
            OutputSpec(name="std", shape=[None], units="mS/cm", description="ensemble spread"),
        ],
        training_data=trained.training_data,
        metrics=trained.metrics,
        primary_metric="rmse",
        higher_is_better=False,
        framework={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": str(OPSET),
            "python": platform.python_version(),
        },
        extra={
            "config": trained.config.model_dump(mode="json"),
            "descriptors": list(DESCRIPTOR_NAMES),
            "target": TARGET,
        },
    )


def register_property_model(
    registry: str | Path | Registry,
    trained: TrainedProperty,
    name: str = "conductivity",
    *,
    promote: bool = False,
) -> ModelRecord:
    """Export ``trained`` and add it to ``registry`` (promoted when ``promote``)."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    record = reg.add(export_property_model(trained), property_record(trained, name))
    if promote:
        reg.promote(name, record.version)
    return record


class PropertyPredictor(Predictor):
    """Conductivity (mean, std in mS/cm) of formulations, from a stored ONNX model.

    Uses onnxruntime only (no torch). Inputs are checked against the model's valid
    ranges; an out-of-range value raises ``InputRangeError`` naming the input.
    """

    kind = "property"
    default_name = "conductivity"

    def predict(
        self,
        fractions: ArrayLike,
        salt_molality: ArrayLike,
        temperature_c: ArrayLike,
        *,
        batch_size: int = 4096,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(mean, std) in mS/cm for (n, 5) fractions, (n,) molality, (n,) temperature."""
        out = self.model.run(
            {
                "fractions": fractions,
                "salt_molality": salt_molality,
                "temperature_c": temperature_c,
            },
            batch_size=batch_size,
        )
        return out["mean"].astype(np.float64), out["std"].astype(np.float64)

    def predict_frame(
        self, df: pandas.DataFrame
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(mean, std) for a DataFrame with the SOLVENTS, salt_molality, temperature_c columns."""
        return self.predict(
            df[list(SOLVENTS)].to_numpy(dtype=np.float64),
            df["salt_molality"].to_numpy(dtype=np.float64),
            df["temperature_c"].to_numpy(dtype=np.float64),
        )


def torch_predict(
    trained: TrainedProperty, fractions: ArrayLike, salt: ArrayLike, temp: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(mean, std) from the torch module (the reference for the ONNX parity test)."""
    import torch

    with torch.no_grad():
        mean, std = trained.module(
            torch.as_tensor(np.asarray(fractions), dtype=torch.float32),
            torch.as_tensor(np.asarray(salt), dtype=torch.float32),
            torch.as_tensor(np.asarray(temp), dtype=torch.float32),
        )
    return mean.numpy().astype(np.float64), std.numpy().astype(np.float64)
