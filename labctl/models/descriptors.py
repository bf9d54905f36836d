"""rdkit descriptors of the five carbonate solvents, and their composition-weighted mean.

The descriptors of a formulation are the mass-fraction-weighted mean of its solvents'
descriptors: ``fractions (n, 5) @ SOLVENT_MATRIX (5, d)``. The property model does
this multiply inside its ONNX graph (the matrix is a constant there), so its users give
raw fractions and never re-implement the featurisation.

rdkit is imported only when the matrix is first computed; it is cached in-process.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from labctl import recipes

__all__ = [
    "DESCRIPTOR_NAMES",
    "SMILES",
    "SOLVENTS",
    "descriptor_matrix",
    "formulation_descriptors",
    "solvent_descriptors",
]

SOLVENTS: tuple[str, ...] = recipes.SOLVENTS
SMILES: dict[str, str] = {k: recipes.SMILES[k] for k in SOLVENTS}
DESCRIPTOR_NAMES: tuple[str, ...] = (
    "MolWt",
    "TPSA",
    "MolLogP",
    "NumRotatableBonds",
    "RingCount",
    "NumHAcceptors",
    "FractionCSP3",
)


@lru_cache(maxsize=1)
def _matrix() -> tuple[tuple[float, ...], ...]:
    from rdkit import Chem
    from rdkit.Chem import Crippen, Descriptors, Lipinski, rdMolDescriptors

    # Descriptors/Crippen/Lipinski attributes are generated at import: no stubs see them.
    rows = []
    for solvent in SOLVENTS:
        mol = Chem.MolFromSmiles(SMILES[solvent])
        if mol is None:  # a typo in SMILES above: fail loudly, never featurise garbage
            raise ValueError(f"SMILES of {solvent}: {SMILES[solvent]!r} does not parse")
        rows.append(
            (
                float(Descriptors.MolWt(mol)),  # type: ignore[attr-defined]
                float(rdMolDescriptors.CalcTPSA(mol)),
                float(Crippen.MolLogP(mol)),  # type: ignore[attr-defined]
                float(Lipinski.NumRotatableBonds(mol)),  # type: ignore[attr-defined]
                float(rdMolDescriptors.CalcNumRings(mol)),
                float(Lipinski.NumHAcceptors(mol)),  # type: ignore[attr-defined]
                float(rdMolDescriptors.CalcFractionCSP3(mol)),
            )
        )
    return tuple(rows)


def descriptor_matrix() -> NDArray[np.float64]:
    """The (5, len(DESCRIPTOR_NAMES)) matrix: one row per solvent in SOLVENTS order."""
    return np.array(_matrix(), dtype=np.float64)


def solvent_descriptors(solvent: str) -> dict[str, float]:
    """The descriptors of one solvent by name, e.g. ``solvent_descriptors("EC")["MolWt"]``."""
    if solvent not in SOLVENTS:
        raise ValueError(f"solvent: {solvent!r} is not one of {', '.join(SOLVENTS)}")
    row = _matrix()[SOLVENTS.index(solvent)]
    return dict(zip(DESCRIPTOR_NAMES, row, strict=True))


def formulation_descriptors(fractions: ArrayLike) -> NDArray[np.float64]:
    """Mass-fraction-weighted mean descriptors: (n, 5) fractions -> (n, d); (5,) -> (d,)."""
    arr = np.asarray(fractions, dtype=np.float64)
    if arr.shape[-1:] != (len(SOLVENTS),):
        raise ValueError(
            f"fractions: last axis must have {len(SOLVENTS)} entries "
            f"({', '.join(SOLVENTS)}), got shape {arr.shape}"
        )
    return np.asarray(arr @ descriptor_matrix())
