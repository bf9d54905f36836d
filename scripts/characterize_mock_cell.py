"""Characterize the simulated lab's cell and identify its edge_bms cell model.

The cycler's cells (``hardware_mocks.physics.cell``: graphite/NMC811 OCV curves, two RC
pairs, Arrhenius resistances, a lumped thermal node) are not PyBaMM's Chen2020 DFN that the
shipped ``lg-m50`` model was identified from, so edge_bms needs a model of its own for
them. This runs what a lab would run on a new cell, directly on the physics (batched over
the chamber temperatures, no lab, a few seconds):

* pseudo-OCV: 1 h rest at full, C/20 discharge to 2.5 V, 1 h rest, C/20 CC-CV charge
  to 4.2 V (to C/100);
* HPPC: from full, at SOC 0.95, 0.9 .. 0.1, 0.05 (0.5C steps, 30 min rests): a 1C
  discharge pulse and a 0.75C charge pulse of 10 s, each followed by 40 s of rest;

at -10, 0, 10, 25 and 40 degC, with the cycler's sensor noise. It writes each test as CSV
+ sidecar JSON (what ``edge-bms identify`` reads), identifies the model with
``edge_bms.identify.run_identification`` and writes it where ``load_cell`` finds it by name:

    .venv/bin/python scripts/characterize_mock_cell.py [--out-dir DIR] [--model PATH]

The cell is characterized fresh (no ageing during the tests) with the reference
electrolyte (10 mS/cm at 25 degC); the lab's cells age and take their vial's electrolyte,
which moves their resistances by a few percent.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_bms.cell import Limits
from edge_bms.identify import run_identification
from hardware_mocks.physics import cell as cm

NAME = "labctl-sim-5ah"
TEMPERATURES_C = (-10.0, 0.0, 10.0, 25.0, 40.0)
CAPACITY_AH = 5.0
NOISE_V, NOISE_A = 1.0e-4, 2.0e-4  # the cycler simulator's defaults
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "edge_bms/data/cells" / f"{NAME}.json"
# The simulated cell's window (OCV 2.50 V empty, 4.19 V full). Currents: the LG M50
# datasheet's discharge limit; charge up to 1C, what the lab's protocols use (the
# simulated cell has no charge-rate limit of its own).
LIMITS = Limits(
    v_min=2.5,
    v_max=4.2,
    i_discharge_max_a=7.28,
    i_charge_max_a=5.0,
    t_min_c=-20.0,
    t_max_c=60.0,
    soc_min=0.0,
    soc_max=1.0,
)
# The characterization must not age the cell it characterizes.
PARAMS = cm.CellParams(capacity_ah=CAPACITY_AH, fade_per_efc=0.0, resistance_growth_per_efc=0.0)


@dataclass
class Segment:
    """One step of a protocol, run on every cell at once (a cell that ends early rests)."""

    direction: int  # cm.IDLE, cm.DISCHARGE or cm.CHARGE
    current_a: float = 0.0
    voltage_v: float = 3.0
    duration_s: float = 0.0  # the longest it may take
    until_ah: float | None = None  # end after this much charge moved
    cv_end_a: float | None = None  # CC-CV: end once the current tapered below this
    cc_only: bool = False  # end at the voltage limit (the current starts to taper)
    log_s: float = 10.0


@dataclass
class Bench:
    """n cells in chambers at ``temps``; their logged rows."""

    temps: np.ndarray
    dt: float
    rng: np.random.Generator
    state: cm.CellState = field(init=False)
    rows: list[list[tuple[float, ...]]] = field(init=False)
    t: float = 0.0

    def __post_init__(self) -> None:
        n = self.temps.size
        # each cell starts at its chamber's temperature
        self.state = replace(cm.init_state(n, soc=1.0, params=PARAMS), temp_c=self.temps.copy())
        self.rows = [[] for _ in range(n)]

    def run(self, seg: Segment) -> None:
        n = self.temps.size
        active = np.ones(n, dtype=bool)
        moved = np.zeros(n)
        t_seg = 0.0
        next_log = seg.log_s
        while active.any() and t_seg < seg.duration_s - 1e-9:
            direction = np.where(active, seg.direction, cm.IDLE).astype(np.int64)
            control = cm.Control(direction, np.full(n, seg.current_a), np.full(n, seg.voltage_v))
            self.state, i, v = cm.step(self.state, control, PARAMS, self.temps, self.dt)
            self.t += self.dt
            t_seg += self.dt
            moved += np.abs(i) * self.dt / 3600.0
            if t_seg >= next_log - 1e-9:
                next_log += seg.log_s
                self._log(i, v, direction)
            if seg.until_ah is not None:
                active &= moved < seg.until_ah - 1e-9
            if seg.cv_end_a is not None:
                active &= np.abs(i) >= seg.cv_end_a
            if seg.cc_only:
                active &= np.abs(i) >= 0.999 * seg.current_a

    def _log(self, i: np.ndarray, v: np.ndarray, direction: np.ndarray) -> None:
        n = self.temps.size
        v_meas = v + self.rng.normal(0.0, NOISE_V, n)
        i_meas = np.where(direction == cm.IDLE, 0.0, i + self.rng.normal(0.0, NOISE_A, n))
        for k in range(n):
            self.rows[k].append(
                (
                    self.t,
                    float(i_meas[k]),
                    float(v_meas[k]),
                    float(self.state.temp_c[k]),
                    float(self.state.soc[k]),
                    float(i[k]),
                    float(v[k]),
                )
            )


def pseudo_ocv(temps: np.ndarray, rng: np.random.Generator) -> Bench:
    b = Bench(temps, 10.0, rng)
    c20 = CAPACITY_AH / 20
    b.run(Segment(cm.IDLE, duration_s=3600.0, log_s=60.0))
    b.run(Segment(cm.DISCHARGE, c20, 2.5, duration_s=30 * 3600.0, cc_only=True, log_s=60.0))
    b.run(Segment(cm.IDLE, duration_s=3600.0, log_s=60.0))
    b.run(Segment(cm.CHARGE, c20, 4.2, duration_s=30 * 3600.0, cv_end_a=CAPACITY_AH / 100,
                  log_s=60.0))  # fmt: skip
    return b


def hppc(temps: np.ndarray, rng: np.random.Generator) -> Bench:
    b = Bench(temps, 1.0, rng)
    points = [0.95, *np.round(np.arange(0.9, 0.05, -0.1), 2).tolist(), 0.05]
    b.run(Segment(cm.IDLE, duration_s=600.0, log_s=10.0))
    soc = 1.0
    for target in points:
        b.run(Segment(cm.DISCHARGE, 0.5 * CAPACITY_AH, 2.5, duration_s=7200.0,
                      until_ah=(soc - target) * CAPACITY_AH, log_s=10.0))  # fmt: skip
        soc = target
        b.run(Segment(cm.IDLE, duration_s=1800.0, log_s=10.0))
        b.run(Segment(cm.DISCHARGE, 1.0 * CAPACITY_AH, 2.5, duration_s=10.0, log_s=1.0))
        b.run(Segment(cm.IDLE, duration_s=40.0, log_s=1.0))
        b.run(Segment(cm.CHARGE, 0.75 * CAPACITY_AH, 4.2, duration_s=10.0, log_s=1.0))
        b.run(Segment(cm.IDLE, duration_s=40.0, log_s=1.0))
    b.run(Segment(cm.IDLE, duration_s=600.0, log_s=10.0))
    return b


HEADER = ("time_s", "current_a", "voltage_v", "temperature_c", "soc_true",
          "current_true_a", "voltage_true_v")  # fmt: skip


def write_tests(directory: Path, seed: int = 7) -> list[Path]:
    """Run both tests at every temperature; one CSV + sidecar per test and temperature."""
    rng = np.random.default_rng(seed)
    temps = np.asarray(TEMPERATURES_C, dtype=np.float64)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for kind, bench in (("pseudo_ocv", pseudo_ocv(temps, rng)), ("hppc", hppc(temps, rng))):
        for k, tc in enumerate(TEMPERATURES_C):
            stem = f"{'ocv' if kind == 'pseudo_ocv' else 'hppc'}_{tc:g}C".replace("-", "m")
            path = directory / f"{stem}.csv"
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(HEADER)
                for r in bench.rows[k]:
                    w.writerow([f"{r[0]:.1f}", f"{r[1]:.5f}", f"{r[2]:.5f}", f"{r[3]:.3f}",
                                f"{r[4]:.6f}", f"{r[5]:.5f}", f"{r[6]:.5f}"])  # fmt: skip
            sidecar = {"kind": kind, "temperature_c": tc, "initial_soc": 1.0,
                       "cell": "hardware_mocks.physics.cell (fresh, kappa 10 mS/cm)"}  # fmt: skip
            path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the test CSVs here")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model JSON to write")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.out_dir or Path(tmp)
        t0 = time.monotonic()
        files = write_tests(directory)
        print(f"simulated {len(files)} tests in {time.monotonic() - t0:.1f} s -> {directory}")
        t0 = time.monotonic()
        result = run_identification(files, name=NAME, limits=LIMITS)
        print(f"identified in {time.monotonic() - t0:.1f} s")
        print(result.summary())
    cell = result.cell
    source = dict(cell.source)
    source["ground_truth"] = (
        "hardware_mocks.physics.cell (the simulated lab's cycler cell), fresh, reference "
        "electrolyte 10 mS/cm; tests by scripts/characterize_mock_cell.py"
    )
    # a shipped file: keep the per-test report, drop the per-block detail (every other
    # field, the OCV half-gap included, as identified)
    import dataclasses

    model = dataclasses.replace(cell, source=source)
    path = model.save(args.model)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
