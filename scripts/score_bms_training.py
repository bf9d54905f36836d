"""Score an estimator option on the training profiles, as decision 0022's rule does.

The shipped configuration (EKF + the shipped network + a fresh online SOH estimator per
profile) over every training profile of ``--data``, from the OCV start and from the
+-30 point starts (runs at least ``WRONG_MIN`` off), and the same network without SOH
from the OCV start. Per profile: the first sample's error, max |error| after 120 s, the
worst +-30 convergence, RMSE; then the pooled RMSE with and without SOH and the misses
(profiles over 3 % max plus profiles over 120 s convergence). Choices are made on these
profiles; held-out data is for the test afterwards.

    .venv/bin/python scripts/score_bms_training.py [--option start_drop=r0] [--json F]

One run takes 2-20 min on one core of the 2-core CI machine (the other core's load matters);
run two options side by side
with ``taskset -c 0`` / ``-c 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edge_bms.cell import load_cell
from edge_bms.correction import try_load_correction
from edge_bms.errors import InputError
from edge_bms.estimator import PackEstimator
from edge_bms.soh import SohEstimator
from labctl.models.bms_correction import load_split
from labctl.models.bms_eval import run_cells, soc_metrics, wrong_start_times, wrong_starts

MAX_TARGET = 0.03
CONVERGE_TARGET_S = 120.0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: a string option such as start_drop=r0


def parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {item!r}: expected NAME=VALUE")
        out[key] = _value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/bms")
    ap.add_argument("--option", action="append", default=[], help="PackEstimator NAME=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    opts = parse_options(args.option)
    cell = load_cell()
    net, reason, msg = try_load_correction(None)
    if net is None:
        raise SystemExit(f"no shipped network ({reason}: {msg})")
    try:  # a bad option fails here, named, before any profile runs
        PackEstimator(cell, 1, **opts)
    except (InputError, TypeError) as exc:
        raise SystemExit(f"--option: {exc}") from None
    profiles = load_split(Path(args.data), "train")
    print(f"{len(profiles)} training profiles from {args.data}; options {opts or 'none'}")
    with_soh, without, rows = [], [], {}

    def soh(n: int) -> SohEstimator:  # a fresh online SOH per run, as the benchmark's
        return SohEstimator(n, cell.capacity_ah, cell=cell)

    t0 = time.perf_counter()
    for k, p in enumerate(profiles, 1):
        starts = wrong_starts(p)[1]
        ocv = run_cells(cell, p, 1, correction=net, health=soh(1), options=opts)[0]
        wrong = run_cells(
            cell, p, 2, correction=net, initial_soc=starts, health=soh(2), options=opts
        )
        no_soh = run_cells(cell, p, 1, correction=net, options=opts)[0]
        with_soh.append(ocv)
        without.append(no_soh)
        m = soc_metrics([ocv])
        conv = wrong_start_times(p, wrong)
        row = {
            "e0": float(ocv.error[0]),
            "max": m["max_abs"],
            "conv": max(conv) if conv else 0.0,
            "rmse": m["rmse"],
            "rmse_without_soh": soc_metrics([no_soh])["rmse"],
        }
        rows[p.name] = row
        print(
            f"[{k}/{len(profiles)}] {p.name:24s} first {100 * row['e0']:6.2f}  max "
            f"{100 * row['max']:5.2f} %  +-30 {row['conv']:6.0f} s  RMSE {100 * row['rmse']:.2f} "
            f"(no SOH {100 * row['rmse_without_soh']:.2f}) %  [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    rmse = soc_metrics(with_soh)["rmse"]
    rmse_without = soc_metrics(without)["rmse"]
    max_misses = sorted(n for n, r in rows.items() if r["max"] > MAX_TARGET)
    conv_misses = sorted(n for n, r in rows.items() if r["conv"] > CONVERGE_TARGET_S)
    print(
        f"RMSE with SOH {100 * rmse:.3f} %, without {100 * rmse_without:.3f} %; misses "
        f"{len(max_misses) + len(conv_misses)} (max > 3 %: {max_misses}; +-30 > 120 s: "
        f"{conv_misses})"
    )
    out = {
        "options": opts,
        "rmse": rmse,
        "rmse_without_soh": rmse_without,
        "max_misses": max_misses,
        "converge_misses": conv_misses,
        "profiles": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
