"""Choose the filter's RC-branch-2 noise and the network's variance inflation on
residuals the network has not seen.

    .venv/bin/python scripts/validate_bms_noise.py [--data data/bms] [--values 2e-4 6e-4]
        [--inflations 64 256] [--wrong-start]

Leave one training temperature out: for each ambient temperature of the training split,
train the correction network (``labctl models train-bms``'s trainer and settings) on the
training profiles that never see that temperature, then run EKF + that network + online
SOH on the training profiles at that temperature, once per candidate pair
(``FilterNoise.v2_v_per_sqrt_s``, variance inflation). The held-out (test) profiles are
not touched, so the choice does not leak into the benchmark (decisions 0017, 0020).
SOC errors after 120 s, pooled over folds; ``--wrong-start`` also runs every validation
profile from its true SOC -/+ 30 points (clipped; starts left under 10 points off are
not counted) and reports the worst time to stay in the 2 % band, as the benchmark's
convergence row does. ``--inflations`` defaults to the shipped record's.

The rule, fixed before the figures: the pair with the lowest pooled RMSE; pairs within
0.02 points of it count as tied, and among those the one with the lowest pooled maximum
error after 120 s wins (the convergence target fails on any excursion past 2 %). It is
applied to the pairs of one call: to choose v2 at the shipped inflation, pass only that
one (``--inflations 256``); more inflations make it a joint choice.

About 4 minutes on one core per inflation value (four trainings of ~7 s, ~170 filter
runs); ``--wrong-start`` doubles it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from edge_bms.cell import load_cell
from edge_bms.correction import CorrectionRecord, VoltageCorrectionNet, load_correction
from edge_bms.soh import SohEstimator
from labctl.models.bms_correction import (
    BmsTrainConfig,
    Profile,
    correction_record,
    export_correction,
    load_split,
    train_correction,
)
from labctl.models.bms_eval import converge_time, run_cells, wrong_start_times, wrong_starts
from labctl.models.registry import sha256_bytes

TIE = 2e-4  # pooled RMSE within this counts as tied (0.02 SOC points)


def ambients(p: Profile) -> set[float]:
    return {float(t) for _, t in p.meta["ambient"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/bms")
    parser.add_argument(
        "--values", nargs="+", type=float, default=[5e-5, 1e-4, 2e-4, 4e-4, 6e-4, 8e-4]
    )
    parser.add_argument("--inflations", nargs="+", type=float, default=None)
    parser.add_argument("--wrong-start", action="store_true")
    parser.add_argument("--steps", type=int, default=BmsTrainConfig().steps)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    root = Path(args.data)
    if not (root / "manifest.json").is_file():
        raise SystemExit(f"{root}/manifest.json not found: run `make bms-data` first")
    cell = load_cell()
    inflations = args.inflations or [load_correction().r_inflation]
    train = load_split(root, "train")
    temps = sorted({t for p in train for t in ambients(p)})
    pairs = [(v2, k) for v2 in args.values for k in inflations]
    errors: dict[tuple[float, float], list[np.ndarray]] = {pair: [] for pair in pairs}
    conv: dict[tuple[float, float], float] = dict.fromkeys(pairs, 0.0)
    rows = []
    t0 = time.perf_counter()
    for temp in temps:
        fold = [p for p in train if temp not in ambients(p)]
        val = [p for p in train if ambients(p) == {temp}]
        if not val:
            continue
        cfg = BmsTrainConfig(steps=args.steps)
        trained = train_correction(cell, fold, cfg)
        model = export_correction(trained)
        nets = {}
        for k in inflations:
            trained.r_inflation = k
            draft = correction_record(trained, {}, cell=cell).model_dump(mode="json")
            draft.update(version=f"loto-{temp:g}C-x{k:g}", sha256=sha256_bytes(model))
            nets[k] = VoltageCorrectionNet(
                model, CorrectionRecord.model_validate(draft), draft["version"]
            )
        print(
            f"fold {temp:g} C: network trained on {len(fold)} profiles in {trained.seconds:.0f} s"
            f", validated on {len(val)}: {', '.join(p.name for p in val)}",
            flush=True,
        )
        for v2, k in pairs:
            errs, worst_conv = [], 0.0
            noise = {**cell.filter_noise, "v2_v_per_sqrt_s": v2}
            for p in val:
                tr = run_cells(
                    cell,
                    p,
                    1,
                    correction=nets[k],
                    health=SohEstimator(1, cell.capacity_ah, cell=cell),
                    noise=noise,
                )[0]
                after = tr.time_s - tr.time_s[0] >= 120.0
                errs.append(tr.error[after])
                if args.wrong_start:  # counted as the benchmark counts them
                    runs = run_cells(
                        cell,
                        p,
                        2,
                        correction=nets[k],
                        initial_soc=wrong_starts(p)[1],
                        health=SohEstimator(2, cell.capacity_ah, cell=cell),
                        noise=noise,
                    )
                    worst_conv = max([worst_conv, *wrong_start_times(p, runs, 0.02)])
                else:
                    worst_conv = max(worst_conv, converge_time(tr, 0.02))
            e = np.concatenate(errs)
            errors[(v2, k)].extend(errs)
            conv[(v2, k)] = max(conv[(v2, k)], worst_conv)
            row = {
                "fold_c": temp,
                "v2": v2,
                "inflation": k,
                "rmse": float(np.sqrt(np.mean(e**2))),
                "max_abs": float(np.max(np.abs(e))),
                "converge_worst_s": worst_conv,
            }
            rows.append(row)
            print(
                f"  v2 {v2:.0e} x{k:g}: RMSE {100 * row['rmse']:.2f} %"
                f", max {100 * row['max_abs']:.2f} %, in 2 % band after {worst_conv:.0f} s"
                f"{' (+/-30 starts)' if args.wrong_start else ''}",
                flush=True,
            )
    print(f"\npooled over {len(temps)} folds ({time.perf_counter() - t0:.0f} s):")
    pooled: dict[tuple[float, float], tuple[float, float]] = {}
    for pair, errs in errors.items():
        e = np.concatenate(errs)
        pooled[pair] = (float(np.sqrt(np.mean(e**2))), float(np.max(np.abs(e))))
        print(
            f"  v2 {pair[0]:.0e} x{pair[1]:g}: RMSE {100 * pooled[pair][0]:.2f} %"
            f", max {100 * pooled[pair][1]:.2f} %, worst convergence {conv[pair]:.0f} s"
        )
    lowest = min(r for r, _ in pooled.values())
    tied = [pair for pair in pairs if pooled[pair][0] <= lowest + TIE]
    best = min(tied, key=lambda pair: pooled[pair][1])
    print(
        f"lowest pooled RMSE {100 * lowest:.2f} %; tied within {100 * TIE:.2f} points: "
        f"{', '.join(f'{v:.0e} x{k:g}' for v, k in tied)}; "
        f"chosen (lowest max among them): v2 = {best[0]:.0e} V/sqrt(s), x{best[1]:g}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "folds": rows,
                    "pooled": {
                        f"{v:g} x{k:g}": {"rmse": r, "max_abs": m, "converge_worst_s": conv[(v, k)]}
                        for (v, k), (r, m) in pooled.items()
                    },
                    "chosen": {"v2": best[0], "inflation": best[1]},
                },
                indent=1,
            )
        )
    if not math.isfinite(pooled[best][0]):
        raise SystemExit("no finite result")


if __name__ == "__main__":
    main()
