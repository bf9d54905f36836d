"""Batched MD engine: conservation, thermostats, batching, neighbour reuse, stability, dry test."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.lattice.cubic import FaceCenteredCubic
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.md import integrators as integ
from sim_backend.md.neighbors_reuse import build_neighbors, update_neighbors
from sim_backend.md.runner import dry_test, run_md
from sim_backend.md.stability import check_stability, make_monitor
from sim_backend.md.state import (
    kinetic_energy,
    maxwell_boltzmann_momenta,
    state_from_atoms,
    state_to_atoms,
    temperature,
)
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.lj import LennardJones
from sim_backend.nn.potential import Potential, edge_vectors

torch.set_num_threads(1)


def argon(size: int = 3, a: float = 5.26, rattle: float = 0.0, seed: int = 0) -> Atoms:
    atoms: Atoms = FaceCenteredCubic("Ar", size=(size, size, size), latticeconstant=a)
    if rattle:
        atoms.rattle(rattle, seed=seed)  # type: ignore[no-untyped-call]
    return atoms


def lj64() -> LennardJones:
    return LennardJones(cutoff=7.5).double()


def test_state_roundtrip_and_maxwell_boltzmann() -> None:
    reps = [argon(2, rattle=0.05, seed=k) for k in range(3)]
    st = state_from_atoms(reps, temperature_k=120.0, seed=4, dtype=torch.float64)
    assert st.n_systems == 3 and st.n_atoms == 96
    assert torch.allclose(temperature(st), torch.full((3,), 120.0, dtype=torch.float64))
    p_tot = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, st.system_idx, st.momenta)
    assert float(p_tot.abs().max()) < 1e-12
    back = state_to_atoms(st)
    assert np.allclose(back[1].positions, reps[1].positions)
    assert np.allclose(back[2].arrays["momenta"], st.momenta[64:].numpy())
    # same seed -> same draw; different seed -> different
    again = state_from_atoms(reps, temperature_k=120.0, seed=4, dtype=torch.float64)
    assert torch.equal(again.momenta, st.momenta)
    other = state_from_atoms(reps, temperature_k=120.0, seed=5, dtype=torch.float64)
    assert not torch.allclose(other.momenta, st.momenta)


def test_nve_energy_conservation_argon() -> None:
    tr = run_md(
        [argon(3, rattle=0.02)], lj64(), ensemble="nve", temperature_k=80.0,
        timestep_fs=5.0, n_steps=400, sample_every=10, dtype=torch.float64, device="cpu",
    )  # fmt: skip
    e = tr.conserved_energy[:, 0] / 108
    t_ps = tr.times_fs / 1000.0
    drift_per_ps = abs(np.polyfit(t_ps, e, 1)[0])
    assert drift_per_ps < 2e-5  # eV/atom/ps
    assert np.ptp(e) < 1e-4
    assert tr.temperature[-1, 0] > 20.0  # it actually moved
    assert tr.n_neighbor_builds < 400 / 4  # the skin lets lists be reused


def test_nve_breaks_with_a_far_too_long_timestep() -> None:
    """The conservation bound above can fail: with 40 fs steps the spread exceeds it."""
    tr = run_md(
        [argon(2, rattle=0.02)], lj64(), ensemble="nve", temperature_k=80.0,
        timestep_fs=40.0, n_steps=60, sample_every=10, dtype=torch.float64, device="cpu",
        max_energy_drift_per_atom=10.0,
    )  # fmt: skip
    assert np.ptp(tr.conserved_energy[:, 0] / 32) > 1e-4


@pytest.mark.parametrize(
    ("ensemble", "kwargs"),
    [("csvr", {"tau_fs": 100.0}), ("langevin", {"friction_per_fs": 0.02})],
)
def test_thermostat_reaches_target(ensemble: str, kwargs: dict[str, float]) -> None:
    reps = [argon(2, a=5.5, rattle=0.02, seed=k) for k in range(8)]
    model = LennardJones(cutoff=7.0).double()
    st = state_from_atoms(reps, temperature_k=20.0, seed=11, dtype=torch.float64)
    st = integ.md_init(st, model, skin=1.0)
    step = integ.csvr_step if ensemble == "csvr" else integ.langevin_step
    temps = []
    for k in range(500):
        st = step(st, model, 5.0, temperature_k=90.0, **kwargs)
        if k >= 250:
            temps.append(temperature(st))
    t_mean = float(torch.stack(temps).mean())
    assert t_mean == pytest.approx(90.0, rel=0.04)
    # conserved quantity (energy minus thermostat work) stays put although T rose 20 -> 90 K
    drift = (integ.conserved_energy(st) - st.energy.new_tensor(0)).std()
    assert float(drift) < 1.0


def test_csvr_kinetic_energy_fluctuations_are_canonical() -> None:
    # ideal gas (no forces): CSVR alone must sample K with var = Ndf/2 (kT)^2
    reps = [Atoms("Ar2", positions=[[0, 0, 0], [5, 0, 0]], cell=[30, 30, 30], pbc=True)] * 1
    st = state_from_atoms(reps * 64, temperature_k=100.0, seed=0, dtype=torch.float64)
    ks = []
    for _ in range(400):
        st = integ.csvr_rescale(st, 5.0, 100.0, 20.0)
        ks.append(kinetic_energy(st))
    k = torch.stack(ks[50:]).flatten()
    kt = 8.617333262e-5 * 100.0
    ndf = 3.0
    assert float(k.mean()) == pytest.approx(ndf / 2 * kt, rel=0.05)
    assert float(k.var()) == pytest.approx(ndf / 2 * kt * kt, rel=0.15)


def test_batched_equals_separate_runs() -> None:
    reps = [argon(2, rattle=0.1, seed=k) for k in range(4)]
    model = lj64()
    batched = run_md(
        reps, model, ensemble="nve", temperature_k=100.0, timestep_fs=5.0, n_steps=100,
        sample_every=50, dtype=torch.float64, device="cpu", seed=10,
    )  # fmt: skip
    for k in range(4):
        alone = run_md(
            [reps[k]], model, ensemble="nve", temperature_k=100.0, timestep_fs=5.0,
            n_steps=100, sample_every=50, dtype=torch.float64, device="cpu", seed=10 + k,
        )  # fmt: skip
        idx = batched.atoms_of(k)
        assert np.allclose(batched.positions[-1, idx], alone.positions[-1], atol=1e-9, rtol=0)
        assert batched.potential_energy[-1, k] == pytest.approx(alone.potential_energy[-1, 0])
    assert batched.positions[-1].std() > 0


def test_neighbor_reuse_matches_rebuild_every_step() -> None:
    reps = [argon(2, rattle=0.1, seed=k) for k in range(2)]
    kw = {"ensemble": "nve", "temperature_k": 150.0, "timestep_fs": 5.0, "n_steps": 150,
          "sample_every": 150, "dtype": torch.float64, "device": "cpu", "seed": 3}  # fmt: skip
    reuse = run_md(reps, lj64(), skin=1.5, **kw)  # type: ignore[arg-type]
    every = run_md(reps, lj64(), skin=0.0, **kw)  # type: ignore[arg-type]
    assert every.n_neighbor_builds == 151
    assert reuse.n_neighbor_builds < 40
    assert np.allclose(reuse.positions[-1], every.positions[-1], atol=1e-9, rtol=0)
    # forces from the reused (unwrapped, skinned) list equal a fresh list's forces
    st = reuse.final_state
    assert st is not None
    fresh = evaluate(lj64(), st.positions, st.numbers, st.cell, st.pbc, st.system_idx)
    assert fresh.forces is not None
    assert torch.allclose(st.forces, fresh.forces, atol=1e-10)
    # atoms left the cell (positions are unwrapped) and it did not matter
    frac = np.linalg.solve(reps[0].cell.array.T, reuse.positions[-1].T).T
    assert (frac < 0).any() or (frac >= 1).any()


def test_only_systems_that_moved_are_rebuilt() -> None:
    reps = [argon(2), argon(2)]
    st = state_from_atoms(reps, dtype=torch.float64)
    cache = build_neighbors(st.positions, st.cell, st.pbc, st.system_idx, 2, cutoff=7.5, skin=1.0)
    moved = st.positions.clone()
    moved[40] += torch.tensor([0.7, 0.0, 0.0], dtype=torch.float64)  # atom of system 1
    new = update_neighbors(cache, moved, st.cell, st.pbc, st.system_idx, 2)
    assert new.system_rebuilds.tolist() == [0, 1]
    assert torch.equal(new.ref_positions[:32], cache.ref_positions[:32])
    small = st.positions + 0.4 / 3**0.5
    assert update_neighbors(cache, small, st.cell, st.pbc, st.system_idx, 2) is cache
    fresh = evaluate(lj64(), moved, st.numbers, st.cell, st.pbc, st.system_idx)
    from sim_backend.nn.neighbors import NeighborList

    reused = evaluate(
        lj64(), moved, st.numbers, st.cell, st.pbc, st.system_idx,
        neighbors=NeighborList(edge_index=new.edge_index, cell_offsets=new.cell_offsets),
    )  # fmt: skip
    assert fresh.forces is not None and reused.forces is not None
    assert torch.allclose(fresh.forces, reused.forces, atol=1e-12)


class ToyBonds(Potential):
    """Harmonic pairs within 3 Å; the rest length grows with the system charge and an
    energy of NaN marks charge < 0, so single replicas can be made to fail on purpose."""

    def __init__(self) -> None:
        super().__init__(cutoff=3.0, species=(7,))
        self.k = 20.0

    def forward(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        system_idx: Tensor,
        edge_index: Tensor,
        cell_offsets: Tensor,
        n_systems: int,
        charge: Tensor | None = None,
    ) -> Tensor:
        assert charge is not None
        vec = edge_vectors(positions, cell, system_idx, edge_index, cell_offsets)
        r = torch.linalg.norm(vec, dim=-1)
        owner = system_idx[edge_index[0]]
        r0 = 1.1 + 1.5 * torch.clamp(charge, min=0.0)[owner]
        e = torch.where(r < self.cutoff, 0.25 * self.k * (r - r0) ** 2, torch.zeros_like(r))
        out = torch.zeros(n_systems, dtype=positions.dtype).index_add(0, owner, e)
        return torch.where(charge < 0, torch.full_like(out, float("nan")), out)


def dimers() -> Atoms:
    pos = [[2, 2, 2], [3.1, 2, 2], [12, 12, 12], [12, 13.1, 12]]
    return Atoms("N4", positions=pos, cell=[20, 20, 20], pbc=True)


def test_blown_bond_and_nan_replicas_are_stopped_others_continue() -> None:
    model = ToyBonds().double()
    st = state_from_atoms(
        [dimers()] * 4, temperature_k=300.0, seed=1, dtype=torch.float64,
        charges=[0.0, 1.0, 0.0, -1.0],
    )  # fmt: skip
    st = integ.md_init(st, model, skin=0.5)
    mon = make_monitor(st)
    assert mon.bonds.pairs.shape[1] == 8  # two N-N bonds per replica
    from sim_backend.md.runner import simulate

    tr = simulate(
        st, model, mon, ensemble="nve", temperature_k=300.0, timestep_fs=0.5,
        n_steps=400, sample_every=10,
    )  # fmt: skip
    ev = {e["system"]: e for e in tr.stability["stopped"]}
    assert set(ev) == {1, 3}
    assert ev[1]["reason"] == "bond" and ev[1]["value"] > 0.5
    assert ev[3]["reason"] == "non-finite" and ev[3]["step"] == 0
    assert tr.stability["stable_fraction"] == 0.5
    assert tr.alive[-1].tolist() == [True, False, True, False]
    final = tr.final_state
    assert final is not None
    assert final.step.tolist()[0] == 400 and final.step.tolist()[2] == 400
    assert final.step.tolist()[1] == ev[1]["step"] < 400
    # the stopped replica is frozen and finite; the live ones kept their bonds
    idx1 = tr.atoms_of(1)
    frozen = [k for k in range(len(tr.times_fs)) if not tr.alive[k, 1]]
    assert np.allclose(tr.positions[frozen[0], idx1], tr.positions[-1, idx1])
    assert np.isfinite(tr.positions).all()
    d = np.linalg.norm(tr.positions[:, 1] - tr.positions[:, 0], axis=-1)
    assert d.max() < 1.6


def test_energy_drift_check_flags_only_that_replica() -> None:
    model = ToyBonds().double()
    st = state_from_atoms([dimers()] * 3, temperature_k=100.0, seed=2, dtype=torch.float64)
    st = integ.md_init(st, model, skin=0.5)
    mon = make_monitor(st, max_energy_drift_per_atom=0.05)
    jumped = st.replace(energy=st.energy + torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64))
    out = check_stability(jumped, mon)
    assert out.alive.tolist() == [True, False, True]
    assert mon.events[0].reason == "energy-drift"
    assert mon.events[0].value == pytest.approx(0.3 / 4)
    assert float(out.momenta[4:8].abs().sum()) == 0.0


def test_dry_test_is_json_and_physical() -> None:
    liquid = argon(3, a=5.9, rattle=0.2)
    res = dry_test(
        liquid, LennardJones(cutoff=7.0), temperature_k=110.0, n_replicas=2, n_equil_steps=60,
        n_steps=300, sample_every=5, timestep_fs=5.0, dtype=torch.float32, device="cpu",
        viscosity_pa_s=2.0e-4,
    )  # fmt: skip
    json.dumps(res)
    assert res["n_stable"] == 2
    assert res["density_g_cm3"]["value"] == pytest.approx(
        108 * 39.948 * 1.66054 / 5.9**3 / 27, rel=1e-4
    )
    d = res["diffusion_m2_s"]["Ar"]
    assert 1e-10 < d["value_m2_s"] < 1e-7 and d["error_m2_s"] > 0
    assert d["value_yeh_hummer_m2_s"] > d["value_m2_s"]
    assert res["li_o_coordination"] is None and res["conductivity_ms_cm"] is None
    assert res["mean_temperature_k"] == pytest.approx(110.0, rel=0.15)


def test_dry_test_with_one_replica_and_a_short_run() -> None:
    """One stable replica takes its D error from time blocks of >= 10 frames (30 frames:
    3 blocks; this crashed with a fixed 5), and too short a run says so instead."""
    liquid = argon(3, a=5.9, rattle=0.2)
    common: dict[str, Any] = {
        "temperature_k": 110.0, "n_replicas": 1, "n_equil_steps": 20, "sample_every": 5,
        "timestep_fs": 5.0, "dtype": torch.float32, "device": "cpu",
    }  # fmt: skip
    res = dry_test(liquid, LennardJones(cutoff=7.0), n_steps=150, **common)
    d = res["diffusion_m2_s"]["Ar"]
    assert d["method"] == "block averaging, 3 blocks" and d["error_m2_s"] > 0
    short = dry_test(liquid, LennardJones(cutoff=7.0), n_steps=45, **common)
    assert short["diffusion_m2_s"] == {}
    assert any("too short" in w for w in short["warnings"])


def test_float32_run_and_bad_inputs() -> None:
    tr = run_md(
        [argon(2, rattle=0.05)], LennardJones(cutoff=7.0), ensemble="langevin",
        temperature_k=80.0, n_steps=20, sample_every=10, dtype=torch.float32, device="cpu",
    )  # fmt: skip
    assert tr.final_state is not None and tr.final_state.dtype == torch.float32
    with pytest.raises(SimInputError, match="ensemble"):
        run_md([argon(2)], lj64(), ensemble="npe", dtype=torch.float64)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="timestep_fs"):
        run_md([argon(2)], lj64(), timestep_fs=-1.0, dtype=torch.float64)
    with pytest.raises(SimInputError, match="replicas"):
        run_md([], lj64(), dtype=torch.float64)
    with pytest.raises(SimInputError, match="seeds"):
        maxwell_boltzmann_momenta(torch.ones(2), torch.zeros(2, dtype=torch.long), 1, 10.0, [])
