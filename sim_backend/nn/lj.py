"""A Lennard-Jones reference potential: analytic, cheap, used to test MD and evaluate."""

from __future__ import annotations

import torch
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.nn.potential import Potential, edge_vectors

__all__ = ["LennardJones"]


class LennardJones(Potential):
    """12-6 Lennard-Jones, energy-shifted so E(cutoff) = 0 (continuous energy).

    Every species interacts with the same ``epsilon`` (eV) and ``sigma`` (Å); defaults
    are argon's. Forces jump by a tiny amount at the cutoff (shifted energy, not shifted
    force), as in most MD codes; use ``cutoff`` >= 2.5 sigma.
    """

    def __init__(
        self,
        epsilon: float = 0.0104,
        sigma: float = 3.40,
        cutoff: float = 8.5,
        species: tuple[int, ...] = tuple(range(1, 119)),
        shift: bool = True,
    ) -> None:
        if epsilon <= 0:
            raise SimInputError(f"epsilon must be > 0 eV, got {epsilon!r}")
        if sigma <= 0:
            raise SimInputError(f"sigma must be > 0 Å, got {sigma!r}")
        if cutoff <= sigma:
            raise SimInputError(f"cutoff must exceed sigma ({sigma} Å), got {cutoff!r}")
        super().__init__(cutoff, species)
        self.epsilon = float(epsilon)
        self.sigma = float(sigma)
        sr6 = (sigma / cutoff) ** 6
        self.e_shift = 4.0 * epsilon * (sr6 * sr6 - sr6) if shift else 0.0

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
        """Sum of pair energies per system; the full list counts each pair twice."""
        vec = edge_vectors(positions, cell, system_idx, edge_index, cell_offsets)
        r2 = (vec * vec).sum(-1)
        sr6 = (self.sigma * self.sigma / r2) ** 3
        pair = 4.0 * self.epsilon * (sr6 * sr6 - sr6) - self.e_shift
        pair = torch.where(r2 < self.cutoff * self.cutoff, pair, torch.zeros_like(pair))
        energy = torch.zeros(n_systems, dtype=positions.dtype, device=positions.device)
        return 0.5 * energy.index_add(0, system_idx[edge_index[0]], pair)
