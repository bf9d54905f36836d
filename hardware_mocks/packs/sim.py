"""N packs of M series cells: batched physics, a pack controller, sensors, faults, telemetry.

State is one flat :class:`~hardware_mocks.physics.cell.CellState` of ``P * C`` cells
(pack-major), viewed as ``[P, C]`` arrays; :func:`pack_step` advances it with the same
current through every cell of a pack (a series string) using the cycler's cell physics.

Cell-to-cell variation (seeded): capacity (``capacity_factor``), resistance and initial
SOC. The cell model has no per-cell resistance knob other than the electrolyte
conductivity (the ionic part of R0 scales as 1/kappa), so a relative R0 spread is drawn
and realised through each cell's ``kappa``; half of the diffusion resistance follows it,
as in a cell that really has a worse electrolyte.

Sensors: cell voltages with Gaussian noise and quantization; a current sensor with a
per-pack gain error and offset plus noise; temperature sensors (one per
``cells_per_temp_sensor`` cells, reading their group's mean) with a per-sensor offset,
noise and quantization. Faults act on the sensors and the link, never on the physics.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hardware_mocks.packs.config import PackSimConfig
from hardware_mocks.packs.loads import V_NOMINAL, LoadTable, build_loads
from hardware_mocks.packs.truth import Truth, TruthRecorder
from hardware_mocks.physics import cell as cm

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Pack controller modes.
FOLLOW = 0  # follow the load profile (derated at the weakest cell's limits)
RECHARGE = 1  # empty: CC charge until the highest cell reaches v_max

# A drive that the weakest cell can deliver less than this fraction of means "empty".
EMPTY_FRACTION = 0.5
_OPEN = 1.0e9  # a voltage limit that never binds


class Fault(enum.StrEnum):
    STUCK = "stuck"  # a cell voltage reading frozen at its value at injection
    DROPOUT = "dropout"  # the pack's telemetry messages are lost (seq still counts)
    NOISE_BURST = "noise_burst"  # a cell's (or the whole pack's) voltage noise rises
    OPEN_WIRE = "open_wire"  # a sense wire open: the cell reads ~0 V, a neighbour the sum


@dataclass
class ActiveFault:
    id: int
    pack: int
    fault: Fault
    cell: int | None
    start_t_s: float
    end_t_s: float | None  # None: until cleared
    sigma_mv: float = 0.0  # noise burst
    frozen_v: float = 0.0  # stuck


@dataclass(frozen=True)
class TelemetryMessage:
    """One contract-5 telemetry message."""

    pack_id: str
    topic: str
    payload: dict[str, Any]  # ts, seq, current_a, cell_v, temp_c

    def json(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":")).encode()


def pack_step(
    cells: cm.CellState,
    params: cm.CellParams,
    mode: IntArray,
    demand_a: FloatArray,
    n_cells: int,
    *,
    v_min: float,
    v_max: float,
    charge_a: float,
    env_c: float,
    dt: float,
) -> tuple[cm.CellState, FloatArray, FloatArray, IntArray]:
    """Advance ``P`` series strings by ``dt`` s; pure (the inputs are not modified).

    ``demand_a`` (P,) is what each pack's load asks for (discharge > 0) in mode FOLLOW;
    RECHARGE ignores it and charges at ``charge_a``. The controller derates the demand so
    that no cell leaves ``v_min..v_max`` at the end of the step: a first pass of the cell
    model gives, for every cell, the largest current that keeps it inside (its CC-CV
    clip), the pack takes the smallest over its cells, and a second pass applies that one
    current to the whole string. Returns ``(cells, current_a (P,), cell_v (P, C), mode)``.
    """
    want = np.where(mode == RECHARGE, -charge_a, demand_a)
    direction = np.where(want > 0.0, cm.DISCHARGE, np.where(want < 0.0, cm.CHARGE, cm.IDLE))
    d_cells = np.repeat(direction, n_cells).astype(np.int64)
    limit = np.where(direction == cm.DISCHARGE, v_min, v_max)
    probe = cm.Control(d_cells, np.repeat(np.abs(want), n_cells), np.repeat(limit, n_cells))
    _, i_probe, _ = cm.step(cells, probe, params, env_c, dt)
    allowed = np.abs(i_probe).reshape(-1, n_cells).min(axis=1)
    apply = cm.Control(
        d_cells,
        np.repeat(allowed, n_cells),
        np.where(d_cells == cm.DISCHARGE, -_OPEN, _OPEN),
    )
    new, current, voltage = cm.step(cells, apply, params, env_c, dt)
    pack_i = current.reshape(-1, n_cells)[:, 0]
    # Empty (the weakest cell cannot carry the drive) -> recharge; full -> follow again.
    empty = (mode == FOLLOW) & (want > 0.0) & (allowed < EMPTY_FRACTION * want)
    full = (mode == RECHARGE) & (allowed < 0.99 * charge_a)
    new_mode = np.where(empty, RECHARGE, np.where(full, FOLLOW, mode)).astype(np.int64)
    return new, np.asarray(pack_i), voltage.reshape(-1, n_cells), new_mode


def _r0_to_kappa(factor: FloatArray, params: cm.CellParams) -> FloatArray:
    """Electrolyte conductivity that scales R0 (at 25 C) by ``factor``."""
    r_o, r_e = params.r_ohmic_ohm, params.r_electrolyte_ohm
    ratio = (factor * (r_o + r_e) - r_o) / r_e  # kappa_ref / kappa
    return np.asarray(params.kappa_ref_ms_cm / ratio)


class PackSimulator:
    """``n_packs`` packs of ``n_cells`` series cells; see the module docstring.

    Typical loop: ``sim.advance(1.0)`` then ``for m in sim.telemetry(): publish(m.topic,
    m.json())``. Ground truth of every ``record_every``-th advance is in :meth:`truth`.
    """

    def __init__(self, config: PackSimConfig | None = None, **overrides: Any) -> None:
        cfg = config or PackSimConfig()
        if overrides:
            cfg = PackSimConfig.from_mapping({**cfg.model_dump(), **overrides})
        self.config = cfg
        n_p, n_c = cfg.n_packs, cfg.n_cells
        self.n_packs, self.n_cells = n_p, n_c
        self.pack_ids = cfg.pack_ids
        growth = {} if cfg.ageing else {"fade_per_efc": 0.0, "resistance_growth_per_efc": 0.0}
        self.params = cm.CellParams(capacity_ah=cfg.capacity_ah, h_a_w_k=cfg.cooling_w_k, **growth)
        # Independent streams: physics draws do not change when sensor settings do.
        rng = np.random.default_rng([cfg.seed, 1])
        _, capacity = cm.cell_variation(
            n_p * n_c, [cfg.seed, 2], capacity_spread=cfg.capacity_spread
        )
        r0_factor = np.clip(1.0 + cfg.resistance_spread * rng.standard_normal(n_p * n_c), 0.7, 1.6)
        lo, hi = cfg.initial_soc
        pack_soc = rng.uniform(lo, hi, n_p)
        temp0 = cfg.ambient_c if cfg.initial_temp_c is None else cfg.initial_temp_c
        # A pack is never stored outside its controller's window: clip each cell's SOC to
        # the OCV range v_min..v_max (at the starting temperature).
        grid = np.linspace(0.0, 1.0, 2001)
        u = cm.ocv(grid, temp0)
        soc_lo, soc_hi = np.interp([cfg.v_min, cfg.v_max], u, grid)
        cell_soc = np.clip(
            np.repeat(pack_soc, n_c) + cfg.soc_spread * rng.standard_normal(n_p * n_c),
            soc_lo,
            soc_hi,
        )
        base = cm.init_state(
            n_p * n_c, soc=0.5, temp_c=temp0, params=self.params, capacity_factor=capacity
        )
        self.state: cm.CellState = replace(
            base, soc=cell_soc, kappa_ms_cm=_r0_to_kappa(r0_factor, self.params)
        )
        self.resistance_factor: FloatArray = r0_factor.reshape(n_p, n_c)
        self.loads: LoadTable = build_loads(
            list(cfg.loads),
            n_p,
            cfg.seed,
            peak_c_rate=cfg.peak_c_rate,
            constant_c_rate=cfg.constant_c_rate,
            pulse_c_rate_=cfg.pulse_c_rate,
            phase_offsets=cfg.phase_offsets,
        )
        self.mode: IntArray = np.zeros(n_p, dtype=np.int64)
        self.current_a: FloatArray = np.zeros(n_p)  # flowing now (last sub-step)
        self._cell_v: FloatArray = cm.terminal_voltage(
            self.state, self.params, np.zeros(n_p * n_c)
        ).reshape(n_p, n_c)
        self.t_s = 0.0
        self.start_ts = time.time() if cfg.start_ts is None else float(cfg.start_ts)
        self.seq: IntArray = np.zeros(n_p, dtype=np.int64)  # next seq of each pack
        self.n_steps = 0
        # Sensor errors (fixed per device) and noise.
        srng = np.random.default_rng([cfg.seed, 3])
        self.i_gain: FloatArray = 1.0 + cfg.i_gain_error * srng.standard_normal(n_p)
        self.i_offset_a: FloatArray = cfg.i_offset_a * srng.standard_normal(n_p)
        self.t_offset_c: FloatArray = cfg.t_offset_c * srng.standard_normal(
            (n_p, cfg.n_temp_sensors)
        )
        self._noise = np.random.default_rng([cfg.seed, 4])
        self._sensor_starts = np.arange(0, n_c, cfg.cells_per_temp_sensor)
        self._sensor_counts = np.diff(np.append(self._sensor_starts, n_c))
        self._last_v: FloatArray = self._quantize(self._cell_v, cfg.v_quant_mv / 1000.0)
        self._faults: list[ActiveFault] = []
        self._next_fault_id = 1
        self._recorder = TruthRecorder(self.pack_ids)
        if cfg.record_every:
            self._record(np.zeros(n_p))

    # ----------------------------------------------------------------- true state
    @property
    def ts(self) -> float:
        """Epoch seconds of the present simulated instant (the next telemetry's ``ts``)."""
        return self.start_ts + self.t_s

    @property
    def soc(self) -> FloatArray:
        """(P, C) true SOC of each cell (fraction of its present capacity)."""
        return self.state.soc.reshape(self.n_packs, self.n_cells)

    @property
    def temp_c(self) -> FloatArray:
        """(P, C) true cell temperatures."""
        return self.state.temp_c.reshape(self.n_packs, self.n_cells)

    @property
    def cell_v(self) -> FloatArray:
        """(P, C) true terminal voltages at the end of the last sub-step."""
        return self._cell_v

    @property
    def capacity_ah(self) -> FloatArray:
        """(P, C) present capacity of each cell."""
        return cm.capacity_ah(self.state, self.params).reshape(self.n_packs, self.n_cells)

    def pack_index(self, pack: int | str) -> int:
        if isinstance(pack, str):
            try:
                return self.pack_ids.index(pack)
            except ValueError:
                raise ValueError(f"unknown pack {pack!r}; packs are {self.pack_ids[0]}..") from None
        if not 0 <= pack < self.n_packs:
            raise ValueError(f"pack index must be within 0..{self.n_packs - 1}, got {pack!r}")
        return int(pack)

    # ----------------------------------------------------------------- physics
    def demand_a(self) -> FloatArray:
        """(P,) current each pack's load asks for now (before the controller's limits)."""
        c = self.loads.c_rate(self.t_s)
        v_cell = self._cell_v.mean(axis=1)
        # Power profiles: constant power, so the current rises as the pack voltage falls.
        scale = np.where(self.loads.constant_power, V_NOMINAL / np.maximum(v_cell, 1.0), 1.0)
        return np.asarray(c * self.config.capacity_ah * scale)

    def advance(self, dt: float) -> None:
        """Advance every pack by ``dt`` simulated seconds (sub-steps of <= ``max_step_s``)."""
        if not (math.isfinite(dt) and dt > 0.0):
            raise ValueError(f"dt must be finite and > 0, got {dt!r}")
        cfg = self.config
        n_sub = max(1, math.ceil(dt / cfg.max_step_s - 1e-9))
        h = dt / n_sub
        charge_as = np.zeros(self.n_packs)
        for _ in range(n_sub):
            self.state, self.current_a, self._cell_v, self.mode = pack_step(
                self.state,
                self.params,
                self.mode,
                self.demand_a(),
                self.n_cells,
                v_min=cfg.v_min,
                v_max=cfg.v_max,
                charge_a=cfg.charge_c_rate * cfg.capacity_ah,
                env_c=cfg.ambient_c,
                dt=h,
            )
            self.t_s += h
            charge_as += self.current_a * h
        self.n_steps += 1
        if cfg.record_every and self.n_steps % cfg.record_every == 0:
            self._record(charge_as / dt)

    def _record(self, mean_current: FloatArray) -> None:
        self._recorder.add(
            self.t_s, self.ts, mean_current, self.soc, self.temp_c, self._cell_v, self.capacity_ah
        )

    def truth(self) -> Truth:
        """Ground truth recorded so far (plus the fault events)."""
        self._expire()
        return self._recorder.truth()

    # ----------------------------------------------------------------- faults
    def inject(
        self,
        pack: int | str,
        fault: Fault | str,
        *,
        cell: int | None = None,
        duration_s: float | None = None,
        sigma_mv: float | None = None,
    ) -> int:
        """Start ``fault`` on ``pack`` (index or id) now, for ``duration_s`` simulated
        seconds (None: until :meth:`clear`). ``cell`` is required for stuck and open_wire,
        optional for noise_burst (None: every cell), not allowed for dropout. Returns the
        fault's id."""
        p = self.pack_index(pack)
        kind = Fault(fault)
        if cell is not None and not 0 <= cell < self.n_cells:
            raise ValueError(f"cell must be within 0..{self.n_cells - 1}, got {cell!r}")
        if kind in (Fault.STUCK, Fault.OPEN_WIRE) and cell is None:
            raise ValueError(f"fault {kind.value!r} needs a cell")
        if kind is Fault.DROPOUT and cell is not None:
            raise ValueError(f"fault 'dropout' applies to the whole pack, got cell={cell!r}")
        if kind is Fault.OPEN_WIRE and self.n_cells < 2:
            raise ValueError("fault 'open_wire' needs a pack of at least 2 cells")
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s must be > 0 or None, got {duration_s!r}")
        sigma = self.config.noise_burst_mv if sigma_mv is None else float(sigma_mv)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma_mv must be finite and >= 0, got {sigma_mv!r}")
        f = ActiveFault(
            id=self._next_fault_id,
            pack=p,
            fault=kind,
            cell=cell,
            start_t_s=self.t_s,
            end_t_s=None if duration_s is None else self.t_s + duration_s,
            sigma_mv=sigma,
            frozen_v=float(self._last_v[p, cell]) if cell is not None else 0.0,
        )
        self._next_fault_id += 1
        self._faults.append(f)
        self._recorder.faults.append(
            {
                "id": f.id,
                "pack_id": self.pack_ids[p],
                "fault": kind.value,
                "cell": cell,
                "start_t_s": f.start_t_s,
                "end_t_s": f.end_t_s,
            }
        )
        return f.id

    def clear(
        self,
        pack: int | str | None = None,
        fault: Fault | str | None = None,
        *,
        fault_id: int | None = None,
    ) -> int:
        """End the matching active faults now (all of them without arguments); returns
        how many ended."""
        p = None if pack is None else self.pack_index(pack)
        kind = None if fault is None else Fault(fault)
        ended = [
            f
            for f in self._faults
            if (p is None or f.pack == p)
            and (kind is None or f.fault is kind)
            and (fault_id is None or f.id == fault_id)
        ]
        for f in ended:
            self._end(f, self.t_s)
        return len(ended)

    @property
    def active_faults(self) -> list[ActiveFault]:
        self._expire()
        return list(self._faults)

    def _end(self, f: ActiveFault, t: float) -> None:
        self._faults.remove(f)
        for ev in self._recorder.faults:
            if ev["id"] == f.id:
                ev["end_t_s"] = t

    def _expire(self) -> None:
        for f in list(self._faults):
            if f.end_t_s is not None and self.t_s >= f.end_t_s - 1e-9:
                self._end(f, f.end_t_s)

    # ----------------------------------------------------------------- sensors
    @staticmethod
    def _quantize(x: FloatArray, q: float) -> FloatArray:
        if q > 0.0:
            x = np.round(x / q) * q
        return np.asarray(np.round(x, 6))  # clean decimal text in JSON

    def measure(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """One sensor reading of every pack, faults applied:
        ``(current_a (P,), cell_v (P, C), temp_c (P, n_temp_sensors))``."""
        cfg = self.config
        self._expire()
        rng = self._noise
        n_p, n_c = self.n_packs, self.n_cells
        sigma = np.full((n_p, n_c), cfg.v_noise_mv / 1000.0)
        for f in self._faults:
            if f.fault is Fault.NOISE_BURST:
                cells = slice(None) if f.cell is None else f.cell
                sigma[f.pack, cells] = np.maximum(sigma[f.pack, cells], f.sigma_mv / 1000.0)
        v = self._cell_v + sigma * rng.standard_normal((n_p, n_c))
        for f in self._faults:
            if f.fault is Fault.OPEN_WIRE and f.cell is not None:
                k = f.cell
                nbr = k + 1 if k + 1 < n_c else k - 1
                total = v[f.pack, k] + v[f.pack, nbr]
                # The open channel floats near 0 V (its filter capacitor bleeds down)
                # and the neighbour's channel spans both cells: the sum is preserved.
                v[f.pack, k] = rng.uniform(0.0, 0.05)
                v[f.pack, nbr] = total - v[f.pack, k]
        v = self._quantize(v, cfg.v_quant_mv / 1000.0)
        for f in self._faults:
            if f.fault is Fault.STUCK and f.cell is not None:
                v[f.pack, f.cell] = f.frozen_v
        self._last_v = v
        i = (
            self.current_a * self.i_gain
            + self.i_offset_a
            + cfg.i_noise_a * rng.standard_normal(n_p)
        )
        i = np.round(i, 4)
        group = np.add.reduceat(self.temp_c, self._sensor_starts, axis=1) / self._sensor_counts
        t = group + self.t_offset_c + cfg.t_noise_c * rng.standard_normal(group.shape)
        t = self._quantize(t, cfg.t_quant_c)
        return np.asarray(i), v, t

    def telemetry(self) -> list[TelemetryMessage]:
        """Sample every pack's sensors now: one message per pack not in dropout. Every
        pack's ``seq`` advances by one per call, so a dropout leaves a gap."""
        i, v, t = self.measure()
        dropped = {f.pack for f in self._faults if f.fault is Fault.DROPOUT}
        ts = self.ts
        prefix = self.config.topic_prefix.rstrip("/")
        out = []
        for p, pid in enumerate(self.pack_ids):
            if p not in dropped:
                payload = {
                    "ts": ts,
                    "seq": int(self.seq[p]),
                    "current_a": float(i[p]),
                    "cell_v": v[p].tolist(),
                    "temp_c": t[p].tolist(),
                }
                out.append(TelemetryMessage(pid, f"{prefix}/{pid}/telemetry", payload))
        self.seq += 1
        return out
