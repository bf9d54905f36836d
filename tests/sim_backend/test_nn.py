# mypy: disable-error-code="no-untyped-call"
"""sim_backend.nn: neighbour lists, evaluate, the moment potential, files, calculator, training.

References: ASE's neighbour list, ASE's Lennard-Jones calculator, finite differences
and ASE's numerical stress.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from sim_backend.errors import ModelFileError, SimInputError
from sim_backend.nn.calculator import MLPCalculator, load_calculator, resolve_model_path
from sim_backend.nn.dataset import collate, prepare, split_frames
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.lj import LennardJones
from sim_backend.nn.model import MomentPotential, load_model, save_model
from sim_backend.nn.neighbors import neighbor_list
from sim_backend.nn.train import train
from tests.sim_backend.helpers import (
    F64,
    as_batch,
    assert_forces_match_finite_differences,
    molecule,
)

torch.set_num_threads(1)


def random_system(
    rng: np.random.Generator, n: int, pbc: Sequence[bool], scale: float, triclinic: bool
) -> Atoms:
    cell = np.eye(3) * scale
    if triclinic:
        cell = cell + rng.uniform(-0.3, 0.3, (3, 3)) * scale
    pos = rng.uniform(-0.2, 1.2, (n, 3)) @ cell  # some atoms outside the cell
    z = rng.choice([1, 6, 8], size=n)
    return Atoms(numbers=z, positions=pos, cell=cell, pbc=pbc)


def small_model(seed: int = 0, dtype: torch.dtype = F64) -> MomentPotential:
    torch.manual_seed(seed)
    m = MomentPotential(cutoff=4.0, n_basis=6, n_channels=6, hidden=(16, 16)).to(dtype)
    with torch.no_grad():  # make the charge term and atomic energies non-trivial
        m.energy_scale.fill_(0.5)
        m.ref_energy.copy_(torch.linspace(-3.0, -1.0, len(m.species)))
    return m


def ase_pairs(a: Atoms, cutoff: float, start: int) -> list[tuple[int, int, tuple[int, ...]]]:
    i, j, s = ase_neighbor_list("ijS", a, cutoff)
    return sorted(
        zip((i + start).tolist(), (j + start).tolist(), map(tuple, s.tolist()), strict=True)
    )


# ------------------------------------------------------------------ neighbour lists


@pytest.mark.parametrize("method", ["brute", "cell"])
def test_neighbor_list_matches_ase_on_a_mixed_batch(method: str) -> None:
    rng = np.random.default_rng(0)
    systems = [
        random_system(rng, n, pbc, scale, tric)
        for pbc in ([True] * 3, [False] * 3, [True, True, False], [True, False, False])
        for tric in (False, True)
        for scale, n in ((3.0, 5), (9.0, 40))  # 3 Å cells need two image shells at 4.5 Å
    ]
    pos, _, cell, pbc, sidx = as_batch(systems)
    nl = neighbor_list(pos, cell, pbc, sidx, 4.5, method=method)  # type: ignore[arg-type]
    ei, off = nl.edge_index.numpy(), nl.cell_offsets.numpy()
    start, total = 0, 0
    for a in systems:
        ref = ase_pairs(a, 4.5, start)
        m = (ei[0] >= start) & (ei[0] < start + len(a))
        got = sorted(
            zip(
                ei[0][m].tolist(),
                ei[1][m].tolist(),
                map(tuple, np.rint(off[m]).astype(int).tolist()),
                strict=True,
            )
        )
        assert got == ref
        total += len(ref)
        start += len(a)
    assert nl.n_edges == total > 1000
    # r_ij from the offsets equals the distances ASE reports
    r = (
        pos[nl.edge_index[1]]
        - pos[nl.edge_index[0]]
        + torch.einsum("ek,ekc->ec", nl.cell_offsets, cell[sidx[nl.edge_index[0]]])
    )
    assert float(r.norm(dim=1).max()) < 4.5


def test_neighbor_list_float32_and_empty_system() -> None:
    rng = np.random.default_rng(1)
    a = random_system(rng, 30, [True] * 3, 8.0, True)
    empty = Atoms(cell=np.eye(3) * 5, pbc=True)
    pos, _, cell, pbc, sidx = as_batch([a, empty], torch.float32)
    sidx = torch.zeros(len(a), dtype=torch.long)
    nl = neighbor_list(pos, cell, pbc, sidx, 4.0, method="cell")
    assert nl.cell_offsets.dtype == torch.float32
    assert nl.n_edges == len(ase_pairs(a, 4.0, 0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cutoff": -1.0}, "cutoff"),
        ({"system_idx": torch.tensor([1, 0, 0])}, "sorted"),
        ({"pbc": torch.ones(2, 3, dtype=torch.bool)}, "pbc"),
        ({"positions": torch.zeros(3, 2)}, "positions"),
    ],
)
def test_neighbor_list_rejects_bad_input(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "positions": torch.zeros(3, 3),
        "cell": torch.eye(3)[None],
        "pbc": torch.zeros(1, 3, dtype=torch.bool),
        "system_idx": torch.zeros(3, dtype=torch.long),
        "cutoff": 3.0,
    }
    args.update(kwargs)
    with pytest.raises(SimInputError, match=field):
        neighbor_list(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ evaluate (LJ vs ASE)


def test_lennard_jones_energy_forces_stress_equal_ase() -> None:
    a = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    a.rattle(0.1, seed=1)
    a.set_cell(
        a.cell.array @ (np.eye(3) + np.array([[0.02, 0.03, 0], [0, -0.01, 0.02], [0.01, 0, 0]])),
        scale_atoms=True,
    )
    a.calc = AseLJ(epsilon=0.0104, sigma=3.4, rc=8.5, smooth=False)
    pos, z, cell, pbc, sidx = as_batch([a])
    out = evaluate(LennardJones(), pos, z, cell, pbc, sidx, stress=True)
    assert float(out.energy[0]) == pytest.approx(a.get_potential_energy(), abs=1e-10)
    assert out.forces is not None
    assert out.stress is not None
    np.testing.assert_allclose(out.forces.numpy(), a.get_forces(), atol=1e-10)
    np.testing.assert_allclose(out.stress[0].numpy(), a.get_stress(voigt=False), atol=1e-12)


def test_evaluate_rejects_bad_charge_shape() -> None:
    pos, z, cell, pbc, sidx = as_batch([molecule(np.random.default_rng(0), 4)])
    with pytest.raises(SimInputError, match="charge"):
        evaluate(LennardJones(), pos, z, cell, pbc, sidx, charge=torch.zeros(2, dtype=F64))


# ------------------------------------------------------------------ the learned model


def test_model_invariance_and_force_equivariance() -> None:
    rng = np.random.default_rng(2)
    a = molecule(rng, 14)
    model = small_model()
    pos, z, cell, pbc, sidx = as_batch([a])
    base = evaluate(model, pos, z, cell, pbc, sidx)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = torch.tensor(q, dtype=F64)
    moved = pos @ rot.T + torch.tensor([3.0, -1.0, 7.5], dtype=F64)
    out = evaluate(model, moved, z, cell, pbc, sidx)
    assert base.forces is not None
    assert out.forces is not None
    assert float(out.energy[0]) == pytest.approx(float(base.energy[0]), abs=1e-9)
    torch.testing.assert_close(out.forces, base.forces @ rot.T, atol=1e-9, rtol=0)
    perm = torch.tensor(rng.permutation(len(a)))
    out_p = evaluate(model, pos[perm], z[perm], cell, pbc, sidx)
    assert out_p.forces is not None
    assert float(out_p.energy[0]) == pytest.approx(float(base.energy[0]), abs=1e-9)
    torch.testing.assert_close(out_p.forces, base.forces[perm], atol=1e-10, rtol=0)
    assert float(base.forces.abs().max()) > 1e-3  # the test would catch a zero model


def test_model_forces_match_finite_differences() -> None:
    a = molecule(np.random.default_rng(3), 10)
    assert_forces_match_finite_differences(small_model(1), a, [(0, 0), (3, 1), (7, 2), (9, 0)])


def numerical_stress(atoms: Atoms, d: float) -> np.ndarray:
    """ASE's recipe: central differences of E under symmetric strains, Voigt order."""
    cell0, volume = atoms.cell.array.copy(), atoms.get_volume()
    stress = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                eps = np.eye(3)
                eps[i, j] += sign * d / (1 if i == j else 2)
                eps[j, i] += 0 if i == j else sign * d / 2
                atoms.set_cell(cell0 @ eps, scale_atoms=True)
                energies.append(atoms.get_potential_energy())
            atoms.set_cell(cell0, scale_atoms=True)
            stress[i, j] = (energies[0] - energies[1]) / (2 * d * volume)
    return stress.flat[[0, 4, 8, 5, 2, 1]]


def test_model_stress_matches_ase_numerical_stress() -> None:
    rng = np.random.default_rng(4)
    a = random_system(rng, 16, [True] * 3, 6.0, True)
    a.numbers = rng.choice([1, 6, 8], size=len(a))
    calc = MLPCalculator(small_model(2))
    a.calc = calc
    analytic = a.get_stress(voigt=True)
    numeric = numerical_stress(a, d=1e-5)  # ASE's own helper is deprecated (warns)
    np.testing.assert_allclose(analytic, numeric, atol=1e-8)
    assert np.abs(analytic).max() > 1e-5


def test_model_is_smooth_at_the_cutoff() -> None:
    model = small_model(3)
    cell, pbc, sidx = (
        torch.eye(3, dtype=F64)[None],
        torch.zeros(1, 3, dtype=torch.bool),
        torch.zeros(2, dtype=torch.long),
    )
    z = torch.tensor([6, 8])

    def e_and_f(r: float) -> tuple[float, float]:
        pos = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=F64)
        out = evaluate(model, pos, z, cell, pbc, sidx)
        assert out.forces is not None
        return float(out.energy[0]), float(out.forces[1, 0])

    e_far, f_far = e_and_f(4.5)
    e_in, f_in = e_and_f(4.0 - 1e-4)
    e_out, f_out = e_and_f(4.0 + 1e-4)
    assert f_far == 0.0
    assert f_out == 0.0
    assert e_out == pytest.approx(e_far, abs=1e-12)
    assert abs(e_in - e_out) < 1e-9  # energy continuous
    assert abs(f_in) < 1e-6  # force goes to zero (continuous)
    _e_mid, f_mid = e_and_f(3.0)
    assert abs(f_mid) > 1e-6  # there is an interaction inside


def test_charge_changes_the_energy_and_batches_equal_singles() -> None:
    rng = np.random.default_rng(5)
    systems = [molecule(rng, 6), random_system(rng, 12, [True] * 3, 5.0, True), molecule(rng, 9)]
    systems[1].numbers = rng.choice([1, 6, 8], size=12)
    model = small_model(4)
    charge = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    pos, z, cell, pbc, sidx = as_batch(systems)
    out = evaluate(model, pos, z, cell, pbc, sidx, charge=charge, stress=True)
    assert out.forces is not None
    assert out.stress is not None
    start = 0
    for k, a in enumerate(systems):
        p1, z1, c1, b1, s1 = as_batch([a])
        one = evaluate(model, p1, z1, c1, b1, s1, charge=charge[k : k + 1], stress=True)
        assert one.forces is not None
        assert one.stress is not None
        assert float(one.energy[0]) == pytest.approx(float(out.energy[k]), abs=1e-10)
        torch.testing.assert_close(
            one.forces, out.forces[start : start + len(a)], atol=1e-10, rtol=0
        )
        torch.testing.assert_close(one.stress[0], out.stress[k], atol=1e-12, rtol=0)
        start += len(a)
    assert float(out.stress[0].abs().max()) == 0.0  # not periodic: no stress
    neutral = evaluate(model, pos, z, cell, pbc, sidx, forces=False)
    assert abs(float(neutral.energy[0] - out.energy[0])) > 1e-4  # Li+ != Li


def test_a_neighbour_list_with_skin_gives_the_same_result() -> None:
    rng = np.random.default_rng(13)
    a = random_system(rng, 20, [True] * 3, 7.0, True)
    pos, z, cell, pbc, sidx = as_batch([a])
    for model in (small_model(6), LennardJones(cutoff=4.0)):
        skin = neighbor_list(pos, cell, pbc, sidx, model.cutoff + 1.0)
        plain = evaluate(model, pos, z, cell, pbc, sidx, stress=True)
        padded = evaluate(model, pos, z, cell, pbc, sidx, neighbors=skin, stress=True)
        assert skin.n_edges > neighbor_list(pos, cell, pbc, sidx, model.cutoff).n_edges
        assert float(padded.energy[0]) == pytest.approx(float(plain.energy[0]), abs=1e-10)
        assert padded.forces is not None
        assert plain.forces is not None
        torch.testing.assert_close(padded.forces, plain.forces, atol=1e-10, rtol=0)


def test_float32_agrees_with_float64() -> None:
    a = molecule(np.random.default_rng(6), 12)
    m64 = small_model(5)
    m32 = small_model(5, torch.float32)
    pos, z, cell, pbc, sidx = as_batch([a])
    o64 = evaluate(m64, pos, z, cell, pbc, sidx)
    o32 = evaluate(m32, pos.float(), z, cell.float(), pbc, sidx)
    assert o32.energy.dtype == torch.float32
    assert o32.forces is not None
    assert o64.forces is not None
    assert float(o32.energy[0]) == pytest.approx(float(o64.energy[0]), abs=1e-4)
    torch.testing.assert_close(o32.forces.double(), o64.forces, atol=1e-4, rtol=1e-4)


def test_model_rejects_unknown_elements() -> None:
    model = small_model()
    with pytest.raises(SimInputError, match=r"\[26\]"):
        model.species_index(torch.tensor([1, 26]))
    a = Atoms("FeH", positions=[[0, 0, 0], [1.5, 0, 0]])
    a.calc = MLPCalculator(model)
    with pytest.raises(SimInputError, match="26"):
        a.get_potential_energy()


# ------------------------------------------------------------------ files and calculator


def test_save_load_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = small_model(7)
    path = save_model(model, tmp_path / "m.pt", {"version": 3, "metrics": {"force_mae": 0.1}})
    payload = torch.load(path, weights_only=True)  # must not need pickle of classes
    assert payload["kind"] == "moment-mlp"
    loaded = load_model(path)
    assert isinstance(loaded, MomentPotential)
    assert loaded.metadata["version"] == 3
    assert loaded.metadata["species"] == list(model.species)
    assert loaded.metadata["cutoff"] == 4.0
    a = molecule(np.random.default_rng(8), 8)
    pos, z, cell, pbc, sidx = as_batch([a])
    e_old = evaluate(model, pos, z, cell, pbc, sidx).energy
    e_new = evaluate(loaded.to(F64), pos, z, cell, pbc, sidx).energy
    assert float(e_new[0]) == pytest.approx(float(e_old[0]), abs=1e-4)  # stored as float32


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_calculator(tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="no-such-model"):
        load_calculator("no-such-model")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_calculator(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelFileError, match="not a sim_backend model"):
        load_model(foreign)
    path = save_model(small_model(), tmp_path / "k.pt", kind="no-such-kind")
    with pytest.raises(ModelFileError, match="unknown model kind 'no-such-kind'"):
        load_model(path)
    with pytest.raises(SimInputError, match="dtype"):
        load_calculator(path, dtype=torch.int32)


def test_calculator_equals_evaluate_on_the_batch() -> None:
    rng = np.random.default_rng(9)
    a = random_system(rng, 14, [True] * 3, 6.0, True)
    a.numbers = rng.choice([1, 3, 6, 8], size=len(a))
    a.info["total_charge"] = 1
    model = small_model(10)
    a.calc = MLPCalculator(model)
    pos, z, cell, pbc, sidx = as_batch([a])
    out = evaluate(
        model, pos, z, cell, pbc, sidx, charge=torch.tensor([1.0], dtype=F64), stress=True
    )
    assert out.forces is not None
    assert out.stress is not None
    assert a.get_potential_energy() == pytest.approx(float(out.energy[0]), abs=1e-10)
    np.testing.assert_allclose(a.get_forces(), out.forces.numpy(), atol=1e-10)
    np.testing.assert_allclose(a.get_stress(voigt=False), out.stress[0].numpy(), atol=1e-12)


def test_shipped_default_model_loads_offline() -> None:
    path = resolve_model_path(None)
    assert path.name == "default.pt"
    assert path.stat().st_size < 3_000_000
    calc = load_calculator(dtype=torch.float32)
    ec = Atoms(
        "OC(O)OCCHHHH",
        positions=[
            [0.0, 0.0, 2.4],
            [0.0, 0.0, 1.2],
            [1.1, 0.0, 0.45],
            [-1.1, 0.0, 0.45],
            [0.75, 0.0, -0.95],
            [-0.75, 0.0, -0.95],
            [1.2, 0.9, -1.4],
            [1.2, -0.9, -1.4],
            [-1.2, 0.9, -1.4],
            [-1.2, -0.9, -1.4],
        ],
    )
    ec.calc = calc
    e = ec.get_potential_energy()
    f = ec.get_forces()
    assert np.isfinite(e)
    assert -700 < e < -450  # GFN2-xTB puts EC near -559 eV
    assert np.isfinite(f).all()
    assert np.abs(f.sum(axis=0)).max() < 1e-3  # no net force on an isolated molecule


def test_import_sim_backend_is_light() -> None:
    code = "import sys, sim_backend; assert 'torch' not in sys.modules and 'ase' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    import sim_backend

    assert sim_backend.load_calculator is load_calculator  # the lazy attribute resolves


# ------------------------------------------------------------------ data and training


def lj_frames(n: int, seed: int) -> list[Atoms]:
    """Small clusters labelled by ASE's Lennard-Jones (a stand-in for xTB labels)."""
    rng = np.random.default_rng(seed)
    calc = AseLJ(epsilon=0.2, sigma=1.4, rc=4.0, smooth=True)
    frames = []
    for _ in range(n):
        a = molecule(rng, int(rng.integers(4, 9)), spread=2.0)
        a.numbers = rng.choice([1, 6, 8], size=len(a))
        a.calc = calc
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        frames.append(a)
    return frames


def test_split_is_stable_and_respects_info() -> None:
    frames = lj_frames(40, 11)
    frames[0].info["split"] = "test"
    s1 = split_frames(frames)
    s2 = split_frames(frames[::-1])
    assert frames[0] in s1["test"]
    assert sum(len(v) for v in s1.values()) == 40
    assert {id(a) for a in s1["val"]} == {id(a) for a in s2["val"]}
    frames[1].info["split"] = "holdout"
    with pytest.raises(SimInputError, match="holdout"):
        split_frames(frames)


def test_tiny_training_reduces_the_loss_and_resumes(tmp_path: Path) -> None:
    frames = lj_frames(48, 12)
    hyper = {
        "cutoff": 4.0,
        "n_basis": 6,
        "n_channels": 6,
        "hidden": [16],
        "batch_size": 8,
        "lr": 1e-2,
        "energy_weight": 1.0,
        "force_weight": 10.0,
    }
    history: list[dict[str, float]] = []
    ckpt = tmp_path / "ckpt.pt"
    _model, metrics = train(
        frames[:40],
        frames[40:],
        hyper=hyper,
        epochs=6,
        seed=0,
        progress=history.append,
        checkpoint=ckpt,
        test_frames=frames[40:],
    )
    assert len(history) == 6
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    assert metrics["test"]["force_mae_mev_per_a"] > 0
    best = min(h["val_loss"] for h in history)
    assert metrics["best_epoch"] == [h["val_loss"] for h in history].index(best)
    assert ckpt.is_file()
    # Resuming continues from the checkpoint's epoch, not from scratch.
    _, metrics2 = train(frames[:40], frames[40:], hyper=hyper, epochs=8, seed=0, checkpoint=ckpt)
    assert metrics2["epochs_run"] == 8
    with pytest.raises(SimInputError, match="unknown hyper-parameters"):
        train(frames[:4], frames[4:6], hyper={"learning_rate": 1.0})
    # Samples collate into a batch whose edges stay within each system.
    b = collate(prepare(frames[:3], 4.0))
    assert bool((b.system_idx[b.edge_index[0]] == b.system_idx[b.edge_index[1]]).all())
