"""Electrolyte structures and GFN2-xTB training data: species, packing, sampling, labels.

Light to import (numpy, pydantic); rdkit, ASE and tblite load inside the functions that use them.
"""

from __future__ import annotations

from sim_backend.chem.build import (
    build_box,
    build_cluster,
    composition_name,
    density_g_cm3,
    min_intermolecular_distance,
    parse_composition,
    total_charge,
)
from sim_backend.chem.dataset import (
    ConfigSpec,
    DatasetRecipe,
    DatasetReport,
    DatasetSummary,
    generate_dataset,
    summarize,
)
from sim_backend.chem.label import (
    FailedFrame,
    LabelProgress,
    LabelReport,
    frame_id,
    label_frames,
    labelled_ids,
    split_of,
)
from sim_backend.chem.sample import XtbSettings, md_sample, perturb, thermal_conformers
from sim_backend.chem.species import (
    SOLVENTS,
    SPECIES,
    Species,
    get_species,
    molar_mass,
    species_atoms,
)

__all__ = [
    "SOLVENTS",
    "SPECIES",
    "ConfigSpec",
    "DatasetRecipe",
    "DatasetReport",
    "DatasetSummary",
    "FailedFrame",
    "LabelProgress",
    "LabelReport",
    "Species",
    "XtbSettings",
    "build_box",
    "build_cluster",
    "composition_name",
    "density_g_cm3",
    "frame_id",
    "generate_dataset",
    "get_species",
    "label_frames",
    "labelled_ids",
    "md_sample",
    "min_intermolecular_distance",
    "molar_mass",
    "parse_composition",
    "perturb",
    "species_atoms",
    "split_of",
    "summarize",
    "thermal_conformers",
    "total_charge",
]
