"""`labctl models`: the ONNX model registry (list, show, verify, promote, rollback) and
training the property model from the lab's measurements in Tiled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from labctl.cli.models_bms import bms_data

if TYPE_CHECKING:
    from labctl.models.registry import Registry

models = typer.Typer(
    no_args_is_help=True, help="ONNX models: list, show, verify, promote, rollback, train."
)
models.command("bms-data")(bms_data)

Root = Annotated[
    Path | None,
    typer.Option(
        "--registry",
        help="Registry directory (default: <data>/models, data = LABCTL_DATA or ./data/tiled).",
    ),
]


def _registry(root: Path | None) -> Registry:
    from labctl.data import DataConfig
    from labctl.models.registry import Registry

    return Registry(root or DataConfig.from_env().directory.resolve() / "models")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@models.command("list")
def models_list(
    registry: Root = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Every model and version; * marks the promoted one."""
    reg = _registry(registry)
    rows: list[dict[str, Any]] = []
    for name in reg.names():
        promoted = reg.promoted(name)
        for rec in reg.versions(name):
            rows.append({"name": name, "version": rec.version, "promoted": rec.version == promoted,
                         "kind": rec.kind, "sha256": rec.sha256, "created": rec.created,
                         "metrics": rec.metrics, "rows": rec.training_data.rows})  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no models in {reg.root}")
    for r in rows:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items())
        mark = "*" if r["promoted"] else " "
        typer.echo(f"{mark} {r['name']:14s} {r['version']:5s} {r['sha256'][:12]}  "
                   f"{r['created'][:19]}  {r['rows']:5d} rows  {metrics}")  # fmt: skip


@models.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Model name, e.g. conductivity.")],
    version: Annotated[str | None, typer.Argument(help="v3, or a sha256 prefix.")] = None,
    registry: Root = None,
) -> None:
    """The full metadata record (inputs with units and valid ranges, data, metrics)."""
    from labctl.models.registry import ModelError

    try:
        rec = _registry(registry).record(name, version)
    except (ModelError, KeyError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(rec.model_dump_json(indent=1))


@models.command("verify")
def models_verify(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str | None, typer.Argument()] = None,
    registry: Root = None,
) -> None:
    """Hash the stored file and compare with its record (exit 1 on a mismatch)."""
    from labctl.models.registry import ModelError

    reg = _registry(registry)
    try:
        reg.load_bytes(name, version)
        rec = reg.record(name, version)
    except (ModelError, KeyError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"ok {name} {rec.version} sha256 {rec.sha256}")


@models.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    registry: Root = None,
) -> None:
    """Make VERSION the one loaded by default."""
    from labctl.models.registry import ModelError

    try:
        rec = _registry(registry).promote(name, version)
    except (ModelError, KeyError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"promoted {name} {rec.version}")


@models.command("rollback")
def models_rollback(name: Annotated[str, typer.Argument()], registry: Root = None) -> None:
    """Promote again the version promoted before the current one."""
    from labctl.models.registry import ModelError

    try:
        rec = _registry(registry).rollback(name)
    except (ModelError, KeyError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"rolled back {name} to {rec.version}")


@models.command("train-property")
def models_train_property(
    campaign: Annotated[
        str | None, typer.Option(help="Only this campaign's measurements (default: all).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Full-batch Adam steps per member.")] = 1500,
    registry: Root = None,
) -> None:
    """Train the conductivity model on the measurements in Tiled; promote if not worse."""
    from labctl.data import DataConfig, open_store
    from labctl.models.property import PropertyConfig
    from labctl.models.training_data import conductivity_table
    from labctl.models.update import update_property_model

    reg = _registry(registry)
    with open_store(DataConfig.from_env()) as store:
        table = conductivity_table(store, campaign=campaign, equilibrated_only=False)
    if len(table.frame) < 6:
        raise _fail(f"{len(table.frame)} measurements in Tiled; need at least 6 to train")
    typer.echo(f"training on {len(table.frame)} measurements ({table.query})", err=True)
    decision = update_property_model(
        reg, table.frame, config=PropertyConfig(epochs=epochs, molality_range=(0.0, 3.0),
                                                temperature_range=(-30.0, 80.0)),
        data_query=table.query, data_sha256=table.sha256,
    )  # fmt: skip
    typer.echo(decision.model_dump_json(indent=1))


@models.command("train-cell")
def models_train_cell(
    target_cycle: Annotated[int, typer.Option(help="Cycle whose capacity retention to predict.")],
    early_cycles: Annotated[
        str, typer.Option(help="The two early cycles A,B the features compare (B < target).")
    ] = "2,10",
    campaign: Annotated[str | None, typer.Option(help="Only this campaign's cells.")] = None,
    alpha: Annotated[
        str, typer.Option(help="Ridge penalty, or 'auto' (leave-one-out on the training cells).")
    ] = "auto",
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of the cells held out to score the model.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split.")] = 0,
    dcir_s: Annotated[
        float | None,
        typer.Option(
            help="DC resistance this many s into each discharge (default 1.5 log periods)."
        ),
    ] = None,
    registry: Root = None,
) -> None:
    """Fit the cell model on the cycle_cell runs in Tiled (features of the early cycles
    -> retention at TARGET_CYCLE); promote if not worse. Cells need TARGET_CYCLE cycles.
    Prints the update decision (JSON); the model's record holds the held-out metrics and
    the naive baseline's (baseline_mae, baseline_rmse: the training cells' mean)."""
    from pydantic import ValidationError

    from labctl.data import DataConfig, open_store
    from labctl.models.cell import CellConfig, feature_table
    from labctl.models.training_data import cell_cycles_table, cell_table_sha256
    from labctl.models.update import update_cell_model

    try:
        a, b = (int(x) for x in early_cycles.split(","))
    except ValueError:
        raise _fail(f"--early-cycles: need two cycle numbers A,B, got {early_cycles!r}") from None
    try:
        penalty: float | Literal["auto"] = "auto" if alpha == "auto" else float(alpha)
        config = CellConfig(target_cycle=target_cycle, early_cycles=(a, b), alpha=penalty,
                            holdout_fraction=holdout_fraction, seed=seed)  # fmt: skip
    except (ValidationError, ValueError) as exc:
        raise _fail(f"invalid settings: {exc}") from None
    reg = _registry(registry)
    with open_store(DataConfig.from_env()) as store:
        try:
            cells, skipped = cell_cycles_table(store, campaign=campaign, min_cycles=2,
                                               dcir_s=dcir_s)  # fmt: skip
        except ValueError as exc:
            raise _fail(str(exc)) from None
        url = store.url
    usable = sorted(
        (c for c in cells if target_cycle in set(c.summary["cycle"]) and {a, b} <= set(c.qv)),
        key=lambda c: c.cell_id,  # a split and a hash that do not depend on the runs' order
    )
    for uid, why in skipped.items():
        typer.echo(f"left out run {uid}: {why}", err=True)
    if len(usable) < 4:
        raise _fail(
            f"{len(usable)} cells in Tiled reached cycle {target_cycle} with Q(V) curves of "
            f"cycles {a} and {b} ({len(cells)} cycled); need at least 4"
        )
    table = feature_table(usable, target_cycle, early_cycles=(a, b))
    query = json.dumps(
        {
            "source": f"labctl.data Store at {url}",
            "runs": {"plan_name": "cycle_cell", "campaign_id": campaign, "exit_status": "success"},
            "cells": list(table["cell_id"]),
            "target_cycle": target_cycle,
            "early_cycles": [a, b],
            "dcir_s": dcir_s,
        },
        sort_keys=True,
    )
    typer.echo(f"training on {len(table)} cells ({query})", err=True)
    decision = update_cell_model(
        reg, table, config=config, data_query=query,
        data_sha256=cell_table_sha256(table),
    )  # fmt: skip
    typer.echo(decision.model_dump_json(indent=1))


@models.command("train-bms")
def models_train_bms(
    data: Annotated[
        Path, typer.Option(help="Ground-truth profiles from `labctl models bms-data`.")
    ] = Path("data/bms"),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of the training.")] = 0,
    cell: Annotated[
        str | None, typer.Option(help="edge_bms cell model name or file (default lg-m50).")
    ] = None,
    ship_to: Annotated[
        Path | None,
        typer.Option(help="Also write <dir>/bms-correction.onnx + .json for edge_bms."),
    ] = None,
    registry: Root = None,
) -> None:
    """Train the edge BMS voltage-correction network (torch -> ONNX) on the training
    profiles, tune it on half of them, register it, promote it if not worse than the
    promoted version on those tuning profiles, and score the plain and the corrected
    filter on the held-out profiles. Prints the scores (JSON)."""
    from edge_bms.cell import load_cell
    from labctl.models.bms_correction import BmsTrainConfig, ship, train_bms

    if not (data / "manifest.json").is_file():
        raise _fail(f"--data: {data}/manifest.json not found; run `labctl models bms-data` first")
    reg = _registry(registry)
    result = train_bms(
        data,
        reg,
        cell=load_cell(cell),
        config=BmsTrainConfig(steps=steps, seed=seed),
        progress=lambda m: typer.echo(m, err=True),
    )
    out: dict[str, Any] = {
        "version": result.record.version,
        "promoted": result.promoted,
        "reason": result.reason,
        "heldout_plain": result.plain,
        "heldout_corrected": result.corrected,
        "plain_voltage_noise_v": result.plain_noise_v,
        "r_inflation": result.record.extra["r_inflation"],
        "tune_corrected_rmse": result.tune_corrected,
        "tune_incumbent_rmse": result.tune_incumbent,
    }
    if ship_to is not None:
        onnx_path, _ = ship(reg, result.record.name, result.record.version, ship_to)
        out["shipped"] = str(onnx_path)
    typer.echo(json.dumps(out, indent=1))
