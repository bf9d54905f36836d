"""Online update: retrain on the latest data, validate on held-out data, promote if not worse.

After a batch of experiments, :func:`update_property_model` (conductivity) or
:func:`update_cell_model` (capacity retention) trains a candidate on the training
share of the data and stores it (every candidate is kept, promoted or not). It then
scores the candidate *and* the promoted model through onnxruntime on the same held-out
rows, and promotes the candidate only when its RMSE is not worse (within a relative
``tolerance``). The previous model stays loadable and ``Registry.rollback`` restores
it. The returned :class:`UpdateDecision` records why.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from labctl.models.cell import (
    FEATURES,
    CellConfig,
    CellPredictor,
    register_cell_model,
    train_cell_model,
)
from labctl.models.property import (
    SOLVENTS,
    PropertyConfig,
    PropertyPredictor,
    register_property_model,
    regression_metrics,
    split_holdout,
    train_property_model,
)
from labctl.models.registry import ModelRecord, Registry

if TYPE_CHECKING:
    import pandas

__all__ = ["UpdateDecision", "in_valid_range", "update_cell_model", "update_property_model"]

Predict = Callable[[str, "pandas.DataFrame"], NDArray[np.float64]]


class UpdateDecision(BaseModel):
    """What an update did and why."""

    name: str
    candidate_version: str
    candidate_sha256: str
    incumbent_version: str | None
    promoted: bool
    promoted_version: str | None
    metric: str
    candidate_score: float
    incumbent_score: float | None
    tolerance: float
    holdout_rows: int
    compared_rows: int
    train_rows: int
    data_sha256: str
    reason: str
    time: str


def in_valid_range(record: ModelRecord, df: pandas.DataFrame) -> NDArray[np.bool_]:
    """Boolean mask of the rows of ``df`` a model accepts: every input column within the
    record's range (a property model's ``fractions`` input reads the SOLVENTS columns)."""
    ok = np.ones(len(df), dtype=bool)
    for spec in record.inputs:
        columns = list(SOLVENTS) if spec.name == "fractions" else [spec.name]
        values = df[columns].to_numpy(dtype=np.float64)
        ok &= ((values >= spec.min) & (values <= spec.max)).all(axis=1)
    return ok


def _decide(
    reg: Registry,
    candidate: ModelRecord,
    held: pandas.DataFrame,
    truth: NDArray[np.float64],
    predict: Predict,
    tolerance: float,
    base: dict[str, Any],
) -> UpdateDecision:
    """Score candidate and incumbent on the same held-out rows; promote if not worse."""
    name, metric = candidate.name, candidate.primary_metric
    incumbent_version = reg.promoted(name)
    # Held-out rows the candidate itself refuses (a measured molality a hair outside its
    # declared range) cannot score it: compare on the rows it accepts.
    inside = in_valid_range(candidate, held)
    held, truth = held[inside], truth[inside]
    if not len(held):
        raise ValueError(
            f"{name} {candidate.version}: none of the held-out rows lies inside its valid "
            "ranges; widen the training ranges (PropertyConfig.molality_range, ...)"
        )
    cand_all = predict(candidate.version, held)
    base = {
        **base,
        "name": name,
        "candidate_version": candidate.version,
        "candidate_sha256": candidate.sha256,
        "incumbent_version": incumbent_version,
        "metric": metric,
        "tolerance": tolerance,
        "holdout_rows": len(held),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    mask = (
        in_valid_range(reg.record(name, incumbent_version), held)
        if incumbent_version is not None
        else np.ones(len(held), dtype=bool)
    )
    if incumbent_version is None or not mask.any():
        reg.promote(name, candidate.version)
        why = (
            "no promoted version yet"
            if incumbent_version is None
            else f"{incumbent_version} accepts none of the held-out rows (outside its ranges)"
        )
        return UpdateDecision(
            **base,
            promoted=True,
            promoted_version=candidate.version,
            candidate_score=regression_metrics(truth, cand_all)[metric],
            incumbent_score=None,
            compared_rows=len(held) if incumbent_version is None else 0,
            reason=why,
        )
    inc_pred = predict(incumbent_version, held[mask])
    c_score = regression_metrics(truth[mask], cand_all[mask])[metric]
    i_score = regression_metrics(truth[mask], inc_pred)[metric]
    outcome = reg.promote_if_not_worse(
        name,
        candidate.version,
        tolerance=tolerance,
        candidate_score=c_score,
        incumbent_score=i_score,
    )
    return UpdateDecision(
        **base,
        promoted=outcome.promoted,
        promoted_version=reg.promoted(name),
        candidate_score=c_score,
        incumbent_score=i_score,
        compared_rows=int(mask.sum()),
        reason=f"on {int(mask.sum())} held-out rows: {outcome.reason}",
    )


def _split(
    data: pandas.DataFrame, holdout: pandas.DataFrame | None, fraction: float, seed: int
) -> tuple[pandas.DataFrame, pandas.DataFrame]:
    """(train, held-out): ``holdout`` when given, else a seeded ``fraction`` of ``data``."""
    if holdout is not None:
        return data, holdout
    tr, ho = split_holdout(len(data), fraction, seed)
    return data.iloc[tr], data.iloc[ho]


def update_property_model(
    registry: str | Path | Registry,
    data: pandas.DataFrame,
    *,
    name: str = "conductivity",
    config: PropertyConfig | None = None,
    data_query: str = "",
    data_sha256: str = "",
    holdout: pandas.DataFrame | None = None,
    tolerance: float = 0.0,
) -> UpdateDecision:
    """Retrain the property model ``name`` on ``data`` and promote it only if not worse.

    ``holdout`` defaults to a seeded ``config.holdout_fraction`` of ``data`` (not
    trained on). Both models are scored (RMSE of the mean, mS/cm) on the held-out rows
    inside the incumbent's valid ranges; when there is no incumbent, or it accepts none
    of them, the candidate is promoted and the reason says so.
    """
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    cfg = config or PropertyConfig()
    train, held = _split(data, holdout, cfg.holdout_fraction, cfg.seed)
    trained = train_property_model(
        train, cfg, data_query=data_query, data_sha256=data_sha256, holdout=held
    )
    candidate = register_property_model(reg, trained, name)

    def predict(version: str, rows: pandas.DataFrame) -> NDArray[np.float64]:
        return PropertyPredictor.load(reg, name, version).predict_frame(rows)[0]

    truth = held["conductivity_mS_cm"].to_numpy(dtype=np.float64)
    base = {"train_rows": len(train), "data_sha256": data_sha256}
    return _decide(reg, candidate, held, truth, predict, tolerance, base)


def update_cell_model(
    registry: str | Path | Registry,
    table: pandas.DataFrame,
    *,
    name: str = "cell_retention",
    config: CellConfig | None = None,
    data_query: str = "",
    data_sha256: str = "",
    holdout: pandas.DataFrame | None = None,
    tolerance: float = 0.0,
) -> UpdateDecision:
    """Refit the cell model ``name`` on ``table`` (FEATURES and ``retention`` per cell,
    :func:`labctl.models.cell.feature_table`) and promote it only if not worse (RMSE of
    the retention on held-out cells), as :func:`update_property_model` does."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    cfg = config or CellConfig()
    train, held = _split(table, holdout, cfg.holdout_fraction, cfg.seed)
    trained = train_cell_model(
        train, cfg, data_query=data_query, data_sha256=data_sha256, holdout=held
    )
    candidate = register_cell_model(reg, trained, name)

    def predict(version: str, rows: pandas.DataFrame) -> NDArray[np.float64]:
        model = CellPredictor.load(reg, name, version)
        return model.predict_features({f: rows[f].to_numpy() for f in FEATURES})

    truth = held["retention"].to_numpy(dtype=np.float64)
    base = {"train_rows": len(train), "data_sha256": data_sha256}
    return _decide(reg, candidate, held, truth, predict, tolerance, base)
