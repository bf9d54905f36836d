"""Energy, forces and stress of a batch from any :class:`Potential`, by autograd.

Forces are -dE/dx. Stress uses the strain trick: positions and cell are deformed by
(I + eps) per system and stress = (1/V) dE/d(eps) at eps = 0 (eV/Å^3, ASE's sign:
positive = tensile), which is exact for any potential that goes through
:func:`sim_backend.nn.potential.edge_vectors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.nn.neighbors import NeighborList, neighbor_list
from sim_backend.nn.potential import Potential

__all__ = ["Output", "evaluate"]


@dataclass(frozen=True)
class Output:
    """Per-system energy [S] (eV), per-atom forces [N, 3] (eV/Å), stress [S, 3, 3] (eV/Å^3).

    Stress is zero for systems that are not periodic in all three directions.
    """

    energy: Tensor
    forces: Tensor | None
    stress: Tensor | None


def evaluate(
    model: Potential,
    positions: Tensor,
    numbers: Tensor,
    cell: Tensor,
    pbc: Tensor,
    system_idx: Tensor,
    *,
    neighbors: NeighborList | None = None,
    charge: Tensor | None = None,
    forces: bool = True,
    stress: bool = False,
    create_graph: bool = False,
) -> Output:
    """Evaluate ``model`` on a batch.

    ``neighbors=None`` builds the list (cutoff = ``model.cutoff``); MD passes a list built
    with a skin and reused. ``charge`` is the total charge per system [S] in e (default
    zeros: neutral). ``create_graph=True`` keeps the graph of the forces (for training on
    forces).
    """
    n_systems = int(cell.shape[0])
    if numbers.shape != (positions.shape[0],):
        raise SimInputError(
            f"numbers must have shape [N] = {(positions.shape[0],)}, got {tuple(numbers.shape)}"
        )
    if charge is None:
        charge = torch.zeros(n_systems, dtype=positions.dtype, device=positions.device)
    elif charge.shape != (n_systems,):
        raise SimInputError(
            f"charge must have shape [S] = {(n_systems,)}, got {tuple(charge.shape)}"
        )
    if neighbors is None:
        neighbors = neighbor_list(positions, cell, pbc, system_idx, model.cutoff)
    with torch.enable_grad():
        pos = positions if create_graph and positions.requires_grad else positions.detach()
        inputs: list[Tensor] = []
        if forces:
            pos = pos.requires_grad_(True) if not pos.requires_grad else pos
            inputs.append(pos)
        cel = cell
        if stress:
            eps = torch.zeros_like(cell, requires_grad=True)
            deform = torch.eye(3, dtype=cell.dtype, device=cell.device) + eps
            pos = torch.einsum("nc,ncd->nd", pos, deform[system_idx])
            cel = cell @ deform
            inputs.append(eps)
        energy = model(
            pos,
            numbers,
            cel,
            system_idx,
            neighbors.edge_index,
            neighbors.cell_offsets,
            n_systems,
            charge=charge,
        )
        if not inputs:
            return Output(
                energy=energy if create_graph else energy.detach(), forces=None, stress=None
            )
        grads = torch.autograd.grad(
            energy.sum(), inputs, create_graph=create_graph, allow_unused=True
        )
    f_out: Tensor | None = None
    s_out: Tensor | None = None
    k = 0
    if forces:
        g = grads[0]
        f_out = -g if g is not None else torch.zeros_like(positions)
        k = 1
    if stress:
        g = grads[k]
        virial = g if g is not None else torch.zeros_like(cell)
        volume = torch.linalg.det(cell).abs()
        periodic = pbc.to(device=cell.device).all(-1)
        safe_v = torch.where(periodic, volume, torch.ones_like(volume))
        sym = 0.5 * (virial + virial.transpose(1, 2)) / safe_v[:, None, None]
        s_out = torch.where(periodic[:, None, None], sym, torch.zeros_like(sym))
    if not create_graph:
        energy = energy.detach()
    return Output(energy=energy, forces=f_out, stress=s_out)
