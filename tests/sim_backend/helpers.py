"""Structures and checks shared by the sim_backend model tests (the moment model and MACE)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from ase import Atoms

from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.potential import Potential

F64 = torch.float64


def as_batch(
    systems: Sequence[Atoms], dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype)
    numbers = torch.tensor(np.concatenate([a.numbers for a in systems]), dtype=torch.long)
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), dtype=dtype)
    pbc = torch.tensor(np.stack([a.pbc for a in systems]))
    sidx = torch.cat([torch.full((len(a),), k) for k, a in enumerate(systems)])
    return pos, numbers, cell, pbc, sidx


def molecule(
    rng: np.random.Generator,
    n: int = 12,
    spread: float = 2.5,
    species: Sequence[int] = (1, 3, 6, 8, 9),
) -> Atoms:
    """A random compact cluster with realistic minimum distances (> 0.9 Å)."""
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(-spread, spread, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    return Atoms(numbers=rng.choice(list(species), size=n), positions=np.array(pos))


def assert_forces_match_finite_differences(
    model: Potential, atoms: Atoms, components: Sequence[tuple[int, int]], h: float = 1e-5
) -> None:
    """Forces (autograd) at ``components`` (atom, axis) equal central differences of the
    energy to 1e-7 eV/Å, with a total charge of +1 so that the charge input is exercised."""
    pos, z, cell, pbc, sidx = as_batch([atoms])
    charge = torch.tensor([1.0], dtype=F64)
    out = evaluate(model, pos, z, cell, pbc, sidx, charge=charge)
    assert out.forces is not None
    for atom, axis in components:
        plus, minus = pos.clone(), pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        ep = evaluate(model, plus, z, cell, pbc, sidx, charge=charge, forces=False).energy
        em = evaluate(model, minus, z, cell, pbc, sidx, charge=charge, forces=False).energy
        fd = -(float(ep[0]) - float(em[0])) / (2 * h)
        assert float(out.forces[atom, axis]) == pytest.approx(fd, abs=1e-7)
