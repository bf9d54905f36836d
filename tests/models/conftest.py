"""Fixtures of the model tests: synthetic lab data, one trained and stored property model,
simulated cells. Everything is small and seeded, so the whole set runs in well under a
minute on two cores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hardware_mocks.physics.electrolyte import landesfeind_blend
from labctl.models.cell import (
    CellConfig,
    CellCycles,
    TrainedCell,
    feature_table,
    register_cell_model,
    train_cell_model,
)
from labctl.models.property import (
    SOLVENTS,
    PropertyConfig,
    PropertyPredictor,
    TrainedProperty,
    register_property_model,
    train_property_model,
)
from labctl.models.registry import ModelRecord, Registry
from tests.models.cycling import simulate_cells

# The valid ranges are declared (the design space the data was drawn from), not inferred.
FAST = PropertyConfig(
    members=5,
    hidden=24,
    epochs=600,
    seed=0,
    molality_range=(0.2, 2.0),
    temperature_range=(10.0, 50.0),
)


def conductivity_data(n: int, seed: int, noise: float = 0.01) -> pd.DataFrame:
    """``n`` formulations measured on the default ground truth, with relative noise."""
    rng = np.random.default_rng(seed)
    fractions = rng.dirichlet(np.full(5, 0.7), size=n)
    molality = rng.uniform(0.2, 2.0, n)
    temperature = rng.uniform(10.0, 50.0, n)
    kappa = np.array(
        [
            landesfeind_blend(dict(zip(SOLVENTS, f, strict=True)), float(m), float(t))
            for f, m, t in zip(fractions, molality, temperature, strict=True)
        ]
    )
    frame = pd.DataFrame(fractions, columns=list(SOLVENTS))
    frame["salt_molality"] = molality
    frame["temperature_c"] = temperature
    frame["conductivity_mS_cm"] = kappa * (1.0 + noise * rng.standard_normal(n))
    return frame


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def conductivity_frame() -> pd.DataFrame:
    return conductivity_data(240, seed=0)


@pytest.fixture(scope="session")
def trained_property(conductivity_frame: pd.DataFrame) -> TrainedProperty:
    import torch

    torch.set_num_threads(1)
    return train_property_model(
        conductivity_frame, FAST, data_query="synthetic: landesfeind_blend", data_sha256="ab" * 32
    )


@pytest.fixture(scope="session")
def property_store(
    trained_property: TrainedProperty, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ModelRecord]:
    """A registry with the trained model exported and promoted (do not modify it)."""
    root = tmp_path_factory.mktemp("registry")
    record = register_property_model(Registry(root), trained_property, promote=True)
    return root, record


@pytest.fixture(scope="session")
def predictor(property_store: tuple[Path, ModelRecord]) -> PropertyPredictor:
    return PropertyPredictor.load(property_store[0])


CELL_TARGET = 40


@pytest.fixture(scope="session")
def cells() -> list[CellCycles]:
    return simulate_cells(28, CELL_TARGET, seed=1)


@pytest.fixture(scope="session")
def cell_table(cells: list[CellCycles]) -> pd.DataFrame:
    return feature_table(cells, CELL_TARGET)


@pytest.fixture(scope="session")
def trained_cell(cell_table: pd.DataFrame) -> TrainedCell:
    return train_cell_model(
        cell_table,
        CellConfig(target_cycle=CELL_TARGET),
        data_query="simulated",
        data_sha256="cd" * 32,
    )


@pytest.fixture(scope="session")
def cell_store(
    trained_cell: TrainedCell, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ModelRecord]:
    """A registry with the cell model exported and promoted (do not modify it)."""
    root = tmp_path_factory.mktemp("cell-registry")
    return root, register_cell_model(Registry(root), trained_cell, promote=True)
