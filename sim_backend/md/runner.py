"""High-level MD driver: ``run_md`` for trajectories, ``dry_test`` for a formulation's properties.

``dry_test`` is what the campaign calls: Langevin equilibration, then CSVR production (a
thermostat that leaves diffusion intact), then density, per-molecule self-diffusion,
Li-O coordination and Nernst-Einstein conductivity, all with uncertainties, as a JSON-able
dict. Replicas stopped by the stability monitor are excluded from every property.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from sim_backend.errors import SimInputError
from sim_backend.md import barostat as baro
from sim_backend.md import integrators as integ
from sim_backend.md.properties import (
    AMU_G,
    FloatArray,
    cell_volume,
    coordination_number,
    density_g_cm3,
    nernst_einstein,
    rdf,
    self_diffusion,
    yeh_hummer_correction,
)
from sim_backend.md.stability import StabilityMonitor, check_stability, make_monitor
from sim_backend.md.state import MDState, kinetic_energy, state_from_atoms, temperature

if TYPE_CHECKING:
    from ase import Atoms

    from sim_backend.nn.potential import Potential

Ensemble = Literal["nve", "csvr", "langevin", "npt"]
ProgressT = bool | Callable[[int, int], None]

#: Langevin friction of the equilibration (1/fs): a freshly packed box releases its
#: packing strain as heat (300 -> 500 K in 100 fs); 20 fs coupling removes it in a few
#: hundred steps. Production uses CSVR, which leaves the dynamics alone.
EQUIL_FRICTION_PER_FS = 0.05

#: A production run whose mean temperature is further off target than this is flagged.
TEMPERATURE_TOL = 0.03

ION_CHARGES: dict[str, float] = {"Li": 1.0, "Na": 1.0, "F6P": -1.0, "BF4": -1.0}
"""Formal charges of ions by Hill formula of the bonded fragment (PF6- is ``F6P``)."""


@dataclass
class Trajectory:
    """Sampled frames of a batched run (numpy, float64).

    ``positions`` [F,N,3] are unwrapped (ready for MSD); energies and temperatures are [F,S];
    ``alive`` [F,S] says which replicas were still running at each frame. ``cells`` [S,3,3]
    are the final cells and ``volumes`` [F,S] (Å^3) the volume at each frame, which only
    changes under ``npt``; ``barostat`` holds the MC barostat's step sizes and acceptance.
    """

    times_fs: FloatArray
    positions: FloatArray
    potential_energy: FloatArray
    kinetic_energy: FloatArray
    conserved_energy: FloatArray
    temperature: FloatArray
    alive: np.ndarray
    numbers: np.ndarray
    masses: FloatArray
    system_idx: np.ndarray
    cells: FloatArray
    timestep_fs: float
    sample_every: int
    stability: dict[str, Any]
    n_neighbor_builds: int
    system_rebuilds: list[int]
    wall_s: float
    final_state: MDState | None = field(default=None, repr=False)
    volumes: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    barostat: dict[str, Any] | None = None

    def atoms_of(self, system: int) -> np.ndarray:
        """Atom indices [n_s] of one replica."""
        return np.nonzero(self.system_idx == system)[0]

    def densities_g_cm3(self) -> FloatArray:
        """Mass density of every replica at every frame [F,S] in g/cm³ (from ``volumes``)."""
        mass_g = np.bincount(self.system_idx, weights=self.masses) * AMU_G
        return np.asarray(mass_g[None, :] / (self.volumes * 1e-24), dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """JSON-able run summary (no per-frame arrays)."""
        n_atoms = len(self.numbers)
        steps = self.sample_every * max(len(self.times_fs) - 1, 0)
        return {
            "n_frames": len(self.times_fs),
            "n_replicas": int(self.cells.shape[0]),
            "n_atoms": n_atoms,
            "timestep_fs": self.timestep_fs,
            "mean_temperature_k": float(np.nanmean(self.temperature[1:]))
            if len(self.times_fs) > 1
            else float("nan"),
            "n_neighbor_builds": self.n_neighbor_builds,
            "wall_s": self.wall_s,
            "atom_steps_per_s": n_atoms * steps / self.wall_s if self.wall_s > 0 else 0.0,
            "stability": self.stability,
        } | ({"barostat": self.barostat} if self.barostat is not None else {})


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _progress_fn(progress: ProgressT, total: int, label: str) -> tuple[Callable[[int], None], Any]:
    if callable(progress):
        cb = progress
        return (lambda k: cb(k, total)), None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(label, total=total)
        return (lambda k: bar.update(task, completed=k)), bar
    return (lambda k: None), None


def simulate(
    state: MDState,
    model: Potential,
    monitor: StabilityMonitor,
    *,
    ensemble: Ensemble,
    temperature_k: float,
    timestep_fs: float,
    n_steps: int,
    sample_every: int,
    tau_fs: float = 100.0,
    friction_per_fs: float = 0.01,
    check_every: int | None = None,
    progress: ProgressT = False,
    pressure_bar: float = baro.ATM_BAR,
    barostat_every: int = 25,
    max_dlnv: float | torch.Tensor = 0.01,
    barostat_adapt: bool = True,
) -> Trajectory:
    """Advance an initialised state ``n_steps``, sampling every ``sample_every`` steps.

    Stability is checked every ``check_every`` steps (default: ``sample_every``); a
    stopped replica is frozen at its last checked positions.

    ``ensemble="npt"``: CSVR steps (``tau_fs``) plus, every ``barostat_every`` steps, one
    Monte Carlo volume move per replica at ``pressure_bar`` with molecular centre-of-mass
    scaling (:mod:`sim_backend.md.barostat`); molecules are the t=0 bond graph of
    ``monitor``. The ln V step starts at ``max_dlnv`` and, with ``barostat_adapt``, adapts
    per replica towards 25-75 % acceptance; adapting bends detailed balance, so run the
    averaging stage with ``barostat_adapt=False`` (and the step the equilibration found).
    The other ensembles ignore the barostat parameters.
    """
    if n_steps < 0:
        raise SimInputError(f"n_steps must be >= 0, got {n_steps}")
    if sample_every < 1:
        raise SimInputError(f"sample_every must be >= 1, got {sample_every}")
    check = sample_every if check_every is None else check_every
    if check < 1:
        raise SimInputError(f"check_every must be >= 1, got {check}")
    baro.check_pressure(pressure_bar)
    if isinstance(barostat_every, bool) or not (
        isinstance(barostat_every, int) and barostat_every >= 1
    ):
        raise SimInputError(f"barostat_every must be an integer >= 1, got {barostat_every}")
    baro.check_max_dlnv(max_dlnv, state.n_systems)
    step_fn: Callable[[MDState], MDState]
    if ensemble == "nve":
        step_fn = lambda s: integ.nve_step(s, model, timestep_fs)  # noqa: E731
    elif ensemble == "csvr":
        step_fn = lambda s: integ.csvr_step(  # noqa: E731
            s, model, timestep_fs, temperature_k=temperature_k, tau_fs=tau_fs
        )
    elif ensemble == "langevin":
        step_fn = lambda s: integ.langevin_step(  # noqa: E731
            s, model, timestep_fs, temperature_k=temperature_k, friction_per_fs=friction_per_fs
        )
    elif ensemble == "npt":
        step_fn = lambda s: integ.csvr_step(  # noqa: E731
            s, model, timestep_fs, temperature_k=temperature_k, tau_fs=tau_fs
        )
    else:
        raise SimInputError(
            f"ensemble must be 'nve', 'csvr', 'langevin' or 'npt', got {ensemble!r}"
        )
    stats: baro.BarostatStats | None = None
    mol_idx: torch.Tensor | None = None
    if ensemble == "npt":
        if not (temperature_k > 0 and math.isfinite(temperature_k)):
            raise SimInputError(f"temperature_k must be > 0 for npt, got {temperature_k}")
        labels, _ = molecules(state, monitor)
        mol_idx = torch.as_tensor(labels, dtype=torch.long, device=state.device)
        stats = baro.barostat_stats(state, max_dlnv)

    frames: dict[str, list[Any]] = {
        k: [] for k in ("t", "x", "epot", "ekin", "econs", "T", "alive", "V")
    }

    def sample(s: MDState, k: int) -> None:
        frames["t"].append(k * timestep_fs)
        frames["x"].append(s.positions.detach().double().cpu().numpy())
        frames["epot"].append(s.energy.detach().double().cpu().numpy())
        frames["ekin"].append(kinetic_energy(s).detach().double().cpu().numpy())
        frames["econs"].append(integ.conserved_energy(s).detach().double().cpu().numpy())
        frames["T"].append(temperature(s).detach().double().cpu().numpy())
        frames["alive"].append(s.alive.cpu().numpy())
        frames["V"].append(baro.cell_volumes(s.cell).detach().double().cpu().numpy())

    tick, bar = _progress_fn(progress, n_steps, f"MD {ensemble}")
    t0 = time.perf_counter()
    fallback = state.positions.detach().clone()
    fallback_cell = state.cell.detach().clone()
    state = check_stability(state, monitor, fallback_positions=fallback)
    sample(state, 0)
    try:
        for k in range(1, n_steps + 1):
            state = step_fn(state)
            if stats is not None and mol_idx is not None and k % barostat_every == 0:
                state, accepted = baro.mc_barostat_step(
                    state, model, pressure_bar=pressure_bar, temperature_k=temperature_k,
                    molecule_idx=mol_idx, max_dlnv=stats.max_dlnv,
                )  # fmt: skip
                stats = baro.record_attempt(stats, accepted, state.alive, adapt=barostat_adapt)
            if k % check == 0 or k == n_steps:
                state = check_stability(
                    state, monitor, fallback_positions=fallback, fallback_cell=fallback_cell
                )
                fallback = state.positions.detach().clone()
                fallback_cell = state.cell.detach().clone()
            if k % sample_every == 0:
                sample(state, k)
            if k % 10 == 0 or k == n_steps:
                tick(k)
    finally:
        if bar is not None:
            bar.stop()
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    wall = time.perf_counter() - t0
    cache = state.neighbors
    return Trajectory(
        times_fs=np.asarray(frames["t"], dtype=np.float64),
        positions=np.stack(frames["x"]),
        potential_energy=np.stack(frames["epot"]),
        kinetic_energy=np.stack(frames["ekin"]),
        conserved_energy=np.stack(frames["econs"]),
        temperature=np.stack(frames["T"]),
        alive=np.stack(frames["alive"]),
        numbers=state.numbers.cpu().numpy(),
        masses=state.masses.detach().double().cpu().numpy(),
        system_idx=state.system_idx.cpu().numpy(),
        cells=state.cell.detach().double().cpu().numpy(),
        timestep_fs=float(timestep_fs),
        sample_every=sample_every,
        stability=monitor.report(state.n_systems),
        n_neighbor_builds=cache.n_builds if cache is not None else 0,
        system_rebuilds=cache.system_rebuilds.tolist() if cache is not None else [],
        wall_s=wall,
        final_state=state,
        volumes=np.stack(frames["V"]),
        barostat=stats.to_dict() if stats is not None else None,
    )


def run_md(
    replicas: Sequence[Atoms],
    model: Potential,
    *,
    ensemble: Ensemble = "csvr",
    temperature_k: float = 300.0,
    timestep_fs: float = 1.0,
    n_steps: int = 1000,
    sample_every: int = 10,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: ProgressT = False,
    skin: float = 1.0,
    tau_fs: float = 100.0,
    friction_per_fs: float = 0.01,
    max_bond_deviation: float = 0.5,
    max_energy_drift_per_atom: float = 0.05,
    check_every: int | None = None,
    pressure_bar: float = baro.ATM_BAR,
    barostat_every: int = 25,
    max_dlnv: float | torch.Tensor = 0.01,
    barostat_adapt: bool = True,
) -> Trajectory:
    """Run all ``replicas`` as one batch and return the sampled trajectory.

    Momenta come from the Atoms if set, else Maxwell-Boltzmann at ``temperature_k``
    (replica s seeded ``seed + s``). ``model`` is moved to ``device``/``dtype`` in place.
    ``device=None`` picks CUDA when available. ``ensemble="npt"`` adds the Monte Carlo
    barostat to CSVR (``pressure_bar``, ``barostat_every``, ``max_dlnv``, ``barostat_adapt``; see
    :func:`simulate`).
    """
    dev = _pick_device(device)
    model.to(device=dev, dtype=dtype)
    state = state_from_atoms(
        replicas, temperature_k=temperature_k, seed=seed, device=dev, dtype=dtype
    )
    state = integ.md_init(state, model, skin=skin)
    monitor = make_monitor(
        state,
        max_bond_deviation=max_bond_deviation,
        max_energy_drift_per_atom=max_energy_drift_per_atom,
    )
    return simulate(
        state,
        model,
        monitor,
        ensemble=ensemble,
        temperature_k=temperature_k,
        timestep_fs=timestep_fs,
        n_steps=n_steps,
        sample_every=sample_every,
        tau_fs=tau_fs,
        friction_per_fs=friction_per_fs,
        check_every=check_every,
        progress=progress,
        pressure_bar=pressure_bar,
        barostat_every=barostat_every,
        max_dlnv=max_dlnv,
        barostat_adapt=barostat_adapt,
    )


def molecules(state: MDState, monitor: StabilityMonitor) -> tuple[np.ndarray, list[str]]:
    """Molecule id per atom [N] (covalent components of the t=0 bonds) and Hill formulas."""
    from ase.data import chemical_symbols
    from ase.formula import Formula
    from scipy.sparse import coo_matrix  # type: ignore[import-untyped]
    from scipy.sparse.csgraph import connected_components  # type: ignore[import-untyped]

    n = state.n_atoms
    pairs = monitor.bonds.pairs.cpu().numpy()
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(n, n))
    n_mol, labels = connected_components(graph, directed=False)
    z = state.numbers.cpu().numpy()
    names = []
    for m in range(n_mol):
        syms = "".join(chemical_symbols[int(x)] for x in z[labels == m])
        names.append(Formula(syms).format("hill"))
    return labels, names


def _com_trajectory(
    positions: FloatArray, masses: FloatArray, labels: np.ndarray, mol_ids: np.ndarray
) -> FloatArray:
    """Centre-of-mass positions [F,M,3] of the molecules ``mol_ids`` (unwrapped input)."""
    out = np.empty((positions.shape[0], len(mol_ids), 3))
    for k, m in enumerate(mol_ids):
        idx = labels == m
        w = masses[idx] / masses[idx].sum()
        out[:, k] = np.einsum("fai,a->fi", positions[:, idx], w)
    return out


def dry_test(
    system: Atoms,
    model: Potential,
    *,
    temperature_k: float = 313.0,
    n_replicas: int = 4,
    timestep_fs: float = 1.0,
    n_equil_steps: int = 2000,
    n_steps: int = 1000,
    sample_every: int = 10,
    viscosity_pa_s: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: ProgressT = False,
    skin: float = 1.0,
) -> dict[str, Any]:
    """Properties of one periodic box from ``n_replicas`` independent replicas.

    Returns a JSON-able dict: density (g/cm³), D per molecular species from centre-of-mass
    MSDs (m²/s, Yeh-Hummer-corrected too when ``viscosity_pa_s`` is given), Li-O
    coordination (first RDF minimum), Nernst-Einstein conductivity (mS/cm; ions are Li+ and
    the PF6-/BF4- fragments), each with an uncertainty, plus the stability report.
    Only replicas that stayed stable are used.
    """
    if not all(system.pbc):
        raise SimInputError(f"system.pbc must be periodic in x, y and z, got {system.pbc.tolist()}")
    if n_replicas < 1:
        raise SimInputError(f"n_replicas must be >= 1, got {n_replicas}")
    t_start = time.perf_counter()
    dev = _pick_device(device)
    model.to(device=dev, dtype=dtype)
    replicas = [system.copy() for _ in range(n_replicas)]  # type: ignore[no-untyped-call]
    for a in replicas:
        a.set_momenta(np.zeros((len(a), 3)))
    state = state_from_atoms(
        replicas, temperature_k=temperature_k, seed=seed, device=dev, dtype=dtype
    )
    state = integ.md_init(state, model, skin=skin)
    monitor = make_monitor(state)
    common: dict[str, Any] = {"temperature_k": temperature_k, "timestep_fs": timestep_fs}
    if n_equil_steps > 0:
        eq = simulate(
            state, model, monitor, ensemble="langevin", n_steps=n_equil_steps,
            sample_every=n_equil_steps, check_every=min(10, n_equil_steps),
            friction_per_fs=EQUIL_FRICTION_PER_FS, progress=progress, **common,
        )  # fmt: skip
        assert eq.final_state is not None
        state = eq.final_state
    traj = simulate(
        state, model, monitor, ensemble="csvr", n_steps=n_steps, sample_every=sample_every,
        progress=progress, **common,
    )  # fmt: skip
    alive = traj.alive[-1]
    ok = [s for s in range(n_replicas) if alive[s]]
    result: dict[str, Any] = {
        "temperature_k": temperature_k,
        "n_replicas": n_replicas,
        "n_stable": len(ok),
        "production_ps": n_steps * timestep_fs / 1000.0,
        "equilibration_ps": n_equil_steps * timestep_fs / 1000.0,
        "timestep_fs": timestep_fs,
        "mean_temperature_k": float(traj.temperature[1:, ok].mean()) if ok and n_steps else None,
        "stability": traj.stability,
        "neighbor_builds": traj.n_neighbor_builds,
    }
    cell0 = traj.cells[0]
    volume = cell_volume(cell0)
    atoms0 = traj.atoms_of(0)
    result["density_g_cm3"] = {
        "value": density_g_cm3(traj.masses[atoms0], cell0),
        "error": 0.0,
        "note": "NVT: fixed by the input box",
    }
    if not ok:
        result.update(diffusion_m2_s={}, li_o_coordination=None, conductivity_ms_cm=None)
        result["warnings"] = ["every replica was stopped by the stability monitor"]
        result["wall_s"] = time.perf_counter() - t_start
        return result
    warnings: list[str] = []
    labels, names = molecules(traj.final_state, monitor) if traj.final_state else ([], [])
    labels = np.asarray(labels)
    frame_dt = sample_every * timestep_fs
    diff: dict[str, Any] = {}
    counts: dict[str, int] = {}
    box_l = volume ** (1.0 / 3.0)
    for name in sorted(set(names)):
        per_rep = []
        for s in ok:
            idx = traj.atoms_of(s)
            mol_ids = np.unique(labels[idx])
            mol_ids = np.array([m for m in mol_ids if names[m] == name])
            if mol_ids.size == 0:
                continue
            counts[name] = len(mol_ids)
            per_rep.append(_com_trajectory(traj.positions, traj.masses, labels, mol_ids))
        if not per_rep or len(traj.times_fs) < 10:
            continue
        if len(per_rep) >= 2:
            d = self_diffusion(np.stack(per_rep), frame_dt)
        else:  # one stable replica: the error from time blocks (>= 10 frames each)
            blocks = min(5, len(traj.times_fs) // 10)
            if blocks < 2:
                warnings.append(f"D({name}): one stable replica, too short to estimate it")
                continue
            d = self_diffusion(per_rep[0], frame_dt, n_blocks=blocks)
        entry = d.to_dict() | {"n_molecules": counts[name]}
        if viscosity_pa_s is not None:
            entry["value_yeh_hummer_m2_s"] = d.value + yeh_hummer_correction(
                temperature_k, viscosity_pa_s, box_l
            )
        if not d.diffusive:
            warnings.append(
                f"D({name}): the MSD's log-log slope over the fit window is "
                f"{d.beta:.2f}, not 1: not yet diffusive, run longer"
            )
        diff[name] = entry
    result["diffusion_m2_s"] = diff
    t_mean = result["mean_temperature_k"]
    if t_mean is not None and abs(t_mean / temperature_k - 1.0) > TEMPERATURE_TOL:
        warnings.append(
            f"mean production temperature {t_mean:.0f} K is more than "
            f"{100 * TEMPERATURE_TOL:.0f} % off {temperature_k:g} K: equilibrate longer"
        )
    z = traj.numbers
    li_o = None
    if np.any(z == 3) and np.any(z == 8):
        pos = np.concatenate([traj.positions[:, traj.atoms_of(s)] for s in ok], axis=0)
        zr = z[traj.atoms_of(ok[0])]
        r_max = min(6.0, 0.5 * box_l)
        res = rdf(pos, cell0, zr, 3, 8, r_max=r_max, n_bins=int(r_max / 0.05))
        cn = coordination_number(res)
        li_o = {"value": cn.value, "error": cn.error, "r_cut_A": cn.r_cut}
    result["li_o_coordination"] = li_o
    ions = [n for n in diff if n in ION_CHARGES]
    if ions:
        # with a viscosity, from the finite-size corrected D (the PBC ones are low by
        # xi kT / (6 pi eta L), comparable to D(Li+) itself in a 15 A box)
        key = "value_m2_s" if viscosity_pa_s is None else "value_yeh_hummer_m2_s"
        sigma = nernst_einstein(
            volume,
            temperature_k,
            [diff[n]["n_molecules"] for n in ions],
            [ION_CHARGES[n] for n in ions],
            [diff[n][key] for n in ions],
            [diff[n]["error_m2_s"] for n in ions],
        )
        result["conductivity_ms_cm"] = {
            "value": sigma.value_ms_cm,
            "error": sigma.error_ms_cm,
            "ions": ions,
            "note": "Nernst-Einstein (uncorrelated ions), from "
            + ("PBC diffusion coefficients" if viscosity_pa_s is None else "Yeh-Hummer D"),
        }
        if viscosity_pa_s is None:
            warnings.append(
                "conductivity from PBC diffusion coefficients (no viscosity given, so no "
                "Yeh-Hummer correction): low by the finite-size effect"
            )
    else:
        result["conductivity_ms_cm"] = None
    result["warnings"] = warnings
    result["wall_s"] = time.perf_counter() - t_start
    if not all(math.isfinite(v) for v in [result["density_g_cm3"]["value"]]):
        raise SimInputError("density is not finite: check the cell of the input system")
    return result
