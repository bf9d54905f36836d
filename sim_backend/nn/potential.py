"""The interface every potential implements (learned model, Lennard-Jones, MACE wrapper).

A potential maps a batch of systems plus a neighbour list to one total energy per
system (eV). Forces and stress are *not* its job: :func:`sim_backend.nn.evaluate.evaluate`
derives them by autograd, so each potential stays a pure, differentiable energy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Potential", "edge_vectors"]


def edge_vectors(
    positions: Tensor, cell: Tensor, system_idx: Tensor, edge_index: Tensor, cell_offsets: Tensor
) -> Tensor:
    """r_ij = positions[j] - positions[i] + cell_offsets @ cell[system_idx[i]], shape [E, 3]."""
    i, j = edge_index[0], edge_index[1]
    shift = torch.einsum(
        "ek,ekc->ec", cell_offsets, cell.index_select(0, system_idx.index_select(0, i))
    )
    return positions.index_select(0, j) - positions.index_select(0, i) + shift


class Potential(torch.nn.Module):
    """Base class: total energy per system from positions and a neighbour list.

    Subclasses set ``cutoff`` (Å) and ``species`` (atomic numbers they accept) and
    implement :meth:`forward`. ``charge`` is the total charge per system (e); potentials
    that ignore charge accept and ignore it. The neighbour list may be built with a
    larger radius than ``cutoff`` (MD adds a skin and reuses it), so a potential must give
    pairs beyond its cutoff exactly zero contribution.
    """

    cutoff: float
    species: tuple[int, ...]
    metadata: dict[str, Any]

    def __init__(self, cutoff: float, species: tuple[int, ...]) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.species = tuple(int(z) for z in species)
        self.metadata = {}  # filled from the model file by load_model

    def forward(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        system_idx: Tensor,
        edge_index: Tensor,
        cell_offsets: Tensor,
        n_systems: int,
        charge: Tensor | None = None,
    ) -> Tensor:
        """Total energy of each system, shape [n_systems], eV."""
        raise NotImplementedError
