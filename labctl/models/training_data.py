"""Training data from Tiled: conductivity measurements (property model) and cycled cells
(cell model, :func:`cell_cycles_table`).

:func:`conductivity_table` reads the runs of ``prepare_and_measure`` and
``measure_conductivity`` (labctl.plans.electrolyte) from a :class:`labctl.data.Store`
and returns one row per equilibrated temperature point:

* composition: the ``composition`` stream of the same run (achieved fractions and
  molality, by the balance); for a ``measure_conductivity`` run, the ``composition``
  of the ``prepare_electrolyte`` run of the same ``sample_id``; else the target recipe
  of the start document (``composition_source`` says which);
* ``temperature_c`` (the meter's, averaged over the agreeing readings) and
  ``conductivity_mS_cm`` from the ``conductivity`` stream.

With the table comes a query description (what to rerun to get the same rows) and the
sha256 of the rows, both stored in the model's metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labctl.models.descriptors import SOLVENTS

if TYPE_CHECKING:
    import pandas

    from labctl.data.store import Store
    from labctl.models.cell import CellCycles

__all__ = [
    "MEASUREMENT_PLANS",
    "TrainingTable",
    "cell_cycles",
    "cell_cycles_table",
    "cell_table_sha256",
    "conductivity_table",
    "table_sha256",
]

MEASUREMENT_PLANS: tuple[str, ...] = ("prepare_and_measure", "measure_conductivity")
VALUE_COLUMNS: tuple[str, ...] = (
    *SOLVENTS,
    "salt_molality",
    "temperature_c",
    "conductivity_mS_cm",
)


@dataclass(frozen=True)
class TrainingTable:
    """Rows for :func:`labctl.models.property.train_property_model` and their provenance."""

    frame: pandas.DataFrame
    query: str
    sha256: str
    runs: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Runs not used (uid -> why)."""


def table_sha256(frame: pandas.DataFrame) -> str:
    """sha256 of the value columns and run uids, in a canonical order and float format."""
    cols = [c for c in ("run_uid", *VALUE_COLUMNS) if c in frame.columns]
    canon = frame[cols].sort_values(cols).reset_index(drop=True)
    return hashlib.sha256(canon.to_csv(index=False, float_format="%.17g").encode()).hexdigest()


def _composition_from_stream(row: Any) -> tuple[dict[str, float], float]:
    fractions = {s: float(row.get(f"fraction_{s}", 0.0)) for s in SOLVENTS}
    return fractions, float(row["salt_molality"])


def _composition_from_recipe(recipe: dict[str, Any]) -> tuple[dict[str, float], float]:
    given = {str(k): float(v) for k, v in (recipe.get("fractions") or {}).items()}
    unknown = set(given) - set(SOLVENTS)
    if unknown:
        raise ValueError(f"recipe: unknown solvents {sorted(unknown)}")
    return {s: given.get(s, 0.0) for s in SOLVENTS}, float(recipe.get("salt_molality", 0.0))


def conductivity_table(
    store: Store,
    *,
    campaign: str | None = None,
    plans: Sequence[str] = MEASUREMENT_PLANS,
    equilibrated_only: bool = True,
    limit: int | None = None,
) -> TrainingTable:
    """Conductivity measurements of successful runs as a table (see the module docstring).

    Columns: SOLVENTS (mass fractions, renormalised to sum 1), ``salt_molality``,
    ``temperature_c``, ``conductivity_mS_cm``, plus ``run_uid``, ``sample_id``,
    ``setpoint_c`` and ``composition_source``.
    """
    import pandas

    rows: list[dict[str, Any]] = []
    used: list[str] = []
    skipped: dict[str, str] = {}
    for plan in plans:
        for summary in store.runs(campaign=campaign, plan=plan, limit=limit):
            uid = summary.uid
            if summary.exit_status != "success":
                skipped[uid] = f"exit status {summary.exit_status}"
                continue
            info = store.run(uid)
            if "conductivity" not in info.streams:
                skipped[uid] = "no conductivity stream"
                continue
            source = "composition"
            if "composition" in info.streams:
                comp = store.read(uid, "composition").iloc[-1]
                fractions, molality = _composition_from_stream(comp)
            else:
                prepared = (
                    [
                        r
                        for r in store.runs(sample=summary.sample_id, plan="prepare_electrolyte")
                        if r.exit_status == "success" and "composition" in store.run(r.uid).streams
                    ]
                    if summary.sample_id
                    else []
                )
                if prepared:
                    comp = store.read(prepared[0].uid, "composition").iloc[-1]
                    fractions, molality = _composition_from_stream(comp)
                    source = f"prepare_electrolyte {prepared[0].uid}"
                elif info.start.get("recipe"):
                    fractions, molality = _composition_from_recipe(info.start["recipe"])
                    source = "recipe (target)"
                else:
                    skipped[uid] = "no composition: no stream, no prepared sample, no recipe"
                    continue
            total = sum(fractions.values())
            if not total > 0:
                skipped[uid] = f"fractions sum to {total}"
                continue
            points = store.read(uid, "conductivity")
            n_before = len(rows)
            for _, point in points.iterrows():
                if equilibrated_only and not bool(point.get("equilibrated", True)):
                    continue
                rows.append(
                    {
                        **{s: fractions[s] / total for s in SOLVENTS},
                        "salt_molality": molality,
                        "temperature_c": float(point["temperature_c"]),
                        "conductivity_mS_cm": float(point["conductivity_mS_cm"]),
                        "run_uid": uid,
                        "sample_id": summary.sample_id,
                        "setpoint_c": float(point["setpoint_c"]),
                        "composition_source": source,
                    }
                )
            if len(rows) > n_before:
                used.append(uid)
            else:
                skipped[uid] = "no equilibrated conductivity point"
    columns = [*VALUE_COLUMNS, "run_uid", "sample_id", "setpoint_c", "composition_source"]
    frame = pandas.DataFrame(rows, columns=columns)
    query = json.dumps(
        {
            "source": f"labctl.data Store at {store.url}",
            "runs": {"plan_name": list(plans), "campaign_id": campaign, "exit_status": "success"},
            "stream": "conductivity",
            "equilibrated_only": equilibrated_only,
            "composition": "run's composition stream > prepare_electrolyte of the sample > recipe",
        },
        sort_keys=True,
    )
    return TrainingTable(frame, query, table_sha256(frame), used, skipped)


# -- cells -------------------------------------------------------------------------------


DCIR_LOG_PERIODS = 1.5
"""Default DC-resistance time, in data-log periods of the run (see :func:`cell_cycles`)."""


def cell_cycles(store: Store, uid: str, *, dcir_s: float | None = None) -> CellCycles:
    """One ``cycle_cell`` run as :class:`labctl.models.cell.CellCycles`.

    Every segment of the run (formation, rate test, cycling) counts as one cycle of the
    cell, numbered as the plan numbered them. Per cycle: charge and discharge capacity
    and coulombic efficiency from the ``cycles`` stream; the discharge Q(V) curve from
    the ``cycling`` stream (the last attempt of each segment); ``resistance_ohm``, the
    DC resistance ``dcir_s`` seconds into the discharge: the voltage drop from the rest
    right before it (the rest's last row, logged at the step change) to the voltage
    interpolated at ``dcir_s``, over the current there. A fixed time, because the
    cycler logs on its own clock: the first row of a discharge comes anywhere up to a
    log period after its start, and the polarisation it includes would vary from cycle
    to cycle. Default ``dcir_s``: 1.5 log periods of the run (``plan_args.log_period_s``
    of its start document), so that rows on both sides of it exist; a cycle without
    them gets the median of the others.
    """
    import numpy as np
    import pandas

    from labctl.models.cell import CellCycles

    info = store.run(uid)
    if "cycles" not in info.streams or "cycling" not in info.streams:
        raise ValueError(
            f"run {uid}: not a cycle_cell run with data (streams {list(info.streams)})"
        )
    if dcir_s is None:
        period = float((info.start.get("plan_args") or {}).get("log_period_s") or 10.0)
        dcir_s = DCIR_LOG_PERIODS * period
    if not (np.isfinite(dcir_s) and dcir_s > 0):
        raise ValueError(f"dcir_s: must be finite and > 0, got {dcir_s!r}")
    cycles = store.read(uid, "cycles")
    rows = store.read(uid, "cycling")
    # The rows' own ``time`` (the cycler's clock) comes back as ``time_``: Tiled's
    # bluesky writer keeps ``time`` for the event's timestamp.
    clock = "time_" if "time_" in rows.columns else "time"
    summary, qv = [], {}
    for _, c in cycles.iterrows():
        n = int(c["cycle"])
        seg = rows[rows["segment"] == n]
        if len(seg):
            seg = seg[seg["attempt"] == seg["attempt"].max()]
        discharging = seg[seg["current"] > 0]
        resistance = float("nan")
        if len(discharging):
            # The discharge step's own rows (a pulse before it would be another step).
            discharging = discharging[discharging["step"] == discharging["step"].iloc[0]]
            first = discharging.index[0]
            before = seg.loc[: first - 1]
            if len(before) and abs(float(before["current"].iloc[-1])) < 1e-6:
                t = discharging[clock].to_numpy(dtype=np.float64) - float(before[clock].iloc[-1])
                if t[0] <= dcir_s <= t[-1]:
                    v = np.interp(dcir_s, t, discharging["voltage"].to_numpy(dtype=np.float64))
                    i = np.interp(dcir_s, t, discharging["current"].to_numpy(dtype=np.float64))
                    resistance = (float(before["voltage"].iloc[-1]) - float(v)) / float(i)
            qv[n] = (discharging["voltage"].to_numpy(), discharging["capacity"].to_numpy())
        summary.append({
            "cycle": n, "charge_capacity_ah": float(c["charge_ah"]),
            "discharge_capacity_ah": float(c["discharge_ah"]),
            "coulombic_efficiency": float(c["coulombic_efficiency"]),
            "resistance_ohm": resistance,
        })  # fmt: skip
    frame = pandas.DataFrame(summary)
    if frame["resistance_ohm"].isna().all():
        raise ValueError(
            f"run {uid}: no rest-to-discharge step with data-log rows around {dcir_s:g} s "
            "into the discharge to estimate a resistance from (dcir_s)"
        )
    frame["resistance_ohm"] = frame["resistance_ohm"].fillna(
        float(np.nanmedian(frame["resistance_ohm"]))
    )
    cell_id = str(info.start.get("cell_id") or info.summary.sample_id or uid)
    return CellCycles(summary=frame, qv=qv, cell_id=cell_id)


def cell_cycles_table(
    store: Store,
    *,
    campaign: str | None = None,
    min_cycles: int = 2,
    dcir_s: float | None = None,
) -> tuple[list[CellCycles], dict[str, str]]:
    """Every successful ``cycle_cell`` run (of ``campaign``) with at least ``min_cycles``
    cycles, as CellCycles (newest run first); and the runs left out with the reason.
    ``dcir_s``: see :func:`cell_cycles`."""
    cells, skipped = [], {}
    for s in store.runs(campaign=campaign, plan="cycle_cell"):
        if s.exit_status != "success":
            skipped[s.uid] = f"exit status {s.exit_status}"
            continue
        try:
            cell = cell_cycles(store, s.uid, dcir_s=dcir_s)
        except ValueError as exc:
            skipped[s.uid] = str(exc)
            continue
        if len(cell.qv) < min_cycles:
            skipped[s.uid] = f"{len(cell.qv)} cycles with a discharge (need {min_cycles})"
            continue
        cells.append(cell)
    return cells, skipped


def cell_table_sha256(table: pandas.DataFrame) -> str:
    """sha256 of a cell feature table (:func:`labctl.models.cell.feature_table`): its
    columns in their order, rows by ``cell_id``, floats written exactly."""
    canon = table.sort_values("cell_id", kind="stable").reset_index(drop=True)
    return hashlib.sha256(canon.to_csv(index=False, float_format="%.17g").encode()).hexdigest()
