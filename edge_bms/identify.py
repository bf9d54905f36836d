"""Identify a 2-RC cell model from characterization tests: pseudo-OCV and HPPC, as CSV.

What a lab does with a new cell, and what ``edge-bms identify`` does with its files:

**Pseudo-OCV** (a slow, C/20-ish discharge from full and a charge back, at each
temperature). SOC comes from coulomb counting, ``soc = 1 - Ah_since_full / Q``, anchored at
the start of the discharge (the cell is full there) with one capacity ``Q`` for every
temperature: the discharge capacity measured at the reference temperature (25 degC, or
the nearest). The capacity measured at each temperature is reported, but a cell's charge
does not change with temperature: a cold cell reaches the cut-off voltage earlier because
of its overpotential, and scaling each temperature's SOC to its own capacity would tell
the filter that a cold cell at the cut-off is empty while it is not. The OCV is the
average of the discharge and charge branches at each SOC of the grid (the overpotential,
about ``I * R``, cancels), each branch smoothed by a local linear fit over +-0.5 % SOC.
Where one branch is missing (the charge's CV end, the cold discharge's early cut-off) the
other is used with the nearest known half-gap; where both are missing, the reference
temperature's curve, shifted to meet this one. The result is forced strictly increasing.
The first 15 minutes of each branch (the polarisation still building) are dropped, and a
rest before the discharge gives the OCV at SOC 1 exactly.

**HPPC** (pulses at SOC steps with long rests). ``R0`` is the instantaneous voltage step
``-dV / dI`` at each clean current step. The RC pairs come from fitting each block between
two long rests (the end of the first rest, every pulse and SOC step, the relaxation after)
with the cell's own OCV table, ``R0`` fixed, the RC branches starting relaxed and a free
voltage offset:

    ocv(soc_k) - v_k - R0 i_k = R1 phi(tau1)_k + R2 phi(tau2)_k + c

where ``phi(tau)`` is the response of a unit RC branch to the measured current (the same
zero-order-hold discretisation as the filters). For fixed time constants this is linear,
so (variable projection) a grid over ``tau1 < tau2`` is searched with a linear least
squares solve per pair (from one Gram matrix, all pairs at once), then refined on finer
grids around the best pair. Time constants are then smoothed across SOC (log scale) at
each temperature, R1 and R2 refitted with the smoothed time constants, and every table
smoothed across SOC with a second-difference penalty, held constant beyond the tested
SOC range and clamped positive. A temperature without HPPC takes its parameters
interpolated in ``1/T`` (Arrhenius-like, on log values) from its neighbours. Pulses above
``max_pulse_c`` (1C) are left out of the fits: one linear R0 cannot hold the DFN's
current-dependent charge-transfer resistance, and drive cycles live mostly below 1C.

The report gives, for every test file, the RMSE of the *final* model simulated over the
whole file (coulomb counting from the file's initial SOC), which is what the filter will
see; :func:`evaluate` does the same for any other profile (a held-out drive cycle).

File layout: CSV with a header and columns ``time_s,current_a,voltage_v,temperature_c``
(more allowed, e.g. ``step``; positive current = discharge). A file's ``kind``
(``pseudo_ocv`` / ``ocv`` / ``hppc`` / other), ``temperature_c`` (the chamber's) and
optional ``initial_soc`` come from a sidecar ``NAME.json`` beside ``NAME.csv``, else from
its entry in the directory's listing (``protocol.json`` with ``files``), else from the file
name (``hppc_25C``, ``ocv_m10C``) and the median measured temperature.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_bms.cell import TABLES, CellModel, Limits
from edge_bms.errors import CellModelError, IdentificationError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
Kind = Literal["ocv", "hppc", "other"]

REQUIRED = ("time_s", "current_a", "voltage_v", "temperature_c")
# 0.01 at the ends, 0.02 between: the DFN's OCV (graphite staging near 15 % SOC, the knee
# below 5 %) is reproduced by this grid's linear interpolation to 0.65 mV RMS (8 mV at
# worst, in the last half percent); a 0.05 grid was 2.7 mV RMS, 14 mV at worst.
DEFAULT_SOC_GRID = np.round(
    np.concatenate(
        [
            [0.0, 0.005, 0.01, 0.015],
            np.arange(0.02, 0.0999, 0.01),
            np.arange(0.1, 0.8999, 0.02),
            np.arange(0.9, 0.9999, 0.01),
            [0.995, 1.0],
        ]
    ),
    4,
)
REFERENCE_T_C = 25.0
# LG INR21700-M50 datasheet: 2.50-4.20 V; 7.28 A (1.5C of 4.85 Ah) continuous discharge;
# 3.40 A (0.7C) maximum charge; discharge -20..60 degC (charge only 0..45 degC: the
# charge window is the SOP's derating, edge_bms.sop.Derating, not a cell limit).
LG_M50_LIMITS = Limits(
    v_min=2.5,
    v_max=4.2,
    i_discharge_max_a=7.28,
    i_charge_max_a=3.4,
    t_min_c=-20.0,
    t_max_c=60.0,
    soc_min=0.0,
    soc_max=1.0,
)

# Search ranges of the two time constants (s); tau2 >= TAU_RATIO * tau1 keeps them apart.
TAU1_RANGE = (0.3, 100.0)
TAU2_RANGE = (5.0, 3000.0)
TAU_RATIO = 2.0
LONG_REST_S = 300.0  # a rest this long ends a block (the RC branches have relaxed)
PRE_REST_S = 30.0  # rested samples kept before a block's first current
TAIL_S = 1800.0  # a block's trailing rest is cut here (cost; the tail is flat by then)
BRANCH_SETTLE_S = 900.0  # pseudo-OCV: the start of each branch, where polarisation builds
# Pulses above this C-rate are left out of the fits (a linear ECM has one R0, but the
# DFN's charge-transfer resistance falls with current, Butler-Volmer: at 25 C the 2C
# pulses' R0 is ~20 % below the 1C pulses'; drive cycles spend most of their time below 1C).
MAX_PULSE_C = 1.0


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
@dataclass
class Series:
    """One test file: the four required columns, its sidecar and what it is."""

    path: Path
    t: FloatArray
    i: FloatArray
    v: FloatArray
    temp: FloatArray
    meta: dict[str, Any]
    kind: Kind
    temperature_c: float
    soc_true: FloatArray | None = None
    truth: FloatArray | None = None  # [n, 3]: true current, voltage, temperature if given
    v_valid: npt.NDArray[np.bool_] | None = None  # False where the voltage was lost (NaN)

    @property
    def duration_s(self) -> float:
        return float(self.t[-1] - self.t[0])


LISTINGS = ("protocol.json", "manifest.json", "index.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IdentificationError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc


def _listing(directory: Path) -> tuple[Path, dict[str, dict[str, Any]]] | None:
    """A directory's listing of its test files: ``protocol.json`` (or ``manifest.json``,
    ``index.json``) with ``files`` as a list of objects with ``file`` or as an object
    keyed by file name. Each entry is that file's metadata (kind/test, temperature_c)."""
    for name in LISTINGS:
        path = directory / name
        if not path.is_file():
            continue
        data = _read_json(path)
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(files, list):
            entries = {str(f["file"]): f for f in files if isinstance(f, dict) and "file" in f}
        elif isinstance(files, dict):
            entries = {str(k): v for k, v in files.items() if isinstance(v, dict)}
        else:
            continue
        return path, entries
    return None


def _sidecar(path: Path) -> dict[str, Any]:
    """The file's metadata: ``NAME.json`` beside it, else its entry in the directory's
    listing (``protocol.json``), else nothing."""
    for cand in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if cand.is_file():
            data = _read_json(cand)
            if not isinstance(data, dict):
                raise IdentificationError(f"{cand}: the sidecar must be a JSON object")
            return data
    listing = _listing(path.parent)
    if listing is not None and path.name in listing[1]:
        return dict(listing[1][path.name])
    return {}


def _temperature_from_name(stem: str) -> float | None:
    """``hppc_25C``, ``ocv_m10C``, ``ocv_-10C`` -> 25, -10, -10."""
    m = re.search(r"(?:^|[_\-\s])(m|-)?(\d+(?:\.\d+)?)C(?:$|[_\-\s.])", stem)
    if m is None:
        return None
    return -float(m.group(2)) if m.group(1) else float(m.group(2))


def _classify(text: str) -> Kind | None:
    t = text.lower()
    if "hppc" in t or "pulse" in t:
        return "hppc"
    if "ocv" in t:
        return "ocv"
    return None


def _kind(path: Path, meta: dict[str, Any]) -> Kind:
    """The sidecar's ``kind``/``test``/``type`` if it names one, else the file name."""
    for key in ("kind", "test", "type"):
        val = meta.get(key)
        if isinstance(val, str):
            return _classify(val) or "other"
    return _classify(path.stem) or "other"


def _meta_float(meta: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        val = meta.get(k)
        if isinstance(val, int | float) and math.isfinite(val):
            return float(val)
    return None


TRUE_COLUMNS = ("current_true_a", "voltage_true_v", "temperature_true_c")
MAX_MISSING = 0.01  # lost readings (NaN) filled by interpolation, up to this share of rows


def read_series(path: str | Path) -> Series:
    """Read one test CSV (and its sidecar); errors name the file and what is wrong.

    A few lost readings (NaN in current, voltage or temperature, up to 1 % of the rows)
    are filled by linear interpolation in time; the voltage's are remembered
    (``Series.v_valid``) so reports leave them out. Logging gaps (rows missing, time
    jumping) need nothing: every step uses the actual time difference.
    """
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            header = next(csv.reader(fh), None)
    except FileNotFoundError as exc:
        raise IdentificationError(f"{p}: no such file") from exc
    if not header:
        raise IdentificationError(f"{p}: empty file (a header line is needed)")
    cols = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise IdentificationError(f"{p}: missing column(s) {missing}; the header has {cols}")
    use = [cols.index(c) for c in REQUIRED]
    soc_col = next((cols.index(c) for c in ("soc", "soc_true") if c in cols), None)
    has_truth = all(c in cols for c in TRUE_COLUMNS)
    if soc_col is not None:
        use.append(soc_col)
    if has_truth:
        use += [cols.index(c) for c in TRUE_COLUMNS]
    try:
        data = np.loadtxt(p, delimiter=",", skiprows=1, usecols=use, ndmin=2)
    except ValueError as exc:
        raise IdentificationError(f"{p}: a value is not a number: {exc}") from exc
    if data.shape[0] < 10:
        raise IdentificationError(f"{p}: only {data.shape[0]} rows; a test needs more")
    t = data[:, 0]
    if not np.all(np.isfinite(t)):
        row = int(np.argmax(~np.isfinite(t))) + 1
        raise IdentificationError(f"{p}: column time_s has a non-finite value at data row {row}")
    back = np.diff(t) < 0
    if back.any():
        row = int(np.argmax(back)) + 2
        raise IdentificationError(f"{p}: time_s goes backwards at data row {row}")
    filled = {}
    v_valid = np.ones(t.size, dtype=bool)
    for k, name in enumerate(REQUIRED[1:], start=1):
        bad = ~np.isfinite(data[:, k])
        if name == "voltage_v":
            v_valid = ~bad  # the fit weighs interpolated voltages out
        if bad.sum() > MAX_MISSING * bad.size:
            raise IdentificationError(
                f"{p}: column {name} has {int(bad.sum())} non-finite value(s) (more than "
                f"{MAX_MISSING:.0%} of the rows), first at data row {int(np.argmax(bad)) + 1}"
            )
        if bad.any():
            data[bad, k] = np.interp(t[bad], t[~bad], data[~bad, k])
            filled[name] = int(bad.sum())
    meta = _sidecar(p)
    if filled:
        meta = {**meta, "_filled": filled}
    kind = _kind(p, meta)
    temp_c = _meta_float(
        meta, "temperature_c", "ambient_c", "ambient_temperature_c", "ambient_temp_c"
    )
    if temp_c is None:
        temp_c = _temperature_from_name(p.stem)
    if temp_c is None:
        temp_c = float(np.median(data[:, 3]))
    k_soc = 4
    k_truth = 5 if soc_col is not None else 4
    return Series(
        p,
        t,
        data[:, 1],
        data[:, 2],
        data[:, 3],
        meta,
        kind,
        temp_c,
        data[:, k_soc] if soc_col is not None else None,
        data[:, k_truth : k_truth + 3] if has_truth else None,
        v_valid,
    )


def _has_columns(path: Path) -> bool:
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), None) or []
    return all(c in [h.strip() for h in header] for c in REQUIRED)


def collect(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Test files from directories, files, or a list of either.

    A directory with a listing (``protocol.json`` ...) gives the files it lists (a listed
    file that is missing is an error); otherwise every CSV under it that has the required
    columns (others, e.g. a truth table, are not tests). A file given by name must be a
    test file.
    """
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            listing = _listing(p)
            if listing is not None:
                where, entries = listing
                missing = [name for name in entries if not (p / name).is_file()]
                if missing:
                    raise IdentificationError(f"{where}: lists missing file(s) {missing}")
                out += [p / name for name in sorted(entries)]
            else:
                out += [f for f in sorted(p.rglob("*.csv")) if _has_columns(f)]
        elif p.is_file():
            out.append(p)
        else:
            raise IdentificationError(f"{p}: no such file or directory")
    if not out:
        raise IdentificationError(f"no test CSV files found in {[str(i) for i in items]}")
    return out


# ---------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------
def linear_scan(a: FloatArray, b: FloatArray) -> FloatArray:
    """``x_k = a_k x_{k-1} + b_k`` with ``x_{-1} = 0`` along axis 0, in log2(n) numpy steps
    (Hillis-Steele on the affine maps; products of factors in [0, 1], so stable)."""
    aa = a.copy()
    bb = b.copy()
    d = 1
    n = a.shape[0]
    while d < n:
        b_new = bb.copy()
        b_new[d:] = aa[d:] * bb[:-d] + bb[d:]
        a_new = aa.copy()
        a_new[d:] = aa[d:] * aa[:-d]
        aa, bb = a_new, b_new
        d *= 2
    return bb


def rc_basis(t: FloatArray, i: FloatArray, taus: FloatArray) -> FloatArray:
    """Voltage of a unit-resistance RC branch for each tau, driven by ``i`` from rest:
    ``x_0 = 0``, ``x_{k+1} = a x_k + (1 - a) i_k`` (zero-order hold): [n, n_tau]."""
    dt = np.diff(t)
    a = np.exp(-dt[:, None] / taus[None, :])
    b = (1.0 - a) * i[:-1, None]
    out = np.zeros((t.size, taus.size))
    if t.size > 1:
        out[1:] = linear_scan(a, b)
    return out


def coulombs(t: FloatArray, i: FloatArray) -> FloatArray:
    """Discharged ampere-hours since the first sample (sample k's current held to k+1)."""
    q = np.zeros(t.size)
    q[1:] = np.cumsum(i[:-1] * np.diff(t)) / 3600.0
    return q


def simulate_ecm(
    cell: CellModel,
    t: FloatArray,
    i: FloatArray,
    temperature_c: FloatArray | float,
    soc0: float,
) -> tuple[FloatArray, FloatArray]:
    """Terminal voltage and SOC of the cell model under a current profile, starting relaxed
    at ``soc0`` (same discretisation as the filters). Returns (v, soc)."""
    soc = soc0 - coulombs(t, i) / cell.capacity_ah
    temp = np.broadcast_to(np.asarray(temperature_c, dtype=float), t.shape)
    p = cell.lookup(soc, temp)
    dt = np.diff(t)
    v = p.ocv - i * p.r0
    for r, tau in ((p.r1, p.tau1), (p.r2, p.tau2)):
        a = np.exp(-dt / tau[:-1])
        x = np.zeros(t.size)
        if t.size > 1:
            x[1:] = linear_scan(a, r[:-1] * (1 - a) * i[:-1])
        v = v - x
    return v, soc


def _local_linear(x: FloatArray, y: FloatArray, grid: FloatArray, h: float) -> FloatArray:
    """Value at each grid point of a straight line fitted to the points within +-h
    (NaN where fewer than 3 points or the grid point is more than h outside the data)."""
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    lo = np.searchsorted(xs, grid - h, side="left")
    hi = np.searchsorted(xs, grid + h, side="right")

    def csum(z: FloatArray) -> FloatArray:
        return np.concatenate([[0.0], np.cumsum(z)])

    # sums over windows, centred on each grid point for conditioning
    s0 = (hi - lo).astype(float)
    cx, cxx, cy, cxy = csum(xs), csum(xs * xs), csum(ys), csum(xs * ys)
    sx = cx[hi] - cx[lo]
    sxx = cxx[hi] - cxx[lo]
    sy = cy[hi] - cy[lo]
    sxy = cxy[hi] - cxy[lo]
    g = grid
    # shift to u = x - g: su = sx - n g, suu = sxx - 2 g sx + n g^2, suy = sxy - g sy
    su = sx - s0 * g
    suu = sxx - 2 * g * sx + s0 * g * g
    suy = sxy - g * sy
    det = s0 * suu - su * su
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (suu * sy - su * suy) / det
    # a grid point may lie up to h beyond the data (the last sample of a branch is one
    # sample short of its end): the line extends that far
    inside = (grid >= xs[0] - h) & (grid <= xs[-1] + h)
    ok = inside & (s0 >= 3) & (det > 1e-18 * np.maximum(s0 * suu, 1e-300))
    out: FloatArray = np.where(ok, a, np.nan)
    return out


def _isotonic(y: FloatArray, min_step: float) -> FloatArray:
    """Nearest strictly increasing sequence (pool adjacent violators, then a minimum step)."""
    z = y - min_step * np.arange(y.size)  # strict with a step -> non-strict
    blocks: list[list[float]] = []  # [mean, count]
    for val in z:
        blocks.append([float(val), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    out = np.concatenate([np.full(int(n), m) for m, n in blocks])
    res: FloatArray = out + min_step * np.arange(y.size)
    return res


def _interp_matrix(grid: FloatArray, x: FloatArray) -> FloatArray:
    """Rows that linearly interpolate grid values at x (clamped)."""
    xc = np.clip(x, grid[0], grid[-1])
    j = np.clip(np.searchsorted(grid, xc, side="right") - 1, 0, grid.size - 2)
    w = (xc - grid[j]) / (grid[j + 1] - grid[j])
    m = np.zeros((x.size, grid.size))
    m[np.arange(x.size), j] = 1 - w
    m[np.arange(x.size), j + 1] += w
    return m


def smooth_on_grid(
    x: FloatArray, z: FloatArray, grid: FloatArray, lam: float, w: FloatArray | None = None
) -> FloatArray:
    """Penalised least squares (Whittaker): grid values whose interpolation fits (x, z),
    with ``lam`` times the squared second derivative; constant beyond the data's range."""
    ok = np.isfinite(z)
    x, z = x[ok], z[ok]
    w = np.ones(x.size) if w is None else w[ok]
    if x.size == 0:
        return np.full(grid.size, np.nan)
    if x.size == 1 or np.ptp(x) == 0:
        return np.full(grid.size, float(np.average(z, weights=w)))
    a = _interp_matrix(grid, x)
    h = np.diff(grid)
    n = grid.size
    d2 = np.zeros((n - 2, n))
    for k in range(n - 2):  # divided second differences (grid is non-uniform)
        d2[k, k] = 2 / (h[k] * (h[k] + h[k + 1]))
        d2[k, k + 1] = -2 / (h[k] * h[k + 1])
        d2[k, k + 2] = 2 / (h[k + 1] * (h[k] + h[k + 1]))
    wt = w / w.mean()
    lhs = a.T @ (wt[:, None] * a) + lam * d2.T @ (d2 * np.r_[h[:-1] + h[1:]][:, None] / 2)
    lhs += 1e-12 * np.eye(n)
    f = np.linalg.solve(lhs, a.T @ (wt * z))
    # beyond the data: hold the edge value instead of extrapolating a slope
    lo_v = float((_interp_matrix(grid, np.array([x.min()])) @ f)[0])
    hi_v = float((_interp_matrix(grid, np.array([x.max()])) @ f)[0])
    out: FloatArray = np.where(grid < x.min(), lo_v, np.where(grid > x.max(), hi_v, f))
    return out


# ---------------------------------------------------------------------------------------
# pseudo-OCV
# ---------------------------------------------------------------------------------------
@dataclass
class OcvTest:
    series: Series
    q_discharge_ah: float  # capacity measured by this test's discharge
    q_charge_ah: float
    dis_q: FloatArray  # Ah discharged since full, discharge branch samples
    dis_v: FloatArray
    chg_q: FloatArray
    chg_v: FloatArray
    q_full: float  # the coulomb count at the start of the discharge (full)
    rest_q: FloatArray  # rested points (Ah since full, V): the rest before the discharge
    rest_v: FloatArray
    current_a: float  # the test's current (see _branch_current; NaN: the branches differ)


def _rest_threshold(i: FloatArray) -> float:
    """|current| below this is rest: 1 % of the test's largest current, at least 5 mA
    (a cycler's noise and offset around zero must not split a rest)."""
    return max(0.01 * float(np.abs(i).max()), 5e-3)


def _longest_run(mask: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """[start, end) of the longest run of True (0, 0 when none)."""
    if not mask.any():
        return 0, 0
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k])


def _ocv_test(s: Series) -> OcvTest:
    """The branches of a pseudo-OCV test: its longest discharge and charge runs.

    The first BRANCH_SETTLE_S of each branch is dropped: the overpotential is still
    building there (the RC branches charge with their time constants), so that part is
    neither the steady ``OCV - I R`` nor ``OCV + I R`` the average relies on; the other
    branch with the nearest half-gap covers it.
    """
    q = coulombs(s.t, s.i)
    pos = s.i[s.i > 0]
    neg = -s.i[s.i < 0]
    if pos.size == 0:
        raise IdentificationError(f"{s.path}: pseudo-OCV test has no discharge (current > 0)")
    d0, d1 = _longest_run(s.i > 0.5 * np.median(pos))
    if d1 - d0 < 20:
        raise IdentificationError(f"{s.path}: pseudo-OCV discharge is too short ({d1 - d0} rows)")
    q_full = float(q[d0])
    q_dis = float(q[d1 - 1] - q_full) if d1 == s.t.size else float(q[d1] - q_full)
    if neg.size:
        c0, c1 = _longest_run(s.i < -0.5 * np.median(neg))
    else:
        c0 = c1 = 0
    q_chg = float(-(q[min(c1, s.t.size - 1)] - q[c0])) if c1 - c0 > 1 else 0.0

    def settled(a: int, b: int) -> slice:
        start = int(np.searchsorted(s.t, s.t[a] + BRANCH_SETTLE_S)) if b > a else a
        return slice(min(start, b), b)

    ds, cs = settled(d0, d1), settled(c0, c1)
    # a rest before the discharge is the cell full and relaxed: OCV at SOC 1 exactly
    rest_q, rest_v = np.zeros(0), np.zeros(0)
    if d0 > 0 and abs(s.i[d0 - 1]) <= _rest_threshold(s.i):
        rest_q, rest_v = np.zeros(1), np.array([s.v[d0 - 1]])  # SOC 1 by definition
    return OcvTest(
        s,
        q_dis,
        q_chg,
        q[ds] - q_full,
        s.v[ds],
        q[cs] - q_full,
        s.v[cs],
        q_full,
        rest_q,
        rest_v,
        _branch_current(s.i[ds], s.i[cs]),
    )


def _branch_current(dis: FloatArray, chg: FloatArray) -> float:
    """The current a half gap belongs to: the mean of the branches' median |i| (the gap
    is (I_d R + I_c R) / 2), or the discharge's alone; NaN when they differ by more than
    10 % (no single current then)."""
    i_d = float(np.median(np.abs(dis))) if dis.size else float("nan")
    if not chg.size:
        return i_d
    i_c = float(np.median(np.abs(chg)))
    if not max(i_d, i_c) <= 1.1 * min(i_d, i_c):
        return float("nan")
    return 0.5 * (i_d + i_c)


def _ocv_rows(
    tests: dict[float, OcvTest], q_ref: float, grid: FloatArray, t_ref: float
) -> tuple[FloatArray, dict[float, dict[str, float]]]:
    """OCV [n_T, n_soc] from each temperature's branches, and per-T diagnostics."""
    temps = sorted(tests)
    raw: dict[float, FloatArray] = {}
    info: dict[float, dict[str, float]] = {}
    h = 0.005
    for tc in temps:
        te = tests[tc]
        d = _local_linear(1.0 - te.dis_q / q_ref, te.dis_v, grid, h)
        c = (
            _local_linear(1.0 - te.chg_q / q_ref, te.chg_v, grid, h)
            if te.chg_q.size >= 3
            else np.full(grid.size, np.nan)
        )
        both = np.isfinite(d) & np.isfinite(c)
        half = np.where(both, (c - d) / 2, np.nan)
        if both.any():
            k = np.flatnonzero(both)
            # the nearest known half-gap where only one branch exists
            near = k[np.abs(np.arange(grid.size)[:, None] - k[None, :]).argmin(axis=1)]
            half_f = np.where(both, half, half[near])
        else:
            half_f = np.zeros(grid.size)
        ocv = np.where(both, (d + c) / 2, np.where(np.isfinite(d), d + half_f, c - half_f))
        if te.rest_q.size:
            # between the branches' reach and a rested point (the top, where a CC charge
            # stops short of full and the discharge's settling was dropped): a line
            known = np.isfinite(ocv)
            xs = np.concatenate([grid[known], 1.0 - te.rest_q / q_ref])
            ys = np.concatenate([ocv[known], te.rest_v])
            order = np.argsort(xs)
            xs, ys = xs[order], ys[order]
            span = (grid >= xs[0]) & (grid <= xs[-1])
            ocv = np.where(~known & span, np.interp(grid, xs, ys), ocv)
        raw[tc] = ocv
        info[tc] = {
            "q_discharge_ah": te.q_discharge_ah,
            "q_charge_ah": te.q_charge_ah,
            "half_gap_mv_median": float(np.nanmedian(half) * 1e3) if both.any() else float("nan"),
            "soc_covered_min": float(grid[np.isfinite(ocv)].min())
            if np.isfinite(ocv).any()
            else 1.0,
        }
    ref = raw[t_ref]
    if not np.all(np.isfinite(ref)):
        missing = grid[~np.isfinite(ref)]
        raise IdentificationError(
            f"{tests[t_ref].series.path}: the reference pseudo-OCV test does not cover SOC "
            f"{missing.tolist()} (needs a full discharge and charge)"
        )
    rows = []
    for tc in temps:
        row = raw[tc]
        miss = ~np.isfinite(row)
        if miss.any():
            # shift the reference curve to meet this one at its nearest covered point
            k = np.flatnonzero(~miss)
            if k.size == 0:
                raise IdentificationError(f"{tests[tc].series.path}: no usable OCV points")
            near = k[np.abs(np.arange(grid.size)[:, None] - k[None, :]).argmin(axis=1)]
            row = np.where(miss, ref + (row[near] - ref[near]), row)
        rows.append(_isotonic(row, 1e-5))
    return np.array(rows), info


# ---------------------------------------------------------------------------------------
# HPPC
# ---------------------------------------------------------------------------------------
@dataclass
class BlockFit:
    soc: float  # where the block's parameters belong (middle of its SOC range)
    r0: float
    r1: float
    tau1: float
    r2: float
    tau2: float
    offset_v: float
    rmse_mv: float
    n: int
    # the block's data, kept for the refit with smoothed time constants
    t: FloatArray = field(repr=False)
    i: FloatArray = field(repr=False)
    y: FloatArray = field(repr=False)  # ocv - v - r0 i
    w: FloatArray = field(repr=False)


def _steps(
    s: Series, soc: FloatArray, max_pulse_a: float = math.inf
) -> tuple[FloatArray, FloatArray]:
    """R0 = -dV/dI at clean current steps: (soc, r0) arrays.

    The voltage before the step is a line through the last four samples extrapolated to
    the step's sample: at the end of a pulse the RC branches are still charging, and a
    plain difference would count one sample interval of that as a (smaller) R0. A step
    logged twice at one timestamp (a simulator's step boundary) needs no extrapolation.
    """
    i, v, t = s.i, s.v, s.t
    imax = float(np.abs(i).max())
    di = np.diff(i)
    k = np.flatnonzero(np.abs(di) >= max(0.1 * imax, 0.05)) + 1  # first sample after
    # clean: the current is flat for four samples before and one after the step
    tol = 0.02 * imax + 1e-3
    k = k[(k >= 4) & (k <= i.size - 2)]
    pre = k[:, None] - np.arange(1, 5)[None, :]  # [n, 4]: k-1 .. k-4
    flat = (np.abs(i[pre] - i[k - 1][:, None]) <= tol).all(axis=1)
    flat &= np.abs(i[k + 1] - i[k]) <= tol
    flat &= (np.abs(i[k]) <= max_pulse_a * 1.001) & (np.abs(i[k - 1]) <= max_pulse_a * 1.001)
    k, pre = k[flat], pre[flat]
    tp, vp = t[pre], v[pre]
    tm, vm = tp.mean(axis=1, keepdims=True), vp.mean(axis=1, keepdims=True)
    sxx = ((tp - tm) ** 2).sum(axis=1)
    slope = np.where(
        sxx > 0, ((tp - tm) * (vp - vm)).sum(axis=1) / np.where(sxx > 0, sxx, 1.0), 0.0
    )
    v_before = v[k - 1] + slope * (t[k] - t[k - 1])
    r0 = -(v[k] - v_before) / (i[k] - i[k - 1])
    good = r0 > 0
    return soc[k][good], r0[good]


def _blocks(s: Series) -> list[tuple[int, int]]:
    """[start, end) index ranges: from PRE_REST_S before a long rest's end to TAIL_S into
    the next long rest (or the end of the file)."""
    rest = np.abs(s.i) <= _rest_threshold(s.i)
    m = np.concatenate([[False], rest, [False]]).astype(np.int8)
    d = np.diff(m)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)  # rest runs [st, en)
    dur = s.t[np.minimum(ends, s.t.size - 1)] - s.t[starts]
    long_runs = [
        (int(a), int(b)) for a, b, du in zip(starts, ends, dur, strict=True) if du >= LONG_REST_S
    ]
    out = []
    for (a0, a1), nxt in zip(long_runs, [*long_runs[1:], None], strict=True):
        if a1 >= s.t.size:
            continue  # the file ends resting
        start = int(np.searchsorted(s.t, s.t[a1 - 1] - PRE_REST_S))
        start = max(start, a0)
        if nxt is None:
            end = s.t.size
        else:
            end = int(np.searchsorted(s.t, s.t[nxt[0]] + TAIL_S, side="right"))
            end = min(end, nxt[1])
        if end - start >= 20:
            out.append((start, end))
    return out


def _pairs(t1: FloatArray, t2: FloatArray) -> tuple[IntArray, IntArray]:
    a, b = np.meshgrid(np.arange(t1.size), np.arange(t2.size), indexing="ij")
    ok = t2[b] >= TAU_RATIO * t1[a]
    return a[ok], b[ok]


def _varpro(
    t: FloatArray, i: FloatArray, y: FloatArray, w: FloatArray, t1: FloatArray, t2: FloatArray
) -> tuple[float, float, float, float, float, float]:
    """Best (sse, r1, tau1, r2, tau2, c) over the tau1 x tau2 grid (R1, R2 > 0)."""
    taus = np.concatenate([t1, t2])
    phi = rc_basis(t, i, taus)
    cols = np.concatenate([phi, np.ones((t.size, 1))], axis=1)
    g = cols.T @ (w[:, None] * cols)
    bvec = cols.T @ (w * y)
    yy = float(y @ (w * y))
    a, b = _pairs(t1, t2)
    ia, ib, ic = a, t1.size + b, np.full(a.size, taus.size)
    idx = np.stack([ia, ib, ic], axis=1)  # [n_pairs, 3]
    gm = g[idx[:, :, None], idx[:, None, :]]
    bv = bvec[idx]
    gm = gm + 1e-14 * np.trace(g) * np.eye(3)
    theta = np.linalg.solve(gm, bv[..., None])[..., 0]
    sse = yy - 2 * np.einsum("pk,pk->p", theta, bv) + np.einsum("pk,pkl,pl->p", theta, gm, theta)
    sse = np.where((theta[:, 0] > 0) & (theta[:, 1] > 0), sse, np.inf)
    k = int(np.argmin(sse))
    return (
        float(sse[k]),
        float(theta[k, 0]),
        float(t1[a[k]]),
        float(theta[k, 1]),
        float(t2[b[k]]),
        float(theta[k, 2]),
    )


def _fit_taus(
    t: FloatArray, i: FloatArray, y: FloatArray, w: FloatArray
) -> tuple[float, float, float, float, float, float]:
    """Coarse grid, then two finer grids around the best pair."""
    t1 = np.geomspace(*TAU1_RANGE, 24)
    t2 = np.geomspace(*TAU2_RANGE, 28)
    best = _varpro(t, i, y, w, t1, t2)
    for span in (np.sqrt(t1[1] / t1[0]) ** 2, np.sqrt(t1[1] / t1[0])):
        c1, c2 = best[2], best[4]
        f1 = np.clip(c1 * np.geomspace(1 / span, span, 7), *TAU1_RANGE)
        f2 = np.clip(c2 * np.geomspace(1 / span, span, 7), *TAU2_RANGE)
        cand = _varpro(t, i, y, w, np.unique(f1), np.unique(f2))
        if cand[0] <= best[0]:
            best = cand
    if not math.isfinite(best[0]):
        raise ValueError("no positive R1, R2 fit")
    return best


def _linear_rc(
    t: FloatArray, i: FloatArray, y: FloatArray, w: FloatArray, tau1: float, tau2: float
) -> tuple[float, float, float, float]:
    """(sse, r1, r2, c) for fixed time constants (R1, R2 clamped at a small positive)."""
    phi = rc_basis(t, i, np.array([tau1, tau2]))
    cols = np.concatenate([phi, np.ones((t.size, 1))], axis=1)
    sw = np.sqrt(w)
    theta, *_ = np.linalg.lstsq(cols * sw[:, None], y * sw, rcond=None)
    if theta[0] <= 0 or theta[1] <= 0:
        # refit with the non-positive branch dropped (a one-RC block)
        keep = [k for k in (0, 1) if theta[k] > 0] + [2]
        th2, *_ = np.linalg.lstsq(cols[:, keep] * sw[:, None], y * sw, rcond=None)
        theta = np.zeros(3)
        theta[keep] = th2
    theta[:2] = np.maximum(theta[:2], 1e-6)
    res = y - cols @ theta
    return float(res @ (w * res)), float(theta[0]), float(theta[1]), float(theta[2])


def _pulse_weights(i: FloatArray, rest: float, max_pulse_a: float) -> FloatArray:
    """0 on samples under a current above ``max_pulse_a`` and the rest that follows it
    (until the next current), 1 elsewhere."""
    active = np.abs(i) > rest
    idx = np.where(active, np.arange(i.size), -1)
    last = np.maximum.accumulate(idx)  # the last active sample at or before each one
    last_i = np.where(last >= 0, i[np.maximum(last, 0)], 0.0)
    w: FloatArray = np.where(np.abs(last_i) > max_pulse_a * 1.001, 0.0, 1.0)
    return w


def _hppc_blocks(
    s: Series,
    ocv_of: Any,
    soc: FloatArray,
    r0_soc: FloatArray,
    r0_val: FloatArray,
    max_pulse_a: float = math.inf,
) -> list[BlockFit]:
    fits: list[BlockFit] = []
    for a, b in _blocks(s):
        sl = slice(a, b)
        t, i, v = s.t[sl], s.i[sl], s.v[sl]
        sb = soc[sl]
        active = np.abs(i) > _rest_threshold(s.i)
        if not active.any():
            continue
        inside = (r0_soc >= sb.min() - 0.02) & (r0_soc <= sb.max() + 0.02)
        if inside.any():
            r0 = float(np.median(r0_val[inside]))
        elif r0_val.size:
            order = np.argsort(r0_soc)
            r0 = float(np.interp(sb.mean(), r0_soc[order], r0_val[order]))
        else:
            raise IdentificationError(f"{s.path}: no clean current step to measure R0 from")
        y = ocv_of(sb) - v - r0 * i
        w = _pulse_weights(i, _rest_threshold(s.i), max_pulse_a)
        try:
            sse, r1, tau1, r2, tau2, c = _fit_taus(t, i, y, w)
        except ValueError:
            continue
        lo, hi = float(sb.min()), float(sb.max())
        fits.append(
            BlockFit(
                0.5 * (lo + hi),
                r0,
                r1,
                tau1,
                r2,
                tau2,
                c,
                1e3 * math.sqrt(sse / t.size),
                t.size,
                t,
                i,
                y,
                w,
            )
        )
    return fits


def _initial_soc(s: Series, cell_ocv: CellModel) -> float:
    """The file's initial SOC: sidecar ``initial_soc``, a ``soc`` column, or the OCV of a
    rested first sample."""
    val = _meta_float(s.meta, "initial_soc", "soc0", "soc_initial")
    if val is not None:
        return val
    if s.soc_true is not None:
        return float(s.soc_true[0])
    if abs(s.i[0]) <= _rest_threshold(s.i):
        return float(cell_ocv.soc_from_ocv(s.v[0], s.temperature_c))
    raise IdentificationError(
        f"{s.path}: the initial SOC is unknown: give initial_soc in the sidecar, a soc "
        "column, or start the test at rest"
    )


# ---------------------------------------------------------------------------------------
# the whole identification
# ---------------------------------------------------------------------------------------
@dataclass
class TestReport:
    """How well the identified model reproduces one test file."""

    path: str
    kind: Kind
    temperature_c: float
    n_samples: int
    duration_s: float
    rmse_mv: float
    max_abs_mv: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "temperature_c": self.temperature_c,
            "n_samples": self.n_samples,
            "duration_s": round(self.duration_s, 3),
            "rmse_mv": round(self.rmse_mv, 3),
            "max_abs_mv": round(self.max_abs_mv, 3),
            "detail": self.detail,
        }

    def line(self) -> str:
        fitted = self.detail.get("rmse_fitted_mv")
        extra = f"  (fitted pulses {fitted:.2f} mV)" if fitted is not None else ""
        return (
            f"{self.kind:5s} {self.temperature_c:6.1f} C  rmse {self.rmse_mv:7.2f} mV  "
            f"max {self.max_abs_mv:7.1f} mV  {Path(self.path).name}{extra}"
        )


@dataclass
class Identification:
    cell: CellModel
    tests: list[TestReport]
    capacity_by_temperature_ah: dict[float, float]
    blocks: dict[float, list[dict[str, float]]]

    def summary(self) -> str:
        lines = [f"cell {self.cell.name}: capacity {self.cell.capacity_ah:.4f} Ah"]
        caps = ", ".join(f"{t:g} C: {q:.3f}" for t, q in self.capacity_by_temperature_ah.items())
        lines.append(f"capacity measured by each pseudo-OCV test (Ah): {caps}")
        lines += [r.line() for r in self.tests]
        return "\n".join(lines)


def _arrhenius_fill(temps: list[float], have: list[float], rows: dict[float, FloatArray]) -> None:
    """Fill rows of temperatures without HPPC from neighbours, linear in 1/T on logs."""
    inv = {tc: 1.0 / (tc + 273.15) for tc in temps}
    hx = np.array([inv[tc] for tc in have])
    order = np.argsort(hx)
    for tc in temps:
        if tc in rows:
            continue
        logs = np.stack([np.log(rows[h]) for h in have])[order]  # [n_have, n_soc, k]
        x = hx[order]
        if x.size == 1:
            rows[tc] = np.exp(logs[0])
            continue
        j = int(np.clip(np.searchsorted(x, inv[tc]) - 1, 0, x.size - 2))
        f = (inv[tc] - x[j]) / (x[j + 1] - x[j])
        f = float(np.clip(f, -0.5, 1.5))  # a little extrapolation, not a runaway
        rows[tc] = np.exp(logs[j] * (1 - f) + logs[j + 1] * f)


def run_identification(
    inputs: str | Path | Iterable[str | Path],
    *,
    name: str = "identified",
    limits: Limits | None = None,
    soc_grid: Sequence[float] | None = None,
    smoothing: float = 1e-5,
    max_pulse_c: float | None = MAX_PULSE_C,
) -> Identification:
    """Identify a cell model from pseudo-OCV and HPPC files (see the module docstring)."""
    grid = np.asarray(DEFAULT_SOC_GRID if soc_grid is None else soc_grid, dtype=float)
    if grid.ndim != 1 or grid.size < 3 or np.any(np.diff(grid) <= 0) or grid[0] < 0 or grid[-1] > 1:
        raise IdentificationError(f"soc_grid must be increasing within [0, 1], got {grid.tolist()}")
    paths = collect(inputs)
    series = [read_series(p) for p in paths]
    ocv_series = [s for s in series if s.kind == "ocv"]
    hppc_series = [s for s in series if s.kind == "hppc"]
    if not ocv_series:
        raise IdentificationError(
            f"no pseudo-OCV test among {[str(p) for p in paths]} (name a file *ocv* or give "
            'kind "pseudo_ocv" in its sidecar)'
        )

    ocv_tests: dict[float, OcvTest] = {}
    for s in ocv_series:
        if s.temperature_c in ocv_tests:
            raise IdentificationError(
                f"{s.path}: a second pseudo-OCV test at {s.temperature_c} C "
                f"(first: {ocv_tests[s.temperature_c].series.path})"
            )
        ocv_tests[s.temperature_c] = _ocv_test(s)
    if not hppc_series:
        raise IdentificationError(f"no HPPC test among {[str(p) for p in paths]}")
    t_ref = min(ocv_tests, key=lambda tc: abs(tc - REFERENCE_T_C))
    q_ref = ocv_tests[t_ref].q_discharge_ah
    max_pulse = math.inf if max_pulse_c is None else max_pulse_c * q_ref
    temps = sorted(set(ocv_tests) | {s.temperature_c for s in hppc_series})
    ocv_rows, ocv_info = _ocv_rows(ocv_tests, q_ref, grid, t_ref)
    ocv_t = np.array(sorted(ocv_tests))
    # OCV on the full temperature grid (a temperature with HPPC only: nearest OCV rows)
    ocv_full = np.stack(
        [np.array([np.interp(tc, ocv_t, ocv_rows[:, k]) for k in range(grid.size)]) for tc in temps]
    )

    lim = limits or _limits_from_data(series)
    ones = np.ones((len(temps), grid.size))

    def make(tables: FloatArray) -> CellModel:
        return CellModel(
            name=name,
            capacity_ah=q_ref,
            soc=grid,
            temperature_c=np.array(temps, dtype=float),
            tables=tables,
            limits=lim,
            source={},
        )

    # an OCV-only model, for SOC anchors and the OCV term of the block fits
    ocv_model = make(np.stack([ocv_full] + [ones] * 5, axis=-1))

    per_t: dict[float, FloatArray] = {}  # [n_soc, 5]: r0, r1, tau1, r2, tau2
    blocks_out: dict[float, list[dict[str, float]]] = {}
    for tc in sorted({s.temperature_c for s in hppc_series}):
        group = [s for s in hppc_series if s.temperature_c == tc]
        all_fits: list[BlockFit] = []
        r0_s: list[FloatArray] = []
        r0_v: list[FloatArray] = []
        for s in group:
            soc = _initial_soc(s, ocv_model) - coulombs(s.t, s.i) / q_ref
            # a test whose pulses are all above the limit uses its smallest ones
            active = np.abs(s.i)[np.abs(s.i) > _rest_threshold(s.i)]
            limit = max(max_pulse, float(active.min()) if active.size else 0.0)
            ks, kr = _steps(s, soc, limit)
            r0_s.append(ks)
            r0_v.append(kr)
            fits = _hppc_blocks(s, lambda sb, tc=tc: ocv_model.ocv(sb, tc), soc, ks, kr, limit)
            if not fits:
                raise IdentificationError(
                    f"{s.path}: no HPPC block could be fitted (each needs a rest of "
                    f">= {LONG_REST_S:g} s before it)"
                )
            all_fits += fits
        rs, rv = np.concatenate(r0_s), np.concatenate(r0_v)
        if rs.size == 0:
            raise IdentificationError(
                f"{group[0].path}: no clean current step found to measure R0 from"
            )
        bs = np.array([f.soc for f in all_fits])
        # smooth the time constants across SOC, then refit R1, R2 with them
        # (weighted by block length: a short block, e.g. the last pulses of a test with no
        # long rest after them, says little about a slow time constant)
        bw = np.array([f.n for f in all_fits], dtype=float)
        ltau1 = smooth_on_grid(bs, np.log([f.tau1 for f in all_fits]), grid, 10 * smoothing, bw)
        ltau2 = smooth_on_grid(bs, np.log([f.tau2 for f in all_fits]), grid, 10 * smoothing, bw)
        tau1_b = np.exp(np.interp(bs, grid, ltau1))
        tau2_b = np.exp(np.interp(bs, grid, ltau2))
        r1_b, r2_b, rm_b = [], [], []
        for f, ta, tb in zip(all_fits, tau1_b, tau2_b, strict=True):
            sse, r1, r2, _ = _linear_rc(f.t, f.i, f.y, f.w, float(ta), float(tb))
            r1_b.append(r1)
            r2_b.append(r2)
            rm_b.append(1e3 * math.sqrt(sse / f.n))
        # a branch the refit dropped (R clamped to ~0) is missing, not a value: its log
        # would drag the smoothed table to zero
        lr1 = np.where(np.array(r1_b) > 1e-5, np.log(np.maximum(r1_b, 1e-300)), np.nan)
        lr2 = np.where(np.array(r2_b) > 1e-5, np.log(np.maximum(r2_b, 1e-300)), np.nan)
        cols = [
            smooth_on_grid(rs, np.log(rv), grid, smoothing),
            smooth_on_grid(bs, lr1, grid, smoothing, bw),
            ltau1,
            smooth_on_grid(bs, lr2, grid, smoothing, bw),
            ltau2,
        ]
        per_t[tc] = np.exp(np.stack(cols, axis=-1))
        blocks_out[tc] = [
            {
                "soc": round(f.soc, 4),
                "r0_ohm": f.r0,
                "r1_ohm": f.r1,
                "tau1_s": f.tau1,
                "r2_ohm": f.r2,
                "tau2_s": f.tau2,
                "rmse_mv": round(f.rmse_mv, 3),
                "r1_refit_ohm": r1,
                "r2_refit_ohm": r2,
                "rmse_refit_mv": round(rm, 3),
            }
            for f, r1, r2, rm in zip(all_fits, r1_b, r2_b, rm_b, strict=True)
        ]
    have = sorted(per_t)
    _arrhenius_fill(temps, have, per_t)
    rc = np.stack([per_t[tc] for tc in temps])  # [n_T, n_soc, 5]
    rc = np.clip(rc, 1e-6, None)
    tables = np.concatenate([ocv_full[..., None], rc], axis=-1)
    assert len(TABLES) == tables.shape[-1]
    cell = make(tables)

    reports = [
        evaluate(cell, s, max_pulse_a=max_pulse if s.kind == "hppc" else None)
        for s in series
        if s.kind in ("ocv", "hppc")
    ]
    caps = {tc: ocv_tests[tc].q_discharge_ah for tc in sorted(ocv_tests)}
    source = {
        "tool": "edge_bms.identify",
        "files": [str(p.name) for p in paths],
        "reference_temperature_c": t_ref,
        "capacity_by_temperature_ah": {f"{k:g}": round(v, 5) for k, v in caps.items()},
        "ocv": {f"{k:g}": {kk: round(vv, 5) for kk, vv in v.items()} for k, v in ocv_info.items()},
        "fit": [r.to_dict() for r in reports],
    }
    # half the pseudo-OCV branch gap (median over SOC; hysteresis plus the test's
    # polarisation) per model temperature, from the OCV tests that had both branches
    gaps = {t: v["half_gap_mv_median"] for t, v in ocv_info.items()}
    known = sorted(t for t, g in gaps.items() if math.isfinite(g))
    half_gap = (
        np.interp(cell.temperature_c, known, [gaps[t] * 1e-3 for t in known]) if known else None
    )
    # the current the gaps were measured at (one C-rate for every test, else no value:
    # the gap over the current is then no single resistance scale)
    currents = [ocv_tests[t].current_a for t in known]
    test_current = (
        float(f"{np.median(currents):.6g}")
        if currents  # one per temperature with a gap: none when half_gap is None
        and all(math.isfinite(c) for c in currents)
        and max(currents) <= 1.1 * min(currents)
        else None
    )
    cell = CellModel(
        cell.name,
        cell.capacity_ah,
        cell.soc,
        cell.temperature_c,
        cell.tables,
        lim,
        source,
        ocv_half_gap_v=half_gap,
        ocv_test_current_a=test_current,
    )
    try:  # the file format's own checks, so what we return can be saved and loaded
        CellModel.from_dict(cell.to_dict())
    except CellModelError as exc:
        raise IdentificationError(f"the identified model is invalid: {exc}") from exc
    return Identification(cell, reports, caps, blocks_out)


def identify(
    inputs: str | Path | Iterable[str | Path],
    *,
    name: str = "identified",
    limits: Limits | None = None,
    soc_grid: Sequence[float] | None = None,
) -> CellModel:
    """The identified cell model; its ``source["fit"]`` holds the per-test report."""
    return run_identification(inputs, name=name, limits=limits, soc_grid=soc_grid).cell


def _limits_from_data(series: list[Series]) -> Limits:
    """Without given limits: the voltage window and the largest currents the tests used."""
    v = np.concatenate([s.v for s in series])
    i = np.concatenate([s.i for s in series])
    return Limits(
        v_min=round(float(v.min()), 2),
        v_max=round(float(v.max()), 2),
        i_discharge_max_a=max(round(float(i.max()), 2), 0.01),
        i_charge_max_a=max(round(float(-i.min()), 2), 0.01),
        soc_min=0.0,
        soc_max=1.0,
    )


def evaluate(
    cell: CellModel,
    series: Series | str | Path,
    soc0: float | None = None,
    max_pulse_a: float | None = None,
) -> TestReport:
    """Simulate the cell model over a test file; RMSE and max error of the voltage.

    If the file carries the simulator's true signals (``current_true_a``,
    ``voltage_true_v``, ``temperature_true_c``), ``detail["rmse_true_mv"]`` is the model
    driven by the true current against the true voltage: the model's own error, without
    the sensors' noise, offsets and gain error. With ``max_pulse_a``,
    ``detail["rmse_fitted_mv"]`` leaves out what followed larger currents (the samples an
    identification with that limit did not fit).
    """
    s = series if isinstance(series, Series) else read_series(series)
    start = _initial_soc(s, cell) if soc0 is None else soc0
    v_model, soc = simulate_ecm(cell, s.t, s.i, s.temp, start)
    ok = np.ones(s.t.size, dtype=bool) if s.v_valid is None else s.v_valid
    err = (v_model - s.v)[ok]
    detail: dict[str, Any] = {"initial_soc": round(start, 5)}
    if "_filled" in s.meta:
        detail["filled_nan"] = s.meta["_filled"]
    if max_pulse_a is not None and math.isfinite(max_pulse_a):
        used = (_pulse_weights(s.i, _rest_threshold(s.i), max_pulse_a) > 0)[ok]
        detail["rmse_fitted_mv"] = round(float(1e3 * np.sqrt(np.mean(err[used] ** 2))), 3)
    if s.soc_true is not None:
        detail["soc_drift_max"] = round(float(np.abs(soc - s.soc_true).max()), 5)
    if s.truth is not None:
        v_true_model, _ = simulate_ecm(cell, s.t, s.truth[:, 0], s.truth[:, 2], start)
        e_true = v_true_model - s.truth[:, 1]
        detail["rmse_true_mv"] = round(float(1e3 * np.sqrt(np.mean(e_true**2))), 3)
        detail["max_abs_true_mv"] = round(float(1e3 * np.abs(e_true).max()), 3)
    return TestReport(
        str(s.path),
        s.kind,
        s.temperature_c,
        s.t.size,
        s.duration_s,
        float(1e3 * np.sqrt(np.mean(err**2))),
        float(1e3 * np.abs(err).max()),
        detail,
    )


# ---------------------------------------------------------------------------------------
# CLI: edge-bms identify
# ---------------------------------------------------------------------------------------
def _load_limits(text: str | None) -> Limits | None:
    if text is None:
        return None
    if text.lower() in ("lg-m50", "lg_m50"):
        return LG_M50_LIMITS
    p = Path(text)
    try:
        raw = json.loads(p.read_text()) if p.is_file() else json.loads(text)
        return Limits.model_validate(raw)
    except (json.JSONDecodeError, ValueError) as exc:
        raise IdentificationError(f"--limits {text!r}: not a limits JSON object ({exc})") from exc


def _cli(args: argparse.Namespace) -> int:
    try:
        result = run_identification(
            args.input,
            name=args.name,
            limits=_load_limits(args.limits),
            max_pulse_c=args.max_pulse_c,
        )
        held = [evaluate(result.cell, p) for p in (args.validate or [])]
    except IdentificationError as exc:
        print(f"edge-bms identify: {exc}", file=sys.stderr)
        return 2
    out = result.cell.save(args.output)
    if args.json:
        print(
            json.dumps(
                {
                    "output": str(out),
                    "capacity_ah": result.cell.capacity_ah,
                    "tests": [r.to_dict() for r in result.tests],
                    "validation": [r.to_dict() for r in held],
                }
            )
        )
    else:
        print(result.summary())
        for r in held:
            print("held-out " + r.line())
        print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``identify`` to the ``edge-bms`` command line."""
    p = sub.add_parser(
        "identify",
        help="identify a 2-RC cell model from pseudo-OCV and HPPC CSV files",
        description=(
            "Identify OCV(SOC, T), R0, R1, tau1, R2, tau2 over (SOC, T) from pseudo-OCV and "
            "HPPC tests (CSV: time_s,current_a,voltage_v,temperature_c; + = discharge) and "
            "print how well the model reproduces each file."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, help="CSV files and/or directories")
    p.add_argument("--output", required=True, help="the cell model JSON to write")
    p.add_argument("--name", default="identified", help="the model's name")
    p.add_argument(
        "--limits",
        default=None,
        help="operating limits: 'lg-m50', a JSON file or inline JSON (default: from the data)",
    )
    p.add_argument(
        "--max-pulse-c",
        type=float,
        default=MAX_PULSE_C,
        help="leave pulses above this C-rate out of the fits (default %(default)s; inf: all)",
    )
    p.add_argument("--validate", nargs="*", help="more CSV files (e.g. a drive cycle) to report on")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cli)
