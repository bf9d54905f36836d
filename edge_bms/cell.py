"""The cell model the filters run on: a 2-RC equivalent circuit with tables over (T, SOC).

Sign convention (DESIGN.md): positive current discharges the cell, so

    dsoc/dt = -i / (3600 * Q)
    v_k     = OCV(soc, T) - i * R0 - v1 - v2,      v1, v2: RC branch voltages
    v1[k+1] = a1 * v1[k] + R1 * (1 - a1) * i,      a1 = exp(-dt / tau1)   (same for v2)

Parameters are tables on a grid of temperatures (rows) and SOC (columns), interpolated
bilinearly and clamped at the grid's edges. Every lookup is vectorised over cells: one call
for a whole pack, no per-cell Python. The file format is JSON (``edge_bms.cell/1``) so a
user can read and diff it; :meth:`CellModel.load` validates it with errors that name the
field.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_bms.errors import CellModelError

FloatArray = npt.NDArray[np.float64]

FORMAT = "edge_bms.cell/1"
TABLES = ("ocv_v", "r0_ohm", "r1_ohm", "tau1_s", "r2_ohm", "tau2_s")
# Rows of CellModel.lookup_rows (the filters' fast path): the two RC branches side by side
# so a filter can take R and tau of both as one [2, n] slice.
ROWS = ("ocv_v", "r0_ohm", "r1_ohm", "r2_ohm", "tau1_s", "tau2_s", "docv_dsoc")
DEFAULT_CELL = "lg-m50"


class Limits(BaseModel):
    """Operating limits of one cell (the datasheet's, or the pack designer's)."""

    model_config = ConfigDict(extra="forbid")

    v_min: float = Field(gt=0)
    v_max: float = Field(gt=0)
    i_discharge_max_a: float = Field(gt=0, description="continuous discharge current limit")
    i_charge_max_a: float = Field(gt=0, description="charge current limit, a positive number")
    t_min_c: float = -20.0
    t_max_c: float = 60.0
    soc_min: float = Field(0.0, ge=0, le=1)
    soc_max: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        if self.v_min >= self.v_max:
            raise ValueError(f"v_min ({self.v_min}) must be below v_max ({self.v_max})")
        if self.t_min_c >= self.t_max_c:
            raise ValueError(f"t_min_c ({self.t_min_c}) must be below t_max_c ({self.t_max_c})")
        return self


class CellFile(BaseModel):
    """The JSON file, validated."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str
    capacity_ah: float = Field(gt=0)
    soc: list[float] = Field(min_length=2)
    temperature_c: list[float] = Field(min_length=1)
    ocv_v: list[list[float]]
    r0_ohm: list[list[float]]
    r1_ohm: list[list[float]]
    tau1_s: list[list[float]]
    r2_ohm: list[list[float]]
    tau2_s: list[list[float]]
    limits: Limits
    # What the filters should assume for this cell when the caller gives no noise
    # (edge_bms.filters.FilterNoise fields): the identified model's error, not the sensor's.
    filter_noise: dict[str, float] = Field(default_factory=dict)
    # Half the gap between the charge and discharge pseudo-OCV branches (V), one per
    # temperature_c: hysteresis plus the test current's polarisation, so how far the
    # true rest voltage may sit from ocv_v (the branches' mean). Optional.
    ocv_half_gap_v: list[float] | None = None
    # The pseudo-OCV test's current (A, its magnitude) at which ocv_half_gap_v was
    # measured: with it the gap gives the cell's resistance at small currents (see
    # CellModel.start_drop). Optional; only with ocv_half_gap_v.
    ocv_test_current_a: float | None = None
    source: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shapes(self) -> CellFile:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        for axis, values in (("soc", self.soc), ("temperature_c", self.temperature_c)):
            if any(b <= a for a, b in itertools.pairwise(values)):
                raise ValueError(f"{axis} must be strictly increasing, got {values}")
        shape = (len(self.temperature_c), len(self.soc))
        for name in TABLES:
            table = np.asarray(getattr(self, name), dtype=float)
            if table.shape != shape:
                raise ValueError(
                    f"{name} must be [len(temperature_c)][len(soc)] = {list(shape)}, "
                    f"got {list(table.shape)}"
                )
            if not np.all(np.isfinite(table)):
                raise ValueError(f"{name} holds a non-finite value")
            if name != "ocv_v" and np.any(table <= 0):
                raise ValueError(f"{name} must be > 0 everywhere, min is {table.min():g}")
        h = self.ocv_half_gap_v
        if h is not None:
            if len(h) != len(self.temperature_c):
                raise ValueError(
                    f"ocv_half_gap_v must have one value per temperature_c "
                    f"({len(self.temperature_c)}), got {len(h)}"
                )
            if not all(math.isfinite(x) and 0 <= x < 1 for x in h):
                raise ValueError(f"ocv_half_gap_v must be finite, in [0, 1) V, got {h}")
        elif self.ocv_test_current_a is not None:
            raise ValueError("ocv_test_current_a needs ocv_half_gap_v (the gap it was measured at)")
        it = self.ocv_test_current_a
        if it is not None and not (math.isfinite(it) and 0 < it <= self.limits.i_discharge_max_a):
            raise ValueError(
                f"ocv_test_current_a must be a current in (0, limits.i_discharge_max_a = "
                f"{self.limits.i_discharge_max_a:g}] A, got {it!r}"
            )
        return self


class Params(NamedTuple):
    """Parameters looked up for a batch of cells, each an array shaped like the query."""

    ocv: FloatArray
    docv_dsoc: FloatArray
    r0: FloatArray
    r1: FloatArray
    tau1: FloatArray
    r2: FloatArray
    tau2: FloatArray


@dataclass(frozen=True)
class CellModel:
    """A 2-RC equivalent-circuit cell with parameters over (temperature, SOC)."""

    name: str
    capacity_ah: float
    soc: FloatArray  # [n_soc], increasing
    temperature_c: FloatArray  # [n_t], increasing
    tables: FloatArray  # [n_t, n_soc, 6] in TABLES order
    limits: Limits
    source: dict[str, Any]
    filter_noise: dict[str, float] = field(default_factory=dict)
    ocv_half_gap_v: FloatArray | None = None  # [n_t], see CellFile
    ocv_test_current_a: float | None = None  # see CellFile

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_file_model(cls, f: CellFile) -> CellModel:
        tables = np.stack([np.asarray(getattr(f, n), dtype=float) for n in TABLES], axis=-1)
        return cls(
            name=f.name,
            capacity_ah=f.capacity_ah,
            soc=np.asarray(f.soc, dtype=float),
            temperature_c=np.asarray(f.temperature_c, dtype=float),
            tables=tables,
            limits=f.limits,
            source=dict(f.source),
            filter_noise=dict(f.filter_noise),
            ocv_half_gap_v=None
            if f.ocv_half_gap_v is None
            else np.asarray(f.ocv_half_gap_v, dtype=float),
            ocv_test_current_a=f.ocv_test_current_a,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellModel:
        try:
            return cls.from_file_model(CellFile.model_validate(data))
        except ValidationError as exc:
            raise CellModelError(f"invalid cell model: {_first_error(exc)}") from exc

    @classmethod
    def load(cls, path: str | Path) -> CellModel:
        """Load a cell model file, or a directory holding ``cell.json``."""
        p = Path(path)
        if p.is_dir():
            p = p / "cell.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as exc:
            raise CellModelError(f"cell model file not found: {p}") from exc
        except json.JSONDecodeError as exc:
            raise CellModelError(f"{p}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        try:
            return cls.from_file_model(CellFile.model_validate(data))
        except ValidationError as exc:
            raise CellModelError(f"{p}: invalid cell model: {_first_error(exc)}") from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "capacity_ah": self.capacity_ah,
            "soc": self.soc.tolist(),
            "temperature_c": self.temperature_c.tolist(),
        }
        for k, name in enumerate(TABLES):
            out[name] = np.round(self.tables[..., k], 9).tolist()
        out["limits"] = self.limits.model_dump()
        if self.filter_noise:
            out["filter_noise"] = self.filter_noise
        if self.ocv_half_gap_v is not None:
            out["ocv_half_gap_v"] = np.round(self.ocv_half_gap_v, 6).tolist()
        if self.ocv_test_current_a is not None:
            out["ocv_test_current_a"] = self.ocv_test_current_a
        out["source"] = self.source
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.suffix != ".json":
            p = p / "cell.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)
        return p

    def ocv_half_gap(self, temperature_c: npt.ArrayLike) -> FloatArray:
        """Half the charge/discharge pseudo-OCV gap at ``temperature_c`` (V; interpolated,
        held at the ends): a measure of how uncertain ``ocv_v`` is there; zeros when
        the file has none."""
        t = np.asarray(temperature_c, dtype=float)
        if self.ocv_half_gap_v is None:
            return np.zeros(t.shape)
        out: FloatArray = np.interp(t, self.temperature_c, self.ocv_half_gap_v)
        return out

    def start_drop(
        self,
        current_a: npt.ArrayLike,
        soc: npt.ArrayLike,
        temperature_c: npt.ArrayLike,
        r0_scale: npt.ArrayLike = 1.0,
    ) -> FloatArray:
        """The voltage drop OCV - v (V, the sign of the current) the OCV start corrects the
        first voltage for, when the cell has been at rest until a current ``current_a``.

        The table's R0 comes from 1C-2C pulses. Below the pseudo-OCV test's current the
        charge-transfer overpotential is still linear in the current (Butler-Volmer) and
        far steeper than that R0 says: at -10 C a DFN cell drops 21 mV at 0.114 A where
        ``i * R0`` gives 5 mV. The half pseudo-OCV gap over the test current measures
        that small-current resistance, ``R_lo = half_gap / I_test``. The drop is two
        lines, continuous and concave: ``|i| R_lo`` up to ``I_test``, then R0 per ampere
        beyond (``R_lo`` at least R0). Without ``ocv_half_gap_v`` and
        ``ocv_test_current_a``: ``i * R0``. ``r0_scale`` (aged cells) is taken as series
        resistance: ``(r0_scale - 1) R0`` adds to both slopes.

        Scope: the gap is measured under a sustained C/20 current, so R_lo also holds
        that current's steady polarisation (it overstates the instant drop where that
        matters, at 25 C 6.5 mV against the DFN's 4.4 mV at 0.11 A), and on a cell with
        OCV hysteresis it would count the hysteresis as resistance.
        """
        i = np.asarray(current_a, dtype=float)
        r0_table = self.lookup(soc, temperature_c).r0
        r0 = r0_table * np.asarray(r0_scale, dtype=float)
        it = self.ocv_test_current_a
        if it is None or self.ocv_half_gap_v is None:
            out: FloatArray = i * r0
            return out
        extra = np.maximum(self.ocv_half_gap(temperature_c) / it - r0_table, 0.0)  # R_lo - R0
        a = np.abs(i)
        # |i| R0 + min(|i|, I_test) (R_lo - R0): the two lines without cancellation
        drop: FloatArray = np.sign(i) * (a * r0 + np.minimum(a, it) * extra)
        return drop

    # -- lookup ---------------------------------------------------------------------
    @cached_property
    def _soc_bins(self) -> tuple[float, npt.NDArray[np.intp]] | None:
        """(h, segment of each bin) when every SOC grid point is a multiple of ``h`` (the
        smallest spacing): a bin of width h then lies in one segment, and the segment of a
        SOC is a table read instead of a binary search (SOP looks up ~10^4 points a call)."""
        g = self.soc
        h = float(np.min(np.diff(g)))
        k = (g - g[0]) / h
        if h <= 0 or k[-1] > 100_000 or not np.allclose(k, np.round(k), atol=1e-6):
            return None
        mids = g[0] + (np.arange(round(float(k[-1]))) + 0.5) * h
        seg = np.clip(np.searchsorted(g, mids, side="right") - 1, 0, g.size - 2)
        return h, seg.astype(np.intp)

    def soc_segment(self, soc_clipped: FloatArray) -> npt.NDArray[np.intp]:
        """Index i of the SOC grid segment [soc[i], soc[i+1]] holding each (clipped) SOC."""
        bins = self._soc_bins
        g = self.soc
        if bins is None:
            i: npt.NDArray[np.intp] = np.clip(
                np.searchsorted(g, soc_clipped, side="right") - 1, 0, g.size - 2
            )
            return i
        h, seg = bins
        b = ((soc_clipped - g[0]) * (1.0 / h)).astype(np.intp)
        out: npt.NDArray[np.intp] = seg[np.clip(b, 0, seg.size - 1)]
        return out

    def lookup(self, soc: npt.ArrayLike, temperature_c: npt.ArrayLike) -> Params:
        """Parameters at each (soc, temperature) pair, bilinear, clamped to the grid.

        ``docv_dsoc`` is the slope of the OCV segment the SOC falls in (the filters'
        Jacobian), not a finite difference, so it is consistent with ``ocv``.
        """
        s = np.asarray(soc, dtype=float)
        t = np.asarray(temperature_c, dtype=float)
        s, t = np.broadcast_arrays(s, t)
        gs, gt = self.soc, self.temperature_c
        sc = np.clip(s, gs[0], gs[-1])
        i = self.soc_segment(sc)
        ds = gs[i + 1] - gs[i]
        ws = (sc - gs[i]) / ds
        if gt.size == 1:
            j = np.zeros(t.shape, dtype=np.intp)
            wt = np.zeros(t.shape)
            j1 = j
        else:
            tc = np.clip(t, gt[0], gt[-1])
            j = np.clip(np.searchsorted(gt, tc, side="right") - 1, 0, gt.size - 2)
            wt = (tc - gt[j]) / (gt[j + 1] - gt[j])
            j1 = j + 1
        tab = self.tables
        lo = tab[j, i] * (1.0 - wt)[..., None] + tab[j1, i] * wt[..., None]  # at soc grid i
        hi = tab[j, i + 1] * (1.0 - wt)[..., None] + tab[j1, i + 1] * wt[..., None]
        val = lo + (hi - lo) * ws[..., None]
        slope = (hi[..., 0] - lo[..., 0]) / ds
        return Params(
            ocv=val[..., 0],
            docv_dsoc=slope,
            r0=val[..., 1],
            r1=val[..., 2],
            tau1=val[..., 3],
            r2=val[..., 4],
            tau2=val[..., 5],
        )

    # -- fast path for the filters --------------------------------------------------
    @cached_property
    def _patch_coefficients(self) -> FloatArray:
        """Per grid patch (j, i), each ROWS quantity as c0 + c1*s + c2*t + c3*s*t.

        Bilinear interpolation is exactly this polynomial inside one patch, so a lookup
        becomes one gather and a few multiply-adds instead of two weight computations
        and four gathers. Shape [n_patches, 4 * len(ROWS)] (patch-major: one contiguous
        row per patch is the fastest gather), coefficient blocks c0, c2, c1, c3 (the two
        multiplied by s side by side: one product for both).
        """
        gs, gt = self.soc, self.temperature_c
        tab = self.tables[..., [0, 1, 2, 4, 3, 5]]  # TABLES order -> ROWS order (no slope)
        if gt.size == 1:  # one temperature: constant in t (a degenerate patch of height 1)
            tab = np.concatenate([tab, tab], axis=0)
            gt = np.array([gt[0], gt[0] + 1.0])
        f00, f01 = tab[:-1, :-1], tab[:-1, 1:]  # [n_t-1, n_soc-1, 6]; 01: next soc
        f10, f11 = tab[1:, :-1], tab[1:, 1:]  # next temperature
        ds = np.diff(gs)[None, :, None]
        dt = np.diff(gt)[:, None, None]
        s0 = gs[:-1][None, :, None]
        t0 = gt[:-1][:, None, None]
        a, b, c = f01 - f00, f10 - f00, f11 - f10 - f01 + f00
        # f = f00 + a*ws + b*wt + c*ws*wt with ws = (s - s0)/ds, wt = (t - t0)/dt
        c3 = c / (ds * dt)
        c1 = a / ds - c3 * t0
        c2 = b / dt - c3 * s0
        c0 = f00 - c1 * s0 - c2 * t0 - c3 * s0 * t0
        # d ocv / d soc = c1 + c3*t: the segment's slope, as lookup() defines it
        zero = np.zeros_like(c0[..., :1])
        blocks = [
            np.concatenate([c0, c1[..., :1]], axis=-1),
            np.concatenate([c2, c3[..., :1]], axis=-1),
            np.concatenate([c1, zero], axis=-1),
            np.concatenate([c3, zero], axis=-1),
        ]
        coef = np.concatenate(blocks, axis=-1)  # [n_t-1, n_soc-1, 4 * 7]
        out: FloatArray = np.ascontiguousarray(coef.reshape(-1, coef.shape[-1]))
        return out

    @cached_property
    def _grid_bounds(self) -> tuple[float, float, FloatArray, float, float, FloatArray]:
        gs, gt = self.soc, self.temperature_c
        return (
            float(gs[0]),
            float(gs[-1]),
            gs[1:-1].copy(),
            float(gt[0]),
            float(gt[-1]),
            gt[1:-1].copy(),
        )

    def lookup_rows(self, soc: npt.ArrayLike, temperature_c: npt.ArrayLike) -> FloatArray:
        """Same values as :meth:`lookup`, stacked as ``[len(ROWS), *shape]`` (ROWS order).

        The filters' hot path: for 200 cells about a fifth of :meth:`lookup`'s time
        (array methods rather than the ``np.`` wrappers, one gather, contiguous rows).
        ``soc`` and ``temperature_c`` broadcast (one temperature for a pack is fine).
        """
        coef = self._patch_coefficients
        s_lo, s_hi, s_knots, t_lo, t_hi, t_knots = self._grid_bounds
        s = np.minimum(np.maximum(soc, s_lo), s_hi)
        t = np.minimum(np.maximum(temperature_c, t_lo), t_hi)
        if np.ndim(t) > np.ndim(s):  # the patch index follows soc's shape: give it t's
            s = s + np.zeros_like(t)
        # searchsorted on the interior knots gives the patch index, already in range
        i = s_knots.searchsorted(s, "right")
        if t_knots.size:
            i += t_knots.searchsorted(t, "right") * (s_knots.size + 1)
        m = len(ROWS)
        g = coef.take(i, axis=0)  # [*shape, 4 * m]
        # [4 * m, *shape] with contiguous rows: the multiply-adds below run 2x faster
        if g.ndim == 2:
            g = g.T.copy()
        elif g.ndim == 3:  # the UKF's [3, n] (transpose: no np.moveaxis wrapper)
            g = g.transpose(2, 0, 1).copy()
        else:
            g = np.moveaxis(g, -1, 0).copy()
        # ((c3 s + c2) t + c1 s) + c0, with c1 s and c3 s from one product
        cs = g[2 * m :] * s
        out = cs[m:]
        out += g[m : 2 * m]
        out *= t
        out += cs[:m]
        out += g[:m]
        return out

    def ocv(self, soc: npt.ArrayLike, temperature_c: npt.ArrayLike) -> FloatArray:
        ocv: FloatArray = self.lookup(soc, temperature_c).ocv
        return ocv

    def rows_at(self, temperature_c: FloatArray, column: int | None = None) -> FloatArray:
        """Every table column over the SOC grid at each temperature: [m, n_soc, 6] for
        ``temperature_c`` [m] (linear in T, clamped), or one column: [m, n_soc].
        Interpolating in T once and then only along SOC gives the same bilinear values
        as :meth:`lookup`."""
        t = np.asarray(temperature_c, dtype=float).reshape(-1)
        tab = self.tables if column is None else self.tables[..., column]
        gt = self.temperature_c
        if gt.size == 1:
            return np.broadcast_to(tab[0], (t.size, *tab.shape[1:])).copy()
        tc = np.clip(t, gt[0], gt[-1])
        j = np.clip(np.searchsorted(gt, tc, side="right") - 1, 0, gt.size - 2)
        w = ((tc - gt[j]) / (gt[j + 1] - gt[j])).reshape(-1, *([1] * (tab.ndim - 1)))
        rows: FloatArray = tab[j] * (1 - w) + tab[j + 1] * w
        return rows

    def soc_from_ocv(self, voltage: npt.ArrayLike, temperature_c: npt.ArrayLike) -> FloatArray:
        """Invert OCV(soc, T) per cell (vectorised): a rested cell's SOC, clamped to the
        grid. The OCV at a cell's temperature is piecewise linear in SOC, so where it
        rises strictly (every shipped cell) the inverse is exact: the segment holding the
        voltage, then a linear step; otherwise bisection."""
        v = np.asarray(voltage, dtype=float)
        t = np.asarray(temperature_c, dtype=float)
        v, t = np.broadcast_arrays(v, t)
        rows = self.rows_at(t.reshape(-1), column=0)
        if np.all(np.diff(rows, axis=1) > 0):
            g = self.soc
            vv = v.reshape(-1)
            k = np.clip((rows <= vv[:, None]).sum(axis=1) - 1, 0, g.size - 2)
            at = np.arange(vv.size)
            lo, hi = rows[at, k], rows[at, k + 1]
            w = np.clip((vv - lo) / (hi - lo), 0.0, 1.0)
            exact: FloatArray = (g[k] + w * (g[k + 1] - g[k])).reshape(v.shape)
            return exact
        lo_s = np.full(v.shape, float(self.soc[0]))
        hi_s = np.full(v.shape, float(self.soc[-1]))
        for _ in range(40):  # 2**-40: far below any sensor's resolution
            mid = 0.5 * (lo_s + hi_s)
            above = self.ocv(mid, t) > v
            hi_s = np.where(above, mid, hi_s)
            lo_s = np.where(above, lo_s, mid)
        soc: FloatArray = 0.5 * (lo_s + hi_s)
        return soc

    def with_capacity(self, capacity_ah: float) -> CellModel:
        """The same cell with another capacity (e.g. an aged cell's, or SOH's estimate)."""
        if not capacity_ah > 0:
            raise CellModelError(f"capacity_ah must be > 0, got {capacity_ah!r}")
        return CellModel(
            self.name,
            float(capacity_ah),
            self.soc,
            self.temperature_c,
            self.tables,
            self.limits,
            self.source,
            self.filter_noise,
            self.ocv_half_gap_v,
            self.ocv_test_current_a,
        )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "file"
    return f"{where}: {err['msg']}"


def default_cell() -> CellModel:
    """The shipped LG M50 (5 Ah NMC811/graphite-SiOx) model, identified from PyBaMM Chen2020."""
    return load_cell(DEFAULT_CELL)


def load_cell(name_or_path: str | Path | None = None) -> CellModel:
    """A shipped cell by name (``lg-m50``), or a file / directory path."""
    if name_or_path is None:
        name_or_path = DEFAULT_CELL
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir() or p.exists():
        return CellModel.load(p)
    shipped = resources.files("edge_bms") / "data" / "cells" / f"{name_or_path}.json"
    if not shipped.is_file():
        raise CellModelError(
            f"no cell model named {str(name_or_path)!r} is shipped and no such file exists"
        )
    with resources.as_file(shipped) as f:
        return CellModel.load(f)
