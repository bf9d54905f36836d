"""Replica stability monitoring in the spirit of Fu et al. (2022, "Forces are not enough").

A replica is stopped (``alive=False``: frozen, never averaged into properties) and flagged with
the reason and step when any of these happens:

* ``non-finite``: a force, energy or position is NaN/inf;
* ``bond``: a covalent bond of the reference connectivity (from t=0) is longer or shorter than
  its reference length by more than ``max_bond_deviation`` Å (0.5 Å as in Fu et al.);
* ``energy-drift``: the conserved energy (``E_pot + E_kin - thermostat work``) drifted by more
  than ``max_energy_drift_per_atom`` eV/atom from its start value. Every integrator here tracks
  its thermostat's work, so this check is valid in NVE, CSVR and Langevin alike.

Bonds are pairs closer than ``bond_scale * (r_cov_i + r_cov_j)`` at t=0 (ASE covalent radii),
excluding pairs with an alkali or alkaline-earth atom (Li+ coordination is ionic and may change).
The image offset of each bond is frozen at t=0 so unwrapped positions stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sim_backend.errors import SimInputError
from sim_backend.md.integrators import conserved_energy
from sim_backend.md.state import MDState, state_to_atoms

IONIC_ELEMENTS: frozenset[int] = frozenset({3, 4, 11, 12, 19, 20, 37, 38, 55, 56})
"""Li, Be, Na, Mg, K, Ca, Rb, Sr, Cs, Ba: their contacts are not covalent bonds."""


@dataclass
class ReferenceBonds:
    """Covalent bonds at t=0: atom pairs [2,B], image offsets [B,3], lengths [B], owner [B]."""

    pairs: torch.Tensor
    offsets: torch.Tensor
    length0: torch.Tensor
    bond_system: torch.Tensor


@dataclass(frozen=True)
class StabilityEvent:
    """Why and when one replica was stopped."""

    system: int
    step: int
    reason: str
    value: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "system": self.system,
            "step": self.step,
            "reason": self.reason,
            "value": self.value,
            "detail": self.detail,
        }


@dataclass
class StabilityMonitor:
    """Thresholds plus the t=0 references; :func:`check_stability` applies them."""

    bonds: ReferenceBonds
    energy0: torch.Tensor
    max_bond_deviation: float = 0.5
    max_energy_drift_per_atom: float = 0.05
    events: list[StabilityEvent] = field(default_factory=list)

    def report(self, n_systems: int) -> dict[str, Any]:
        """JSON-able summary: counts, stable fraction, one entry per stopped replica."""
        stopped = sorted({e.system for e in self.events})
        return {
            "n_replicas": n_systems,
            "n_stable": n_systems - len(stopped),
            "stable_fraction": (n_systems - len(stopped)) / n_systems if n_systems else 0.0,
            "max_bond_deviation_A": self.max_bond_deviation,
            "max_energy_drift_eV_per_atom": self.max_energy_drift_per_atom,
            "stopped": [e.to_dict() for e in self.events],
        }


def reference_bonds(state: MDState, *, bond_scale: float = 1.2) -> ReferenceBonds:
    """Covalent connectivity of every replica at the current positions."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    if bond_scale <= 0:
        raise SimInputError(f"bond_scale must be > 0, got {bond_scale}")
    starts = (torch.cumsum(state.n_atoms_per_system, 0) - state.n_atoms_per_system).tolist()
    ii, jj, ss, dd, sys_ = [], [], [], [], []
    for s, atoms in enumerate(state_to_atoms(state)):
        radii = bond_scale * covalent_radii[atoms.numbers]
        i, j, shift, d = neighbor_list("ijSd", atoms, radii.tolist())  # type: ignore[no-untyped-call]
        z = atoms.numbers
        keep = (i < j) & ~np.isin(z[i], list(IONIC_ELEMENTS)) & ~np.isin(z[j], list(IONIC_ELEMENTS))
        ii.append(i[keep] + starts[s])
        jj.append(j[keep] + starts[s])
        ss.append(shift[keep])
        dd.append(d[keep])
        sys_.append(np.full(int(keep.sum()), s))
    dev, dt = state.device, state.dtype
    return ReferenceBonds(
        pairs=torch.as_tensor(np.stack([np.concatenate(ii), np.concatenate(jj)]), device=dev),
        offsets=torch.as_tensor(np.concatenate(ss), dtype=dt, device=dev).reshape(-1, 3),
        length0=torch.as_tensor(np.concatenate(dd), dtype=dt, device=dev),
        bond_system=torch.as_tensor(np.concatenate(sys_), dtype=torch.long, device=dev),
    )


def bond_lengths(state: MDState, bonds: ReferenceBonds) -> torch.Tensor:
    """Current lengths [B] of the reference bonds."""
    i, j = bonds.pairs[0], bonds.pairs[1]
    shift = torch.einsum("bk,bkl->bl", bonds.offsets, state.cell[bonds.bond_system])
    out: torch.Tensor = torch.linalg.norm(state.positions[j] - state.positions[i] + shift, dim=-1)
    return out


def make_monitor(
    state: MDState,
    *,
    max_bond_deviation: float = 0.5,
    max_energy_drift_per_atom: float = 0.05,
    bond_scale: float = 1.2,
) -> StabilityMonitor:
    """Record t=0 bonds and conserved energy of an initialised state (forces evaluated)."""
    if max_bond_deviation <= 0:
        raise SimInputError(f"max_bond_deviation must be > 0, got {max_bond_deviation}")
    if max_energy_drift_per_atom <= 0:
        raise SimInputError(
            f"max_energy_drift_per_atom must be > 0, got {max_energy_drift_per_atom}"
        )
    return StabilityMonitor(
        bonds=reference_bonds(state, bond_scale=bond_scale),
        energy0=conserved_energy(state).detach().clone(),
        max_bond_deviation=max_bond_deviation,
        max_energy_drift_per_atom=max_energy_drift_per_atom,
    )


def check_stability(
    state: MDState,
    monitor: StabilityMonitor,
    *,
    fallback_positions: torch.Tensor | None = None,
    fallback_cell: torch.Tensor | None = None,
) -> MDState:
    """Stop and flag replicas that fail a criterion; returns the state with ``alive`` updated.

    Newly stopped replicas get zero momenta and, if ``fallback_positions`` (the last checked,
    finite positions) is given, those positions, so a frozen replica never feeds NaNs or
    exploded coordinates to the neighbour builder; ``fallback_cell`` (the cells at that
    check) goes with them, since a barostat may have moved the cell since. Events are
    appended to ``monitor.events``.
    """
    n_sys = state.n_systems
    sidx = state.system_idx
    bad_atom = ~(torch.isfinite(state.forces).all(-1) & torch.isfinite(state.positions).all(-1))
    n_bad = torch.zeros(n_sys, dtype=torch.long, device=state.device)
    n_bad = n_bad.index_add(0, sidx, bad_atom.long())
    nonfinite = (n_bad > 0) | ~torch.isfinite(state.energy)

    b = monitor.bonds
    dev_b = torch.abs(bond_lengths(state, b) - b.length0)
    dev_b = torch.nan_to_num(dev_b, nan=float("inf"))
    max_dev = torch.zeros(n_sys, dtype=state.dtype, device=state.device)
    if dev_b.numel():
        max_dev = max_dev.scatter_reduce(0, b.bond_system, dev_b, reduce="amax")
    bond_bad = max_dev > monitor.max_bond_deviation

    drift = torch.abs(conserved_energy(state) - monitor.energy0) / state.n_atoms_per_system
    drift = torch.nan_to_num(drift, nan=float("inf"))
    drift_bad = drift > monitor.max_energy_drift_per_atom

    newly = state.alive & (nonfinite | bond_bad | drift_bad)
    if not bool(newly.any()):
        return state
    steps = state.step.tolist()
    for s in torch.nonzero(newly).squeeze(1).tolist():
        if bool(nonfinite[s]):
            ev = StabilityEvent(s, steps[s], "non-finite", float("nan"), "forces/energy/positions")
        elif bool(bond_bad[s]):
            mask = b.bond_system == s
            k = int(torch.argmax(torch.where(mask, dev_b, torch.zeros_like(dev_b))))
            pair = b.pairs[:, k].tolist()
            ev = StabilityEvent(
                s, steps[s], "bond", float(max_dev[s]), f"atoms {pair[0]}-{pair[1]}"
            )
        else:
            ev = StabilityEvent(s, steps[s], "energy-drift", float(drift[s]), "eV/atom")
        monitor.events.append(ev)
    alive = state.alive & ~newly
    dead_a = newly[sidx].unsqueeze(-1)
    positions = state.positions
    if fallback_positions is not None:
        positions = torch.where(dead_a, fallback_positions, positions)
    cell = state.cell
    if fallback_cell is not None:
        cell = torch.where(newly[:, None, None], fallback_cell, cell)
    momenta = torch.where(dead_a, torch.zeros_like(state.momenta), state.momenta)
    forces = torch.where(dead_a, torch.zeros_like(state.forces), state.forces)
    return state.replace(
        alive=alive, positions=positions, cell=cell, momenta=momenta, forces=forces
    )
