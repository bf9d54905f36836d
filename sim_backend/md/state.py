"""Batched MD state: many replicas in one set of flat tensors (torch-sim layout).

Atoms of all systems are concatenated; ``system_idx`` (sorted, contiguous) maps each atom to
its system. Units are ASE's: Å, eV, amu, and ASE time (``ase.units.fs`` per fs), so momenta are
amu·Å/ASE-time and kinetic energies come out in eV without conversion factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from ase import units

from sim_backend.errors import SimInputError

if TYPE_CHECKING:
    from ase import Atoms

    from sim_backend.md.neighbors_reuse import NeighborCache

KB_EV: float = float(units.kB)
"""Boltzmann constant in eV/K."""


@dataclass
class MDState:
    """One batch of replicas.

    Per atom: ``positions`` [N,3] (unwrapped, so MSDs need no image bookkeeping), ``momenta``
    [N,3], ``masses`` [N], ``numbers`` [N], ``forces`` [N,3], ``system_idx`` [N].
    Per system: ``cell`` [S,3,3] (rows are lattice vectors), ``pbc`` [S,3], ``charge`` [S],
    ``energy`` [S] (potential), ``step`` [S], ``alive`` [S], ``thermostat_energy`` [S]
    (energy the thermostat has put in, so ``E_pot + E_kin - thermostat_energy`` is conserved
    for every ensemble and one drift check serves NVE, CSVR and Langevin).
    """

    positions: torch.Tensor
    momenta: torch.Tensor
    masses: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_idx: torch.Tensor
    charge: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    step: torch.Tensor
    alive: torch.Tensor
    thermostat_energy: torch.Tensor
    n_atoms_per_system: torch.Tensor
    neighbors: NeighborCache | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def n_systems(self) -> int:
        """Number of replicas S."""
        return int(self.cell.shape[0])

    @property
    def n_atoms(self) -> int:
        """Total number of atoms N over all replicas."""
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        """Device every tensor lives on."""
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of positions, momenta, energies."""
        return self.positions.dtype

    @property
    def velocities(self) -> torch.Tensor:
        """Velocities [N,3] in Å per ASE time unit."""
        return self.momenta / self.masses.unsqueeze(-1)

    @property
    def alive_atoms(self) -> torch.Tensor:
        """Per-atom view of ``alive`` [N]."""
        return self.alive[self.system_idx]

    def replace(self, **changes: object) -> MDState:
        """Return a shallow copy with some fields changed (keeps step functions pure)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def sum_per_system(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Sum per-atom values ([N] or [N,k]) into [S] or [S,k] with one scatter."""
    out = torch.zeros((n_systems, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, system_idx, values)


def kinetic_energy(state: MDState) -> torch.Tensor:
    """Kinetic energy per system [S] in eV."""
    ke_atom = (state.momenta**2).sum(-1) / (2.0 * state.masses)
    return sum_per_system(ke_atom, state.system_idx, state.n_systems)


def degrees_of_freedom(state: MDState) -> torch.Tensor:
    """3N - 3 per system: the total momentum is removed at start and conserved after."""
    n = state.n_atoms_per_system.to(state.dtype)
    return torch.clamp(3.0 * n - 3.0, min=1.0)


def temperature(state: MDState) -> torch.Tensor:
    """Instantaneous kinetic temperature per system [S] in K."""
    return 2.0 * kinetic_energy(state) / (degrees_of_freedom(state) * KB_EV)


def maxwell_boltzmann_momenta(
    masses: torch.Tensor,
    system_idx: torch.Tensor,
    n_systems: int,
    temperature_k: float,
    seeds: Sequence[int],
) -> torch.Tensor:
    """Momenta [N,3] drawn per system from its own seeded generator, total momentum zeroed.

    One generator per system (seeded ``seeds[s]``) makes replica ``s`` of a batch identical
    to the same replica run alone with that seed, which the batched-vs-separate test relies on.
    The draw is rescaled so each system starts exactly at ``temperature_k``.
    """
    if temperature_k < 0:
        raise SimInputError(f"temperature_k must be >= 0, got {temperature_k}")
    if len(seeds) != n_systems:
        raise SimInputError(f"seeds: need {n_systems} seeds, got {len(seeds)}")
    counts = torch.bincount(system_idx, minlength=n_systems).tolist()
    chunks = []
    for s, n in enumerate(counts):
        gen = torch.Generator(device="cpu").manual_seed(int(seeds[s]))
        chunks.append(torch.randn((n, 3), generator=gen, dtype=torch.float64))
    z = torch.cat(chunks).to(device=masses.device, dtype=masses.dtype)
    p = z * torch.sqrt(masses * KB_EV * temperature_k).unsqueeze(-1)
    n_per = torch.tensor(counts, device=masses.device, dtype=masses.dtype)
    p_tot = sum_per_system(p, system_idx, n_systems)
    m_tot = sum_per_system(masses, system_idx, n_systems)
    # remove the centre-of-mass velocity, weighting by mass so sum(p) is exactly zero
    p = p - (p_tot / m_tot.unsqueeze(-1))[system_idx] * masses.unsqueeze(-1)
    ke = sum_per_system((p**2).sum(-1) / (2 * masses), system_idx, n_systems)
    target = 0.5 * torch.clamp(3.0 * n_per - 3.0, min=1.0) * KB_EV * temperature_k
    scale = torch.where(ke > 0, torch.sqrt(target / torch.clamp(ke, min=1e-300)), 0.0)
    return p * scale[system_idx].unsqueeze(-1)


def state_from_atoms(
    replicas: Sequence[Atoms],
    *,
    temperature_k: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    charges: Sequence[float] | None = None,
) -> MDState:
    """Batch a list of ``ase.Atoms`` into one :class:`MDState`.

    Momenta come from the Atoms when any replica carries non-zero ones, otherwise from a
    Maxwell-Boltzmann draw at ``temperature_k`` with replica ``s`` seeded ``seed + s``.
    Total charge per replica is ``charges[s]``, else ``atoms.info["total_charge"]``, else 0.
    Energy and forces are zero until an integrator's ``init`` evaluates the model.
    """
    if len(replicas) == 0:
        raise SimInputError("replicas: need at least one Atoms, got an empty list")
    if dtype not in (torch.float32, torch.float64):
        raise SimInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if charges is not None and len(charges) != len(replicas):
        raise SimInputError(f"charges: need {len(replicas)} values, got {len(charges)}")
    dev = torch.device(device)
    pos, mom, mass, num, sidx, cells, pbcs, q = [], [], [], [], [], [], [], []
    for s, atoms in enumerate(replicas):
        if len(atoms) < 2:
            raise SimInputError(f"replicas[{s}]: need at least 2 atoms, got {len(atoms)}")
        pos.append(np.asarray(atoms.positions, dtype=np.float64))
        mom.append(np.asarray(atoms.get_momenta(), dtype=np.float64))  # type: ignore[no-untyped-call]
        mass.append(np.asarray(atoms.get_masses(), dtype=np.float64))
        num.append(np.asarray(atoms.numbers, dtype=np.int64))
        sidx.append(np.full(len(atoms), s, dtype=np.int64))
        cells.append(np.asarray(atoms.cell.array, dtype=np.float64))
        pbcs.append(np.asarray(atoms.pbc, dtype=bool))
        if charges is not None:
            q.append(float(charges[s]))
        else:
            q.append(float(atoms.info.get("total_charge", 0.0)))

    def t(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dt, device=dev)

    positions = t(np.concatenate(pos), dtype)
    masses = t(np.concatenate(mass), dtype)
    system_idx = t(np.concatenate(sidx), torch.long)
    n_sys = len(replicas)
    momenta_np = np.concatenate(mom)
    if np.any(momenta_np != 0.0):
        momenta = t(momenta_np, dtype)
        # temperatures count 3N - 3 degrees of freedom: the centre of mass must not move
        # (a drifting box would also add a t^2 term to every MSD)
        p_tot = sum_per_system(momenta, system_idx, n_sys)
        m_tot = sum_per_system(masses, system_idx, n_sys)
        momenta = momenta - (p_tot / m_tot.unsqueeze(-1))[system_idx] * masses.unsqueeze(-1)
    else:
        momenta = maxwell_boltzmann_momenta(
            masses, system_idx, n_sys, temperature_k, [seed + s for s in range(n_sys)]
        )
    gen = torch.Generator(device=dev).manual_seed(seed + 7919 * n_sys)
    return MDState(
        positions=positions,
        momenta=momenta,
        masses=masses,
        numbers=t(np.concatenate(num), torch.long),
        cell=t(np.stack(cells), dtype),
        pbc=t(np.stack(pbcs), torch.bool),
        system_idx=system_idx,
        charge=t(np.asarray(q), dtype),
        energy=torch.zeros(n_sys, dtype=dtype, device=dev),
        forces=torch.zeros_like(positions),
        step=torch.zeros(n_sys, dtype=torch.long, device=dev),
        alive=torch.ones(n_sys, dtype=torch.bool, device=dev),
        thermostat_energy=torch.zeros(n_sys, dtype=dtype, device=dev),
        n_atoms_per_system=torch.bincount(system_idx, minlength=n_sys),
        generator=gen,
    )


def state_to_atoms(state: MDState, *, wrap: bool = False) -> list[Atoms]:
    """Split a batch back into ``ase.Atoms`` (positions, momenta, cell, pbc, charge)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    pos = state.positions.detach().cpu().double().numpy()
    mom = state.momenta.detach().cpu().double().numpy()
    num = state.numbers.cpu().numpy()
    cell = state.cell.detach().cpu().double().numpy()
    pbc = state.pbc.cpu().numpy()
    energy = state.energy.detach().cpu().double().numpy()
    forces = state.forces.detach().cpu().double().numpy()
    charge = state.charge.detach().cpu().double().numpy()
    bounds = np.concatenate([[0], np.cumsum(state.n_atoms_per_system.cpu().numpy())])
    out: list[Atoms] = []
    for s in range(state.n_systems):
        sl = slice(int(bounds[s]), int(bounds[s + 1]))
        atoms = Atoms(numbers=num[sl], positions=pos[sl], cell=cell[s], pbc=pbc[s])
        atoms.set_momenta(mom[sl])  # type: ignore[no-untyped-call]
        atoms.info["total_charge"] = float(charge[s])
        if wrap:
            atoms.wrap()  # type: ignore[no-untyped-call]
        atoms.calc = SinglePointCalculator(  # type: ignore[no-untyped-call]
            atoms, energy=float(energy[s]), forces=forces[sl]
        )
        out.append(atoms)
    return out
