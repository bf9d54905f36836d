"""The pack estimator: validated samples in, SOC with its uncertainty out, one numpy step
for every cell of a pack.

:class:`PackEstimator` owns the filter state of ``n_cells`` cells and runs, per sample,

1. input checks (shape, finite, plausible; :class:`~edge_bms.errors.InputError` names
   the field and the value, and leaves the estimator as it was);
2. the safety hook on the raw measurements (before anything learned or estimated);
3. the voltage-correction hook (a learned network) -> ``v_correction`` and optionally a
   per-cell measurement variance; any failure falls back to the plain filter, flagged;
4. one EKF or UKF step (:mod:`edge_bms.filters`) with the SOH scales of each cell;
5. the SOH hook (capacity and R0 scale for the next step) and the SOP hook.

Hooks are small Protocols (below) so that the SOH, SOP, safety and correction code can
live in their own modules and be tested alone; each is optional (None: pass-through).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_bms.cell import CellModel
from edge_bms.errors import CheckpointError, InputError
from edge_bms.filters import (
    EkfSettings,
    FilterNoise,
    FilterState,
    StepResult,
    UkfSettings,
    ekf_step,
    ukf_step,
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Method = Literal["ekf", "ukf"]
HealthFeedback = Literal["all", "capacity", "none"]  # what an SOH estimate feeds back
StartDrop = Literal["r0", "two_slope"]  # the drop an OCV start corrects the voltage for

STATE_FORMAT = "edge_bms.estimator/1"
# Plausibility bounds of raw inputs: beyond them a value is a sensor or wiring fault, not a
# cell state, and the sample is rejected rather than filtered.
VOLTAGE_RANGE_V = (0.0, 10.0)  # exclusive
TEMPERATURE_RANGE_C = (-60.0, 150.0)  # inclusive
CURRENT_ABS_MAX_A = 1e4
# Prior SOC sigma when the initial SOC is read off the first sample's OCV: the voltage's
# uncertainty as an OCV (the model's OCV error and hysteresis, RC polarisation left from
# before the start, half the ohmic drop under load) divided by the OCV slope there, so a
# start on a steep part of the curve is trusted and one on the flat middle is not. A
# fixed wide sigma let the first minutes of model error (a held-out temperature, say)
# drag an accurate OCV start several points away.
OCV_PRIOR_SIGMA_V = 0.005
OCV_PRIOR_SIGMA_RANGE = (0.01, 0.1)
OCV_PRIOR_SIGMA = OCV_PRIOR_SIGMA_RANGE[1]  # the widest an OCV start gets
# Prior SOC sigma when the caller gives the initial SOC without its sigma: we do not
# know where it came from (a stale coulomb count, a guess), so wide.
GIVEN_PRIOR_SIGMA = 0.3
# A cell whose voltage is missing at the first sample: middle of the range, sigma of a
# uniform distribution over [0, 1].
UNKNOWN_SOC, UNKNOWN_SOC_SIGMA = 0.5, 0.29
RC_PRIOR_SIGMA_V = 0.01
# Bounds on what an SOH estimate feeds back (see PackEstimator._update_health).
HEALTH_CAPACITY_MAX = 1.0  # x the model's capacity
HEALTH_R0_SCALE_MIN = 1.0
# Relative uncertainty of the R0 the filter uses (table error, ageing the SOH has not
# caught), carried as a consider parameter (decision 0021). Decision 0023's rule chose
# 0.2 on the training profiles with SOH on (misses 5 -> 3, RMSE 0.661 -> 0.464 %), for
# estimators with a health hook only: without SOH it took the voltage's gain away from
# an aged cell's capacity error (EKF + network RMSE 0.965 -> 1.41 % on training data).
R0_SIGMA_REL = 0.2
# ``PackEstimator``'s default for ``r0_sigma_rel``: "with_health" is ``R0_SIGMA_REL``
# when the estimator has a health hook and off without one (decision 0023).
R0_SIGMA_DEFAULT: float | Literal["with_health"] | None = "with_health"
# The OCV start's sigma includes this many times the cell's half pseudo-OCV gap
# (``CellModel.ocv_half_gap``: hysteresis plus the OCV test's polarisation, so how
# uncertain the OCV table is there): 43 mV at -10 C for lg-m50, against the 5 mV
# otherwise assumed at rest. Off: on the tuning profiles 0.58 and 1 slowed one aged 0 C
# profile's convergence 288 -> 2307 s (docs/edge_bms.md, Benchmark).
START_OCV_GAP = 0.0
# How the OCV start corrects the first voltage for the current flowing: "r0" (i * R0,
# the table's pulse resistance) or "two_slope" (CellModel.start_drop: the cell file's
# small-current resistance below its pseudo-OCV test current, R0 above; i * R0 for a
# file without it). The training profiles chose "two_slope" by decision 0022's rule:
# their cold starts at rest under a 0.11 A auxiliary load read 4-7 points low with "r0".
# Either way the start's voltage sigma is 5 mV plus half the drop corrected for.
START_DROP: StartDrop = "two_slope"


# -- hooks ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CorrectionInputs:
    """What a correction network may use at a step, before the filter runs. Arrays [n].

    ``soc``/``soc_sigma`` are the previous step's posterior (the prior of this one);
    ``innovation`` and ``v_pred`` the previous step's (NaN where that voltage was missing;
    zeros at the first corrected step). ``cell_v`` is NaN where this voltage is missing.
    """

    ts: float
    dt_s: float
    current_a: FloatArray
    cell_v: FloatArray
    temp_c: FloatArray
    soc: FloatArray
    soc_sigma: FloatArray
    innovation: FloatArray
    v_pred: FloatArray


class CorrectionOutputLike(Protocol):
    """What :meth:`VoltageCorrection.predict` returns (``edge_bms.correction.CorrectionOutput``
    has this shape): per cell, the voltage to add to the model's prediction, the
    measurement variance to use (NaN: keep the filter's), and whether the network applied
    (False where its inputs left the training range; ``dv_v`` is then ignored)."""

    @property
    def dv_v(self) -> FloatArray: ...
    @property
    def r_var_v2(self) -> FloatArray: ...
    @property
    def used(self) -> BoolArray: ...


class VoltageCorrection(Protocol):
    """A learned voltage-model correction. The object keeps any history it needs (e.g.
    moving averages of current) and updates it in :meth:`features`, called once per step."""

    def features(self, inputs: CorrectionInputs) -> Any: ...
    def predict(self, features: Any) -> CorrectionOutputLike: ...


class HealthEstimator(Protocol):
    """Online SOH (``edge_bms.soh.SohEstimator`` fits). After each step with ``dt_s > 0``
    the estimator calls :meth:`update` with the step's inputs and posterior, then reads
    ``capacity_ah_trusted`` and ``r0_scale_trusted`` ([n]) for the next step: the values
    the estimator stands behind (SohEstimator: the nominal capacity / a scale of 1 until
    enough capacity points / current steps made its estimate)."""

    def update(
        self,
        current_a: npt.ArrayLike,
        voltage_v: npt.ArrayLike,
        dt_s: float,
        *,
        soc: npt.ArrayLike | None = ...,
        soc_sigma: npt.ArrayLike | None = ...,
        temperature_c: npt.ArrayLike | None = ...,
        r0_table_ohm: npt.ArrayLike | None = ...,
    ) -> None: ...

    @property
    def capacity_ah_trusted(self) -> FloatArray: ...

    @property
    def r0_scale_trusted(self) -> FloatArray: ...

    # Optional (read with getattr): ``capacity_sigma_trusted`` ([n], Ah), the standard
    # deviation of ``capacity_ah_trusted``. With it, the filter carries the capacity's
    # uncertainty in its SOC variance (``PackEstimator(capacity_consider=True)``).
    # ``capacity_version`` (int): changes whenever capacity or its sigma may have; with
    # it the estimator re-reads them only then (they are read every step without it),
    # so a change of the hook's options, or of ``capacity_consider``, takes effect at the
    # next version change (or ``set_scales``).


class SafetyCheck(Protocol):
    """Deterministic limit checks on the raw sample (``edge_bms.safety.SafetyMonitor``
    fits); its return value (alarm records) is passed through as ``PackEstimate.alarms``."""

    def update(
        self, ts: float, cell_v: npt.ArrayLike, temp_c: npt.ArrayLike, current_a: npt.ArrayLike
    ) -> Sequence[Any]: ...


# SOP: called with the finished estimate; whatever it returns is ``PackEstimate.sop``, e.g.
# lambda e: sop.power_limits(cell, e.soc, e.temp_c, v1=e.v_rc[0], v2=e.v_rc[1],
#                            r0_scale=e.r0_scale, capacity_ah=e.capacity_ah)
PowerHook = Callable[["PackEstimate"], Any]


# -- output --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EstimateFlags:
    """How a step was computed.

    ``correction_reason`` is "" when the correction applied to every cell, else why not
    (all or some cells): "none" (no network configured), the loader's reason passed as
    ``correction_fallback`` ("missing", "integrity", "metadata"), "range" (inputs outside
    the training range), "error: ..." (the network raised or returned garbage), or
    "initial" (the first sample, which sets the state).
    """

    initial: bool  # this sample initialised the state
    correction_used: bool  # the correction applied to every cell
    correction_reason: str
    correction_cells: BoolArray | None  # per cell, when a correction ran
    dropout: tuple[int, ...]  # cells whose voltage was missing (predict only)


@dataclass(slots=True)
class PackEstimate:
    """One step's estimate of a pack of n cells. Arrays are [n] unless noted.

    ``pack_soc`` is the usable-charge SOC of a series string: with D = min_i(soc_i Q_i)
    the charge the string can still deliver before its emptiest cell is empty and
    C = min_i((1 - soc_i) Q_i) the charge it can take before its fullest cell is full,
    ``pack_soc = D / (D + C)`` (cell SOC clipped to [0, 1]; equal capacities give
    min / (min + 1 - max)). It is 0 when the string can neither charge nor discharge.
    """

    ts: float
    dt_s: float
    soc: FloatArray
    soc_sigma: FloatArray
    v_pred: FloatArray  # prior predicted terminal voltage, correction included
    innovation: FloatArray  # measured - predicted, NaN for a dropout
    innovation_var: FloatArray
    pack_soc: float
    current_a: FloatArray
    cell_v: FloatArray
    temp_c: FloatArray
    v_rc: FloatArray  # [2, n] posterior RC-branch voltages v1, v2
    capacity_ah: FloatArray  # used in this step
    r0_scale: FloatArray  # used in this step
    flags: EstimateFlags
    sop: Any = None
    alarms: Sequence[Any] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """The core fields as JSON-able values (NaN -> None); ``sop``/``alarms`` excluded."""
        return {
            "ts": self.ts,
            "soc": _jsonable(self.soc),
            "soc_sigma": _jsonable(self.soc_sigma),
            "pack_soc": self.pack_soc,
            "v_pred": _jsonable(self.v_pred),
            "innovation": _jsonable(self.innovation),
            "capacity_ah": _jsonable(self.capacity_ah),
            "r0_scale": _jsonable(self.r0_scale),
            "correction_used": self.flags.correction_used,
            "correction_reason": self.flags.correction_reason,
            "dropout": list(self.flags.dropout),
        }


def _jsonable(a: FloatArray) -> list[float | None]:
    return [None if not math.isfinite(x) else x for x in a.tolist()]


# ufunc reductions: the cheapest min/max numpy has (no wrapper, no keyword handling)
_MIN = np.minimum.reduce
_MAX = np.maximum.reduce
_ALL = np.logical_and.reduce
_F64 = np.dtype(np.float64)
_BOOL = np.dtype(np.bool_)


def pack_soc(soc: FloatArray, capacity_ah: FloatArray | float) -> float:
    """The usable-charge SOC of a series string (see :class:`PackEstimate`)."""
    if isinstance(capacity_ah, float | int):  # equal capacities: the ratio needs no Ah
        d = min(max(float(_MIN(soc)), 0.0), 1.0)
        c = 1.0 - min(max(float(_MAX(soc)), 0.0), 1.0)
    else:
        s = np.minimum(np.maximum(soc, 0.0), 1.0)
        d, c = float((s * capacity_ah).min()), float(((1.0 - s) * capacity_ah).min())
    return d / (d + c) if d + c > 0 else 0.0


# -- the estimator -------------------------------------------------------------------------
class PackEstimator:
    """SOC of ``n_cells`` cells of one cell model, sample by sample.

    ``initial_soc``: scalar or [n]; None reads it off the first sample (OCV of the
    voltage corrected by ``i * R0``), with sigma ``OCV_PRIOR_SIGMA_V`` (plus half the
    ohmic drop) over the OCV slope there, within ``OCV_PRIOR_SIGMA_RANGE`` (or
    ``initial_soc_sigma`` when given), and that sample only initialises (its voltage is
    used once). A given SOC gets sigma ``initial_soc_sigma`` (default
    ``GIVEN_PRIOR_SIGMA``, 0.3) and is fused with that same OCV reading (so a wrong
    given SOC with a wide sigma lands near the OCV start, and a stored SOC with a
    tight sigma barely moves); the first sample, used there, only initialises too. A
    cell whose first voltage is missing keeps its given SOC. ``correction_fallback``
    is the reason reported while ``correction`` is None (e.g. the loader's "missing" or
    "integrity"). ``health_feedback``: what a ``health`` estimator's results change in
    the filter: "all" (capacity and R0 scale), "capacity", or "none" (estimate only);
    fed-back values are bounded by ``HEALTH_CAPACITY_MAX`` and ``HEALTH_R0_SCALE_MIN``.
    ``r0_sigma_rel``: the relative uncertainty of the R0 the filter uses (table error
    and ageing), carried as a consider parameter of the measurement (``ekf_step``'s
    ``r0_sigma_rel``), so a start under load reads less of an R0 misfit as SOC
    (``R0_SIGMA_REL`` is the value the training profiles chose); None: R0 taken as
    exact, see decision 0021; "with_health": ``R0_SIGMA_REL`` when ``health`` is given,
    None otherwise (resolved here, once: the term models the R0 error an online SOH
    leaves, and without SOH it takes away the voltage's gain that an aged cell's
    capacity error needs, decision 0023). The default is ``R0_SIGMA_DEFAULT``.
    ``start_ocv_gap``: the OCV start's sigma adds this many times the cell file's half
    pseudo-OCV gap at the temperature (``START_OCV_GAP``; 0: not at all).
    ``capacity_consider``: when the fed-back capacity comes with a sigma (the health
    hook's ``capacity_sigma_trusted``), the filter carries that relative uncertainty as
    a consider parameter (``ekf_step``'s ``capacity_sigma_rel``): an aged cell whose
    capacity is not learned yet lets the voltage correct the coulomb count sooner.
    """

    def __init__(
        self,
        model: CellModel,
        n_cells: int,
        *,
        method: Method = "ekf",
        noise: FilterNoise | Mapping[str, float] | None = None,
        initial_soc: npt.ArrayLike | None = None,
        initial_soc_sigma: float | None = None,
        ekf: EkfSettings | None = None,
        ukf: UkfSettings | None = None,
        correction: VoltageCorrection | None = None,
        correction_fallback: str = "none",
        health: HealthEstimator | None = None,
        power: PowerHook | None = None,
        safety: SafetyCheck | None = None,
        health_feedback: HealthFeedback = "all",
        capacity_consider: bool = True,
        r0_sigma_rel: float | Literal["with_health"] | None = R0_SIGMA_DEFAULT,
        start_ocv_gap: float = START_OCV_GAP,
        start_drop: StartDrop = START_DROP,
    ) -> None:
        if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 1:
            raise InputError(f"n_cells must be an integer >= 1, got {n_cells!r}")
        if health_feedback not in ("all", "capacity", "none"):
            raise InputError(
                f"health_feedback must be 'all', 'capacity' or 'none', got {health_feedback!r}"
            )
        self.health_feedback: HealthFeedback = health_feedback
        if method not in ("ekf", "ukf"):
            raise InputError(f"method must be 'ekf' or 'ukf', got {method!r}")
        self.model = model
        self.n_cells = int(n_cells)
        self.method: Method = method
        self.noise = _noise(noise if noise is not None else (model.filter_noise or None))
        self.ekf = ekf or EkfSettings()
        self.ukf = ukf or UkfSettings()
        self.correction = correction
        self.correction_fallback = correction_fallback
        self.health = health
        self.power = power
        self.safety = safety
        n = self.n_cells
        self._initial_soc = (
            None if initial_soc is None else self._array("initial_soc", initial_soc, (0.0, 1.0))
        )
        sigma = OCV_PRIOR_SIGMA if initial_soc is None else GIVEN_PRIOR_SIGMA
        if initial_soc_sigma is not None:
            sigma = float(initial_soc_sigma)
            if not (math.isfinite(sigma) and sigma > 0):
                raise InputError(f"initial_soc_sigma must be > 0, got {initial_soc_sigma!r}")
        self._initial_sigma = sigma
        self._initial_sigma_given = initial_soc_sigma is not None
        self._state: FilterState | None = None
        self._last_ts: float | None = None
        self._capacity = np.full(n, model.capacity_ah)
        self._r0_scale = np.ones(n)
        self._scaled = False  # capacity/R0 differ from the model's: pass them to the filter
        self._last_innovation = np.zeros(n)
        self._last_v_pred = np.zeros(n)
        self.capacity_consider = bool(capacity_consider)
        if r0_sigma_rel == "with_health":
            r0_sigma_rel = R0_SIGMA_REL if health is not None else None
        if r0_sigma_rel is not None and not (
            isinstance(r0_sigma_rel, float | int | np.floating | np.integer)
            and not isinstance(r0_sigma_rel, bool)
            and math.isfinite(r0_sigma_rel)
            and r0_sigma_rel >= 0
        ):
            raise InputError(
                f"r0_sigma_rel must be a number >= 0, 'with_health' or None, got {r0_sigma_rel!r}"
            )
        self.r0_sigma_rel = None if r0_sigma_rel is None else float(r0_sigma_rel)
        if not (math.isfinite(start_ocv_gap) and start_ocv_gap >= 0):
            raise InputError(f"start_ocv_gap must be a number >= 0, got {start_ocv_gap!r}")
        self.start_ocv_gap = float(start_ocv_gap)
        if start_drop not in ("r0", "two_slope"):
            raise InputError(f"start_drop must be 'r0' or 'two_slope', got {start_drop!r}")
        self.start_drop: StartDrop = start_drop
        # the capacity's relative sigma passed to the filter (None: taken as exact)
        self._capacity_sigma_rel: FloatArray | None = None
        self._read_capacity_sigma()
        # (hook, its capacity_version) when capacity and sigma were last read: a hook
        # with a version counter is re-read only when its capacity may have changed
        self._health_seen: tuple[object, int] | None = None

    def _read_capacity_sigma(self) -> None:
        """The health hook's capacity sigma over the capacity in use, for the next step."""
        if not self.capacity_consider or self.health is None or self.health_feedback == "none":
            return
        sigma = getattr(self.health, "capacity_sigma_trusted", None)
        if sigma is None:
            return
        s = np.asarray(sigma, dtype=float)
        if s.shape != (self.n_cells,) or not np.all(np.isfinite(s) & (s >= 0)):
            return  # a glitch keeps the previous value
        # beyond 50 % the linearisation means nothing; the bound keeps a wild value sane
        self._capacity_sigma_rel = np.minimum(s / self._capacity, 0.5)

    # -- public state --------------------------------------------------------------------
    @property
    def state(self) -> FilterState | None:
        """The filter state after the last step (None before the first sample)."""
        return self._state

    @property
    def last_ts(self) -> float | None:
        return self._last_ts

    def set_scales(
        self, capacity_ah: npt.ArrayLike | None = None, r0_scale: npt.ArrayLike | None = None
    ) -> None:
        """Per-cell capacity (Ah) and R0 scale used from the next step (an SOH result)."""
        if capacity_ah is not None:
            self._capacity = self._array("capacity_ah", capacity_ah, (1e-6, math.inf))
        if r0_scale is not None:
            self._r0_scale = self._array("r0_scale", r0_scale, (1e-6, math.inf))
        self._scaled = bool(
            np.any(self._capacity != self.model.capacity_ah) or np.any(self._r0_scale != 1.0)
        )
        self._read_capacity_sigma()  # relative to the capacity now in use
        self._health_seen = None  # the next health update overwrites these, as before

    def reset_soc(self, soc: npt.ArrayLike, sigma: float) -> None:
        """Set every cell's SOC (scalar or [n]) with standard deviation ``sigma``: the
        next sample updates it. The new SOC is uncorrelated with the RC voltages."""
        values = np.broadcast_to(self._array("soc", soc, (0.0, 1.0)), (self.n_cells,))
        if not (math.isfinite(sigma) and sigma > 0):
            raise InputError(f"sigma must be > 0, got {sigma!r}")
        if self._state is None:  # before the first sample: the start it will use
            self._initial_soc = values.copy()
            self._initial_sigma, self._initial_sigma_given = float(sigma), True
            return
        x, p = self._state.x.copy(), self._state.p.copy()
        x[0] = values
        p[0] = sigma**2
        p[1] = p[2] = 0.0
        c = self._state.c
        if c is not None:
            c = c.copy()
            c[0] = 0.0
        cr = self._state.cr
        if cr is not None:
            cr = cr.copy()
            cr[0] = 0.0
        self._state = FilterState(x, p, self._state.current_a, c, cr)

    # -- the step ------------------------------------------------------------------------
    def step(
        self,
        ts: float,
        current_a: npt.ArrayLike,
        cell_v: npt.ArrayLike,
        temp_c: npt.ArrayLike,
    ) -> PackEstimate:
        """One sample: ``ts`` (s, increasing), ``current_a`` (A, + = discharge; one value
        for a series string or one per cell), ``cell_v`` (V per cell, NaN = that cell's
        voltage is missing), ``temp_c`` (deg C, one value or one per cell)."""
        t_s = self._check_ts(ts)
        i = self._check_current(current_a)
        v, missing = self._check_voltage(cell_v)
        temp = self._check_temperature(temp_c)
        alarms: Sequence[Any] = ()
        if self.safety is not None:
            alarms = self.safety.update(t_s, v, temp, i)

        n = self.n_cells
        initial = self._state is None
        # the first sample's voltage went into the initial state (see _initial_state)
        from_ocv = initial
        state = self._initial_state(i, v, temp) if self._state is None else self._state
        dt = 0.0 if self._last_ts is None else t_s - self._last_ts
        # per cell (the estimate and the network want [n]; the filter takes either)
        i_n = i if i.ndim else _filled(n, float(i))
        temp_n = temp if temp.ndim else _filled(n, float(temp))

        v_corr: FloatArray | None = None
        r_var: FloatArray | None = None
        cells: BoolArray | None = None
        if initial:
            reason = "initial"
        elif self.correction is None:
            reason = self.correction_fallback
        else:
            v_corr, r_var, cells, reason = self._correct(t_s, dt, i_n, v, temp_n, state)

        kwargs: dict[str, Any] = {}
        if self._scaled:
            kwargs = {"capacity_ah": self._capacity, "r0_scale": self._r0_scale}
        if r_var is not None:
            kwargs["measurement_var"] = r_var
        if self._capacity_sigma_rel is not None:
            kwargs["capacity_sigma_rel"] = self._capacity_sigma_rel
        if self.r0_sigma_rel is not None:
            kwargs["r0_sigma_rel"] = self.r0_sigma_rel
        # the OCV-initialised first sample has been used once already: predict only
        z = np.full(n, np.nan) if from_ocv else v
        if self.method == "ekf":
            res: StepResult = ekf_step(
                self.model, state, i, z, temp, dt, self.noise, v_corr, settings=self.ekf, **kwargs
            )
        else:
            res = ukf_step(
                self.model, state, i, z, temp, dt, self.noise, v_corr, settings=self.ukf, **kwargs
            )
        innovation = v - res.v_pred if from_ocv else res.innovation
        # the estimate shares arrays with the filter state: read-only, so a consumer
        # cannot corrupt the next step by writing into them
        for a in (res.state.x, res.state.p, res.soc, res.soc_sigma, i, v, innovation):
            a.flags.writeable = False
        if res.state.c is not None:
            res.state.c.flags.writeable = False
        if res.state.cr is not None:
            res.state.cr.flags.writeable = False

        self._state = res.state
        self._last_ts = t_s
        self._last_innovation = innovation
        self._last_v_pred = res.v_pred
        capacity, r0_scale = self._capacity, self._r0_scale
        estimate = PackEstimate(
            ts=t_s,
            dt_s=dt,
            soc=res.soc,
            soc_sigma=res.soc_sigma,
            v_pred=res.v_pred,
            innovation=innovation,
            innovation_var=res.innovation_var,
            pack_soc=pack_soc(res.soc, capacity if self._scaled else self.model.capacity_ah),
            current_a=i_n,
            cell_v=v,
            temp_c=temp_n,
            v_rc=res.state.x[1:3],
            capacity_ah=capacity,
            r0_scale=r0_scale,
            flags=EstimateFlags(
                initial=initial,
                correction_used=reason == "",
                correction_reason=reason,
                correction_cells=cells,
                dropout=tuple(np.flatnonzero(missing).tolist()) if missing is not None else (),
            ),
            alarms=alarms,
        )
        if self.health is not None and dt > 0:
            self._update_health(estimate, res)
        if self.power is not None:
            estimate.sop = self.power(estimate)
        return estimate

    # -- hooks ---------------------------------------------------------------------------
    def _correct(
        self,
        ts: float,
        dt: float,
        i: FloatArray,
        v: FloatArray,
        temp: FloatArray,
        state: FilterState,
    ) -> tuple[FloatArray | None, FloatArray | None, BoolArray | None, str]:
        """(v_correction, measurement variance, cells used, reason); None: plain filter."""
        assert self.correction is not None
        n = self.n_cells
        inputs = CorrectionInputs(
            ts=ts,
            dt_s=dt,
            current_a=i,
            cell_v=v,
            temp_c=temp,
            soc=state.x[0],
            soc_sigma=np.sqrt(state.p[0]),
            innovation=self._last_innovation,
            v_pred=self._last_v_pred,
        )
        try:
            out = self.correction.predict(self.correction.features(inputs))
            dv, used, r = out.dv_v, out.used, out.r_var_v2
            # [n] float64/bool arrays as they come (edge_bms' network): no conversion
            if not (
                type(dv) is np.ndarray
                and type(r) is np.ndarray
                and type(used) is np.ndarray
                and dv.shape == r.shape == used.shape == (n,)
                and dv.dtype == r.dtype == _F64
                and used.dtype == _BOOL
            ):
                dv = np.asarray(dv, dtype=float).reshape(-1)
                used = np.asarray(used, dtype=bool).reshape(-1)
                r = np.asarray(r, dtype=float).reshape(-1)
                if dv.shape != (n,) or used.shape != (n,) or r.shape != (n,):
                    raise ValueError(
                        f"dv_v, used, r_var_v2 have shapes {dv.shape}, {used.shape}, "
                        f"{r.shape}; expected ({n},)"
                    )
        # A correction is an optional improvement: whatever goes wrong in it (onnxruntime
        # raises its own untyped errors), the plain filter must carry on, flagged.
        except Exception as exc:
            return None, None, None, f"error: {type(exc).__name__}: {exc}"
        # the usual step: every cell in range, every value finite (a dot product is
        # finite iff every entry is), every variance > 0; no masks to build
        if _ALL(used) and math.isfinite(dv.dot(dv) + r.dot(r)) and _MIN(r) > 0:
            # a copy: the flags outlive the step, a network may reuse its mask
            return dv, r, used.copy(), ""
        used = used & np.isfinite(dv)
        if not used.any():
            return None, None, used, "range"
        r_ok = used & np.isfinite(r) & (r > 0)
        r_var = np.where(r_ok, r, self.noise.voltage_v**2) if r_ok.any() else None
        return np.where(used, dv, 0.0), r_var, used, "" if used.all() else "range"

    def _update_health(self, estimate: PackEstimate, res: StepResult) -> None:
        assert self.health is not None
        self.health.update(
            estimate.current_a,
            estimate.cell_v,
            estimate.dt_s,
            soc=estimate.soc,
            soc_sigma=estimate.soc_sigma,
            temperature_c=estimate.temp_c,
            r0_table_ohm=res.r0_table_ohm,
        )
        # an SOH glitch must not corrupt the SOC filter: a cell keeps its previous value
        # where the new one is not finite and > 0 (or the array has the wrong shape)
        if self.health_feedback == "none":
            return
        # Cells fade and their resistance grows; they do not get better. A fed-back
        # estimate above the rated capacity or below the table's R0 is estimator error
        # (an SOC-difference segment the filter biased), so it is held at the bound.
        version = getattr(self.health, "capacity_version", None)
        seen = self._health_seen
        fresh = seen is None or seen[0] is not self.health or seen[1] != version
        if fresh or not isinstance(version, int):
            cap = _sane(self.health.capacity_ah_trusted, self._capacity)
            self._capacity = np.minimum(cap, HEALTH_CAPACITY_MAX * self.model.capacity_ah)
            self._read_capacity_sigma()
            if isinstance(version, int):
                self._health_seen = (self.health, version)
        if self.health_feedback == "all":
            r0s = _sane(self.health.r0_scale_trusted, self._r0_scale)
            self._r0_scale = np.maximum(r0s, HEALTH_R0_SCALE_MIN)
        self._scaled = True

    # -- initial state -------------------------------------------------------------------
    def _initial_state(self, i: FloatArray, v: FloatArray, temp: FloatArray) -> FilterState:
        """The state at the first sample, which uses that sample's voltage (the first step
        then only predicts). From the OCV reading alone, or, with a given SOC, the given
        SOC fused with the OCV reading (product of the two Gaussians)."""
        known = np.isfinite(v)
        soc_ocv, sigma_ocv = self._ocv_reading(i, v, temp, known)
        if self._initial_soc is not None:
            # A given SOC is a prior (a stored value, a guess); the first voltage is a
            # reading of the same SOC with the OCV start's error model. Fusing them in
            # SOC space uses the exact OCV inverse: a first EKF update linearises OCV at
            # the prior (far from the truth when the prior is 30 points off) and uses the
            # filter's running measurement noise, which is meant for a cell under load.
            prior = np.broadcast_to(self._initial_soc, (self.n_cells,))
            var_p = self._initial_sigma**2
            var_o = np.square(sigma_ocv)
            w = var_p / (var_p + var_o)
            soc = np.where(known, prior + w * (soc_ocv - prior), prior)
            sigma = np.where(known, np.sqrt(var_p * var_o / (var_p + var_o)), self._initial_sigma)
            return FilterState.initial(soc, sigma, v_sigma=RC_PRIOR_SIGMA_V)
        soc = np.where(known, soc_ocv, UNKNOWN_SOC)
        given = self._initial_sigma if self._initial_sigma_given else sigma_ocv
        sigma = np.where(known, given, UNKNOWN_SOC_SIGMA)
        return FilterState.initial(soc, sigma, v_sigma=RC_PRIOR_SIGMA_V)

    def _ocv_reading(
        self, i: FloatArray, v: FloatArray, temp: FloatArray, known: BoolArray
    ) -> tuple[FloatArray, FloatArray]:
        """SOC read off the voltage as an OCV, corrected for the drop of the current
        flowing (``start_drop``: the cell's two-slope small-current drop, or i R0), and
        its sigma: ``OCV_PRIOR_SIGMA_V`` plus half that drop (the RC polarisation and the
        drop's model are not known better) over the OCV slope there, within
        ``OCV_PRIOR_SIGMA_RANGE``; plus ``start_ocv_gap`` half gaps when set (which then
        counts the gap twice in a small-current start). Unknown cells: placeholders (the
        caller masks them)."""
        v_known = np.where(known, v, self.model.ocv(UNKNOWN_SOC, temp))
        soc_v = self.model.soc_from_ocv(v_known, temp)
        if self.start_drop == "two_slope":
            drop = self.model.start_drop(i, soc_v, temp, self._r0_scale)
        else:
            drop = i * (self.model.lookup(soc_v, temp).r0 * self._r0_scale)
        soc = self.model.soc_from_ocv(v_known + drop, temp)
        slope = np.abs(self.model.lookup_rows(soc, temp)[6])
        sigma_v = OCV_PRIOR_SIGMA_V + 0.5 * np.abs(drop)
        if self.start_ocv_gap:  # the OCV table is this uncertain at this temperature
            sigma_v = sigma_v + self.start_ocv_gap * self.model.ocv_half_gap(temp)
        sigma = np.clip(sigma_v / np.maximum(slope, 1e-9), *OCV_PRIOR_SIGMA_RANGE)
        return np.broadcast_to(soc, known.shape), np.broadcast_to(sigma, known.shape)

    # -- input checks (no state is touched until all pass) --------------------------------
    def _array(self, name: str, value: npt.ArrayLike, bounds: tuple[float, float]) -> FloatArray:
        """A scalar or [n] parameter as [n], every value finite and within ``bounds``."""
        a = _as_float_array(name, value)
        if a.ndim == 0:
            a = np.full(self.n_cells, float(a))
        if a.shape != (self.n_cells,):
            raise InputError(
                f"{name} must be a scalar or {self.n_cells} values, got shape {a.shape}"
            )
        bad = ~((a >= bounds[0]) & (a <= bounds[1]))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise InputError(f"{name}[{j}] = {float(a[j])!r} is outside [{bounds[0]}, {bounds[1]}]")
        return a

    def _check_ts(self, ts: float) -> float:
        try:
            t = float(ts)
        except (TypeError, ValueError):
            raise InputError(f"ts must be a number (s), got {ts!r}") from None
        if not math.isfinite(t):
            raise InputError(f"ts must be finite, got {t!r}")
        if self._last_ts is not None and not t > self._last_ts:
            raise InputError(f"ts {t!r} is not after the previous sample's ts {self._last_ts!r}")
        return t

    def _check_current(self, current_a: npt.ArrayLike) -> FloatArray:
        if isinstance(current_a, float | int) and not isinstance(current_a, bool):  # fast path
            if not abs(current_a) <= CURRENT_ABS_MAX_A:  # False for NaN too
                raise InputError(_bad_value("current_a", float(current_a), "A", CURRENT_ABS_MAX_A))
            return np.array(current_a, dtype=float)
        a = _as_float_array("current_a", current_a)
        if a.ndim == 0:
            if not abs(float(a)) <= CURRENT_ABS_MAX_A:
                raise InputError(_bad_value("current_a", float(a), "A", CURRENT_ABS_MAX_A))
            return a
        if a.shape != (self.n_cells,):
            raise InputError(
                f"current_a must be one value (series string) or {self.n_cells} values, "
                f"got shape {a.shape}"
            )
        if not _MAX(np.abs(a)) <= CURRENT_ABS_MAX_A:  # False for NaN too
            ok = np.abs(a) <= CURRENT_ABS_MAX_A
            j = int(np.flatnonzero(~ok)[0])
            raise InputError(_bad_value(f"current_a[{j}]", float(a[j]), "A", CURRENT_ABS_MAX_A))
        return a

    def _check_voltage(self, cell_v: npt.ArrayLike) -> tuple[FloatArray, BoolArray | None]:
        """The voltages [n] and, if any is NaN (a dropout), the mask of those cells."""
        a = _as_float_array("cell_v", cell_v)
        if a.ndim == 0 and self.n_cells == 1:
            a = a.reshape(1)
        if a.shape != (self.n_cells,):
            raise InputError(f"cell_v must have {self.n_cells} values, got shape {a.shape}")
        lo, hi = VOLTAGE_RANGE_V
        if lo < _MIN(a) and _MAX(a) < hi:  # False if any is NaN
            return a, None
        ok = (a > lo) & (a < hi)
        missing = np.isnan(a)
        bad = ~ok & ~missing
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            what = "not finite" if not math.isfinite(a[j]) else f"outside ({lo}, {hi}) V"
            raise InputError(
                f"cell_v[{j}] = {float(a[j])!r} is {what} (NaN marks a missing voltage)"
            )
        return a, missing

    def _check_temperature(self, temp_c: npt.ArrayLike) -> FloatArray:
        lo, hi = TEMPERATURE_RANGE_C
        if isinstance(temp_c, float | int) and not isinstance(temp_c, bool):  # fast path
            if not lo <= temp_c <= hi:  # False for NaN too
                raise InputError(f"temp_c = {float(temp_c)!r} is outside [{lo}, {hi}] C")
            return np.array(temp_c, dtype=float)
        a = _as_float_array("temp_c", temp_c)
        if a.ndim and a.shape != (self.n_cells,):
            raise InputError(
                f"temp_c must be one value or {self.n_cells} values, got shape {a.shape}"
            )
        if not (lo <= _MIN(a) and _MAX(a) <= hi):  # False if any is NaN
            ok = (a >= lo) & (a <= hi)
            j = int(np.flatnonzero(~ok.reshape(-1))[0])
            name = f"temp_c[{j}]" if a.ndim else "temp_c"
            raise InputError(f"{name} = {float(a.reshape(-1)[j])!r} is outside [{lo}, {hi}] C")
        return a

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON-able values (NaN -> None).

        The hooks' own state (SOH, safety latches, a network's history) is theirs to save.
        """
        n = self.n_cells
        st = self._state
        return {
            "format": STATE_FORMAT,
            "cell": self.model.name,
            "n_cells": n,
            "method": self.method,
            "noise": self.noise.model_dump(),
            "ekf": self.ekf.model_dump(),
            "ukf": self.ukf.model_dump(),
            "last_ts": self._last_ts,
            "initial_soc": None if self._initial_soc is None else self._initial_soc.tolist(),
            # None: derived at the start (from the OCV slope, or the given-SOC default)
            "initial_soc_sigma": self._initial_sigma if self._initial_sigma_given else None,
            "health_feedback": self.health_feedback,
            "x": None if st is None else st.x.tolist(),
            "p": None if st is None else st.p.tolist(),
            "c": None if st is None or st.c is None else st.c.tolist(),
            "cr": None if st is None or st.cr is None else st.cr.tolist(),
            "capacity_consider": self.capacity_consider,
            "r0_sigma_rel": self.r0_sigma_rel,
            "start_ocv_gap": self.start_ocv_gap,
            "start_drop": self.start_drop,
            "current_a": None if st is None else np.broadcast_to(st.current_a, (n,)).tolist(),
            "capacity_ah": self._capacity.tolist(),
            "r0_scale": self._r0_scale.tolist(),
            "last_innovation": _jsonable(self._last_innovation),
            "last_v_pred": _jsonable(self._last_v_pred),
        }

    @classmethod
    def from_state_dict(
        cls,
        model: CellModel,
        data: Mapping[str, Any],
        *,
        correction: VoltageCorrection | None = None,
        correction_fallback: str = "none",
        health: HealthEstimator | None = None,
        power: PowerHook | None = None,
        safety: SafetyCheck | None = None,
    ) -> PackEstimator:
        """An estimator resumed from :meth:`state_dict` (raises CheckpointError)."""
        try:
            ck = _Checkpoint.model_validate(dict(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "state"
            raise CheckpointError(f"estimator state: {where}: {err['msg']}") from exc
        if ck.format != STATE_FORMAT:
            raise CheckpointError(
                f"estimator state: format {ck.format!r}, expected {STATE_FORMAT!r}"
            )
        if ck.cell != model.name:
            raise CheckpointError(
                f"estimator state is for cell model {ck.cell!r}, not {model.name!r}"
            )
        n = ck.n_cells
        try:
            est = cls(
                model,
                n,
                method=ck.method,
                noise=ck.noise,
                initial_soc=ck.initial_soc,
                initial_soc_sigma=ck.initial_soc_sigma,
                ekf=EkfSettings.model_validate(ck.ekf),
                ukf=UkfSettings.model_validate(ck.ukf),
                correction=correction,
                correction_fallback=correction_fallback,
                health=health,
                power=power,
                safety=safety,
                health_feedback=ck.health_feedback,
                capacity_consider=ck.capacity_consider,
                r0_sigma_rel=ck.r0_sigma_rel,
                start_ocv_gap=ck.start_ocv_gap,
                start_drop=ck.start_drop,
            )
            est.set_scales(ck.capacity_ah, ck.r0_scale)
        except (InputError, ValidationError) as exc:
            raise CheckpointError(f"estimator state: {exc}") from exc
        if ck.x is None or ck.p is None or ck.current_a is None or ck.last_ts is None:
            return est  # saved before its first sample
        x = _restore("x", ck.x, (3, n))
        p = _restore("p", ck.p, (6, n))
        cur = _restore("current_a", [ck.current_a], (1, n))[0]
        if np.any(p[[0, 3, 5]] <= 0):
            raise CheckpointError("estimator state: p has a variance <= 0")
        c = None if ck.c is None else _restore("c", ck.c, (3, n))
        cr = None if ck.cr is None else _restore("cr", ck.cr, (3, n))
        est._state = FilterState(x, p, cur, c, cr)
        est._last_ts = float(ck.last_ts)
        est._last_innovation = _nan_list("last_innovation", ck.last_innovation, n)
        est._last_v_pred = _nan_list("last_v_pred", ck.last_v_pred, n)
        return est


class _Checkpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    cell: str
    n_cells: int
    method: Method
    noise: dict[str, float]
    ekf: dict[str, float]
    ukf: dict[str, float]
    last_ts: float | None
    initial_soc: list[float] | None
    initial_soc_sigma: float | None
    health_feedback: HealthFeedback = "all"  # absent from checkpoints before it existed
    x: list[list[float]] | None
    p: list[list[float]] | None
    c: list[list[float]] | None = None  # absent before the capacity consider term
    capacity_consider: bool = True
    cr: list[list[float]] | None = None
    r0_sigma_rel: float | None = None  # absent before the R0 consider term: off
    start_ocv_gap: float = START_OCV_GAP
    start_drop: StartDrop = "r0"  # absent before the choice existed: the old start
    current_a: list[float] | None
    capacity_ah: list[float]
    r0_scale: list[float]
    last_innovation: list[float | None]
    last_v_pred: list[float | None]


def _filled(n: int, value: float) -> FloatArray:
    """np.full(n, value) without its Python wrapper (the hot path's per-cell copies)."""
    a = np.empty(n)
    a.fill(value)
    return a


def _sane(new: npt.ArrayLike, old: FloatArray) -> FloatArray:
    a = np.array(new, dtype=float)
    if a.shape != old.shape:
        return old
    return np.where(np.isfinite(a) & (a > 0), a, old)


def _restore(name: str, value: list[list[float]], shape: tuple[int, int]) -> FloatArray:
    a = np.array(value, dtype=float)
    if a.shape != shape:
        raise CheckpointError(f"estimator state: {name} has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise CheckpointError(f"estimator state: {name} holds a non-finite value")
    return a


def _nan_list(name: str, value: list[float | None], n: int) -> FloatArray:
    if len(value) != n:
        raise CheckpointError(f"estimator state: {name} has {len(value)} values, expected {n}")
    return np.array([np.nan if x is None else x for x in value], dtype=float)


def _noise(noise: FilterNoise | Mapping[str, float] | None) -> FilterNoise:
    if noise is None:
        return FilterNoise()
    if isinstance(noise, FilterNoise):
        return noise
    try:
        return FilterNoise.model_validate(dict(noise))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"noise.{where}: {err['msg']} (got {err.get('input')!r})") from exc


def _as_float_array(name: str, value: npt.ArrayLike) -> FloatArray:
    """A float64 copy of ``value`` (the estimator keeps it; the caller may reuse buffers)."""
    try:
        return np.array(value, dtype=float)
    except (TypeError, ValueError):
        text = repr(value)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise InputError(f"{name} must be numbers, got {text}") from None


def _bad_value(name: str, value: float, unit: str, limit: float) -> str:
    if not math.isfinite(value):
        return f"{name} = {value!r} is not finite"
    return f"{name} = {value!r} {unit} is beyond +-{limit:g} {unit} (a sensor or wiring fault)"
