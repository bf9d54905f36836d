"""Isotropic Monte Carlo barostat with molecular centre-of-mass scaling, batched over systems.

Chow & Ferguson, Comput. Phys. Commun. 91, 283 (1995); Åqvist, Wennerström, Nervall,
Bjelic & Brandsdal, Chem. Phys. Lett. 384, 288 (2004); what OpenMM's MonteCarloBarostat
does. Every live system proposes ln V' = ln V + max_dlnv * U(-1, 1); the cell is scaled by
s = (V'/V)^(1/3) and every molecule is translated rigidly so that its centre of mass scales
by s (bonds, angles and the intramolecular energy are untouched, so large volume moves are
accepted even with stiff bonds). The move is accepted with probability

    min(1, exp(-(dE + P dV - (N_mol + 1) kT ln(V'/V)) / kT))

where N_mol counts the molecules of the system: N_mol from the centre-of-mass coordinates
scaling with the box, +1 because the move is uniform in ln V rather than in V. The
stationary distribution is then V^N_mol exp(-(E + PV)/kT) dV, the isothermal-isobaric one
for molecular centres. Momenta are not touched, so the barostat is meant to be combined
with a thermostat (``ensemble="npt"`` in :func:`sim_backend.md.runner.simulate` uses CSVR).

All systems are evaluated in one batched model call per attempt (a fresh neighbour build
for the trial cells); acceptance is per system, so a batch of replicas behaves like the same
replicas run separately with the same random draws. Replicas with ``alive == False`` are
never moved.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from ase import units

from sim_backend.errors import SimInputError
from sim_backend.md.integrators import compute_forces
from sim_backend.md.neighbors_reuse import NeighborCache, build_neighbors
from sim_backend.md.state import KB_EV, MDState

if TYPE_CHECKING:
    from sim_backend.nn.potential import Potential

#: 1 atm in bar, the default target pressure.
ATM_BAR: float = 1.01325

#: OpenMM's adaptation window and band: after this many attempts a system whose acceptance
#: fell outside [ACCEPT_LOW, ACCEPT_HIGH] has its step scaled by 0.9 or 1.1.
ADAPT_EVERY: int = 10
ACCEPT_LOW: float = 0.25
ACCEPT_HIGH: float = 0.75

#: Largest allowed step in ln V: a box scaled by more than ~18 % in length in one move is
#: a sign of a broken setup, and the cap stops the adaptation from running away at P ~ 0.
MAX_DLNV_CAP: float = 0.5
#: ...and the smallest: a replica that accepts nothing for a long time keeps a usable step.
MIN_DLNV: float = 1e-6


def pressure_ev_per_a3(pressure_bar: float) -> float:
    """Convert bar (1 bar = 1e5 Pa) to eV/Å^3, ASE's pressure unit."""
    check_pressure(pressure_bar)
    return float(pressure_bar) * float(units.bar)


def check_pressure(pressure_bar: float) -> None:
    """Raise :class:`SimInputError` unless ``pressure_bar`` is finite and >= 0."""
    if not (math.isfinite(pressure_bar) and pressure_bar >= 0):
        raise SimInputError(f"pressure_bar must be a finite number >= 0, got {pressure_bar}")


def check_max_dlnv(max_dlnv: float | torch.Tensor, n_systems: int) -> None:
    """Raise :class:`SimInputError` unless ``max_dlnv`` is finite and > 0 (a number or [S])."""
    if isinstance(max_dlnv, torch.Tensor):
        if max_dlnv.shape not in ((), (n_systems,)):
            raise SimInputError(
                f"max_dlnv must be a number or have shape [S] = {(n_systems,)}, "
                f"got {tuple(max_dlnv.shape)}"
            )
        bad = ~(torch.isfinite(max_dlnv) & (max_dlnv > 0))
        if bool(bad.any()):
            raise SimInputError(f"max_dlnv must be finite and > 0, got {max_dlnv.tolist()}")
    elif not (math.isfinite(max_dlnv) and max_dlnv > 0):
        raise SimInputError(f"max_dlnv must be finite and > 0, got {max_dlnv}")


def cell_volumes(cell: torch.Tensor) -> torch.Tensor:
    """|det(cell)| per system [S] in Å^3."""
    volume: torch.Tensor = torch.linalg.det(cell).abs()
    return volume


def n_molecules_per_system(
    molecule_idx: torch.Tensor, system_idx: torch.Tensor, n_systems: int
) -> torch.Tensor:
    """Number of distinct molecules of each system [S] (long)."""
    _, first = _compact_molecules(molecule_idx)
    return torch.bincount(system_idx[first], minlength=n_systems)


def _compact_molecules(molecule_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Molecule ids relabelled 0..M-1 [N], and the index of one atom of each molecule [M]."""
    _, mol = torch.unique(molecule_idx, return_inverse=True)
    n_mol = int(mol.max()) + 1 if mol.numel() else 0
    atom = torch.arange(mol.numel(), device=mol.device)
    # the lowest atom index of each molecule is its reference atom (deterministic)
    first = torch.full((n_mol,), mol.numel(), dtype=torch.long, device=mol.device)
    first = first.scatter_reduce(0, mol, atom, reduce="amin", include_self=True)
    return mol, first


def scale_molecules(
    positions: torch.Tensor,
    masses: torch.Tensor,
    cell: torch.Tensor,
    system_idx: torch.Tensor,
    molecule_idx: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Positions [N,3] after scaling each molecule's centre of mass by ``scale`` [S].

    Each atom moves by (s - 1) * (COM + its image offset): for a whole molecule that is
    the same (s - 1) * COM shift for every atom, so intramolecular vectors are unchanged.
    Centres of mass are taken over minimum-image vectors to the molecule's first atom, so a
    molecule that the packer wrapped across a face (atoms on both sides) is still scaled as a
    unit: each atom keeps its image, which the new cell carries along, and bonds measured
    with t=0 image offsets (the stability monitor's) stay exactly as they were.
    """
    mol, first = _compact_molecules(molecule_idx)
    n_mol = int(first.shape[0])
    cell_a = cell[system_idx]
    # a singular cell (a dead non-periodic system, which is never scaled) gets the
    # identity: inv() of the whole batch would fail on it
    singular = torch.linalg.det(cell).abs() < 1e-12
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    inv = torch.linalg.inv(torch.where(singular[:, None, None], eye, cell))[system_idx]
    d = positions - positions[first][mol]
    frac = torch.einsum("ni,nij->nj", d, inv)
    image = torch.round(frac)
    # the nearest image is the molecule's own only while every atom lies within half a box
    # of the molecule's first atom; past that the rounding would tear the molecule apart
    spread = (frac - image).abs().amax() if frac.numel() else frac.new_zeros(())
    if float(spread) > 0.45:
        raise SimInputError(
            f"molecule_idx: a molecule spans {float(spread):.2f} of a box edge from its first "
            "atom (> 0.45); the box is too small for molecular scaling"
        )
    offset = torch.einsum("ni,nij->nj", image, cell_a)  # x - (whole-molecule x), [N,3]
    d_whole = d - offset
    m = masses.unsqueeze(-1)
    m_mol = torch.zeros(n_mol, dtype=masses.dtype, device=masses.device).index_add_(0, mol, masses)
    rel = torch.zeros((n_mol, 3), dtype=positions.dtype, device=positions.device)
    rel = rel.index_add_(0, mol, m * d_whole) / m_mol.unsqueeze(-1)
    com = positions[first] + rel  # [M,3]
    shift = (scale[system_idx] - 1.0).unsqueeze(-1) * (com[mol] + offset)
    return positions + shift


@dataclass
class BarostatStats:
    """Per-system step sizes and acceptance counters of the MC barostat.

    ``max_dlnv`` [S] is the current ln V step; ``window_attempted``/``window_accepted`` [S]
    count attempts since the last adaptation, ``attempted``/``accepted`` [S] over the run.
    """

    max_dlnv: torch.Tensor
    attempted: torch.Tensor
    accepted: torch.Tensor
    window_attempted: torch.Tensor
    window_accepted: torch.Tensor

    @property
    def acceptance(self) -> list[float]:
        """Acceptance ratio per system over the run (NaN before the first attempt)."""
        att = self.attempted.double()
        return (
            (self.accepted.double() / att.clamp(min=1.0)).masked_fill(att == 0, math.nan).tolist()
        )

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-able summary."""
        return {
            "max_dlnv": self.max_dlnv.double().tolist(),
            "attempted": self.attempted.tolist(),
            "accepted": self.accepted.tolist(),
            "acceptance": self.acceptance,
        }


def barostat_stats(state: MDState, max_dlnv: float | torch.Tensor = 0.01) -> BarostatStats:
    """Fresh counters for ``state``'s systems, the steps starting at ``max_dlnv`` (a number,
    or one per system [S], e.g. what an equilibration run adapted them to).

    0.01 in ln V (1 % of the volume, OpenMM's default start) suits a liquid box of a few
    hundred to a few thousand atoms; :func:`record_attempt` adapts it per system.
    """
    check_max_dlnv(max_dlnv, state.n_systems)
    zeros = torch.zeros(state.n_systems, dtype=torch.long, device=state.device)
    step = torch.as_tensor(max_dlnv, dtype=state.dtype, device=state.device)
    return BarostatStats(
        max_dlnv=step.expand(state.n_systems).clone(),
        attempted=zeros,
        accepted=zeros.clone(),
        window_attempted=zeros.clone(),
        window_accepted=zeros.clone(),
    )


def record_attempt(
    stats: BarostatStats,
    accepted: torch.Tensor,
    attempted: torch.Tensor,
    *,
    adapt_every: int = ADAPT_EVERY,
    adapt: bool = True,
) -> BarostatStats:
    """Count one attempt (``attempted`` [S]: systems that proposed a move) and adapt.

    After ``adapt_every`` attempts of a system, its step grows by 1.1 when more than
    ACCEPT_HIGH of them were accepted and shrinks by 0.9 below ACCEPT_LOW (OpenMM's rule),
    then its window restarts. Adaptation changes the proposal as the run goes, so the
    strict detailed balance holds only with ``adapt=False`` (use it for production
    averages once equilibrated).
    """
    if adapt_every < 1:
        raise SimInputError(f"adapt_every must be >= 1, got {adapt_every}")
    att = attempted.long()
    acc = (accepted & attempted).long()
    w_att = stats.window_attempted + att
    w_acc = stats.window_accepted + acc
    max_dlnv = stats.max_dlnv
    if adapt:
        full = w_att >= adapt_every
        ratio = w_acc.to(max_dlnv.dtype) / w_att.clamp(min=1).to(max_dlnv.dtype)
        factor = torch.where(
            ratio > ACCEPT_HIGH,
            torch.full_like(max_dlnv, 1.1),
            torch.where(
                ratio < ACCEPT_LOW, torch.full_like(max_dlnv, 0.9), torch.ones_like(max_dlnv)
            ),
        )
        stepped = (max_dlnv * factor).clamp(min=MIN_DLNV, max=MAX_DLNV_CAP)
        max_dlnv = torch.where(full, stepped, max_dlnv)
        w_att = torch.where(full, torch.zeros_like(w_att), w_att)
        w_acc = torch.where(full, torch.zeros_like(w_acc), w_acc)
    return BarostatStats(
        max_dlnv=max_dlnv,
        attempted=stats.attempted + att,
        accepted=stats.accepted + acc,
        window_attempted=w_att,
        window_accepted=w_acc,
    )


def _merge_caches(
    old: NeighborCache, trial: NeighborCache, take: torch.Tensor, state: MDState
) -> NeighborCache:
    """Edges of the accepted systems from ``trial``, of the others from ``old``.

    Both lists are exact for their own positions and cells, so the merge is the final
    state's list without a second build; shifts are recomputed for the final cells.
    """
    keep_old = ~take[old.edge_system]
    keep_new = take[trial.edge_system]
    edge_index = torch.cat([old.edge_index[:, keep_old], trial.edge_index[:, keep_new]], dim=1)
    offsets = torch.cat([old.cell_offsets[keep_old], trial.cell_offsets[keep_new]], dim=0)
    edge_system = state.system_idx[edge_index[0]]
    take_a = take[state.system_idx].unsqueeze(-1)
    return NeighborCache(
        edge_index=edge_index,
        cell_offsets=offsets,
        edge_system=edge_system,
        shifts=torch.einsum("ek,ekc->ec", offsets, state.cell[edge_system]),
        ref_positions=torch.where(take_a, trial.ref_positions, old.ref_positions),
        cutoff=old.cutoff,
        skin=old.skin,
        n_builds=old.n_builds + 1,
        system_rebuilds=old.system_rebuilds + take.long(),
    )


def mc_barostat_step(
    state: MDState,
    model: Potential,
    *,
    pressure_bar: float,
    temperature_k: float,
    molecule_idx: torch.Tensor,
    max_dlnv: float | torch.Tensor = 0.01,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[MDState, torch.Tensor]:
    """One Monte Carlo volume move for every live system; returns ``(state, accepted [S])``.

    ``molecule_idx`` [N] labels each atom's molecule (any integers, unique across systems,
    e.g. :func:`sim_backend.md.runner.molecules`); ``max_dlnv`` is a number or one per
    system [S]. Random numbers come from ``generator`` (default ``state.generator``) as two
    uniforms per system, or are given as ``uniforms`` [S,2] (proposal, acceptance), which
    makes a batched call reproducible system by system. Accepted systems take the trial
    positions, cell, energy and forces and their energy change is added to
    ``thermostat_energy`` (the conserved quantity stays continuous); rejected and dead
    systems keep every tensor bit for bit. Momenta are unchanged.
    """
    check_pressure(pressure_bar)
    if not (math.isfinite(temperature_k) and temperature_k > 0):
        raise SimInputError(f"temperature_k must be a finite number > 0, got {temperature_k}")
    n_sys = state.n_systems
    check_max_dlnv(max_dlnv, n_sys)
    if molecule_idx.shape != (state.n_atoms,):
        raise SimInputError(
            f"molecule_idx must have shape [N] = {(state.n_atoms,)}, "
            f"got {tuple(molecule_idx.shape)}"
        )
    molecule_idx = molecule_idx.to(state.device)
    mol, first = _compact_molecules(molecule_idx)
    if not torch.equal(state.system_idx, state.system_idx[first][mol]):
        raise SimInputError("molecule_idx: a molecule spans two systems; ids must be per system")
    live_pbc = state.pbc.all(dim=1) | ~state.alive
    if not bool(live_pbc.all()):
        bad = torch.nonzero(~live_pbc).squeeze(1).tolist()
        raise SimInputError(f"pbc: the barostat needs periodic x, y and z; systems {bad} are not")
    if state.neighbors is None:
        raise SimInputError("state.neighbors is None: call an integrator's init first")
    if uniforms is None:
        gen = generator if generator is not None else state.generator
        uniforms = torch.rand((n_sys, 2), generator=gen, dtype=state.dtype, device=state.device)
    elif uniforms.shape != (n_sys, 2):
        raise SimInputError(
            f"uniforms must have shape [S, 2] = {(n_sys, 2)}, got {tuple(uniforms.shape)}"
        )
    uniforms = uniforms.to(device=state.device, dtype=state.dtype)

    step = torch.as_tensor(max_dlnv, dtype=state.dtype, device=state.device).expand(n_sys)
    dlnv = step * (2.0 * uniforms[:, 0] - 1.0)
    dlnv = torch.where(state.alive, dlnv, torch.zeros_like(dlnv))  # dead: s = 1 exactly
    scale = torch.exp(dlnv / 3.0)
    trial_cell = state.cell * scale[:, None, None]
    trial_pos = scale_molecules(
        state.positions, state.masses, state.cell, state.system_idx, molecule_idx, scale
    )
    cache = state.neighbors
    trial_nl = build_neighbors(
        trial_pos, trial_cell, state.pbc, state.system_idx, n_sys,
        cutoff=cache.cutoff, skin=cache.skin,
    )  # fmt: skip
    trial = compute_forces(
        state.replace(positions=trial_pos, cell=trial_cell, neighbors=trial_nl), model
    )

    kt = KB_EV * float(temperature_k)
    p = pressure_ev_per_a3(pressure_bar)
    v_old = cell_volumes(state.cell)
    dv = v_old * torch.expm1(dlnv)
    n_mol = torch.bincount(state.system_idx[first], minlength=n_sys).to(state.dtype)
    de = trial.energy - state.energy
    w = de + p * dv - (n_mol + 1.0) * kt * dlnv
    # log-space comparison: no overflow for downhill moves; a NaN trial energy rejects
    accept = state.alive & (torch.log(uniforms[:, 1]) < -w / kt)

    if not bool(accept.any()):
        # nothing moved: the old list and every tensor stay as they are; the trial build
        # still counts as work done
        kept = dataclasses.replace(cache, n_builds=cache.n_builds + 1)
        return state.replace(neighbors=kept), accept
    acc_a = accept[state.system_idx].unsqueeze(-1)
    final_cell = torch.where(accept[:, None, None], trial_cell, state.cell)
    assert trial.neighbors is not None
    nl = _merge_caches(cache, trial.neighbors, accept, state.replace(cell=final_cell))
    return (
        state.replace(
            positions=torch.where(acc_a, trial.positions, state.positions),
            cell=final_cell,
            energy=torch.where(accept, trial.energy, state.energy),
            forces=torch.where(acc_a, trial.forces, state.forces),
            thermostat_energy=state.thermostat_energy + torch.where(accept, de, 0.0),
            neighbors=nl,
        ),
        accept,
    )
