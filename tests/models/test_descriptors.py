"""rdkit descriptors of the solvents and their composition-weighted mean."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from labctl.models import descriptors as d


def test_solvent_descriptors_match_rdkit_reference_values() -> None:
    ec = d.solvent_descriptors("EC")
    assert ec["MolWt"] == pytest.approx(88.062, abs=0.01)
    assert d.solvent_descriptors("DMC")["MolWt"] == pytest.approx(90.078, abs=0.01)
    assert d.solvent_descriptors("DEC")["MolWt"] == pytest.approx(118.132, abs=0.01)
    # Every carbonate has the same O-C(=O)-O group: TPSA 35.53, three H-bond acceptors.
    for s in d.SOLVENTS:
        assert d.solvent_descriptors(s)["TPSA"] == pytest.approx(35.53, abs=0.01)
        assert d.solvent_descriptors(s)["NumHAcceptors"] == 3
    assert [d.solvent_descriptors(s)["RingCount"] for s in d.SOLVENTS] == [1, 1, 0, 0, 0]
    assert [d.solvent_descriptors(s)["NumRotatableBonds"] for s in d.SOLVENTS] == [0, 0, 1, 0, 2]
    assert ec["FractionCSP3"] == pytest.approx(2 / 3)
    # Linear carbonates are more lipophilic than the cyclic ones, longer chains more so.
    logp = {s: d.solvent_descriptors(s)["MolLogP"] for s in d.SOLVENTS}
    assert logp["EC"] < logp["PC"] < logp["DEC"] and logp["DMC"] < logp["EMC"] < logp["DEC"]


def test_smiles_are_the_plans_smiles() -> None:
    from labctl.plans.common import SMILES

    assert {k: SMILES[k] for k in d.SOLVENTS} == d.SMILES


def test_formulation_descriptors_are_the_mass_weighted_mean() -> None:
    m = d.descriptor_matrix()
    assert m.shape == (5, len(d.DESCRIPTOR_NAMES))
    assert np.linalg.matrix_rank(m) == 5  # the descriptors tell the five solvents apart
    pure = d.formulation_descriptors(np.eye(5))
    np.testing.assert_allclose(pure, m)
    half = d.formulation_descriptors([0.5, 0.0, 0.0, 0.5, 0.0])
    assert half[0] == pytest.approx((88.062 + 90.078) / 2, abs=0.01)
    with pytest.raises(ValueError, match="fractions: last axis must have 5"):
        d.formulation_descriptors([0.5, 0.5])
    with pytest.raises(ValueError, match="solvent: 'H2O'"):
        d.solvent_descriptors("H2O")


def test_descriptors_are_computed_once() -> None:
    d.descriptor_matrix()
    before = d._matrix.cache_info()
    for _ in range(3):
        d.descriptor_matrix()
    after = d._matrix.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3


def test_importing_models_is_light() -> None:
    code = (
        "import sys, labctl.models, labctl.models.registry, labctl.models.property, "
        "labctl.models.runtime, labctl.models.cell, labctl.models.update, "
        "labctl.models.training_data, labctl.models.descriptors\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'rdkit', 'pandas', 'bluesky') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
