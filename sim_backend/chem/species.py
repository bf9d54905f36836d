"""The electrolyte species table: solvents by SMILES, the LiPF6 ions, and their 3D structures.

Structures come from rdkit (ETKDG embedding, then an MMFF relaxation) with a fixed seed, so the
same name and seed always give the same geometry; xTB MD later moves them off the force-field
minimum. PF6- is built by hand (an ideal octahedron) because MMFF has no parameters for
hypervalent phosphorus, and Li+ is a single atom.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

from sim_backend.errors import SimInputError

if TYPE_CHECKING:
    from ase import Atoms

SpeciesKind = Literal["solvent", "cation", "anion"]

#: P-F bond length of PF6- (Å); GFN2-xTB relaxes it to about 1.63 Å.
PF6_BOND = 1.61


@dataclass(frozen=True)
class Species:
    """One electrolyte component: name, SMILES with explicit charge, total charge (e)."""

    name: str
    smiles: str
    charge: int
    kind: SpeciesKind
    description: str


SPECIES: dict[str, Species] = {
    s.name: s
    for s in (
        Species("EC", "O=C1OCCO1", 0, "solvent", "ethylene carbonate"),
        Species("PC", "CC1COC(=O)O1", 0, "solvent", "propylene carbonate"),
        Species("EMC", "CCOC(=O)OC", 0, "solvent", "ethyl methyl carbonate"),
        Species("DMC", "COC(=O)OC", 0, "solvent", "dimethyl carbonate"),
        Species("DEC", "CCOC(=O)OCC", 0, "solvent", "diethyl carbonate"),
        Species("Li+", "[Li+]", 1, "cation", "lithium ion"),
        Species("PF6-", "F[P-](F)(F)(F)(F)F", -1, "anion", "hexafluorophosphate"),
    )
}

SOLVENTS: tuple[str, ...] = tuple(n for n, s in SPECIES.items() if s.kind == "solvent")


def get_species(name: str) -> Species:
    """Look a species up by name; an unknown name is an input error that lists the known ones."""
    try:
        return SPECIES[name]
    except KeyError:
        known = ", ".join(SPECIES)
        raise SimInputError(f"species: unknown name {name!r} (known: {known})") from None


def species_charge(name: str) -> int:
    """Total charge of one molecule or ion of `name` (e)."""
    return get_species(name).charge


def molar_mass(name: str) -> float:
    """Molar mass (g/mol) from ASE's standard atomic masses, so it matches `Atoms.get_masses`."""
    return float(species_atoms(name).get_masses().sum())


def species_atoms(name: str, *, seed: int = 0) -> Atoms:
    """A 3D structure of `name`, centred at its centre of mass.

    `info` carries `species`, `total_charge` and `seed`. The result is a fresh copy: callers may
    move it freely.
    """
    get_species(name)
    atoms: Atoms = _species_atoms_cached(name, seed).copy()  # type: ignore[no-untyped-call]
    return atoms


@lru_cache(maxsize=64)
def _species_atoms_cached(name: str, seed: int) -> Atoms:
    from ase import Atoms

    sp = SPECIES[name]
    if name == "Li+":
        atoms = Atoms("Li", positions=[[0.0, 0.0, 0.0]])
    elif name == "PF6-":
        axes = np.concatenate([np.eye(3), -np.eye(3)]) * PF6_BOND
        atoms = Atoms("PF6", positions=np.vstack([np.zeros(3), axes]))
    else:
        atoms = _embed(sp.smiles, seed)
    atoms.positions -= atoms.get_center_of_mass()  # type: ignore[no-untyped-call]
    atoms.info.update(species=name, total_charge=sp.charge, seed=seed)
    return atoms


def _embed(smiles: str, seed: int) -> Atoms:
    """ETKDG conformer + MMFF relaxation of a neutral closed-shell molecule."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom, rdForceFieldHelpers

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = int(seed) % (2**31)  # type: ignore[assignment]  # rdkit's stub is wrong
    if rdDistGeom.EmbedMolecule(mol, params) != 0:
        raise SimInputError(f"smiles: rdkit could not embed {smiles!r} (seed {seed})")
    rdForceFieldHelpers.MMFFOptimizeMolecule(mol, maxIters=2000)
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    return Atoms(numbers=numbers, positions=mol.GetConformer().GetPositions())
