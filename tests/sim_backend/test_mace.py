# mypy: disable-error-code="no-untyped-call"
"""The MACE peer (sim_backend.nn.mace) behind the Potential interface.

References: finite differences of the wrapper's own energy, ASE's numerical stress,
the same systems evaluated one at a time, and the energy before a save/load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones as AseLJ
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from sim_backend.errors import SimError, SimInputError
from sim_backend.nn.calculator import load_calculator
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.mace import MacePotential, MaceUnavailableError, _import_mace
from sim_backend.nn.model import load_model, read_model_file, save_model
from sim_backend.nn.neighbors import neighbor_list
from sim_backend.nn.train import model_hyper_defaults, train
from tests.sim_backend.helpers import (
    F64,
    as_batch,
    assert_forces_match_finite_differences,
    molecule,
)

torch.set_num_threads(1)
SMALL: dict[str, Any] = {
    "hidden_irreps": "8x0e+8x1o",
    "max_ell": 1,
    "correlation": 2,
    "num_interactions": 2,
    "num_bessel": 6,
    "mlp_irreps": "8x0e",
    "radial_mlp": [16],
}


def small_box(rng: np.random.Generator) -> Atoms:
    """A small triclinic periodic box (the cutoff exceeds half the cell: many images)."""
    cell = np.array([[4.2, 0.0, 0.0], [0.6, 4.0, 0.0], [-0.4, 0.5, 4.4]])
    frac = np.array([[0.1, 0.1, 0.1], [0.6, 0.2, 0.3], [0.3, 0.7, 0.2], [0.2, 0.3, 0.7],
                     [0.7, 0.7, 0.6], [0.5, 0.5, 0.1]])  # fmt: skip
    frac = frac + rng.uniform(-0.03, 0.03, frac.shape)
    return Atoms(numbers=[6, 8, 1, 1, 3, 15], scaled_positions=frac, cell=cell, pbc=True)


@pytest.fixture(scope="module")
def model() -> MacePotential:
    torch.manual_seed(0)
    m = MacePotential(4.0, (1, 3, 6, 8, 9, 15), avg_num_neighbors=8.0,
                      atomic_energies=[-10.0, -5.0, -40.0, -60.0, -70.0, -90.0], scale=0.7,
                      **SMALL).to(F64)  # fmt: skip
    with torch.no_grad():
        m.charge_energy.fill_(-0.3)
        for t in m.state_dict().values():  # float32-exact, so a saved file round-trips exactly
            if t.is_floating_point():
                t.copy_(t.float())
    return m


def test_energy_is_invariant_and_forces_equivariant(model: MacePotential) -> None:
    rng = np.random.default_rng(1)
    for a in (molecule(rng, 12, spread=2.2), small_box(rng)):
        pos, z, cell, pbc, sidx = as_batch([a])
        base = evaluate(model, pos, z, cell, pbc, sidx)
        assert base.forces is not None
        assert float(base.forces.abs().max()) > 1e-3  # a zero model would pass the rest
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rot = torch.tensor(q, dtype=F64)
        shift = torch.tensor([3.0, -1.0, 7.5], dtype=F64)
        out = evaluate(model, pos @ rot.T + shift, z, cell @ rot.T, pbc, sidx)
        assert out.forces is not None
        assert float(out.energy[0]) == pytest.approx(float(base.energy[0]), abs=1e-9)
        torch.testing.assert_close(out.forces, base.forces @ rot.T, atol=1e-9, rtol=0)
        perm = torch.tensor(rng.permutation(len(a)))
        out_p = evaluate(model, pos[perm], z[perm], cell, pbc, sidx)
        assert out_p.forces is not None
        assert float(out_p.energy[0]) == pytest.approx(float(base.energy[0]), abs=1e-9)
        torch.testing.assert_close(out_p.forces, base.forces[perm], atol=1e-9, rtol=0)


def test_forces_and_stress_match_finite_differences(model: MacePotential) -> None:
    rng = np.random.default_rng(2)
    a = molecule(rng, 9, spread=2.2)
    assert_forces_match_finite_differences(model, a, [(0, 0), (3, 1), (5, 2), (8, 0)])
    # Stress by the strain derivative equals central differences of E under strain.
    box = small_box(rng)
    pos, z, cell, pbc, sidx = as_batch([box])
    out = evaluate(model, pos, z, cell, pbc, sidx, stress=True)
    assert out.stress is not None
    volume = abs(float(torch.linalg.det(cell[0])))
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        e = []
        for d in (1e-5, -1e-5):
            eps = torch.eye(3, dtype=F64)
            eps[i, j] += d / 2 if i != j else d
            eps[j, i] += d / 2 if i != j else 0.0
            e.append(float(evaluate(model, pos @ eps, z, cell @ eps, pbc, sidx,
                                    forces=False).energy[0]))  # fmt: skip
        fd = (e[0] - e[1]) / (2e-5) / volume
        assert float(out.stress[0, i, j]) == pytest.approx(fd, abs=1e-8)
    assert float(out.stress.abs().max()) > 1e-4


def test_charge_shifts_energy_only(model: MacePotential) -> None:
    a = molecule(np.random.default_rng(3), 8, spread=2.2)
    pos, z, cell, pbc, sidx = as_batch([a])
    e0 = evaluate(model, pos, z, cell, pbc, sidx, charge=torch.tensor([0.0], dtype=F64))
    e1 = evaluate(model, pos, z, cell, pbc, sidx, charge=torch.tensor([1.0], dtype=F64))
    assert float(e1.energy[0] - e0.energy[0]) == pytest.approx(-0.3, abs=1e-7)  # float32 -0.3
    assert e0.forces is not None and e1.forces is not None
    torch.testing.assert_close(e1.forces, e0.forces, atol=0, rtol=0)


def test_batched_equals_one_at_a_time_and_skin_is_ignored(model: MacePotential) -> None:
    rng = np.random.default_rng(4)
    systems = [molecule(rng, 7, spread=2.2), small_box(rng), molecule(rng, 11, spread=2.2)]
    pos, z, cell, pbc, sidx = as_batch(systems)
    charge = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    batch = evaluate(model, pos, z, cell, pbc, sidx, charge=charge, stress=True)
    assert batch.forces is not None and batch.stress is not None
    start = 0
    for k, a in enumerate(systems):
        p1, z1, c1, b1, s1 = as_batch([a])
        one = evaluate(model, p1, z1, c1, b1, s1, charge=charge[k : k + 1], stress=True)
        assert one.forces is not None and one.stress is not None
        assert float(batch.energy[k]) == pytest.approx(float(one.energy[0]), abs=1e-10)
        torch.testing.assert_close(batch.forces[start : start + len(a)], one.forces,
                                   atol=1e-10, rtol=0)  # fmt: skip
        torch.testing.assert_close(batch.stress[k], one.stress[0], atol=1e-12, rtol=0)
        start += len(a)
    # A list with a 1 Å skin (as MD builds it) gives the same numbers: pairs beyond the
    # cutoff carry nothing.
    nl = neighbor_list(pos, cell, pbc, sidx, model.cutoff + 1.0)
    assert nl.n_edges > neighbor_list(pos, cell, pbc, sidx, model.cutoff).n_edges
    skin = evaluate(model, pos, z, cell, pbc, sidx, neighbors=nl, charge=charge, stress=True)
    assert skin.forces is not None and skin.stress is not None
    torch.testing.assert_close(skin.energy, batch.energy, atol=1e-10, rtol=0)
    torch.testing.assert_close(skin.forces, batch.forces, atol=1e-10, rtol=0)
    torch.testing.assert_close(skin.stress, batch.stress, atol=1e-12, rtol=0)


def test_rejects_unknown_elements_and_does_not_touch_caller_tensors(
    model: MacePotential,
) -> None:
    a = molecule(np.random.default_rng(5), 6, spread=2.2)
    pos, z, cell, pbc, sidx = as_batch([a])
    nl = neighbor_list(pos, cell, pbc, sidx, model.cutoff)
    e = model(pos, z, cell, sidx, nl.edge_index, nl.cell_offsets, 1)
    assert not pos.requires_grad  # MACE's prepare_graph got a detached copy
    assert e.shape == (1,)
    z_bad = z.clone()
    z_bad[0] = 17
    with pytest.raises(SimInputError, match=r"\[17\]"):
        model(pos, z_bad, cell, sidx, nl.edge_index, nl.cell_offsets, 1)


def test_save_load_round_trip_and_calculator(model: MacePotential, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "mace.pt", metadata={"note": "test"}, kind="mace")
    payload = torch.load(path, weights_only=True)  # plain tensors + JSON strings
    assert payload["kind"] == "mace"
    kind, hyper, meta, _state = read_model_file(path)
    assert (kind, hyper["hidden_irreps"], meta["note"]) == ("mace", "8x0e+8x1o", "test")
    assert hyper["avg_num_neighbors"] == 8.0
    loaded = load_model(path).to(F64)
    assert isinstance(loaded, MacePotential)
    rng = np.random.default_rng(6)
    systems = [molecule(rng, 8, spread=2.2), small_box(rng)]
    pos, z, cell, pbc, sidx = as_batch(systems)
    ref = evaluate(model, pos, z, cell, pbc, sidx)
    got = evaluate(loaded, pos, z, cell, pbc, sidx)
    assert ref.forces is not None and got.forces is not None
    torch.testing.assert_close(got.energy, ref.energy, atol=1e-9, rtol=0)
    torch.testing.assert_close(got.forces, ref.forces, atol=1e-9, rtol=0)
    calc = load_calculator(path)
    box = systems[1].copy()
    box.calc = calc
    assert box.get_potential_energy() == pytest.approx(float(ref.energy[1]), abs=1e-9)
    np.testing.assert_allclose(box.get_forces(), ref.forces[8:].numpy(), atol=1e-9)
    assert box.get_stress().shape == (6,)


def test_missing_mace_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mace", None)
    with pytest.raises(MaceUnavailableError, match=r"sim-peers") as info:
        _import_mace()
    assert isinstance(info.value, SimError) and isinstance(info.value, ImportError)


def lj_frames(n: int, seed: int) -> list[Atoms]:
    """Small clusters labelled by ASE's Lennard-Jones (a stand-in for xTB labels)."""
    rng = np.random.default_rng(seed)
    calc = AseLJ(epsilon=0.2, sigma=0.9, rc=4.0, smooth=True)  # forces of a few eV/Å
    frames = []
    for k in range(n):
        a = molecule(rng, int(rng.integers(4, 9)), spread=2.0, species=(1, 6, 8))
        a.calc = calc
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info["split"] = ("train", "train", "train", "val", "test")[k % 5]
        frames.append(a)
    return frames


def test_training_reduces_the_loss() -> None:
    frames = lj_frames(46, 7)
    hyper = {**SMALL, "cutoff": 4.0, "species": [1, 6, 8], "batch_size": 8, "lr": 2e-2,
             "energy_weight": 1.0, "force_weight": 10.0}  # fmt: skip
    history: list[dict[str, float]] = []
    model, metrics = train(frames[:40], frames[40:], hyper=hyper, epochs=6, seed=0,
                           progress=history.append, model_kind="mace")  # fmt: skip
    assert isinstance(model, MacePotential)
    assert len(history) == 6 and metrics["model_kind"] == "mace"
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    assert history[-1]["val_force_mae_mev_per_a"] < 0.8 * history[0]["val_force_mae_mev_per_a"]
    assert metrics["val"]["force_mae_mev_per_a"] == pytest.approx(
        min(h["val_force_mae_mev_per_a"] for h in history[metrics["best_epoch"] :]), rel=0.5
    )
    assert 1.0 < model.hyper["avg_num_neighbors"] < 8.0  # clusters of 4-8 atoms
    with pytest.raises(SimInputError, match="unknown hyper-parameters"):
        train(frames[:4], frames[4:6], hyper={"n_channels": 4}, model_kind="mace")
    with pytest.raises(SimInputError, match="model_kind"):
        train(frames[:4], frames[4:6], model_kind="nequip")


def test_cli_train_kind_mace_writes_a_loadable_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from labctl.cli import app

    data = tmp_path / "lj.extxyz"
    write(data, lj_frames(12, 8), format="extxyz")
    out = tmp_path / "mace.pt"
    hyper = {**SMALL, "cutoff": 4.0, "species": [1, 6, 8]}
    res = CliRunner().invoke(app, ["sim", "train", str(data), "--out", str(out), "--epochs", "1",
                                   "--kind", "mace", "--hyper", json.dumps(hyper)])  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout[res.stdout.index("{") :])
    assert metrics["model_kind"] == "mace" and metrics["epochs_run"] == 1
    kind, hyper_out, meta, _ = read_model_file(out)
    assert (kind, meta["model_kind"], hyper_out["hidden_irreps"]) == ("mace", "mace", "8x0e+8x1o")
    frame = lj_frames(1, 99)[0]
    frame.calc = load_calculator(out)
    assert np.isfinite(frame.get_forces()).all()
    assert float(np.abs(frame.get_forces()).max()) > 0


def test_mace_hyper_defaults_keep_the_training_keys() -> None:
    moment, mace = model_hyper_defaults(), model_hyper_defaults("mace")
    assert {"n_basis", "n_channels", "hidden"} <= set(moment) - set(mace)
    assert {"hidden_irreps", "correlation", "max_ell"} <= set(mace) - set(moment)
    shared = set(moment) & set(mace)
    assert {"batch_size", "energy_weight", "force_weight", "patience", "dtype"} <= shared
    assert mace["lr"] == 1e-2 and moment["lr"] == 3e-3


def test_batched_nve_md_runs_the_mace_peer(model: MacePotential) -> None:
    from sim_backend.md import integrators as integ
    from sim_backend.md.state import state_from_atoms

    box = small_box(np.random.default_rng(9))
    st = state_from_atoms([box, box], temperature_k=300, seed=0, dtype=F64)
    st = integ.nve_init(st, model, skin=1.0)
    e0 = integ.conserved_energy(st)
    for _ in range(20):
        st = integ.nve_step(st, model, 0.25)
    e1 = integ.conserved_energy(st)
    assert bool(torch.isfinite(st.positions).all())
    # Velocity Verlet at 0.25 fs conserves the total energy of each replica closely.
    assert float((e1 - e0).abs().max()) < 1e-5  # eV; measured 6e-7
    assert (
        float((st.positions - torch.tensor(np.concatenate([box.positions] * 2))).abs().max()) > 1e-3
    )
