"""Batched integrators as pure ``(init, step)`` function pairs (torch-sim style).

Every step takes ``(state, model, dt_fs, ...)`` and returns a new :class:`MDState`; the input
state's tensors are not modified. ``model`` is any ``sim_backend.nn.potential.Potential``.

* NVE: velocity Verlet.
* CSVR (Bussi, Donadio, Parrinello, J. Chem. Phys. 126, 014101 (2007)): rescales the kinetic
  energy of each system towards a canonical draw; it perturbs single-particle dynamics very
  little, so it is the production thermostat for diffusion coefficients.
* Langevin BAOAB (Leimkuhler & Matthews 2013): strong, local coupling, for equilibration.

Replicas with ``alive == False`` are frozen: positions are not advanced and momenta stay zero.
Every ensemble records the energy its thermostat injects in ``thermostat_energy`` so that
``energy + kinetic - thermostat_energy`` is a conserved quantity for the drift check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from ase import units

from sim_backend.errors import SimInputError
from sim_backend.md.neighbors_reuse import build_neighbors, update_neighbors
from sim_backend.md.state import (
    KB_EV,
    MDState,
    degrees_of_freedom,
    kinetic_energy,
    sum_per_system,
)

if TYPE_CHECKING:
    from sim_backend.nn.potential import Potential


StepFn = Callable[..., MDState]


def _dt(dt_fs: float) -> float:
    if not (dt_fs > 0 and math.isfinite(dt_fs)):
        raise SimInputError(f"timestep_fs must be a positive number, got {dt_fs}")
    return float(dt_fs) * float(units.fs)


def compute_forces(state: MDState, model: Potential) -> MDState:
    """Energy and forces at ``state.positions``, reusing (or updating) the neighbour cache."""
    from sim_backend.nn.evaluate import evaluate
    from sim_backend.nn.neighbors import NeighborList

    if state.neighbors is None:
        raise SimInputError("state.neighbors is None: call an integrator's init first")
    cache = update_neighbors(
        state.neighbors, state.positions, state.cell, state.pbc, state.system_idx, state.n_systems
    )
    # the cached list reaches cutoff + skin; hand the model only pairs inside its cutoff,
    # since its cost scales with the number of edges ((1 + skin/cutoff)^3 more otherwise)
    i, j = cache.edge_index[0], cache.edge_index[1]
    vec = state.positions[j] - state.positions[i] + cache.shifts
    inside = (vec * vec).sum(-1) < cache.cutoff * cache.cutoff
    out = evaluate(
        model,
        state.positions,
        state.numbers,
        state.cell,
        state.pbc,
        state.system_idx,
        neighbors=NeighborList(
            edge_index=cache.edge_index[:, inside], cell_offsets=cache.cell_offsets[inside]
        ),
        charge=state.charge,
        forces=True,
        stress=False,
    )
    assert out.forces is not None
    alive_a = state.alive_atoms.unsqueeze(-1)
    forces = torch.where(alive_a, out.forces.detach(), torch.zeros_like(out.forces))
    energy = torch.where(state.alive, out.energy.detach(), state.energy)
    return state.replace(energy=energy, forces=forces, neighbors=cache)


def md_init(state: MDState, model: Potential, *, skin: float = 1.0) -> MDState:
    """Build the neighbour cache (radius ``model.cutoff + skin``) and evaluate forces.

    ``skin`` (Å) trades list size against rebuild frequency; 1 Å rebuilds a 300 K liquid
    every few tens of 1 fs steps.
    """
    cutoff = float(getattr(model, "cutoff", 0.0))
    if cutoff <= 0:
        raise SimInputError(f"model.cutoff must be > 0, got {cutoff}")
    try:
        param = next(model.parameters())
    except StopIteration:
        param = None
    if param is not None and param.dtype != state.dtype:
        raise SimInputError(
            f"dtype: model parameters are {param.dtype} but state is {state.dtype}; "
            "convert one with .to(dtype)"
        )
    cache = build_neighbors(
        state.positions,
        state.cell,
        state.pbc,
        state.system_idx,
        state.n_systems,
        cutoff=cutoff,
        skin=skin,
    )
    return compute_forces(state.replace(neighbors=cache), model)


def _kick(state: MDState, dt: float) -> torch.Tensor:
    p = state.momenta + state.forces * dt
    return torch.where(state.alive_atoms.unsqueeze(-1), p, torch.zeros_like(p))


def _drift(state: MDState, dt: float) -> torch.Tensor:
    x = state.positions + state.velocities * dt
    return torch.where(state.alive_atoms.unsqueeze(-1), x, state.positions)


def _advance_step(state: MDState) -> torch.Tensor:
    return state.step + state.alive.long()


def nve_init(state: MDState, model: Potential, *, skin: float = 1.0) -> MDState:
    """Initialise for NVE (see :func:`md_init`)."""
    return md_init(state, model, skin=skin)


def nve_step(state: MDState, model: Potential, dt_fs: float) -> MDState:
    """One velocity-Verlet step of ``dt_fs`` femtoseconds for every live replica."""
    dt = _dt(dt_fs)
    s = state.replace(momenta=_kick(state, 0.5 * dt))
    s = s.replace(positions=_drift(s, dt))
    s = compute_forces(s, model)
    return s.replace(momenta=_kick(s, 0.5 * dt), step=_advance_step(state))


def _check_thermostat(temperature_k: float, name: str, value: float) -> None:
    if not (temperature_k >= 0 and math.isfinite(temperature_k)):
        raise SimInputError(f"temperature_k must be >= 0, got {temperature_k}")
    if not (value >= 0 and math.isfinite(value)):
        raise SimInputError(f"{name} must be >= 0, got {value}")


def _first_atoms(state: MDState) -> torch.Tensor:
    n = state.n_atoms_per_system
    return torch.cumsum(n, 0) - n


def csvr_rescale(state: MDState, dt_fs: float, temperature_k: float, tau_fs: float) -> MDState:
    """Bussi's stochastic kinetic-energy rescaling over ``dt_fs``, per system.

    The chi-squared sum over Ndf-1 Gaussians is drawn as explicit Gaussians (one per atom
    component, minus four per system) so one seeded ``torch.Generator`` drives it on any device.
    """
    _check_thermostat(temperature_k, "tau_fs", tau_fs)
    k = kinetic_energy(state)
    ndf = degrees_of_freedom(state)
    k_target = 0.5 * ndf * KB_EV * temperature_k
    c = math.exp(-dt_fs / tau_fs) if tau_fs > 0 else 0.0
    r = torch.randn(
        state.positions.shape, generator=state.generator, dtype=state.dtype, device=state.device
    )
    sq = (r**2).sum(-1)
    first = _first_atoms(state)
    r1 = r[first, 0]
    rest = sum_per_system(sq, state.system_idx, state.n_systems) - sq[first] - r[first + 1, 0] ** 2
    k_new = (
        c * k
        + (1.0 - c) * k_target / ndf * (r1**2 + rest)
        + 2.0 * r1 * torch.sqrt(torch.clamp(c * (1.0 - c) * k * k_target / ndf, min=0.0))
    )
    alpha = torch.sqrt(torch.clamp(k_new, min=0.0) / torch.clamp(k, min=1e-300))
    alpha = torch.where(state.alive & (k > 0), alpha, torch.ones_like(alpha))
    momenta = state.momenta * alpha[state.system_idx].unsqueeze(-1)
    de = torch.where(state.alive, (alpha**2 - 1.0) * k, torch.zeros_like(k))
    return state.replace(momenta=momenta, thermostat_energy=state.thermostat_energy + de)


def csvr_init(state: MDState, model: Potential, *, skin: float = 1.0) -> MDState:
    """Initialise for CSVR (see :func:`md_init`)."""
    return md_init(state, model, skin=skin)


def csvr_step(
    state: MDState,
    model: Potential,
    dt_fs: float,
    *,
    temperature_k: float,
    tau_fs: float = 100.0,
) -> MDState:
    """Velocity Verlet wrapped by two half-step CSVR rescalings (time-symmetric splitting).

    ``tau_fs`` is the kinetic-energy relaxation time; 100 fs to 1 ps leaves diffusion
    essentially unperturbed (Bussi et al. 2007).
    """
    s = csvr_rescale(state, 0.5 * dt_fs, temperature_k, tau_fs)
    s = nve_step(s, model, dt_fs)
    return csvr_rescale(s, 0.5 * dt_fs, temperature_k, tau_fs)


def langevin_init(state: MDState, model: Potential, *, skin: float = 1.0) -> MDState:
    """Initialise for Langevin (see :func:`md_init`)."""
    return md_init(state, model, skin=skin)


def langevin_step(
    state: MDState,
    model: Potential,
    dt_fs: float,
    *,
    temperature_k: float,
    friction_per_fs: float = 0.01,
) -> MDState:
    """One BAOAB Langevin step; ``friction_per_fs`` is gamma in 1/fs (0.01 = 100 fs damping).

    The centre-of-mass momentum of each system is removed after the O step so the 3N-3
    degrees of freedom used for the temperature stay exact.
    """
    _check_thermostat(temperature_k, "friction_per_fs", friction_per_fs)
    dt = _dt(dt_fs)
    alive_a = state.alive_atoms.unsqueeze(-1)
    s = state.replace(momenta=_kick(state, 0.5 * dt))
    s = s.replace(positions=_drift(s, 0.5 * dt))
    k_before = kinetic_energy(s)
    c1 = math.exp(-friction_per_fs * dt_fs)
    r = torch.randn(s.positions.shape, generator=s.generator, dtype=s.dtype, device=s.device)
    sigma = torch.sqrt((1.0 - c1 * c1) * s.masses * KB_EV * temperature_k).unsqueeze(-1)
    p = c1 * s.momenta + sigma * r
    p_tot = sum_per_system(p, s.system_idx, s.n_systems)
    m_tot = sum_per_system(s.masses, s.system_idx, s.n_systems)
    p = p - (p_tot / m_tot.unsqueeze(-1))[s.system_idx] * s.masses.unsqueeze(-1)
    p = torch.where(alive_a, p, torch.zeros_like(p))
    s = s.replace(momenta=p)
    de = torch.where(s.alive, kinetic_energy(s) - k_before, torch.zeros_like(k_before))
    s = s.replace(thermostat_energy=s.thermostat_energy + de)
    s = s.replace(positions=_drift(s, 0.5 * dt))
    s = compute_forces(s, model)
    return s.replace(momenta=_kick(s, 0.5 * dt), step=_advance_step(state))


def conserved_energy(state: MDState) -> torch.Tensor:
    """E_pot + E_kin - thermostat work per system [S]; constant up to integration error."""
    return state.energy + kinetic_energy(state) - state.thermostat_energy
