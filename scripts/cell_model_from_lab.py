"""The cell model end to end from the simulated lab: cycle cells, store them, train, score.

1. Starts the simulated lab (``labctl mocks serve``, a separate process) with one cycler
   of ``--cells`` channels whose cells age at their own rates (``ageing_spread``, see
   docs/hardware_mocks.md), time-accelerated ``--speed`` times.
2. Runs the ``cycle_cell`` plan on every channel at once, each under its own RunEngine
   (one thread each, all on bluesky's event loop; one plan per RunEngine is all bluesky
   allows), every run stored in Tiled (``$LABCTL_DATA``, or ``--data``) under one
   campaign id.
3. Runs ``labctl models train-cell`` on those runs (``--target-cycle``, ``--early-cycles``)
   and prints the registered model's held-out figures next to the naive baseline
   (every held-out cell predicted at the training cells' mean retention).

    .venv/bin/python scripts/cell_model_from_lab.py [--cells 20] [--cycles 30]
        [--early-cycles 2,10] [--speed 8000] [--seed 0] [--folds 5] [--data DIR] [--json]

It prints the held-out figures of the registered model (MAE, RMSE of the retention)
next to the baseline's, and a k-fold cross-validation of the same fit over all cells.
tests/models/test_cell_from_lab.py runs the same functions with 10 cells, 12 cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

    from labctl.data import DataConfig
    from labctl.models.cell import CellConfig, TrainedCell
    from labctl.models.registry import ModelRecord


@dataclass(frozen=True)
class LabSettings:
    """The simulated cycler: ``cells`` channels, one cell each."""

    cells: int = 20
    seed: int = 0
    capacity_ah: float = 2.0
    fade_per_efc: float = 0.004
    resistance_growth_per_efc: float = 0.01
    ageing_spread: float = 0.35
    capacity_spread: float = 0.01
    internal_step_s: float = 2.0


@dataclass(frozen=True)
class CyclingSettings:
    """What ``cycle_cell`` runs on every channel (C-rates of ``LabSettings.capacity_ah``)."""

    cycles: int = 30
    c_rate: float = 2.0
    cv_end_c_rate: float = 0.1
    rest_s: float = 60.0
    log_period_s: float = 60.0
    poll_s: float = 0.25
    speed: float = 8000.0


def lab_config_toml(lab: LabSettings, speed: float) -> str:
    """A lab with only the cycler (what ``labctl mocks serve --config`` reads)."""
    options = {
        "channels": lab.cells,
        "capacity_ah": lab.capacity_ah,
        "fade_per_efc": lab.fade_per_efc,
        "resistance_growth_per_efc": lab.resistance_growth_per_efc,
        "ageing_spread": lab.ageing_spread,
        "capacity_spread": lab.capacity_spread,
        "internal_step_s": lab.internal_step_s,
        "initial_soc": 0.0,
    }
    body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    return (
        f"seed = {lab.seed}\nspeed = {speed}\n\n"
        f'[[instruments]]\nname = "cycler"\nkind = "cycler"\noptions = {{ {body} }}\n'
    )


def cycle_cells(
    records: Sequence[Mapping[str, Any]],
    cells: int,
    cycling: CyclingSettings,
    *,
    capacity_ah: float,
    campaign: str,
    data: DataConfig | None = None,
) -> list[dict[str, Any]]:
    """Run ``cycle_cell`` on channels 1..``cells`` at once, one RunEngine each, into the
    Tiled server of ``data`` (a :class:`labctl.data.DataConfig`; default from the
    environment). Returns each plan's result (in channel order); raises if any failed."""
    from bluesky import RunEngine
    from bluesky.run_engine import call_in_bluesky_event_loop
    from bluesky.utils import DuringTask

    from labctl.data import open_store
    from labctl.devices.cycler import BatteryCycler
    from labctl.devices.lab import LabDevices
    from labctl.plans.cycling import cycle_cell

    found = [r for r in records if r["kind"] == "cycler"]
    if len(found) != 1:
        raise ValueError(f"records: need exactly one cycler, got {[r['name'] for r in found]}")
    record = found[0]
    # build_lab_devices gives the cycler its default 8 channels; this lab may have more.
    cycler = BatteryCycler(str(record["url"]), str(record["name"]), channels=cells,
                           poll_period=cycling.poll_s)  # fmt: skip
    lab = LabDevices(cycler=cycler, by_name={cycler.name: cycler})
    protocol = {
        "nominal_capacity_ah": capacity_ah,
        "rest_s": cycling.rest_s,
        "cv_end_c_rate": cycling.cv_end_c_rate,
        "min_capacity_retention": 0.3,  # keep cycling: the target cycle must be reached
        "formation": None,
        "rate_test": None,
        "cycling": {"cycles": cycling.cycles, "charge_c_rate": cycling.c_rate,
                    "discharge_c_rate": cycling.c_rate},
    }  # fmt: skip
    # One event loop for all (the first RunEngine's, where the devices live); no SIGINT
    # handler (only the main thread may install one) and a plain blocking wait: each
    # RunEngine is driven from its own thread.
    engines: list[RunEngine] = []
    for _ in range(cells):
        loop = engines[0].loop if engines else None
        engines.append(RunEngine(call_returns_result=True, context_managers=[], loop=loop,
                                 during_task=DuringTask()))  # type: ignore[no-untyped-call]  # fmt: skip
    results: list[Any] = [None] * cells
    errors: dict[int, BaseException] = {}

    def run(k: int) -> None:
        try:
            results[k] = engines[k](
                cycle_cell(lab, k + 1, protocol, cell_id=f"{campaign}-cell{k + 1:02d}",
                           campaign_id=campaign, log_period_s=cycling.log_period_s,
                           poll_s=cycling.poll_s, time_scale=cycling.speed)
            )  # fmt: skip
        except BaseException as exc:  # reported below, with the channel
            errors[k] = exc

    call_in_bluesky_event_loop(lab.connect(timeout=20))
    try:
        with open_store(data) as store:
            # One writer for every RunEngine: its single drain thread appends to Tiled
            # one batch at a time (the embedded server's SQLite refuses concurrent
            # appends from one writer per engine: "database is locked", retried).
            writer = store.writer()
            for engine in engines:
                engine.subscribe(writer)  # type: ignore[no-untyped-call]
            threads = [threading.Thread(target=run, args=(k,)) for k in range(cells)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            store.flush()
    finally:
        call_in_bluesky_event_loop(lab.disconnect())
    if errors:
        k, exc = next(iter(sorted(errors.items())))
        raise RuntimeError(f"cycle_cell failed on {len(errors)} channel(s); channel {k + 1}: "
                           f"{exc!r}") from exc  # fmt: skip
    out = []
    for k, result in enumerate(results):
        if result.exit_status != "success":
            raise RuntimeError(f"channel {k + 1}: run {result.exit_status}: {result.reason}")
        out.append(result.plan_result)
    return out


def held_out_figures(record: ModelRecord) -> dict[str, float]:
    """The registered model's held-out metrics and the mean-retention baseline's."""
    m = record.metrics
    keys = ("n", "mae", "rmse", "r2", "baseline_mae", "baseline_rmse")
    return {k: float(m[k]) for k in keys if k in m}


def cross_validated(table: pandas.DataFrame, config: CellConfig, folds: int) -> dict[str, float]:
    """``folds``-fold cross-validation of the same fit over every cell (each held out
    once): MAE and RMSE of the model and of the mean-retention baseline."""
    import numpy as np

    from labctl.models.cell import train_cell_model

    if not 2 <= folds <= len(table):
        raise ValueError(f"folds: must be within 2..{len(table)} (the cells), got {folds}")
    order = np.random.default_rng(config.seed).permutation(len(table))
    pred, base = np.empty(len(table)), np.empty(len(table))
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held)
        fit = train_cell_model(table.iloc[train], config, holdout=table.iloc[held])
        pred[held] = _predict(fit, table.iloc[held])
        base[held] = table["retention"].to_numpy()[train].mean()
    y = table["retention"].to_numpy()
    return {
        "cv_mae": float(np.abs(pred - y).mean()),
        "cv_rmse": float(np.sqrt(((pred - y) ** 2).mean())),
        "cv_baseline_mae": float(np.abs(base - y).mean()),
        "cv_baseline_rmse": float(np.sqrt(((base - y) ** 2).mean())),
    }


def _predict(fit: TrainedCell, rows: pandas.DataFrame) -> Any:
    """The fitted torch module's retention for ``rows``."""
    import torch

    from labctl.models.cell import FEATURES

    x = torch.tensor(rows[list(FEATURES)].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        return fit.module(*x.T).numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )  # fmt: skip
    lab_d, cyc_d = LabSettings(), CyclingSettings()
    add = parser.add_argument
    add("--cells", type=int, default=lab_d.cells, help="cells (cycler channels)")
    add("--cycles", type=int, default=cyc_d.cycles, help="cycles per cell")
    add("--target-cycle", type=int, default=None, help="predicted cycle (default: --cycles)")
    add("--early-cycles", default="2,10", help="the features' cycle pair A,B")
    add("--speed", type=float, default=cyc_d.speed, help="time acceleration")
    add("--log-period-s", type=float, default=cyc_d.log_period_s, help="data log, lab s")
    add("--c-rate", type=float, default=cyc_d.c_rate, help="charge and discharge C-rate")
    add("--seed", type=int, default=lab_d.seed, help="the lab's seed (cells, noise)")
    add("--fade-per-efc", type=float, default=lab_d.fade_per_efc)
    add("--ageing-spread", type=float, default=lab_d.ageing_spread)
    add("--holdout-fraction", type=float, default=0.25)
    add("--folds", type=int, default=5, help="cross-validation folds (0: none)")
    add("--data", type=Path, default=None, help="run data directory (default: $LABCTL_DATA, "
        "else a temporary one, removed at the end)")  # fmt: skip
    add("--json", action="store_true", help="print the figures as JSON, last")
    args = parser.parse_args(argv)

    from labctl.data import DataConfig, ensure_server, open_store, stop_server
    from labctl.models.cell import CellConfig, feature_table
    from labctl.models.registry import Registry
    from labctl.models.training_data import cell_cycles_table
    from labctl.simlab import SimulatedLabProcess

    lab = LabSettings(cells=args.cells, seed=args.seed, fade_per_efc=args.fade_per_efc,
                      ageing_spread=args.ageing_spread)  # fmt: skip
    cycling = CyclingSettings(cycles=args.cycles, speed=args.speed, c_rate=args.c_rate,
                              log_period_s=args.log_period_s)  # fmt: skip
    target = args.target_cycle or args.cycles
    first, second = (int(c) for c in args.early_cycles.split(","))
    early = (first, second)
    temporary = None
    if args.data is None and not os.environ.get("LABCTL_DATA"):
        temporary = tempfile.TemporaryDirectory(prefix="cell-model-")
        args.data = Path(temporary.name)
    if args.data is not None:
        os.environ["LABCTL_DATA"] = str(args.data)  # for train-cell too
    config = DataConfig.from_env()
    campaign = f"cells-{uuid.uuid4().hex[:8]}"
    registry = config.directory.resolve() / "models"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lab.toml"
            path.write_text(lab_config_toml(lab, cycling.speed))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(1) as pool:
                # The embedded Tiled server (seconds to start) starts while the lab does.
                server = pool.submit(ensure_server, config) if config.url is None else None
                with SimulatedLabProcess(config=path, transport="tcp") as simlab:
                    if server is not None:
                        server.result()
                    results = cycle_cells(simlab.records, lab.cells, cycling,
                                          capacity_ah=lab.capacity_ah, campaign=campaign,
                                          data=config)  # fmt: skip
            t_cycle = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "labctl.cli", "models", "train-cell",
               "--target-cycle", str(target), "--early-cycles", args.early_cycles,
               "--campaign", campaign, "--holdout-fraction", str(args.holdout_fraction),
               "--registry", str(registry)]  # fmt: skip
        t1 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        t_train = time.perf_counter() - t1
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        decision = json.loads(done.stdout)
        record = Registry(registry).record("cell_retention", decision["candidate_version"])
        figures = held_out_figures(record)
        if args.folds > 1:
            with open_store(config) as store:
                cells, _ = cell_cycles_table(store, campaign=campaign)
            cells.sort(key=lambda c: c.cell_id)
            table = feature_table(cells, target, early_cycles=early)
            cell_config = CellConfig(target_cycle=target, early_cycles=early)
            figures |= cross_validated(table, cell_config, args.folds)
        q_last = [r["cycles"][-1]["retention"] for r in results]
        print(f"{lab.cells} cells x {cycling.cycles} cycles on the simulated cycler "
              f"(speed {cycling.speed:g}, ageing spread {lab.ageing_spread:g}): cycled and "
              f"stored in {t_cycle:.1f} s; train-cell {t_train:.1f} s")  # fmt: skip
        print(f"retention at cycle {cycling.cycles}: {min(q_last):.4f} .. {max(q_last):.4f}")
        print(f"model {record.name} {record.version}: features of cycles {args.early_cycles}, "
              f"retention at cycle {target}")  # fmt: skip
        print(f"  {int(figures['n'])} held-out cells:  model MAE {figures['mae']:.5f} RMSE "
              f"{figures['rmse']:.5f} | baseline (training mean) MAE "
              f"{figures['baseline_mae']:.5f} RMSE {figures['baseline_rmse']:.5f}")  # fmt: skip
        if "cv_rmse" in figures:
            cv = figures
            print(f"  {args.folds}-fold CV, all {lab.cells} cells: model MAE {cv['cv_mae']:.5f} "
                  f"RMSE {cv['cv_rmse']:.5f} | baseline MAE {cv['cv_baseline_mae']:.5f} RMSE "
                  f"{cv['cv_baseline_rmse']:.5f}")  # fmt: skip
        if args.json:
            print(json.dumps({"cells": lab.cells, "cycles": cycling.cycles, "target": target,
                              "early_cycles": list(early), "cycling_s": t_cycle,
                              "train_s": t_train, **figures}))  # fmt: skip
    finally:
        if temporary is not None:
            stop_server(config.directory)
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
