"""Score SOC estimators on ground-truth profiles: coulomb counting, the plain filter, the
filter with the learned correction. Used by ``labctl models train-bms`` (tuning and
promotion on training profiles, held-out scores for the record) and
``scripts/bench_bms.py``.

Conventions: the error is estimate minus truth in SOC points (fractions x 100 in the
printed tables); "after convergence" means after ``converge_s`` seconds from the
profile's start; the time to converge is the first time after which the error stays
within ``band`` for the rest of the profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_bms.cell import CellModel
from edge_bms.correction import VoltageCorrectionNet
from edge_bms.estimator import HealthEstimator, PackEstimator
from edge_bms.soh import SohEstimator
from labctl.models.bms_correction import Profile

FloatArray = npt.NDArray[np.float64]
Method = Literal["ekf", "ukf"]


@dataclass
class Trace:
    """One estimator run on one profile, aligned with the profile's usable rows."""

    name: str
    time_s: FloatArray
    soc_true: FloatArray
    soc: FloatArray
    soc_sigma: FloatArray
    correction_frac: float  # share of steps where the network applied to the cell
    # per step, when the run was asked to record them (``record=True``): "v1", "v2" (RC
    # branch voltages, V), "capacity_ah", "r0_scale" (used in the step), "temperature_c"
    extras: dict[str, FloatArray] = field(default_factory=dict)

    @property
    def error(self) -> FloatArray:
        err: FloatArray = self.soc - self.soc_true
        return err


def usable_rows(p: Profile) -> npt.NDArray[np.bool_]:
    """Rows with a finite time, current and temperature (voltage may be missing)."""
    ok: npt.NDArray[np.bool_] = (
        np.isfinite(p.time_s) & np.isfinite(p.current_a) & np.isfinite(p.temperature_c)
    )
    return ok


def run_filter(
    cell: CellModel,
    p: Profile,
    *,
    correction: VoltageCorrectionNet | None = None,
    method: Method = "ekf",
    initial_soc: float | None = None,
    noise: dict[str, float] | None = None,
    health: HealthEstimator | None = None,
    record: bool = False,
) -> Trace:
    """Run the estimator over a profile, one cell, sample by sample (as a gateway would)."""
    return run_cells(
        cell,
        p,
        1,
        correction=correction,
        method=method,
        initial_soc=initial_soc,
        noise=noise,
        health=health,
        record=record,
    )[0]


def run_cells(
    cell: CellModel,
    p: Profile,
    n_cells: int,
    *,
    correction: VoltageCorrectionNet | None = None,
    method: Method = "ekf",
    initial_soc: float | Sequence[float] | None = None,
    noise: dict[str, float] | None = None,
    health: HealthEstimator | None = None,
    record: bool = False,
    options: dict[str, Any] | None = None,
) -> list[Trace]:
    """Run one estimator of ``n_cells`` cells that all see the profile's measurements
    (e.g. the same cell from several initial SOCs, ``initial_soc`` [n]): one trace per
    cell, one numpy step for all of them. ``health`` must be sized ``n_cells``."""
    if p.soc_true is None:
        raise ValueError(f"profile {p.name}: no soc_true column")
    ok = usable_rows(p)
    if correction is not None:
        correction.load_state_dict({"ema": None})
    est = PackEstimator(
        cell,
        n_cells,
        method=method,
        initial_soc=initial_soc,
        correction=correction,
        noise=noise,
        health=health,
        **(options or {}),
    )
    t = p.time_s[ok]
    i = p.current_a[ok]
    v = np.repeat(p.voltage_v[ok][:, None], n_cells, axis=1)
    temp = p.temperature_c[ok]
    k_steps = t.size
    soc = np.empty((k_steps, n_cells))
    sig = np.empty((k_steps, n_cells))
    rec = {
        name: np.empty((k_steps, n_cells))
        for name in (("v1", "v2", "capacity_ah", "r0_scale") if record else ())
    }
    used = np.zeros(n_cells)
    for k in range(k_steps):
        e = est.step(float(t[k]), float(i[k]), v[k], float(temp[k]))
        soc[k] = e.soc
        sig[k] = e.soc_sigma
        if e.flags.correction_cells is not None:
            used += e.flags.correction_cells
        if record:
            rec["v1"][k] = e.v_rc[0]
            rec["v2"][k] = e.v_rc[1]
            rec["capacity_ah"][k] = e.capacity_ah
            rec["r0_scale"][k] = e.r0_scale
    frac = used / max(k_steps, 1)
    out = []
    for j in range(n_cells):
        extras = {name: a[:, j].copy() for name, a in rec.items()}
        if record:
            extras["temperature_c"] = temp.copy()
        out.append(Trace(p.name, t, p.soc_true[ok], soc[:, j], sig[:, j], float(frac[j]), extras))
    return out


def ocv_initial_soc(cell: CellModel, p: Profile, options: dict[str, Any] | None = None) -> float:
    """The SOC the estimator (``PackEstimator`` with ``options``) reads off the profile's
    first voltage when it is given none, for coulomb counting from the same start. 0.5 if
    the first usable row has no voltage."""
    ok = usable_rows(p)
    v0 = float(p.voltage_v[ok][0])
    if not np.isfinite(v0):
        return 0.5
    first = PackEstimator(cell, 1, **(options or {})).step(
        float(p.time_s[ok][0]), float(p.current_a[ok][0]), v0, float(p.temperature_c[ok][0])
    )
    return float(first.soc[0])


WRONG_BY = 0.30  # the initial-SOC error of the convergence runs
# A run of the convergence test counts when clipping to [0, 1] left its start at least
# this far off (true + 0.3 from 0.95 starts only 0.05 off, which says little).
WRONG_MIN = 0.10


def wrong_starts(p: Profile) -> tuple[float, list[float]]:
    """The true initial SOC and the two wrong starts: true -/+ WRONG_BY, clipped."""
    if p.soc_true is None:
        raise ValueError(f"profile {p.name}: no soc_true column")
    s0 = float(p.soc_true[usable_rows(p)][0])
    return s0, [max(s0 - WRONG_BY, 0.0), min(s0 + WRONG_BY, 1.0)]


def wrong_start_times(p: Profile, traces: Sequence[Trace], band: float = 0.02) -> list[float]:
    """:func:`converge_time` of the runs from :func:`wrong_starts` (``traces`` in that
    order) whose clipped start is at least ``WRONG_MIN`` off: what the convergence target
    counts."""
    s0, starts = wrong_starts(p)
    return [
        converge_time(t, band)
        for t, start in zip(traces, starts, strict=True)
        if abs(start - s0) >= WRONG_MIN
    ]


def coulomb_count(p: Profile, capacity_ah: float, initial_soc: float | None = None) -> Trace:
    """The peer every BMS is compared with: integrate measured current from a start SOC."""
    if p.soc_true is None:
        raise ValueError(f"profile {p.name}: no soc_true column")
    ok = usable_rows(p)
    t = p.time_s[ok]
    i = p.current_a[ok]
    start = float(p.soc_true[ok][0]) if initial_soc is None else initial_soc
    dq = np.concatenate([[0.0], np.diff(t) * i[:-1]]) / 3600.0
    soc = start - np.cumsum(dq) / capacity_ah
    return Trace(p.name, t, p.soc_true[ok], soc, np.full(t.size, np.nan), 0.0)


def converge_time(tr: Trace, band: float = 0.02) -> float:
    """Seconds from the trace's start until the error enters ``band`` for good: the
    time of the first sample after the last one outside it (0 if none is outside; inf
    if the last sample is outside)."""
    outside = np.abs(tr.error) > band
    if not outside.any():
        return 0.0
    last = int(np.flatnonzero(outside)[-1])
    if last + 1 >= tr.time_s.size:
        return float("inf")
    return float(tr.time_s[last + 1] - tr.time_s[0])


def soc_metrics(
    traces: Sequence[Trace], *, converge_s: float = 120.0, band: float = 0.02
) -> dict[str, float]:
    """RMSE / mean / max absolute error after ``converge_s``, the time to stay in
    ``band`` (worst and median over traces, see :func:`converge_time`), and sigma
    calibration after ``converge_s``: share of errors within 1 and 2 sigma (a calibrated
    Gaussian gives 0.683 and 0.954) and the mean NEES ``(e / sigma)^2`` (1 when
    calibrated; above 1: overconfident)."""
    errs, sigs = [], []
    for tr in traces:
        after = tr.time_s - tr.time_s[0] >= converge_s
        errs.append(tr.error[after])
        sigs.append(tr.soc_sigma[after])
    conv = [converge_time(tr, band) for tr in traces]
    e = np.concatenate(errs)
    s = np.concatenate(sigs)
    out = {
        "rmse": float(np.sqrt(np.mean(e**2))),
        "mae": float(np.mean(np.abs(e))),
        "max_abs": float(np.max(np.abs(e))),
        "converge_s_worst": float(max(conv)),
        "converge_s_median": float(np.median(conv)),
        "n": float(e.size),
    }
    if np.isfinite(s).all():
        z = np.abs(e) / np.maximum(s, 1e-12)
        out["within_1sigma"] = float(np.mean(z <= 1.0))
        out["within_2sigma"] = float(np.mean(z <= 2.0))
        out["nees"] = float(np.mean(z**2))
    return out


def evaluate(
    cell: CellModel,
    profiles: Sequence[Profile],
    correction: VoltageCorrectionNet | None,
    *,
    soh: bool = False,
    **kw: Any,
) -> tuple[dict[str, float], list[Trace]]:
    """The plain (``correction=None``) or corrected filter over ``profiles``; ``soh``:
    with a fresh online SOH estimator per profile fed back into the filter (the shipped
    configuration, and the benchmark's headline)."""
    traces = [
        run_filter(
            cell,
            p,
            correction=correction,
            health=SohEstimator(1, cell.capacity_ah, cell=cell) if soh else None,
            **kw,
        )
        for p in profiles
    ]
    return soc_metrics(traces), traces
