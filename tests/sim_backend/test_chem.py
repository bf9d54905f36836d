# mypy: disable-error-code="no-untyped-call,union-attr"
# (ASE ships partial annotations: Atoms methods are untyped and ase.io.read returns a union.)
"""sim_backend.chem: species, packing, sampling and resumable GFN2-xTB labelling.

xTB runs here are on molecules of a few atoms (milliseconds each); the only periodic single
point is one EC molecule in a 12 Å box (about 0.25 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from pydantic import ValidationError
from tblite.ase import TBLite

from sim_backend.chem import (
    SOLVENTS,
    ConfigSpec,
    DatasetRecipe,
    LabelProgress,
    XtbSettings,
    build_box,
    build_cluster,
    density_g_cm3,
    generate_dataset,
    get_species,
    label_frames,
    labelled_ids,
    md_sample,
    min_intermolecular_distance,
    molar_mass,
    parse_composition,
    perturb,
    species_atoms,
    split_of,
    total_charge,
)
from sim_backend.chem.label import failed_log_path
from sim_backend.errors import SimInputError

PROVENANCE = ("method", "code", "config_type", "system", "source", "seed", "total_charge", "uhf")


def _direct(atoms: Atoms, charge: int) -> tuple[float, np.ndarray, np.ndarray | None]:
    """A plain tblite call, the reference the stored labels must reproduce."""
    work = atoms.copy()
    work.calc = TBLite(method="GFN2-xTB", charge=charge, verbosity=0)
    stress = work.get_stress() if work.pbc.any() else None
    return work.get_potential_energy(), work.get_forces(), stress


def _frames(n: int) -> list[Atoms]:
    """`n` distinct EC geometries with ids f0..f{n-1}."""
    base = species_atoms("EC")
    out = perturb(base, n=n, seed=5, sigma=0.03)
    for i, a in enumerate(out):
        a.info.update(frame_id=f"f{i}", config_type="EC-monomer", system="EC", seed=5)
    return out


# --- species ----------------------------------------------------------------------------------


def test_species_structures_charges_and_masses() -> None:
    formulas = {"EC": "C3H4O3", "PC": "C4H6O3", "EMC": "C4H8O3", "DMC": "C3H6O3", "DEC": "C5H10O3"}
    assert tuple(formulas) == SOLVENTS
    for name, formula in formulas.items():
        atoms = species_atoms(name)
        assert atoms.get_chemical_formula(mode="hill") == formula
        assert atoms.info["total_charge"] == 0
        assert np.allclose(atoms.get_center_of_mass(), 0.0, atol=1e-8)
        d = atoms.get_all_distances() + np.eye(len(atoms)) * 9
        assert d.min() > 0.9  # C-H is the shortest bond, ~1.09 Å
    assert molar_mass("EC") == pytest.approx(88.062, abs=1e-2)
    assert molar_mass("DEC") == pytest.approx(118.13, abs=1e-2)
    li, pf6 = species_atoms("Li+"), species_atoms("PF6-")
    assert (len(li), li.info["total_charge"], get_species("Li+").charge) == (1, 1, 1)
    assert pf6.info["total_charge"] == -1
    bonds = np.linalg.norm(pf6.positions[1:] - pf6.positions[0], axis=1)
    assert np.allclose(bonds, 1.61)
    assert np.allclose(pf6.get_angle(1, 0, 2), 90.0) and np.allclose(pf6.get_angle(1, 0, 4), 180.0)
    # same seed, same geometry; the cache hands out copies
    a = species_atoms("EMC", seed=3)
    a.positions += 1.0
    assert np.allclose(species_atoms("EMC", seed=3).positions, a.positions - 1.0)


def test_unknown_species_is_named() -> None:
    with pytest.raises(SimInputError, match="'LiTFSI'"):
        get_species("LiTFSI")


@pytest.mark.parametrize(
    ("composition", "match"),
    [
        ({"EC": 2, "XY": 1}, r"composition\['XY'\].*unknown"),
        ({"EC": -1}, r"composition\['EC'\].*>= 0, got -1"),
        ({"EC": 1.5}, r"composition\['EC'\].*integer"),
        ({"EC": 0}, r"composition: no molecules"),
    ],
)
def test_bad_composition_names_the_field(composition: dict[str, int], match: str) -> None:
    with pytest.raises(SimInputError, match=match):
        parse_composition(composition)
    with pytest.raises(ValueError, match=match):
        build_cluster(composition, seed=0)
    with pytest.raises(ValidationError, match="composition"):
        ConfigSpec(config_type="x", composition=composition)


def test_recipe_rejects_bad_fields() -> None:
    with pytest.raises(ValidationError, match="density"):
        ConfigSpec(config_type="box", composition={"EC": 8}, periodic=True)
    with pytest.raises(ValidationError, match="n_structures"):
        ConfigSpec(config_type="c", composition={"EC": 1}, n_structures=0)
    spec = ConfigSpec(config_type="c", composition={"EC": 1})
    with pytest.raises(ValidationError, match="appears twice"):
        DatasetRecipe(configs=(spec, spec))


# --- build ------------------------------------------------------------------------------------


def test_cluster_has_no_overlaps_and_the_right_charge() -> None:
    comp = {"EC": 3, "Li+": 1, "PF6-": 1, "DMC": 1}
    atoms = build_cluster(comp, seed=4, min_distance=2.0)
    assert len(atoms) == 3 * 10 + 1 + 7 + 12
    assert atoms.info["total_charge"] == total_charge(comp) == 0
    assert atoms.info["system"] == "Li+_PF6-_EC3_DMC"
    assert sorted(set(atoms.arrays["mol_id"])) == list(range(6))
    assert atoms.numbers[0] == 3  # the ion goes first, at the centre
    assert min_intermolecular_distance(atoms) >= 2.0
    assert not atoms.pbc.any()
    li = build_cluster({"Li+": 1, "EC": 2}, seed=1)
    assert li.info["total_charge"] == 1
    again = build_cluster(comp, seed=4)
    other = build_cluster(comp, seed=5)
    assert np.allclose(again.positions, atoms.positions)
    assert not np.allclose(other.positions, atoms.positions)


def test_box_density_and_minimum_image_distances() -> None:
    comp = {"EC": 4, "Li+": 1, "PF6-": 1}
    box = build_box(comp, density=1.2, seed=2, min_distance=1.9)
    assert box.pbc.all()
    assert density_g_cm3(box) == pytest.approx(1.2, rel=1e-9)
    mass = 4 * molar_mass("EC") + molar_mass("Li+") + molar_mass("PF6-")
    assert box.get_volume() == pytest.approx(mass / 1.2 * 1.66053906660, rel=1e-9)
    assert min_intermolecular_distance(box) >= 1.9
    frac = box.get_scaled_positions(wrap=False)
    assert frac.min() >= 0.0 and frac.max() < 1.0
    assert box.info["total_charge"] == 0
    with pytest.raises(SimInputError, match="density"):
        build_box({"EC": 8}, density=4.0, seed=0, restarts=2, max_tries=200)
    with pytest.raises(SimInputError, match="density"):
        build_box({"EC": 1}, density=1.3, seed=0)  # one molecule wider than its own box


# --- sampling ---------------------------------------------------------------------------------


def test_md_snapshots_carry_their_own_xtb_labels() -> None:
    li = build_cluster({"Li+": 1, "EC": 1}, seed=0)
    frames = md_sample(li, temperature=500, n_frames=2, interval=4, seed=1)
    assert [f.info["source"] for f in frames] == ["xtb-md@500K"] * 2
    assert not np.allclose(frames[0].positions, frames[1].positions)
    for f in frames:
        e, forces, _ = _direct(f, charge=1)
        # MD restarts the SCF from the last step, a fresh call from scratch: same to SCF tolerance
        assert f.get_potential_energy() == pytest.approx(e, abs=1e-5)
        assert np.abs(f.get_forces() - forces).max() < 2e-3
        assert np.abs(f.get_forces().sum(axis=0)).max() < 1e-6  # not the FixCom-projected forces
    again = md_sample(li, temperature=500, n_frames=2, interval=4, seed=1)
    assert np.allclose(again[1].positions, frames[1].positions)


def test_perturb_displaces_and_strains() -> None:
    box = species_atoms("EC")
    box.cell, box.pbc = np.eye(3) * 12.0, True
    copies = perturb(box, n=20, seed=0, sigma=0.05, strain=0.02)
    disp = np.concatenate([c.get_scaled_positions(wrap=False) @ box.cell.array for c in copies])
    base = np.tile(box.get_scaled_positions(wrap=False) @ box.cell.array, (20, 1))
    assert np.std(disp - base) == pytest.approx(0.05, rel=0.15)
    strains = np.array([c.cell.array / 12.0 - np.eye(3) for c in copies])
    assert np.abs(strains).max() <= 0.02 + 1e-12
    assert np.allclose(strains, strains.transpose(0, 2, 1))
    assert all(c.info["source"] == "perturb" and c.calc is None for c in copies)
    mol = perturb(species_atoms("EC"), n=1, seed=0, strain=0.5 - 1e-9)[0]
    assert not mol.pbc.any()


# --- labelling --------------------------------------------------------------------------------


def test_labels_match_a_direct_tblite_call(tmp_path: Path) -> None:
    ec = _frames(1)[0]
    li = build_cluster({"Li+": 1, "EC": 1}, seed=3)
    li.info.update(frame_id="li", config_type="Li-EC-cluster", source="build", seed=3)
    box = species_atoms("EC")
    box.cell, box.pbc = np.eye(3) * 12.0, True
    box.info.update(frame_id="box", config_type="EC-box", total_charge=0)
    out = tmp_path / "d.extxyz"
    report = label_frames([ec, li, box], out)
    assert (report.n_labelled, report.n_reused, report.failed) == (3, 0, [])
    stored = ase.io.read(out, index=":")
    assert [s.info["frame_id"] for s in stored] == ["f0", "li", "box"]
    for s, charge in zip(stored, (0, 1, 0), strict=True):
        e, f, stress = _direct(s, charge)
        assert s.get_potential_energy() == pytest.approx(e, abs=1e-6)
        assert np.abs(s.get_forces() - f).max() < 1e-6
        assert s.info["total_charge"] == charge
        for key in (*PROVENANCE, "frame_id", "split", "label_settings"):
            assert key in s.info, key
        assert s.info["method"] == "GFN2-xTB" and s.info["code"].startswith("tblite ")
        if stress is not None:
            assert np.abs(s.get_stress() - stress).max() < 1e-7
    assert stored[1].info["system"] == "Li+_EC" and stored[1].info["source"] == "build"
    assert not stored[0].pbc.any() and stored[2].pbc.all()


def test_resume_after_a_crash_skips_done_frames(tmp_path: Path) -> None:
    frames = _frames(6)
    out = tmp_path / "d.extxyz"
    seen: list[LabelProgress] = []

    def crash_after_three(p: LabelProgress) -> None:
        seen.append(p)
        if p.index == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        label_frames(frames, out, progress=crash_after_three)
    assert labelled_ids(out) == ["f0", "f1", "f2"]
    assert [p.status for p in seen] == ["labelled"] * 3 and seen[0].total == 6
    # a kill in the middle of a write leaves a torn record: it is cut off on resume
    with out.open("a") as f:
        f.write("10\nProperties=species:S:1:pos:R:3 frame_id=f3\nC 0.0 0.0 0.0\n")
    report = label_frames(frames, out)
    assert (report.n_skipped, report.n_labelled) == (3, 3)
    ids = [a.info["frame_id"] for a in ase.io.read(out, index=":")]
    assert ids == [f"f{i}" for i in range(6)]
    report = label_frames(frames, out)
    assert (report.n_skipped, report.n_labelled) == (6, 0)
    report = label_frames(frames[:2], out, resume=False)
    assert labelled_ids(out) == ["f0", "f1"] and report.n_labelled == 2


def test_unconverged_frame_is_reported_and_skipped(tmp_path: Path) -> None:
    good = _frames(2)
    bad = good[0].copy()
    bad.positions *= 2.0  # every bond stretched to twice its length: the SCF stalls
    bad.info["frame_id"] = "stretched"
    out = tmp_path / "d.extxyz"
    settings = XtbSettings(max_iterations=20)  # plenty for EC, which converges in ~11
    events: list[LabelProgress] = []
    report = label_frames([good[0], bad, good[1]], out, settings=settings, progress=events.append)
    assert report.n_labelled == 2
    assert [f.frame_id for f in report.failed] == ["stretched"]
    assert "SCF not converged" in report.failed[0].reason
    assert [e.status for e in events] == ["labelled", "failed", "labelled"]
    assert labelled_ids(out) == ["f0", "f1"]
    logged = [json.loads(line) for line in failed_log_path(out).read_text().splitlines()]
    assert [r["frame_id"] for r in logged] == ["stretched"]
    # a resumed run does not pay for the failure again, but still reports it
    again = label_frames([good[0], bad, good[1]], out, settings=settings)
    assert (again.n_skipped, again.n_labelled) == (3, 0)
    assert [f.frame_id for f in again.failed] == ["stretched"]


def test_split_is_stable_and_proportional() -> None:
    ids = [f"default:s0/EC-monomer/EC/{i}/md300K/0" for i in range(3000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert frac["train"] == pytest.approx(0.8, abs=0.03)
    assert frac["val"] == pytest.approx(0.1, abs=0.02)
    # every frame of one structure follows it: perturbed copies and MD snapshots (10 fs
    # apart) are near-duplicates that must never straddle train and test
    for i in range(300):
        base = f"default:s0/EC-monomer/EC/{i}"
        group = {
            split_of(f"{base}/md{t}K/{k}{p}")
            for t in (300, 450)
            for k in range(3)
            for p in ("", "/p0", "/p1")
        } | {split_of(f"{base}/build/p2"), split_of(base)}
        assert len(group) == 1, base
    # ...while different structures of one system do spread over the splits
    assert len({split_of(f"default:s0/EC-monomer/EC/{i}") for i in range(60)}) == 3
    with pytest.raises(SimInputError, match="split"):
        split_of("x", (0.5, 0.5, 0.5))


# --- the dataset recipe -----------------------------------------------------------------------


def test_tiny_dataset_end_to_end_and_resume(tmp_path: Path) -> None:
    recipe = DatasetRecipe.tiny()
    report = generate_dataset(recipe, tmp_path, seed=0)
    s = report.summary
    assert s.n_frames == recipe.n_frames() == 14
    assert s.per_config_type == {"EC-monomer": 8, "Li-EC-cluster": 4, "LiPF6-EC-cluster": 2}
    assert report.n_reused == 6 and report.n_labelled == 8 and report.failed == []
    assert sum(s.per_split.values()) == 14
    frames = ase.io.read(report.path, index=":")
    ids = [f.info["frame_id"] for f in frames]
    assert len(set(ids)) == len(ids)
    assert "tiny:s0/Li-EC-cluster/Li+_EC/0/md450K/1/p0" in ids
    for f in frames:
        for key in PROVENANCE:
            assert key in f.info, key
        assert f.info["split"] == split_of(f.info["frame_id"])
    charges = {f.info["system"]: int(f.info["total_charge"]) for f in frames}
    assert charges == {"EC": 0, "Li+_EC": 1, "Li+_PF6-": 0}
    # resuming a complete dataset samples and labels nothing
    again = generate_dataset(recipe, tmp_path, seed=0)
    assert (again.n_skipped, again.n_labelled, again.n_reused) == (0, 0, 0)
    assert again.summary.n_frames == 14
    with pytest.raises(SimInputError, match="out_dir"):
        generate_dataset(recipe, tmp_path, seed=1)


def test_default_recipe_shape() -> None:
    recipe = DatasetRecipe.default()
    types = {c.config_type for c in recipe.configs}
    assert {f"{s}-monomer" for s in SOLVENTS} <= types
    assert {"PF6-monomer", "Li-EC-cluster", "LiPF6-EC-cluster", "EC-box", "LiPF6-EC-box"} <= types
    boxes = [c for c in recipe.configs if c.periodic]
    assert boxes and all(c.density is not None for c in boxes)
    for c in boxes:
        n_atoms = sum(len(species_atoms(n)) * k for n, k in c.composition.items())
        assert n_atoms <= 80
    assert 500 <= recipe.n_frames() <= 1500


def test_stored_stress_is_the_ase_strain_derivative(tmp_path: Path) -> None:
    """The stress labels follow ASE's convention, (1/V) dE/d(strain), checked by finite
    differences of xTB energies, so models trained on them get the sign right."""
    box = species_atoms("EC")
    box.cell, box.pbc = np.eye(3) * 7.0, True
    box.info["frame_id"] = "box7"
    out = tmp_path / "d.extxyz"
    label_frames([box], out)
    stored = ase.io.read(out)
    h = 2e-4
    energies = []
    for sign in (1, -1):
        strained = box.copy()
        strained.set_cell(box.cell.array @ np.diag([1 + sign * h, 1, 1]), scale_atoms=True)
        energies.append(_direct(strained, 0)[0])
    fd = (energies[0] - energies[1]) / (2 * h) / box.get_volume()
    assert abs(fd) > 1e-3  # a 7 Å box squeezes EC: the check is not 0 == 0
    assert stored.get_stress(voigt=False)[0, 0] == pytest.approx(fd, rel=1e-3, abs=1e-6)
