"""Monte Carlo barostat: exact ideal-gas statistics, rigid molecular scaling, rejection,
dead replicas, batching, adaptation, the npt ensemble and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.lattice.cubic import FaceCenteredCubic
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.md import barostat as baro
from sim_backend.md import integrators as integ
from sim_backend.md.neighbors_reuse import build_neighbors
from sim_backend.md.runner import run_md
from sim_backend.md.state import KB_EV, MDState, state_from_atoms
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.lj import LennardJones
from sim_backend.nn.potential import Potential

torch.set_num_threads(1)
F64 = torch.float64


class Zero(Potential):
    """Identically zero energy: non-interacting molecules (an ideal gas of rigid bodies)."""

    def __init__(self) -> None:
        super().__init__(cutoff=0.5, species=(7,))

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
        zero = torch.zeros(n_systems, dtype=positions.dtype)
        # keep positions in the graph so the autograd forces are defined (and zero)
        return zero.index_add(0, system_idx, 0.0 * positions.sum(-1))


def n2_gas(n_mol: int, box: float, seed: int) -> Atoms:
    """``n_mol`` N2 molecules (1.1 Å) at random places and orientations in a cubic box."""
    rng = np.random.default_rng(seed)
    pos = []
    for _ in range(n_mol):
        c = rng.uniform(0.0, box, 3)
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        pos += [c - 0.55 * u, c + 0.55 * u]
    return Atoms(f"N{2 * n_mol}", positions=pos, cell=[box] * 3, pbc=True)


def pair_ids(state: MDState) -> Tensor:
    return torch.arange(state.n_atoms) // 2


def argon(size: int = 2, a: float = 5.26, rattle: float = 0.05, seed: int = 0) -> Atoms:
    atoms: Atoms = FaceCenteredCubic("Ar", size=(size, size, size), latticeconstant=a)
    atoms.rattle(rattle, seed=seed)  # type: ignore[no-untyped-call]
    return atoms


def test_ideal_gas_mean_volume_is_exact() -> None:
    """Zero potential: ln V moves sample V^(N_mol+1) exp(-PV/kT) dlnV, a Gamma(N_mol+1, kT/P)
    in V, so <V> = (N_mol+1) kT/P and var V = (N_mol+1)(kT/P)^2. Without the +1 (OpenMM's
    uniform-in-V count used with ln V moves) <V> would be 20 % lower, ~25 SEM away."""
    n_mol, n_rep, t_k, v_mean = 4, 48, 300.0, 1500.0
    kt = KB_EV * t_k
    p_bar = (n_mol + 1) * kt / v_mean / units.bar
    reps = [n2_gas(n_mol, v_mean ** (1 / 3), seed=k) for k in range(n_rep)]
    st = state_from_atoms(reps, dtype=F64, seed=3)
    st = integ.md_init(st, Zero(), skin=0.0)
    mol = pair_ids(st)
    vols = []
    for k in range(900):
        st, _ = baro.mc_barostat_step(
            st, Zero(), pressure_bar=p_bar, temperature_k=t_k, molecule_idx=mol, max_dlnv=0.6
        )
        if k >= 100:
            vols.append(baro.cell_volumes(st.cell))
    v = torch.stack(vols).numpy()  # [T, R]
    per_rep = v.mean(0)  # replicas are independent: SEM from their spread
    mean, sem = float(per_rep.mean()), float(per_rep.std(ddof=1) / math.sqrt(n_rep))
    expected = (n_mol + 1) * kt / (p_bar * units.bar)
    print(f"<V> expected {expected:.1f} measured {mean:.1f} +- {sem:.1f} A^3")
    assert abs(mean - expected) < 3.5 * sem
    assert sem < 0.03 * expected  # precise enough to tell N_mol + 1 from N_mol
    var_expected = (n_mol + 1) * (kt / (p_bar * units.bar)) ** 2
    assert float(v.var()) == pytest.approx(var_expected, rel=0.15)
    # molecules stayed rigid through 900 moves
    d = torch.linalg.norm(st.positions[1::2] - st.positions[0::2], dim=-1)
    assert torch.allclose(d, torch.full_like(d, 1.1), atol=1e-10, rtol=0)


def test_acceptance_follows_the_formula_at_its_threshold() -> None:
    """For the ideal gas the acceptance probability is exp(-(P dV - (N+1) kT dlnV)/kT);
    a uniform just below it accepts, just above rejects."""
    n_mol, t_k, p_bar = 5, 250.0, 150.0
    st = state_from_atoms([n2_gas(n_mol, 12.0, seed=1)] * 2, dtype=F64)
    st = integ.md_init(st, Zero(), skin=0.0)
    kt, p = KB_EV * t_k, p_bar * units.bar
    dlnv = 0.3  # u0 = 0.8 with max_dlnv 0.5
    v = 12.0**3
    w = p * v * math.expm1(dlnv) - (n_mol + 1) * kt * dlnv
    p_acc = math.exp(-w / kt)
    assert 0.05 < p_acc < 0.95
    u = torch.tensor([[0.8, p_acc * (1 - 1e-6)], [0.8, p_acc * (1 + 1e-6)]], dtype=F64)
    out, acc = baro.mc_barostat_step(
        st, Zero(), pressure_bar=p_bar, temperature_k=t_k, molecule_idx=pair_ids(st),
        max_dlnv=0.5, uniforms=u,
    )  # fmt: skip
    assert acc.tolist() == [True, False]
    assert float(baro.cell_volumes(out.cell)[0]) == pytest.approx(v * math.exp(dlnv), rel=1e-12)


def test_molecular_scaling_is_rigid_and_scales_centres() -> None:
    """Intramolecular vectors unchanged, centres of mass scaled by s, also for a molecule
    wrapped across a face (its bond measured with its t=0 image stays the same)."""
    rng = np.random.default_rng(0)
    box = 15.0
    atoms = n2_gas(6, box, seed=2)
    pos = atoms.positions.copy()
    # CO-like masses so the centre of mass is not the midpoint
    masses = np.tile([12.0, 16.0], 6)
    # molecule 5 straddles the x face: its second atom is wrapped to the other side
    pos[10] = [box - 0.3, 7.0, 7.0]
    pos[11] = [0.8, 7.0, 7.0]  # 1.1 Å through the face, stored wrapped
    x = torch.tensor(pos, dtype=F64)
    cell = torch.eye(3, dtype=F64).unsqueeze(0) * box
    sidx = torch.zeros(12, dtype=torch.long)
    mol = torch.arange(12) // 2
    m = torch.tensor(masses, dtype=F64)
    s = float(np.exp(rng.uniform(-0.1, 0.1) / 3))
    new = baro.scale_molecules(x, m, cell, sidx, mol, torch.tensor([s], dtype=F64))
    image = torch.tensor([[-box, 0.0, 0.0]], dtype=F64)  # bond 10->11 crosses +x
    bond_old = x[1::2] - x[0::2]
    bond_new = new[1::2] - new[0::2]
    bond_old[5] -= image[0]
    bond_new[5] -= s * image[0]  # the image vector is a cell vector: it scales with the cell
    assert torch.allclose(bond_new, bond_old, atol=1e-10, rtol=0)
    mw = m.view(6, 2, 1)
    com_old = (x[:10].view(5, 2, 3) * mw[:5]).sum(1) / mw[:5].sum(1)
    com_new = (new[:10].view(5, 2, 3) * mw[:5]).sum(1) / mw[:5].sum(1)
    sep_old = com_old[:, None] - com_old[None]
    sep_new = com_new[:, None] - com_new[None]
    assert torch.allclose(sep_new, s * sep_old, atol=1e-10, rtol=0)
    assert not torch.allclose(new, x)  # it did move them


def test_accepted_move_is_consistent_and_conserved_quantity_continuous() -> None:
    """An accepted LJ move: energy and forces equal a fresh evaluation in the new cell, the
    energy change goes into thermostat_energy, and the merged neighbour list is exact."""
    model = LennardJones(cutoff=7.5).double()
    st = state_from_atoms([argon(seed=k) for k in range(3)], temperature_k=80.0, dtype=F64)
    st = integ.md_init(st, model, skin=1.0)
    mol = torch.arange(st.n_atoms)  # argon: every atom a molecule
    u = torch.tensor([[0.0, 0.0], [1.0, 0.999999], [0.3, 0.0]], dtype=F64)
    out, acc = baro.mc_barostat_step(
        st, model, pressure_bar=1e4, temperature_k=80.0, molecule_idx=mol, max_dlnv=0.05,
        uniforms=u,
    )  # fmt: skip
    assert acc.tolist() == [True, False, True]  # 1e4 bar: the maximal expansion is uphill
    fresh = evaluate(model, out.positions, out.numbers, out.cell, out.pbc, out.system_idx)
    assert fresh.forces is not None
    assert torch.allclose(out.energy, fresh.energy, atol=1e-10, rtol=0)
    assert torch.allclose(out.forces, fresh.forces, atol=1e-10, rtol=0)
    assert float((out.energy - st.energy)[0].abs()) > 1e-4  # the energy did change
    assert torch.allclose(
        integ.conserved_energy(out), integ.conserved_energy(st), atol=1e-12, rtol=0
    )
    assert torch.equal(out.momenta, st.momenta)
    # a few MD steps on the merged list equal steps on a list built from scratch
    a = out
    b = out.replace(
        neighbors=build_neighbors(
            out.positions, out.cell, out.pbc, out.system_idx, 3, cutoff=7.5, skin=1.0
        )
    )
    for _ in range(5):
        a, b = integ.nve_step(a, model, 5.0), integ.nve_step(b, model, 5.0)
    assert torch.allclose(a.positions, b.positions, atol=1e-10, rtol=0)


def test_rejection_and_dead_replicas_leave_everything_bit_identical() -> None:
    model = LennardJones(cutoff=7.5).double()
    st = state_from_atoms([argon(seed=k) for k in range(3)], temperature_k=80.0, dtype=F64)
    st = integ.md_init(st, model, skin=1.0)
    mol = torch.arange(st.n_atoms)
    kw = {"pressure_bar": 1e4, "temperature_k": 80.0, "molecule_idx": mol, "max_dlnv": 0.05}
    # all expand maximally at 1e4 bar against u = 0.999999: every system rejects
    up = torch.tensor([[1.0, 0.999999]] * 3, dtype=F64)
    out, acc = baro.mc_barostat_step(st, model, uniforms=up, **kw)  # type: ignore[arg-type]
    assert not bool(acc.any())
    for name in ("positions", "cell", "energy", "forces", "thermostat_energy", "momenta"):
        assert torch.equal(getattr(out, name), getattr(st, name)), name
    assert out.neighbors is not None and st.neighbors is not None
    assert out.neighbors.edge_index is st.neighbors.edge_index  # the old list, kept
    assert out.neighbors.n_builds == st.neighbors.n_builds + 1  # the trial build counted
    # system 1 dead: u1 = 0 would accept anything, yet it never moves
    dead = st.replace(alive=torch.tensor([True, False, True]))
    down = torch.tensor([[0.2, 0.0]] * 3, dtype=F64)
    out, acc = baro.mc_barostat_step(dead, model, uniforms=down, **kw)  # type: ignore[arg-type]
    assert acc.tolist() == [True, False, True]
    idx = dead.system_idx == 1
    assert torch.equal(out.positions[idx], dead.positions[idx])
    assert torch.equal(out.cell[1], dead.cell[1])
    assert torch.equal(out.energy[1], dead.energy[1])
    assert torch.equal(out.forces[idx], dead.forces[idx])
    assert not torch.equal(out.cell[0], dead.cell[0])


def test_batched_call_equals_single_system_calls() -> None:
    """Three systems in one call give what each gives alone with the same two uniforms."""
    model = LennardJones(cutoff=7.5).double()
    reps = [argon(seed=k, a=5.3 + 0.05 * k) for k in range(3)]
    u = torch.tensor([[0.1, 0.5], [0.95, 0.5], [0.6, 0.001]], dtype=F64)
    steps = torch.tensor([0.02, 0.05, 0.03], dtype=F64)
    st = integ.md_init(state_from_atoms(reps, dtype=F64), model, skin=1.0)
    out, acc = baro.mc_barostat_step(
        st,
        model,
        molecule_idx=torch.arange(st.n_atoms),
        max_dlnv=steps,
        uniforms=u,
        pressure_bar=5e3,
        temperature_k=90.0,
    )
    assert acc.tolist() == [True, False, True]
    for k in range(3):
        one = integ.md_init(state_from_atoms([reps[k]], dtype=F64), model, skin=1.0)
        o1, a1 = baro.mc_barostat_step(
            one, model, molecule_idx=torch.arange(one.n_atoms), max_dlnv=float(steps[k]),
            uniforms=u[k : k + 1], pressure_bar=5e3, temperature_k=90.0,
        )  # fmt: skip
        idx = st.system_idx == k
        assert bool(a1[0]) == bool(acc[k])
        assert torch.allclose(out.positions[idx], o1.positions, atol=1e-12, rtol=0)
        assert torch.allclose(out.cell[k], o1.cell[0], atol=1e-12, rtol=0)
        assert float(out.energy[k]) == pytest.approx(float(o1.energy[0]), abs=1e-10)
        assert float(out.thermostat_energy[k]) == pytest.approx(
            float(o1.thermostat_energy[0]), abs=1e-10
        )


def test_step_size_adapts_per_system() -> None:
    st = state_from_atoms([argon()] * 3, dtype=F64)
    stats = baro.barostat_stats(st, 0.02)
    every = torch.ones(3, dtype=torch.bool)
    for k in range(10):
        acc = torch.tensor([True, False, k % 2 == 0])  # 100 %, 0 %, 50 % accepted
        stats = baro.record_attempt(stats, acc, every)
    assert stats.max_dlnv.tolist() == pytest.approx([0.022, 0.018, 0.02])
    assert stats.attempted.tolist() == [10, 10, 10] and stats.accepted.tolist() == [10, 0, 5]
    assert stats.window_attempted.tolist() == [0, 0, 0]
    assert stats.acceptance == pytest.approx([1.0, 0.0, 0.5])
    # a later stage starts from the adapted steps, one per system
    again = baro.barostat_stats(st, stats.max_dlnv)
    assert again.max_dlnv.tolist() == pytest.approx([0.022, 0.018, 0.02])
    assert again.attempted.tolist() == [0, 0, 0]
    with pytest.raises(SimInputError, match="max_dlnv"):
        baro.barostat_stats(st, torch.tensor([0.01, 0.02]))


def test_npt_run_records_volumes_and_keeps_other_ensembles() -> None:
    """A tiny NPT run of compressed LJ argon at 1 atm expands it, records V per frame, keeps
    the conserved quantity continuous across volume moves; csvr keeps V fixed."""
    reps = [argon(seed=k, a=5.1) for k in range(2)]
    kw = {"temperature_k": 90.0, "timestep_fs": 5.0, "n_steps": 150, "sample_every": 10,
          "dtype": F64, "device": "cpu", "seed": 1}  # fmt: skip
    tr = run_md(reps, LennardJones(cutoff=7.5), ensemble="npt", barostat_every=2, **kw)  # type: ignore[arg-type]
    assert tr.volumes.shape == (16, 2)
    assert tr.barostat is not None and sum(tr.barostat["accepted"]) > 0
    assert (tr.volumes[-1] > tr.volumes[0]).all()  # compressed solid relaxes outwards
    assert np.allclose(tr.volumes[-1], np.abs(np.linalg.det(tr.cells)))
    rho = tr.densities_g_cm3()
    assert rho[0, 0] == pytest.approx(32 * 39.948 * 1.66053906660 / 5.1**3 / 8, rel=1e-6)
    assert tr.stability["stable_fraction"] == 1.0
    assert np.ptp(tr.conserved_energy, axis=0).max() / 32 < 2e-3  # eV/atom
    assert "barostat" in tr.summary()
    assert tr.barostat["max_dlnv"] != [0.01, 0.01]  # adapted (150 steps, 75 attempts)
    fixed = run_md(reps, LennardJones(cutoff=7.5), ensemble="npt", barostat_every=2,
                   barostat_adapt=False, **kw)  # type: ignore[arg-type]  # fmt: skip
    assert fixed.barostat is not None and fixed.barostat["max_dlnv"] == [0.01, 0.01]
    nvt = run_md(reps, LennardJones(cutoff=7.5), ensemble="csvr", **kw)  # type: ignore[arg-type]
    assert nvt.barostat is None and np.ptp(nvt.volumes) == 0.0


def test_bad_inputs_name_the_field() -> None:
    model = Zero()
    st = integ.md_init(state_from_atoms([n2_gas(2, 10.0, 0)], dtype=F64), model, skin=0.0)
    kw = {"temperature_k": 300.0, "molecule_idx": pair_ids(st)}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(SimInputError, match="pressure_bar"):
            baro.mc_barostat_step(st, model, pressure_bar=bad, **kw)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="max_dlnv"):
        baro.mc_barostat_step(st, model, pressure_bar=1.0, max_dlnv=0.0, **kw)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="temperature_k"):
        baro.mc_barostat_step(
            st, model, pressure_bar=1.0, temperature_k=0.0, molecule_idx=pair_ids(st)
        )
    with pytest.raises(SimInputError, match="molecule_idx"):
        baro.mc_barostat_step(
            st, model, pressure_bar=1.0, temperature_k=300.0, molecule_idx=torch.arange(3)
        )
    open_box = st.replace(pbc=torch.tensor([[True, True, False]]))
    with pytest.raises(SimInputError, match="pbc"):
        baro.mc_barostat_step(open_box, model, pressure_bar=1.0, **kw)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="ensemble"):  # npt is valid now; others are not
        run_md([argon()], LennardJones(cutoff=7.5), ensemble="npe", dtype=F64)  # type: ignore[arg-type]
    common = {"dtype": F64, "device": "cpu", "n_steps": 2, "ensemble": "npt"}
    with pytest.raises(SimInputError, match="barostat_every"):
        run_md([argon()], LennardJones(cutoff=7.5), barostat_every=0, **common)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="pressure_bar"):
        run_md([argon()], LennardJones(cutoff=7.5), pressure_bar=-5.0, **common)  # type: ignore[arg-type]
    with pytest.raises(SimInputError, match="max_dlnv"):
        run_md([argon()], LennardJones(cutoff=7.5), max_dlnv=-0.1, **common)  # type: ignore[arg-type]


def test_a_molecule_too_large_for_its_box_is_refused() -> None:
    """Nearest-image centres need every atom within half a box of its molecule's first
    atom; an N2 stretched to 0.48 of the box is refused instead of torn apart."""
    gas = n2_gas(2, 10.0, 0)
    st = state_from_atoms([gas], dtype=F64)
    ids = pair_ids(st)
    pos = st.positions.clone()
    pos[1] = pos[0] + torch.tensor([4.8, 0.0, 0.0], dtype=F64)
    with pytest.raises(SimInputError, match="too small for molecular scaling"):
        baro.scale_molecules(pos, st.masses, st.cell, st.system_idx, ids, torch.ones(1, dtype=F64))
    pos[1] = pos[0] + torch.tensor([4.0, 0.0, 0.0], dtype=F64)  # 0.40 of the box: fine
    out = baro.scale_molecules(
        pos, st.masses, st.cell, st.system_idx, ids, torch.ones(1, dtype=F64)
    )
    assert torch.equal(out, pos)


def test_a_replica_stopped_after_a_volume_move_gets_its_checked_cell_back() -> None:
    """The stability check restores a newly stopped replica's positions *and* cell to the
    last check (a barostat may have scaled the cell since); live replicas keep theirs."""
    from sim_backend.md.stability import check_stability, make_monitor

    st = integ.md_init(state_from_atoms([n2_gas(2, 10.0, s) for s in range(2)], dtype=F64),
                       Zero(), skin=0.0)  # fmt: skip
    monitor = make_monitor(st)
    checked_pos, checked_cell = st.positions.clone(), st.cell.clone()
    moved = st.replace(cell=st.cell * 1.05, positions=st.positions * 1.05)
    forces = moved.forces.clone()
    forces[0, 0] = float("nan")  # replica 0 fails its check
    out = check_stability(moved.replace(forces=forces), monitor,
                          fallback_positions=checked_pos, fallback_cell=checked_cell)  # fmt: skip
    assert out.alive.tolist() == [False, True]
    assert torch.equal(out.cell[0], checked_cell[0]) and torch.equal(out.cell[1], moved.cell[1])
    first = out.system_idx == 0
    assert torch.equal(out.positions[first], checked_pos[first])
    assert torch.equal(out.positions[~first], moved.positions[~first])


def test_a_dead_cluster_without_a_cell_does_not_stop_the_batch() -> None:
    """A non-periodic system (zero cell) is allowed once it is dead; the periodic ones
    still take their volume moves, and the dead one is left as it was."""
    model = LennardJones(cutoff=7.5).double()
    cluster = Atoms("Ar4", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0], [0, 0, 3.8]])
    st = state_from_atoms([argon(seed=1), cluster, argon(seed=2)], temperature_k=80.0, dtype=F64)
    st = integ.md_init(st, model, skin=1.0)
    assert float(torch.linalg.det(st.cell[1]).abs()) == 0.0
    dead = st.replace(alive=torch.tensor([True, False, True]))
    down = torch.tensor([[0.2, 0.0]] * 3, dtype=F64)
    out, acc = baro.mc_barostat_step(  # type: ignore[arg-type]
        dead, model, pressure_bar=1e4, temperature_k=80.0,
        molecule_idx=torch.arange(st.n_atoms), max_dlnv=0.05, uniforms=down,
    )  # fmt: skip
    assert acc.tolist() == [True, False, True]
    idx = dead.system_idx == 1
    assert torch.equal(out.positions[idx], dead.positions[idx])
    assert not torch.equal(out.cell[0], dead.cell[0])
