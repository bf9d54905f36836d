"""Verlet-skin neighbour lists reused across MD steps, rebuilt per system when needed.

The list is built with ``cutoff + skin``; it stays exact while no atom of a system has moved
more than ``skin / 2`` since that system's last build (two atoms closing in at most ``skin``).
Only the systems that crossed the threshold are rebuilt, so a batch of 64 replicas does not
rebuild 64 times as often as one replica.

Positions in :class:`~sim_backend.md.state.MDState` are unwrapped. Before building, atoms are
wrapped into the cell and the integer image shifts are folded into ``cell_offsets``, so the
stored list is valid for the unwrapped coordinates and the neighbour builder never sees atoms
far outside the cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sim_backend.errors import SimInputError


@dataclass
class NeighborCache:
    """A neighbour list valid for unwrapped positions, with the data needed to reuse it.

    ``edge_index`` [2,E] and ``cell_offsets`` [E,3] follow ``sim_backend.nn.neighbors``;
    ``edge_system`` [E] says which system owns each edge; ``shifts`` [E,3] are
    ``cell_offsets @ cell`` in Å (the cell is fixed in NVE/NVT, so computed once per build);
    ``ref_positions`` [N,3] are the
    positions at each system's last build; ``n_builds`` counts builder calls and
    ``system_rebuilds`` [S] counts rebuilds per system (the initial build excluded).
    """

    edge_index: torch.Tensor
    cell_offsets: torch.Tensor
    edge_system: torch.Tensor
    shifts: torch.Tensor
    ref_positions: torch.Tensor
    cutoff: float
    skin: float
    n_builds: int
    system_rebuilds: torch.Tensor


def _wrap_shifts(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, system_idx: torch.Tensor
) -> torch.Tensor:
    """Integer image shifts s [N,3] with positions - s @ cell inside the cell (periodic axes)."""
    any_pbc = pbc.any(dim=1)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    safe = torch.where(any_pbc[:, None, None], cell, eye)
    inv = torch.linalg.inv(safe)
    frac = torch.einsum("ni,nij->nj", positions, inv[system_idx])
    shift = torch.floor(frac)
    shift = torch.where(pbc[system_idx], shift, torch.zeros_like(shift))
    # non-finite positions (a replica blowing up) must not poison the builder
    return torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0)


def _shifts(offsets: torch.Tensor, cell: torch.Tensor, edge_system: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ek,ekc->ec", offsets, cell[edge_system])


def _build(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    n_systems: int,
    cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from sim_backend.nn.neighbors import neighbor_list

    pos = torch.nan_to_num(positions.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    shift = _wrap_shifts(pos, cell, pbc, system_idx)
    wrapped = pos - torch.einsum("ni,nij->nj", shift, cell[system_idx])
    nl = neighbor_list(wrapped, cell, pbc, system_idx, cutoff)
    i, j = nl.edge_index[0], nl.edge_index[1]
    offsets = nl.cell_offsets.to(positions.dtype) + shift[i] - shift[j]
    del n_systems
    return nl.edge_index, offsets


def build_neighbors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    n_systems: int,
    *,
    cutoff: float,
    skin: float,
) -> NeighborCache:
    """Build a fresh cache for all systems with radius ``cutoff + skin``."""
    if cutoff <= 0:
        raise SimInputError(f"cutoff must be > 0, got {cutoff}")
    if skin < 0:
        raise SimInputError(f"skin must be >= 0, got {skin}")
    edge_index, offsets = _build(positions, cell, pbc, system_idx, n_systems, cutoff + skin)
    return NeighborCache(
        edge_index=edge_index,
        cell_offsets=offsets,
        edge_system=system_idx[edge_index[0]],
        shifts=_shifts(offsets, cell, system_idx[edge_index[0]]),
        ref_positions=positions.detach().clone(),
        cutoff=cutoff,
        skin=skin,
        n_builds=1,
        system_rebuilds=torch.zeros(n_systems, dtype=torch.long, device=positions.device),
    )


def systems_needing_rebuild(
    cache: NeighborCache, positions: torch.Tensor, system_idx: torch.Tensor, n_systems: int
) -> torch.Tensor:
    """Bool [S]: some atom of the system moved more than skin/2 since its last build.

    Non-finite displacements count as moved, so a blowing-up replica is rebuilt (with
    sanitised positions) rather than silently keeping a stale list.
    """
    d2 = ((positions.detach() - cache.ref_positions) ** 2).sum(-1)
    d2 = torch.nan_to_num(d2, nan=float("inf"))
    max_d2 = torch.zeros(n_systems, dtype=d2.dtype, device=d2.device)
    max_d2 = max_d2.scatter_reduce(0, system_idx, d2, reduce="amax", include_self=True)
    return max_d2 > (0.5 * cache.skin) ** 2


def update_neighbors(
    cache: NeighborCache,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    n_systems: int,
) -> NeighborCache:
    """Return ``cache`` unchanged, or a new one with the systems that need it rebuilt."""
    need = systems_needing_rebuild(cache, positions, system_idx, n_systems)
    if not bool(need.any()):
        return cache
    radius = cache.cutoff + cache.skin
    rebuilds = cache.system_rebuilds + need.long()
    if bool(need.all()):
        edge_index, offsets = _build(positions, cell, pbc, system_idx, n_systems, radius)
        return NeighborCache(
            edge_index=edge_index,
            cell_offsets=offsets,
            edge_system=system_idx[edge_index[0]],
            shifts=_shifts(offsets, cell, system_idx[edge_index[0]]),
            ref_positions=positions.detach().clone(),
            cutoff=cache.cutoff,
            skin=cache.skin,
            n_builds=cache.n_builds + 1,
            system_rebuilds=rebuilds,
        )
    atom_mask = need[system_idx]
    atom_ids = torch.nonzero(atom_mask).squeeze(1)
    compact = torch.cumsum(need.long(), 0) - 1
    sub_sidx = compact[system_idx[atom_ids]]
    n_sub = int(need.sum())
    sub_edges, sub_offsets = _build(
        positions[atom_ids], cell[need], pbc[need], sub_sidx, n_sub, radius
    )
    new_edges = atom_ids[sub_edges]
    keep = ~need[cache.edge_system]
    edge_index = torch.cat([cache.edge_index[:, keep], new_edges], dim=1)
    offsets = torch.cat([cache.cell_offsets[keep], sub_offsets], dim=0)
    edge_system = system_idx[edge_index[0]]
    ref = torch.where(atom_mask[:, None], positions.detach(), cache.ref_positions)
    return NeighborCache(
        edge_index=edge_index,
        cell_offsets=offsets,
        edge_system=edge_system,
        shifts=_shifts(offsets, cell, edge_system),
        ref_positions=ref,
        cutoff=cache.cutoff,
        skin=cache.skin,
        n_builds=cache.n_builds + 1,
        system_rebuilds=rebuilds,
    )
