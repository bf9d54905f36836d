"""Dry tests from sim_backend: the formulation box, and the campaign's record in Tiled."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine

from labctl.campaign.runner import (
    Campaign,
    CampaignConfig,
    CampaignConfigError,
    CampaignState,
    Experiment,
    load_campaign_config,
    read_state,
)
from labctl.campaign.space import Formulation
from labctl.data import DataConfig, Store, open_store
from sim_backend.api import formulation_box, formulation_composition, solution_density
from sim_backend.chem.species import molar_mass, species_charge
from sim_backend.errors import SimInputError


@pytest.fixture
def store() -> Iterator[Store]:
    with open_store(DataConfig.from_env()) as s:  # the session's LABCTL_DATA
        yield s


@pytest.mark.parametrize(
    ("fractions", "molality"),
    [({"EC": 0.5, "DMC": 0.5}, 1.0), ({"EC": 0.3, "EMC": 0.7}, 1.2),
     ({"EC": 0.1, "PC": 0.2, "DMC": 0.4, "DEC": 0.3}, 0.5), ({"PC": 0.7, "DMC": 0.3}, 1.8)],
)  # fmt: skip
def test_formulation_box_realises_the_composition(
    fractions: dict[str, float], molality: float
) -> None:
    comp = formulation_composition(fractions, molality)
    counts = comp["counts"]
    solvent_g = sum(n * molar_mass(k) for k, n in counts.items() if k in fractions)
    assert 24 <= comp["n_solvent"] <= 32
    assert counts["Li+"] == counts["PF6-"] == comp["n_ion_pairs"] >= 1
    for k, w in fractions.items():  # mass fractions within 1.5 % (1 molecule in ~28)
        assert counts[k] * molar_mass(k) / solvent_g == pytest.approx(comp["fractions"][k])
        assert abs(comp["fractions"][k] - w) < 0.015, comp
    realised = counts["Li+"] / (solvent_g / 1000)
    assert realised == pytest.approx(comp["salt_molality"])
    # one ion pair more or less is 0.35-0.45 mol/kg here: the rounding keeps within half
    assert abs(realised - molality) <= 0.5 * 1000 / solvent_g + 1e-9, comp

    box = formulation_box(fractions, molality, seed=1)
    assert sum(species_charge(k) * n for k, n in counts.items()) == 0
    assert box.info["total_charge"] == 0
    assert len(np.unique(box.arrays["mol_id"])) == sum(counts.values())
    rho = box.get_masses().sum() / box.get_volume() * 1.66053906660
    assert rho == pytest.approx(solution_density(counts), rel=1e-9)
    # the solvents' ideal-mixing density plus 0.1 g/cm3 per mol/kg: 1.0-1.6 g/cm3
    assert 1.0 < rho < 1.6
    assert box.info["pack_s"] < 2.0 and box.info["pack_scale"] == 1.0
    # no two atoms of different molecules within a covalent-bond cutoff (false bonds)
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    i, j = neighbor_list("ij", box, (1.2 * covalent_radii[box.numbers]).tolist())
    mol, z = box.arrays["mol_id"], box.numbers
    assert not np.any((mol[i] != mol[j]) & (z[i] != 3) & (z[j] != 3))


def test_formulation_errors_name_the_field() -> None:
    cases: list[tuple[Any, Any, dict[str, Any], str]] = [
        ({"EC": 0.5, "DMC": 0.4}, 1.0, {}, "fractions: must sum to 1, got 0.9"),
        ({"EC": 0.5, "XY": 0.5}, 1.0, {}, "fractions['XY']: not a solvent"),
        ({"EC": 1.5, "DMC": -0.5}, 1.0, {}, "fractions['EC']: must be within 0..1"),
        ({"EC": 1.0}, -1.0, {}, "salt_molality: must be within 0..10 mol/kg, got -1.0"),
        ({"EC": 1.0}, math.nan, {}, "salt_molality: must be a finite number"),
        ({"EC": 1.0}, 1.0, {"n_solvent": (30, 20)}, "n_solvent: an integer or a range"),
    ]
    for fractions, molality, kw, message in cases:
        with pytest.raises(SimInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
            formulation_composition(fractions, molality, **kw)
    with pytest.raises(SimInputError, match=r"density: must be within 0.3..3.0 g/cm3, got 9"):
        formulation_box({"EC": 1.0}, 1.0, density=9)
    with pytest.raises(CampaignConfigError, match=r"dry_test.replicas = 0"):
        load_campaign_config(None, dry_test={"enabled": True, "replicas": 0})
    with pytest.raises(CampaignConfigError, match=r"steps = 100 must be >= 50 x sample_every"):
        load_campaign_config(None, dry_test={"steps": 100, "sample_every": 5})


def _campaign(store: Store, **dry: Any) -> tuple[Campaign, RunEngine]:
    cid = f"D-{uuid.uuid4().hex[:8]}"
    cfg = load_campaign_config(None, campaign_id=cid, optimizer="random", dry_test=dry)
    engine = RunEngine(call_returns_result=True)
    store.subscribe(engine)
    session = SimpleNamespace(RE=engine, control=None)
    return Campaign(cfg, session, store, say=lambda _: None), engine  # type: ignore[arg-type]


def _state(cid: str) -> CampaignState:
    exps = []
    for n, (fr, m, kappa) in enumerate([({"EC": 0.4, "DMC": 0.6}, 1.1, 11.0),
                                        ({"EC": 0.55, "DMC": 0.45}, 0.95, 12.5)], 1):  # fmt: skip
        e = Experiment(f"{cid}-E00{n}", 0, Formulation(fractions=fr, salt_molality=m), "random")
        e.measured = {"fractions": fr, "salt_molality": m + 0.01, "conductivity_mS_cm": kappa,
                      "time": float(n), "run_uid": "x"}  # fmt: skip
        exps.append(e)
    return CampaignState(cid, exps, 1, None)


@pytest.mark.timeout(60)
def test_the_campaign_dry_tests_the_best_and_stores_it_in_tiled(store: Store) -> None:
    assert CampaignConfig().dry_test.enabled is False  # off by default
    off, _ = _campaign(store)
    assert off.dry_tests(_state(off.config.id)).dry_tests == []
    assert store.runs(campaign=off.config.id) == []

    camp, _ = _campaign(store, enabled=True, replicas=2, steps=100, sample_every=2,
                        equil_steps=20, n_solvent=[8, 10], device="cpu")  # fmt: skip
    cid = camp.config.id
    camp.dry_tests(_state(cid))
    (run,) = store.runs(campaign=cid)
    assert (run.plan_name, run.sample_id, run.exit_status) == ("sim_dry_test", f"{cid}-E002",
                                                                "success")  # fmt: skip
    (test,) = read_state(store, cid).dry_tests
    assert test["formulation"] == {"fractions": {"EC": 0.55, "DMC": 0.45}, "salt_molality": 0.96}
    result = test["result"]
    comp = result["formulation"]
    assert 8 <= comp["n_solvent"] <= 10 and comp["counts"]["Li+"] == comp["counts"]["PF6-"]
    assert result["settings"]["steps"] == 100 and result["settings"]["temperature_c"] == 25.0
    assert len(result["model"]["sha256"]) == 64
    head = store.read(run.uid, "dry_test").iloc[0]
    assert head["n_replicas"] == 2 and head["n_stable"] == result["n_stable"]
    assert head["temperature_k"] == pytest.approx(298.15)
    assert head["n_atoms"] == comp["n_atoms"] > 100
    # the packed box starts clear of false bonds: both replicas stay (seeded, CPU)
    assert result["n_stable"] == 2
    diffusion = store.read(run.uid, "diffusion")  # each species' D, as sim_backend gave it
    assert set(diffusion["species"]) >= {"Li+", "PF6-", "EC", "DMC"}
    for _, row in diffusion.iterrows():
        d = result["diffusion_by_species"][row["species"]]
        assert row["D_m2_s"] == pytest.approx(d["value_m2_s"]) and row["D_m2_s"] > 0
    # Not repeated: the best already has its dry test.
    camp.dry_tests(read_state(store, cid))
    assert len(store.runs(campaign=cid)) == 1


def test_a_dry_test_that_cannot_run_is_recorded_as_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import labctl.campaign.dry_test as dry

    def missing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(dry, "run_dry_test", missing)
    camp, _ = _campaign(store, enabled=True)
    camp.dry_tests(_state(camp.config.id))
    (test,) = read_state(store, camp.config.id).dry_tests
    assert test["exit_status"] == "fail" and test["result"] is None
    assert "sim_backend is not installed" in test["reason"] and "torch" in test["reason"]
