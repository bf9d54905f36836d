"""A batched equivalent-circuit model of NMC/graphite cells (the cycler's ground truth).

Every array in :class:`CellState` has one entry per cycler channel; :func:`step`
advances all of them by ``dt`` seconds with numpy operations only (no per-cell Python
loop), in the style of torch-sim's pure ``init``/``step`` integrator pairs.

Model (one cell, positive current = discharge)::

    V = OCV(SOC, T) - I * R0 - v1 - v2          dv_i/dt = (I * R_i - v_i) / tau_i

* **OCV(SOC, T).** Electrode open-circuit potentials of the LG M50 (NMC811 / graphite-SiOx)
  from Chen et al., J. Electrochem. Soc. 167 (2020) 080534 (PyBaMM's ``Chen2020``
  parameter set), ``OCV = U_p(y) - U_n(x)`` with the stoichiometries moving linearly
  with SOC between the published 0 % and 100 % limits (x 0.0279 -> 0.9014, y 0.9084 ->
  0.2661). This gives 2.50 V at SOC 0 and 4.19 V at SOC 1, strictly increasing. A small
  entropic term ``dU/dT`` (order 0.1 mV/K, the magnitude reported for NMC/graphite)
  makes the OCV weakly temperature dependent.
* **Series resistance R0** = ohmic/contact part + electrolyte part. The electrolyte part
  scales as ``1/kappa`` (``R_el = R_el_ref * kappa_ref / kappa``, kappa at 25 C): a
  worse electrolyte gives a proportionally larger ohmic drop.
* **Two RC pairs**: charge transfer (R1, tau1 ~ 20 s) and solid/electrolyte diffusion
  polarisation (R2, tau2 ~ 400 s); half of R2 also scales with ``1/kappa`` (concentration
  polarisation in the electrolyte). The RC voltages relax during rest, which is what
  makes a rest step's voltage creep back toward the OCV.
* **Temperature**: each resistance follows Arrhenius, ``R(T) = R(25 C) exp(Ea/R (1/T -
  1/298.15 K))`` with Ea 17 kJ/mol for electrolyte conduction (LiPF6/carbonates), 5
  kJ/mol for the electronic/contact part, 50 kJ/mol for charge transfer (Jow et al.,
  J. Electrochem. Soc. 165 (2018) A361 report 50-65 kJ/mol) and 30 kJ/mol for diffusion.
* **Ageing**: capacity fades linearly with full equivalent cycles (EFC = Ah throughput /
  (2 Q_fresh)), by ``fade_per_efc`` (default 0.2 % per EFC, deliberately fast so that a
  simulated campaign sees it), and every resistance grows by ``resistance_growth_per_efc``.
* **Cell-to-cell variation** (per cell, in the state): ``ageing_factor`` multiplies both
  ageing rates of that cell (1 = the design's rate), so a cell that loses capacity
  faster also grows resistance faster, and both show in its early cycles: the fade
  slope, the resistance growth and the difference between two discharge Q(V) curves
  (less capacity, and a larger IR drop that shifts the curve). ``capacity_factor``
  scales the fresh capacity (manufacturing spread). Cells of one production lot age at
  rates that differ markedly under identical cycling (Baumhoefer et al., J. Power
  Sources 247 (2014) 332, 48 cells), and that spread is not correlated with the
  initial capacity spread (Dubarry et al., Energies 11 (2018) 1031), so the two factors
  are independent; :func:`cell_variation` draws both from a seed.
* **Coulombic efficiency** < 1 on charge: only ``eta * I dt`` of charging current is
  stored (default 0.998); discharge returns all of it.
* **Thermal**: one lumped node, ``C_th dT/dt = Q_irr + Q_rev - hA (T - T_env)`` with
  ``Q_irr = I^2 R0 + v1^2/R1 + v2^2/R2`` (dissipation in each resistor) and the
  reversible heat ``Q_rev = -I T dU/dT``.

Discretisation: the RC pairs use the exact zero-order-hold update
``v' = v a + R (1 - a) I`` with ``a = exp(-dt/tau)``, so the step is stable at any dt.
CC-CV control is solved per step: the current that puts the end-of-step terminal voltage
exactly on the limit is computed in closed form and the commanded current is clipped to
it, so the current tapers in CV without overshoot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

R_GAS = 8.314462618  # J/(mol K)
T_REF_K = 298.15
KAPPA_MIN = 0.05  # mS/cm: salt-free solvent still conducts a little (impurities)

# Direction codes of a channel's control (what the cycler's output does this step).
IDLE = 0  # output off or rest: no current
DISCHARGE = 1
CHARGE = -1

# Chen et al. 2020 (LG M50) stoichiometry windows at 0 % and 100 % SOC.
X_0, X_100 = 0.0279, 0.9014  # graphite lithiation
Y_0, Y_100 = 0.9084, 0.2661  # NMC811 lithiation


@dataclass(frozen=True)
class CellParams:
    """Parameters of one cell design (shared by every channel)."""

    capacity_ah: float = 5.0  # nominal (LG M50 class 21700)
    r_ohmic_ohm: float = 0.010  # contacts, current collectors, electrodes' electronic part
    r_electrolyte_ohm: float = 0.008  # ionic part of R0 at kappa_ref and 25 C
    kappa_ref_ms_cm: float = 10.0
    r1_ohm: float = 0.010  # charge transfer
    tau1_s: float = 20.0
    r2_ohm: float = 0.012  # diffusion / concentration polarisation
    tau2_s: float = 400.0
    ea_ohmic_j_mol: float = 5.0e3
    ea_electrolyte_j_mol: float = 17.0e3
    ea_ct_j_mol: float = 50.0e3
    ea_diffusion_j_mol: float = 30.0e3
    coulombic_efficiency: float = 0.998
    fade_per_efc: float = 0.002  # fraction of capacity lost per full equivalent cycle
    resistance_growth_per_efc: float = 0.005
    mass_kg: float = 0.069
    cp_j_kg_k: float = 1100.0
    h_a_w_k: float = 0.10  # cooling to the surroundings (free air in a cycler fixture)

    def __post_init__(self) -> None:
        for name in ("capacity_ah", "r_ohmic_ohm", "r_electrolyte_ohm", "kappa_ref_ms_cm"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if not 0.5 < self.coulombic_efficiency <= 1.0:
            raise ValueError(
                f"coulombic_efficiency must be in (0.5, 1], got {self.coulombic_efficiency!r}"
            )


@dataclass(frozen=True)
class CellState:
    """State of n cells; every field is an array of shape (n,)."""

    soc: FloatArray  # fraction of the *present* (faded) capacity
    v1: FloatArray  # RC-pair voltages, V (positive during discharge)
    v2: FloatArray
    temp_c: FloatArray
    kappa_ms_cm: FloatArray  # electrolyte conductivity at 25 C
    throughput_ah: FloatArray  # |I| dt summed: drives ageing
    # Per-cell constants (cell-to-cell variation): ageing rate and fresh capacity, each
    # relative to the design (CellParams).
    ageing_factor: FloatArray
    capacity_factor: FloatArray
    # Bookkeeping for conservation checks (discharge-positive signs).
    charge_ah: FloatArray  # net charge delivered at the terminals
    terminal_wh: FloatArray  # net energy delivered at the terminals
    heat_j: FloatArray  # irreversible heat generated

    @property
    def n(self) -> int:
        return int(self.soc.shape[0])


@dataclass(frozen=True)
class Control:
    """What each channel asks for this step: direction, current limit, voltage limit."""

    direction: IntArray  # IDLE, DISCHARGE or CHARGE
    current_a: FloatArray  # magnitude of the CC current (>= 0)
    voltage_v: FloatArray  # CV limit: upper for charge, lower for discharge


def init_state(
    n: int,
    *,
    soc: float = 0.5,
    temp_c: float = 25.0,
    kappa_ms_cm: float | None = None,
    params: CellParams | None = None,
    ageing_factor: float | ArrayLike = 1.0,
    capacity_factor: float | ArrayLike = 1.0,
) -> CellState:
    """n fresh cells at rest; ``ageing_factor`` and ``capacity_factor`` are one value
    for every cell or one per cell (see :func:`cell_variation`)."""
    p = params or CellParams()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not 0.0 <= soc <= 1.0:
        raise ValueError(f"soc must be within 0..1, got {soc!r}")
    zeros = np.zeros(n)
    factors = {}
    for name, value in (("ageing_factor", ageing_factor), ("capacity_factor", capacity_factor)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
            raise ValueError(f"{name} must be a number or {n} values, got shape {arr.shape}")
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        factors[name] = np.broadcast_to(arr, (n,)).copy()
    return CellState(
        soc=np.full(n, float(soc)),
        v1=zeros.copy(),
        v2=zeros.copy(),
        temp_c=np.full(n, float(temp_c)),
        kappa_ms_cm=np.full(n, float(kappa_ms_cm or p.kappa_ref_ms_cm)),
        throughput_ah=zeros.copy(),
        ageing_factor=factors["ageing_factor"],
        capacity_factor=factors["capacity_factor"],
        charge_ah=zeros.copy(),
        terminal_wh=zeros.copy(),
        heat_j=zeros.copy(),
    )


def cell_variation(
    n: int,
    seed: int | Sequence[int],
    *,
    ageing_spread: float = 0.0,
    capacity_spread: float = 0.0,
) -> tuple[FloatArray, FloatArray]:
    """Per-cell ``(ageing_factor, capacity_factor)`` of ``n`` cells of one design.

    The ageing factor is log-normal with median 1 (``ageing_spread`` is the standard
    deviation of its natural log: 0.3 gives rates from about 0.55x to 1.8x, 2 sigma),
    since rates are positive and spread multiplicatively; the capacity factor is normal
    around 1 with standard deviation ``capacity_spread`` (about 0.005-0.01 for
    commercial cells), clipped to 3 sigma. Zero spreads give identical cells.
    """
    for name, value in (("ageing_spread", ageing_spread), ("capacity_spread", capacity_spread)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be within 0..1, got {value!r}")
    rng = np.random.default_rng(seed)
    ageing = np.exp(ageing_spread * rng.standard_normal(n))
    capacity = 1.0 + capacity_spread * np.clip(rng.standard_normal(n), -3.0, 3.0)
    return np.asarray(ageing), np.asarray(capacity)


def _u_graphite(x: FloatArray) -> FloatArray:
    """Graphite-SiOx open-circuit potential vs Li (Chen 2020), V."""
    return np.asarray(
        1.9793 * np.exp(-39.3631 * x)
        + 0.2482
        - 0.0909 * np.tanh(29.8538 * (x - 0.1234))
        - 0.04478 * np.tanh(14.9159 * (x - 0.2769))
        - 0.0205 * np.tanh(30.4444 * (x - 0.6103)),
        dtype=np.float64,
    )


def _u_nmc811(y: FloatArray) -> FloatArray:
    """NMC811 open-circuit potential vs Li (Chen 2020), V."""
    return np.asarray(
        -0.8090 * y
        + 4.4875
        - 0.0428 * np.tanh(18.5138 * (y - 0.5542))
        - 17.7326 * np.tanh(15.7890 * (y - 0.3117))
        + 17.5842 * np.tanh(15.9308 * (y - 0.3120)),
        dtype=np.float64,
    )


def entropic_coefficient(soc: FloatArray | float) -> FloatArray:
    """dOCV/dT in V/K: about +0.1 mV/K when empty to -0.1 mV/K when full."""
    s = np.minimum(np.maximum(np.asarray(soc, dtype=np.float64), 0.0), 1.0)
    return np.asarray(1.0e-4 * (1.0 - 2.0 * s), dtype=np.float64)


def ocv(soc: FloatArray | float, temp_c: FloatArray | float = 25.0) -> FloatArray:
    """Open-circuit voltage in V at state of charge ``soc`` and temperature ``temp_c``."""
    # A little beyond 0..1 stays physical (the graphite potential shoots up when empty);
    # further out is clipped so that a runaway never produces inf/nan.
    s = np.clip(np.asarray(soc, dtype=np.float64), -0.02, 1.02)
    x = X_0 + s * (X_100 - X_0)
    y = Y_0 + s * (Y_100 - Y_0)
    dt = np.asarray(temp_c, dtype=np.float64) - 25.0
    return np.asarray(_u_nmc811(y) - _u_graphite(x) + entropic_coefficient(s) * dt)


# The 25 C OCV tabulated finely for the integrator: np.interp is one call instead of
# ~30 array operations, and linear interpolation on a 0.0005 SOC grid stays within
# 0.1 mV of the analytic curve (and keeps it monotonic).
_OCV_GRID = np.linspace(-0.02, 1.02, 2081)
_OCV_TABLE = ocv(_OCV_GRID)


def _ocv_fast(soc: FloatArray, temp_c: FloatArray, dudt: FloatArray) -> FloatArray:
    return np.asarray(np.interp(soc, _OCV_GRID, _OCV_TABLE) + dudt * (temp_c - 25.0))


def _inv_t(temp_c: FloatArray) -> FloatArray:
    """(1/T - 1/T_ref)/R: the Arrhenius exponent per J/mol of activation energy."""
    return np.asarray((1.0 / (temp_c + 273.15) - 1.0 / T_REF_K) / R_GAS)


def _arrhenius(ea_j_mol: float, temp_c: FloatArray) -> FloatArray:
    return np.asarray(np.exp(ea_j_mol * _inv_t(temp_c)))


def efc(state: CellState, params: CellParams) -> FloatArray:
    """Full equivalent cycles so far (of each cell's own fresh capacity)."""
    return np.asarray(state.throughput_ah / (2.0 * params.capacity_ah * state.capacity_factor))


def capacity_ah(state: CellState, params: CellParams) -> FloatArray:
    """Present (faded) capacity of each cell, Ah."""
    fade = params.fade_per_efc * state.ageing_factor * efc(state, params)
    return np.asarray(params.capacity_ah * state.capacity_factor * np.maximum(0.2, 1.0 - fade))


def resistances(state: CellState, params: CellParams) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(R0, R1, R2) in ohm at each cell's temperature, electrolyte and age."""
    inv = _inv_t(state.temp_c)
    kappa_ratio = params.kappa_ref_ms_cm / np.maximum(state.kappa_ms_cm, KAPPA_MIN)
    growth = 1.0 + params.resistance_growth_per_efc * state.ageing_factor * efc(state, params)
    r0 = (
        params.r_ohmic_ohm * np.exp(params.ea_ohmic_j_mol * inv)
        + params.r_electrolyte_ohm * kappa_ratio * np.exp(params.ea_electrolyte_j_mol * inv)
    ) * growth
    r1 = params.r1_ohm * np.exp(params.ea_ct_j_mol * inv) * growth
    r2 = params.r2_ohm * (0.5 + 0.5 * kappa_ratio) * np.exp(params.ea_diffusion_j_mol * inv)
    return np.asarray(r0), np.asarray(r1), np.asarray(r2 * growth)


def terminal_voltage(state: CellState, params: CellParams, current_a: FloatArray) -> FloatArray:
    """Terminal voltage for an instantaneous current (discharge positive), V."""
    r0, _, _ = resistances(state, params)
    return np.asarray(ocv(state.soc, state.temp_c) - current_a * r0 - state.v1 - state.v2)


def _rc_heat_j(
    v0: FloatArray, v_inf: FloatArray, r: FloatArray, tau: float, a: float, dt: float
) -> FloatArray:
    """Energy dissipated in an RC pair's resistor over dt: integral of v(t)^2 / R."""
    d = v0 - v_inf
    return np.asarray(
        (v_inf**2 * dt + 2.0 * v_inf * d * tau * (1.0 - a) + d**2 * tau / 2.0 * (1.0 - a * a)) / r
    )


def step(
    state: CellState,
    control: Control,
    params: CellParams,
    env_c: float | FloatArray,
    dt: float,
) -> tuple[CellState, FloatArray, FloatArray]:
    """Advance every cell by ``dt`` s under ``control``.

    Returns ``(new_state, current_a, voltage_v)``: the current that flowed (discharge
    positive) and the terminal voltage at the end of the step. Pure: ``state`` is not
    modified.
    """
    r0, r1, r2 = resistances(state, params)
    a1 = math.exp(-dt / params.tau1_s)
    a2 = math.exp(-dt / params.tau2_s)
    dudt = entropic_coefficient(state.soc)
    u = _ocv_fast(state.soc, state.temp_c, dudt)  # (np.interp clamps beyond the grid)
    # End-of-step voltage is affine in I: V(I) = base - I * r_eff.
    base = u - state.v1 * a1 - state.v2 * a2
    r_eff = r0 + r1 * (1.0 - a1) + r2 * (1.0 - a2)
    i_at_limit = (base - control.voltage_v) / r_eff  # the current that lands on the limit
    i_dis = np.minimum(control.current_a, np.maximum(i_at_limit, 0.0))
    i_chg = np.maximum(-control.current_a, np.minimum(i_at_limit, 0.0))
    current = i_dis * (control.direction == DISCHARGE) + i_chg * (control.direction == CHARGE)

    v1 = state.v1 * a1 + r1 * (1.0 - a1) * current
    v2 = state.v2 * a2 + r2 * (1.0 - a2) * current
    voltage = base - current * r_eff

    cap = capacity_ah(state, params)
    # Only eta of the charging current ends up stored (side reactions take the rest).
    eta = 1.0 - (1.0 - params.coulombic_efficiency) * (current < 0.0)
    stored_ah = current * eta * (dt / 3600.0)
    soc = state.soc - stored_ah / cap

    t_k = state.temp_c + 273.15
    # Heat: mean power in each resistor over the step, integrating v(t)^2 / R exactly
    # along the RC pair's exponential (right at any dt, also across a long idle step).
    q_irr = (
        current**2 * r0
        + (
            _rc_heat_j(state.v1, r1 * current, r1, params.tau1_s, a1, dt)
            + _rc_heat_j(state.v2, r2 * current, r2, params.tau2_s, a2, dt)
        )
        / dt
    )
    q_rev = -current * t_k * dudt
    c_th = params.mass_kg * params.cp_j_kg_k
    env = np.asarray(env_c, dtype=np.float64)
    # Exact update of the linear cooling with the heat held over the step.
    tau_th = c_th / params.h_a_w_k
    t_inf = env + (q_irr + q_rev) / params.h_a_w_k
    temp = t_inf + (state.temp_c - t_inf) * math.exp(-dt / tau_th)

    new = CellState(
        soc=soc,
        v1=v1,
        v2=v2,
        temp_c=temp,
        throughput_ah=state.throughput_ah + np.abs(current) * dt / 3600.0,
        ageing_factor=state.ageing_factor,
        capacity_factor=state.capacity_factor,
        charge_ah=state.charge_ah + current * dt / 3600.0,
        terminal_wh=state.terminal_wh + current * voltage * dt / 3600.0,
        heat_j=state.heat_j + q_irr * dt,
        kappa_ms_cm=state.kappa_ms_cm,
    )
    return new, np.asarray(current), np.asarray(voltage)
