"""The benchmark data set: which profiles, on which cells, at which temperatures, in
which split; generating it (resumable, optionally in parallel) and its manifest.

Layout under ``out`` (default ``data/bms``)::

    manifest.json                 everything below, with definitions and versions
    profiles/<name>.csv           measured columns (contract 4) then true columns
    sop/<name>.csv                SOP truth along held-out profiles
    characterization/*.csv        pseudo-OCV and HPPC of the fresh cell (lab columns)
    characterization/protocol.json
    characterization/truth_ocv.csv   the model's OCV(SOC_true) (truth, not lab data)

Definitions (also written into the manifest):

* ``capacity_ah`` (TRUE capacity of a cell): Ah delivered by a C/20 discharge at 25 C
  from full (4.2 V OCV, at rest) to 2.5 V.
* ``soc_true = 1 - (Ah discharged since full) / capacity_ah``; "full" is the rest state
  at 4.2 V OCV. A profile starts at rest at ``initial_soc`` on that scale and
  ``soc_true(t) = initial_soc - discharged_ah_true(t) / capacity_ah``. SOC 0 is where
  a C/20 discharge at 25 C reaches 2.5 V (the OCV there is a little above 2.5 V).
* ``r0_ohm`` (TRUE R0): (V_rest - V(10 ms)) / 5 A for a 1C discharge step from rest at
  50 % (PyBaMM) SOC and 25 C.

Split: UDDS appears only in the held-out set, and so does every profile that sees
10 C ambient (even for a moment); the training set has neither.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labctl.models.bms import characterize as ch
from labctl.models.bms import profiles as pr
from labctl.models.bms import truth as tr
from labctl.models.bms.sensors import SensorModel

FORMAT = "labctl-bms-truth/1"
# Bump when the generated numbers change for the same plan: every file is redone.
GENERATOR_VERSION = "1"
TEMPERATURES_C = (-10.0, 0.0, 10.0, 25.0, 40.0)
HELD_OUT_TEMPERATURE_C = 10.0
HELD_OUT_CYCLES = ("udds",)
SOC_END = 0.10
SOP_INTERVAL_S = 300.0

MEASURED_COLUMNS = ("time_s", "current_a", "voltage_v", "temperature_c")
TRUE_COLUMNS = (
    "soc_true",
    "current_true_a",
    "voltage_true_v",
    "temperature_true_c",
    "ambient_c",
    "ocv_true_v",
    "discharged_ah_true",
    "step",
)
PROFILE_COLUMNS = MEASURED_COLUMNS + TRUE_COLUMNS
_PROFILE_FMT = (
    "%.1f", "%.3f", "%.4f", "%.2f",
    "%.6f", "%.5f", "%.5f", "%.4f", "%.1f", "%.5f", "%.6f", "%d",
)  # fmt: skip
SOP_COLUMNS = (
    "time_s",
    "p_dis_10s_w",
    "p_dis_30s_w",
    "p_chg_10s_w",
    "p_chg_30s_w",
    "i_dis_10s_a",
    "i_dis_30s_a",
    "i_chg_10s_a",
    "i_chg_30s_a",
    "soc_true",
    "voltage_true_v",
    "temperature_true_c",
    "ambient_c",
)

Kind = Literal["drive", "pulse", "cccv"]
ProgressFn = Callable[[str], None]


class DatasetError(RuntimeError):
    """The plan or the output directory is inconsistent."""


@dataclass(frozen=True)
class AgingSpec:
    """Targets of an aged cell: C/20 capacity and R0 relative to the fresh cell."""

    name: str
    capacity_factor: float
    resistance_factor: float


CELLS = (
    AgingSpec("fresh", 1.0, 1.0),
    AgingSpec("aged90", 0.90, 1.5),
    AgingSpec("aged80", 0.80, 2.0),
)


@dataclass(frozen=True)
class ProfileSpec:
    """One profile of the data set. ``ambient`` is a schedule of (start time s,
    ambient C) steps, the first at 0. ``max_duration_s`` caps the run; a profile
    otherwise ends when ``soc_true`` reaches ``soc_end``."""

    name: str
    kind: Kind
    cell: str
    ambient: tuple[tuple[float, float], ...]
    seed: int
    cycle: str | None = None
    soc_end: float = SOC_END
    max_duration_s: float = 8 * 3600.0
    sop: bool = False
    sop_interval_s: float = SOP_INTERVAL_S

    @property
    def ambients(self) -> list[float]:
        return [a for _, a in self.ambient]

    @property
    def split(self) -> Literal["train", "test"]:
        return split_of(self.cycle, self.ambients)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ambient"] = [list(step) for step in self.ambient]
        return d


def split_of(cycle: str | None, ambients: Iterable[float]) -> Literal["train", "test"]:
    """The fixed split rule: held out if the cycle is UDDS or any ambient is 10 C."""
    if cycle in HELD_OUT_CYCLES:
        return "test"
    if any(abs(a - HELD_OUT_TEMPERATURE_C) < 1e-9 for a in ambients):
        return "test"
    return "train"


def _tag(ambient: tuple[tuple[float, float], ...]) -> str:
    return "to".join(ch.temperature_tag(a) for _, a in ambient).replace("Cto", "to")


DRAW_SEED_STRIDE = 1000  # draw N shifts every profile's seed by N x this


def plan(quick: bool = False, draw: int = 0) -> list[ProfileSpec]:
    """The fixed list of profiles (``quick``: two short ones to exercise the pipeline).

    ``draw`` > 0: the same profiles (names, cells, temperatures, split) with other
    random draws: initial SOC, sensor errors and dropouts, synthetic drives and pulse
    trains. A second draw of the held-out set is test data no choice has seen."""
    if draw < 0:
        raise DatasetError(f"draw={draw}: must be >= 0")
    shift = DRAW_SEED_STRIDE * draw
    if quick:
        return [
            ProfileSpec("hwfet_fresh_25C", "drive", "fresh", ((0.0, 25.0),), seed=1 + shift,
                        cycle="hwfet", max_duration_s=240.0),
            ProfileSpec("udds_fresh_10C", "drive", "fresh", ((0.0, 10.0),), seed=2 + shift,
                        cycle="udds", max_duration_s=240.0, sop=True, sop_interval_s=120.0),
        ]  # fmt: skip
    specs: list[ProfileSpec] = []
    seed = 100 + shift

    def add(kind: Kind, cell: str, ambient: tuple[tuple[float, float], ...],
            cycle: str | None = None, suffix: str = "") -> None:  # fmt: skip
        nonlocal seed
        seed += 1
        label = cycle if kind == "drive" else kind
        name = f"{label}_{cell}_{_tag(ambient)}{suffix}"
        test = split_of(cycle, [a for _, a in ambient]) == "test"
        specs.append(
            ProfileSpec(name, kind, cell, ambient, seed, cycle, sop=test and kind != "cccv")
        )

    def at(temp: float) -> tuple[tuple[float, float], ...]:
        return ((0.0, temp),)

    for temp in TEMPERATURES_C:
        add("drive", "fresh", at(temp), "udds")
        add("drive", "fresh", at(temp), "hwfet")
        add("drive", "fresh", at(temp), "synth")
        add("pulse", "fresh", at(temp))
        if temp >= 0:  # nobody charges a Li-ion cell below 0 C
            add("cccv", "fresh", at(temp))
    add("drive", "fresh", at(25.0), "synth", suffix="_b")
    # Ambient steps (chamber changes during a profile).
    add("drive", "fresh", ((0.0, 25.0), (1800.0, 0.0), (3600.0, 40.0)), "hwfet")
    add("drive", "fresh", ((0.0, -10.0), (2400.0, 25.0)), "synth")
    add("pulse", "fresh", ((0.0, 40.0), (1800.0, 0.0)))
    add("drive", "fresh", ((0.0, 25.0), (3600.0, 10.0)), "udds")
    add("drive", "fresh", ((0.0, 0.0), (3600.0, 40.0)), "udds")
    # Aged cells.
    for cell in ("aged90", "aged80"):
        add("drive", cell, at(25.0), "hwfet")
        add("drive", cell, at(0.0), "synth")
        add("pulse", cell, at(25.0 if cell == "aged90" else 0.0))
        add("drive", cell, at(25.0), "udds")
    add("drive", "aged80", at(0.0), "udds")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DatasetError(f"duplicate profile names in the plan: {sorted(names)}")
    return specs


# -- one profile ----------------------------------------------------------------------


def _segments(
    spec: ProfileSpec, cell: dict[str, Any], rng: np.random.Generator
) -> tuple[tr.Setpoint, list[tr.Segment], float]:
    """Set-point series, segments and PyBaMM initial SOC of a profile. Drive and
    pulse profiles discharge from a random 90-100 % (PyBaMM SOC) to ``soc_end``
    (true SOC); CC-CV profiles charge from ~10 % to full."""
    capacity = float(cell["capacity_ah"])
    q_thermo = float(cell["q_thermo_ah"])
    horizon = spec.max_duration_s
    # Set-point series run past the horizon: the solver may look a step beyond the
    # end, and an interpolant asked outside its data warns.
    series_s = horizon + 600.0
    ambient = list(spec.ambient)
    # CC-CV starts at ~10 % true SOC, the rest near full; always at rest.
    s0 = 0.11 if spec.kind == "cccv" else float(rng.uniform(0.90, 1.0))
    soc0 = 1.0 - (1.0 - s0) * q_thermo / capacity
    q_stop = (soc0 - spec.soc_end) * capacity

    vehicle = pr.Vehicle()
    if spec.kind == "drive":
        if spec.cycle == "synth":
            speed = pr.synthetic_urban_cycle(rng, duration_s=int(series_s))
        elif spec.cycle in pr.EPA_CYCLES:
            speed = pr.repeat_to(pr.epa_cycle(spec.cycle), series_s)
        else:
            raise DatasetError(f"profile {spec.name}: cycle={spec.cycle!r}")
        power = vehicle.cell_power_w(speed)
        setpoint = tr.Setpoint(np.arange(power.size, dtype=float), power, "cubic")
        mode: Literal["current", "power"] = "power"
    elif spec.kind == "pulse":
        breaks, levels = pr.pulse_profile(rng, series_s, capacity_ah=tr.NOMINAL_CAPACITY_AH)
        t, y = pr.step_series(breaks, levels)
        setpoint = tr.Setpoint(t, y, "linear")
        mode = "current"
    elif spec.kind == "cccv":
        setpoint = tr.Setpoint(np.array([0.0, series_s]), np.zeros(2))
        mode = "current"
    else:
        raise DatasetError(f"profile {spec.name}: kind={spec.kind!r}")

    segments: list[tr.Segment] = []
    if spec.kind == "cccv":
        # Charge only (the one profile kind that is not a discharge): rest, CC at a
        # rate the temperature allows, CV at 4.2 V down to C/20, rest.
        amb = ambient[0][1]
        if len(ambient) != 1:
            raise DatasetError(f"profile {spec.name}: a CC-CV profile has one ambient")
        c_rate = 0.2 if amb <= 0 else (0.5 if amb < 25 else float(rng.choice([0.5, 1.0])))
        segments = [
            tr.Segment(duration_s=600.0, ambient_c=amb, stop_v=None, label="rest"),
            tr.Segment(
                duration_s=8 * 3600.0, value=-c_rate * tr.NOMINAL_CAPACITY_AH, ambient_c=amb,
                limit_v=(tr.V_MIN, tr.V_MAX), stop_v=(2.45, 4.25),
                stop_i_cv=tr.NOMINAL_CAPACITY_AH / 20.0, label=f"CC-CV charge {c_rate}C",
            ),
            tr.Segment(duration_s=1800.0, ambient_c=amb, stop_v=None, label="rest"),
        ]  # fmt: skip
        return setpoint, segments, s0
    bounds = [t for t, _ in ambient] + [horizon]
    for (t_a, amb), t_b in zip(ambient, bounds[1:], strict=True):
        segments.append(tr.Segment(
            duration_s=t_b - t_a, mode=mode, profile_gain=1.0,
            ambient_c=amb, limit_v=(tr.V_MIN, tr.V_MAX), stop_v=(2.45, 4.25),
            stop_q_max=q_stop, label=f"{spec.kind} at {amb:g} C",
        ))  # fmt: skip
    return setpoint, segments, s0


def run_profile(
    spec: ProfileSpec, cell_spec: tr.CellSpec, cell: dict[str, Any], directory: Path
) -> dict[str, Any]:
    """Simulate one profile, apply its sensor model, write profiles/ and sop/ files;
    return its manifest entry (without hashes)."""
    started = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    setpoint, segments, s0 = _segments(spec, cell, rng)
    capacity = float(cell["capacity_ah"])
    soc0 = 1.0 - (1.0 - s0) * float(cell["q_thermo_ah"]) / capacity
    sim = tr.CellSim(cell_spec, s0, spec.ambient[0][1], setpoint)
    trace = tr.Trace()
    states: dict[float, np.ndarray] = {}
    checkpoints: list[float] = (
        np.arange(spec.sop_interval_s, 48 * 3600.0, spec.sop_interval_s).tolist()
        if spec.sop
        else []
    )
    end = "max duration"
    for i, seg in enumerate(segments):
        termination, got = sim.run(seg, trace, step_index=i, keep_states_at=checkpoints)
        states.update(got)
        if "discharged capacity" in termination:
            end = "soc_end"
            break
        if "stop: voltage" in termination:
            end = termination
            break
        if "CV current" in termination:
            end = "charged"
    t = trace.column("time_s")
    q = trace.column("discharged_ah")
    soc = soc0 - q / capacity
    i_true = trace.column("current_a")
    v_true = trace.column("voltage_v")
    temp_true = trace.column("temperature_c")
    sensor = SensorModel.draw(rng)
    keep, meas = sensor.measure(t, i_true, v_true, temp_true, rng)
    table = np.column_stack([
        t, meas["current_a"] + 0.0, meas["voltage_v"], meas["temperature_c"],
        soc, i_true, v_true, temp_true, trace.column("ambient_c"), trace.column("ocv_v"), q,
        np.concatenate(trace.step),
    ])[keep]  # fmt: skip
    file = f"profiles/{spec.name}.csv"
    ch.write_csv(directory / file, PROFILE_COLUMNS, table, _PROFILE_FMT)
    sim_s = time.perf_counter() - started
    entry: dict[str, Any] = {
        **spec.as_dict(),
        "split": spec.split,
        "file": file,
        "ambient_c": spec.ambient[0][1],
        "aging": {k: cell[k] for k in ("capacity_factor", "resistance_factor")},
        "capacity_ah": capacity,
        "r0_ohm": float(cell["r0_ohm"]),
        "initial_soc": soc0,
        "initial_soc_pybamm": s0,
        "final_soc": float(soc[-1]),
        "duration_s": float(t[-1]),
        "rows": int(keep.sum()),
        "rows_dropped": int((~keep).sum()),
        "end": end,
        "current_true_a_range": [float(i_true.min()), float(i_true.max())],
        "voltage_true_v_range": [float(v_true.min()), float(v_true.max())],
        "temperature_true_c_range": [float(temp_true.min()), float(temp_true.max())],
        "sensor": sensor.as_dict(),
        "simulate_s": round(sim_s, 2),
    }
    if spec.sop:
        entry["sop_file"] = _write_sop(
            spec, sim, states, t, soc, v_true, temp_true, trace, directory
        )
    entry["elapsed_s"] = round(time.perf_counter() - started, 2)
    return entry


def _write_sop(
    spec: ProfileSpec,
    sim: tr.CellSim,
    states: dict[float, np.ndarray],
    t: np.ndarray,
    soc: np.ndarray,
    v_true: np.ndarray,
    temp_true: np.ndarray,
    trace: tr.Trace,
    directory: Path,
) -> str:
    limits = tr.SopLimits()
    ambient = trace.column("ambient_c")
    rows = []
    for tk in sorted(states):
        k = int(np.searchsorted(t, tk))
        sop = tr.sop_at(sim, states[tk], tk, float(ambient[k]), limits)
        rows.append([
            tk, sop["p_dis_10s_w"], sop["p_dis_30s_w"], sop["p_chg_10s_w"], sop["p_chg_30s_w"],
            sop["i_dis_10s_a"], sop["i_dis_30s_a"], sop["i_chg_10s_a"], sop["i_chg_30s_a"],
            soc[k], v_true[k], temp_true[k], ambient[k],
        ])  # fmt: skip
    file = f"sop/{spec.name}.csv"
    fmt = ("%.1f",) + ("%.3f",) * 4 + ("%.4f",) * 4 + ("%.6f", "%.5f", "%.4f", "%.1f")
    ch.write_csv(directory / file, SOP_COLUMNS, np.asarray(rows).reshape(-1, len(SOP_COLUMNS)), fmt)
    return file


# -- cells ---------------------------------------------------------------------------


def calibrate_cell(aging: AgingSpec, fresh_r0_ohm: float | None) -> dict[str, Any]:
    """The cell's CellSpec (aging applied) and its measured TRUE capacity and R0."""
    if aging.capacity_factor == 1.0 and aging.resistance_factor == 1.0:
        spec = tr.CellSpec(name=aging.name)
    else:
        if fresh_r0_ohm is None:
            raise DatasetError(f"cell {aging.name}: the fresh cell's R0 is needed first")
        spec = tr.calibrate_aging(
            aging.name, aging.capacity_factor, aging.resistance_factor, fresh_r0_ohm
        )
    window = tr.stoichiometry_window(spec)
    return {
        "name": aging.name,
        "capacity_factor": aging.capacity_factor,
        "resistance_factor": aging.resistance_factor,
        "active_material_factor": spec.active_material_factor,
        "contact_resistance_ohm": spec.contact_resistance_ohm,
        "capacity_ah": tr.measure_capacity_ah(spec),
        "r0_ohm": tr.measure_r0_ohm(spec),
        **window,
    }


def cell_spec_of(cell: dict[str, Any]) -> tr.CellSpec:
    return tr.CellSpec(
        name=str(cell["name"]),
        active_material_factor=float(cell["active_material_factor"]),
        contact_resistance_ohm=float(cell["contact_resistance_ohm"]),
    )


# -- manifest and generation ----------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "generator": GENERATOR_VERSION,
        "pybamm": version("pybamm"),
        "fastsim": version("fastsim"),
        "numpy": np.__version__,
    }


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_current(entry: dict[str, Any] | None, spec_hash: str, directory: Path) -> bool:
    """A finished item: same spec hash, and every file it lists is there, unchanged."""
    if entry is None or entry.get("spec_hash") != spec_hash:
        return False
    files: dict[str, str] = entry.get("sha256", {})
    if not files:
        return False
    return all(
        (directory / f).is_file() and file_sha256(directory / f) == digest
        for f, digest in files.items()
    )


def _stamp(entry: dict[str, Any], spec_hash: str, directory: Path, files: list[str]) -> None:
    entry["spec_hash"] = spec_hash
    entry["sha256"] = {f: file_sha256(directory / f) for f in files}


def definitions() -> dict[str, Any]:
    limits = tr.SopLimits()
    return {
        "capacity_ah": "TRUE capacity: Ah delivered by a C/20 (0.25 A) discharge at 25 C "
        "from full (rest at 4.2 V OCV) to 2.5 V.",
        "soc_true": "1 - (Ah discharged since full) / capacity_ah of the profile's cell; "
        "soc_true(t) = initial_soc - discharged_ah_true(t) / capacity_ah.",
        "r0_ohm": "TRUE R0: (V_rest - V(10 ms)) / 5 A for a 1C discharge step from rest "
        "at 50 % SOC (PyBaMM stoichiometric) and 25 C.",
        "aging": "capacity: both electrodes' active-material volume fractions x "
        "capacity_factor (loss of active material); resistance: a series contact "
        "resistance chosen so that r0_ohm = resistance_factor x fresh r0_ohm.",
        "sop": "At checkpoints every sop_interval_s along held-out profiles, from the "
        "simulated state: the largest constant current (A, magnitude) up to the "
        f"limits ({limits.i_discharge_max_a} A discharge, {limits.i_charge_max_a} A "
        f"charge) that keeps the voltage within [{limits.v_min}, {limits.v_max}] V for "
        "the whole 10 s or 30 s, found by regula falsi on PyBaMM runs (0.02 A); power "
        "(W, magnitude) = that current x the voltage at the end of the horizon. The "
        "ambient stays as the profile had it at the checkpoint.",
        "signs_units": "s, V, A (positive = discharge), deg C, SOC 0..1, Ah, W",
        "measured_columns": list(MEASURED_COLUMNS),
        "true_columns": list(TRUE_COLUMNS),
        "missing_data": "logging gaps are missing rows (time_s jumps); single lost "
        "readings are 'nan' in a measured column (true columns are never missing)",
        "time_s": "seconds since the start of the profile, 1 s grid",
        "vehicle_limits": "drive and pulse requests are limited so the terminal voltage "
        "stays within [2.5, 4.2] V (regen near full, derating when cold or empty), as a "
        "vehicle obeying its BMS would; CC-CV charges at its CC rate to 4.2 V, then "
        "holds 4.2 V until the current falls below C/20.",
    }


def _default_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(
    out: Path,
    quick: bool = False,
    jobs: int = 1,
    progress: ProgressFn | None = _default_progress,
    *,
    draw: int = 0,
    split: Literal["train", "test"] | None = None,
) -> dict[str, Any]:
    """Generate (or complete) the data set under ``out``; returns the manifest.

    Resumable: a profile, SOP or characterization file whose manifest entry has the
    same spec hash and whose files are unchanged (sha256) is skipped. ``jobs`` > 1
    simulates that many profiles at once in worker processes. ``draw``: see
    :func:`plan`; ``split``: only that split's profiles, and no characterization tests
    (e.g. ``draw=1, split="test"``: a second held-out set)."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: must be >= 1")
    if split not in (None, "train", "test"):
        raise DatasetError(f"split={split!r}: must be 'train', 'test' or None (both)")
    specs = [s for s in plan(quick, draw) if split is None or s.split == split]  # checks draw
    say = progress or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old: dict[str, Any] = {}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if (
            old.get("format") != FORMAT
            or bool(old.get("quick")) != quick
            or int(old.get("draw", 0)) != draw
            or old.get("only_split") != split
        ):
            raise DatasetError(
                f"{manifest_path}: format {old.get('format')!r}, quick={old.get('quick')}, "
                f"draw={old.get('draw', 0)}, split={old.get('only_split')} (want "
                f"{FORMAT!r}, quick={quick}, draw={draw}, split={split}); use another "
                "directory or remove it"
            )
    versions = _versions()
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "quick": quick,
        "draw": draw,
        "only_split": split,
        "versions": versions,
        "cell_model": {
            "model": "DFN",
            "parameter_set": tr.PARAMETER_SET,
            "options": dict(tr.MODEL_OPTIONS),
            "operating_mode": "custom algebraic control law (see labctl/models/bms/truth.py)",
            "solver": {"name": "IDAKLUSolver", "rtol": tr.RTOL, "atol": tr.ATOL},
            "var_pts": "PyBaMM defaults (20 per domain and particle)",
            "nominal_capacity_ah": tr.NOMINAL_CAPACITY_AH,
            "voltage_limits_v": [tr.V_MIN, tr.V_MAX],
        },
        "definitions": definitions(),
        "vehicle": pr.Vehicle().as_dict(),
        "sop": {"limits": tr.SopLimits().as_dict(), "interval_s": SOP_INTERVAL_S},
        "cells": dict(old.get("cells", {})),
        "profiles": {},
        "characterization": dict(old.get("characterization", {})),
    }
    old_profiles: dict[str, Any] = old.get("profiles", {})

    def save() -> None:
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
        tmp.replace(manifest_path)

    # 1. Cells: TRUE capacity and R0 (the aged ones need the fresh R0).
    cell_names = ["fresh"] if quick else [c.name for c in CELLS]
    for aging in CELLS:
        if aging.name not in cell_names:
            continue
        key = _hash([asdict(aging), versions])
        cached = manifest["cells"].get(aging.name)
        if cached is not None and cached.get("spec_hash") == key:
            continue
        t0 = time.perf_counter()
        fresh_r0 = manifest["cells"].get("fresh", {}).get("r0_ohm")
        cell = calibrate_cell(aging, fresh_r0)
        cell["spec_hash"] = key
        manifest["cells"][aging.name] = cell
        save()
        say(
            f"cell {aging.name}: capacity {cell['capacity_ah']:.4f} Ah, R0 "
            f"{cell['r0_ohm'] * 1e3:.2f} mOhm ({time.perf_counter() - t0:.1f} s)"
        )
    manifest["cells"] = {k: v for k, v in manifest["cells"].items() if k in cell_names}

    # 2. Tasks: profiles and characterization files.
    tasks: list[tuple[str, str, dict[str, Any]]] = []  # (kind, key, payload)
    for spec in specs:
        cell = manifest["cells"][spec.cell]
        sop = [tr.SopLimits().as_dict()] if spec.sop else []
        key = _hash([spec.as_dict(), cell["spec_hash"], versions, *sop])
        prev = old_profiles.get(spec.name)
        if _is_current(prev, key, out):
            manifest["profiles"][spec.name] = prev
            continue
        tasks.append(("profile", spec.name, {"spec": spec, "cell": cell, "key": key}))
    temps = (25.0,) if quick else TEMPERATURES_C
    fresh = manifest["cells"]["fresh"]
    char_old = manifest["characterization"].get("files", {})
    manifest["characterization"] = {
        "directory": "characterization",
        "cell": "fresh",
        "protocol_file": "characterization/protocol.json",
        "files": {},
    }
    for task in ch.characterization_tasks(temps, quick) if split is None else []:
        key = _hash([task, fresh["spec_hash"], versions])
        prev = char_old.get(task["file"])
        if _is_current(prev, key, out / "characterization"):
            manifest["characterization"]["files"][task["file"]] = prev
            continue
        tasks.append(("char", task["file"], {"task": task, "cell": fresh, "key": key}))
    # Longest first, so the last worker does not start a UDDS profile alone.
    tasks.sort(key=lambda x: -_expected_cost(x))
    n_char = 2 * len(temps) if split is None else 0
    say(f"{len(tasks)} to generate, {len(specs) + n_char - len(tasks)} up to date")

    done = 0

    def finish(kind: str, name: str, payload: dict[str, Any], entry: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if kind == "profile":
            files = [entry["file"]] + ([entry["sop_file"]] if "sop_file" in entry else [])
            _stamp(entry, payload["key"], out, files)
            manifest["profiles"][name] = entry
            say(
                f"[{done}/{len(tasks)}] {name} ({entry['split']}): {entry['duration_s']:.0f} s, "
                f"SOC {entry['initial_soc']:.3f} -> {entry['final_soc']:.3f}, "
                f"{entry['rows']} rows, {entry['elapsed_s']:.1f} s"
            )
        else:
            _stamp(entry, payload["key"], out / "characterization", [entry["file"]])
            manifest["characterization"]["files"][name] = entry
            say(f"[{done}/{len(tasks)}] characterization/{name}: {entry['rows']} rows")
        save()

    if jobs == 1 or len(tasks) <= 1:
        for kind, name, payload in tasks:
            finish(kind, name, payload, _run_task(kind, payload, str(out)))
    else:
        ctx = get_context("spawn")  # casadi/IDAKLU state is not fork-safe
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            pending: dict[Future[dict[str, Any]], tuple[str, str, dict[str, Any]]] = {
                pool.submit(_run_task, kind, payload, str(out)): (kind, name, payload)
                for kind, name, payload in tasks
            }
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    kind, name, payload = pending.pop(fut)
                    finish(kind, name, payload, fut.result())

    # 3. Characterization sidecar and the OCV truth table.
    if split is None:
        _write_characterization_sidecar(out, manifest, fresh)
    # Order profiles as in the plan; the split lists come from the entries.
    manifest["profiles"] = {s.name: manifest["profiles"][s.name] for s in specs}
    manifest["split"] = {
        "rule": "UDDS only in the held-out (test) set; 10 C ambient never in training: "
        "every profile that sees 10 C, even after an ambient step, is held out",
        "held_out_cycles": list(HELD_OUT_CYCLES),
        "held_out_temperature_c": HELD_OUT_TEMPERATURE_C,
        "train": [s.name for s in specs if s.split == "train"],
        "test": [s.name for s in specs if s.split == "test"],
    }
    manifest["generated_in_s"] = round(time.perf_counter() - started, 1)
    save()
    say(f"done: {len(specs)} profiles in {out} ({manifest['generated_in_s']:.0f} s)")
    return manifest


def _expected_cost(task: tuple[str, str, dict[str, Any]]) -> float:
    kind, _, payload = task
    if kind == "char":
        return 30.0
    spec: ProfileSpec = payload["spec"]
    base = {"udds": 40.0, "hwfet": 15.0, "synth": 25.0}.get(spec.cycle or "", 15.0)
    if spec.kind == "cccv":
        base = 5.0
    return base + (30.0 if spec.sop else 0.0)


def _run_task(kind: str, payload: dict[str, Any], out: str) -> dict[str, Any]:
    """Worker entry (module level, so it pickles)."""
    directory = Path(out)
    cell = payload["cell"]
    if kind == "profile":
        return run_profile(payload["spec"], cell_spec_of(cell), cell, directory)
    return ch.run_characterization_task(
        payload["task"], cell_spec_of(cell), directory / "characterization"
    )


def _write_characterization_sidecar(
    out: Path, manifest: dict[str, Any], fresh: dict[str, Any]
) -> None:
    directory = out / "characterization"
    directory.mkdir(parents=True, exist_ok=True)
    truth = ch.ocv_truth_table(cell_spec_of(fresh), float(fresh["capacity_ah"]))
    ch.write_csv(directory / "truth_ocv.csv", ("soc_true", "ocv_v"), truth, ("%.6f", "%.6f"))
    files = manifest["characterization"]["files"]
    sidecar = {
        "description": "Characterization tests of the fresh simulated LG M50 (PyBaMM DFN, "
        "Chen2020, lumped thermal) in a temperature chamber. CSV columns: "
        + ",".join(ch.CSV_COLUMNS)
        + " (s, A with positive = discharge, V, deg C of the cell surface; step indexes "
        "'steps' of that file). Each test starts fully charged (rest at 4.2 V OCV), "
        "soaked at the chamber temperature.",
        "nominal_capacity_ah": tr.NOMINAL_CAPACITY_AH,
        "voltage_limits_v": [tr.V_MIN, tr.V_MAX],
        "temperatures_c": sorted({f["temperature_c"] for f in files.values()}),
        "measurement": {
            "note": "cycler-grade: Q(x + N(0, noise), lsb), no offsets",
            **{
                k: v
                for k, v in ch.LAB_SENSOR.as_dict().items()
                if k.endswith(("noise_v", "lsb_v", "noise_a", "lsb_a", "noise_c", "lsb_c"))
            },
        },
        "files": [
            {k: f[k] for k in ("file", "test", "temperature_c", "protocol", "steps", "rows")}
            for f in sorted(files.values(), key=lambda f: (f["test"], f["temperature_c"]))
        ],
        "truth": {
            "file": "truth_ocv.csv",
            "note": "NOT lab data: the model's equilibrium OCV against soc_true (the "
            "manifest's definition; capacity_ah below). For checking identified OCV.",
            "capacity_ah": fresh["capacity_ah"],
            "r0_ohm_50soc_25c": fresh["r0_ohm"],
        },
    }
    tmp = directory / "protocol.json.tmp"
    tmp.write_text(json.dumps(sidecar, indent=1))
    tmp.replace(directory / "protocol.json")


def load_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest (run `labctl models bms-data` first)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


__all__ = [
    "CELLS",
    "HELD_OUT_CYCLES",
    "HELD_OUT_TEMPERATURE_C",
    "PROFILE_COLUMNS",
    "SOP_COLUMNS",
    "TEMPERATURES_C",
    "AgingSpec",
    "DatasetError",
    "ProfileSpec",
    "generate",
    "load_manifest",
    "plan",
    "split_of",
]
