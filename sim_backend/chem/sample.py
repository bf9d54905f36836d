"""Configurations for training: short GFN2-xTB Langevin MD and random perturbations, seeded.

MD snapshots keep the xTB energy and forces the integrator computed at exactly those positions
(a `SinglePointCalculator`), so labelling can reuse them instead of paying for the same single
point twice; `info["label_settings"]` records the settings they were computed with.
Perturbed copies carry no labels: they are new geometries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sim_backend.errors import SimError, SimInputError

if TYPE_CHECKING:
    from ase import Atoms
    from tblite.ase import TBLite


class XtbSettings(BaseModel):
    """tblite settings; part of every label's provenance (a change means new labels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "GFN2-xTB"
    accuracy: float = Field(default=1.0, gt=0)
    electronic_temperature: float = Field(default=300.0, gt=0, description="K")
    max_iterations: int = Field(default=250, ge=1)

    def tag(self) -> str:
        """A compact string stored in `info["label_settings"]`, compared on reuse."""
        return (
            f"{self.method}/acc{self.accuracy:g}/etemp{self.electronic_temperature:g}"
            f"/maxiter{self.max_iterations}"
        )


def xtb_calculator(settings: XtbSettings, *, charge: int, uhf: int = 0) -> TBLite:
    """A quiet tblite ASE calculator for one system with total `charge` (e) and `uhf` electrons."""
    from tblite.ase import TBLite

    return TBLite(
        method=settings.method,
        charge=int(charge),
        multiplicity=int(uhf) + 1,
        accuracy=settings.accuracy,
        electronic_temperature=settings.electronic_temperature,
        max_iterations=settings.max_iterations,
        verbosity=0,
    )


class MDFailedError(SimError):
    """xTB failed during sampling MD (SCF not converged, or the system blew apart)."""


def md_sample(
    atoms: Atoms,
    *,
    temperature: float,
    n_frames: int,
    interval: int,
    seed: int,
    equilibration: int = 0,
    timestep: float = 0.5,
    friction: float = 0.02,
    settings: XtbSettings | None = None,
) -> list[Atoms]:
    """Langevin MD with GFN2-xTB at `temperature` (K); a snapshot every `interval` steps.

    `timestep` in fs, `friction` in 1/fs. Velocities start from Maxwell-Boltzmann at the target
    temperature; the first `equilibration` steps are discarded. Charge and uhf come from
    `atoms.info` (`total_charge`, `uhf`). Each snapshot carries its xTB labels and
    `info["source"] = "xtb-md@<T>K"`. If xTB fails mid-run, the frames so far are returned and
    `MDFailedError` is raised only when there are none.
    """
    from ase import units
    from ase.calculators.calculator import CalculationFailed
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    for field, value, low in (
        ("temperature", temperature, 0.0),
        ("n_frames", n_frames, 0),
        ("interval", interval, 1),
        ("equilibration", equilibration, 0),
        ("timestep", timestep, 0.0),
    ):
        if not value >= low or (field in ("temperature", "timestep") and value == low):
            raise SimInputError(f"{field}: invalid value {value!r}")
    settings = settings or XtbSettings()
    work = atoms.copy()  # type: ignore[no-untyped-call]
    work.calc = xtb_calculator(
        settings, charge=int(atoms.info.get("total_charge", 0)), uhf=int(atoms.info.get("uhf", 0))
    )
    rng = np.random.RandomState(seed % (2**32))
    if len(work) > 1:
        # Maxwell-Boltzmann momenta, as ASE's thermalize_momenta (3.29+) draws them
        masses = work.get_masses()
        xi = rng.standard_normal((len(work), 3))
        work.set_momenta(xi * np.sqrt(masses * units.kB * temperature)[:, None])
        Stationary(work)
    work.set_constraint(FixCom())  # ASE's recommended way to keep the centre of mass fixed
    dyn = Langevin(
        work,
        timestep * units.fs,
        temperature_K=temperature,
        friction=friction / units.fs,
        fixcm=False,
        rng=rng,
    )
    frames: list[Atoms] = []
    try:
        if equilibration:
            dyn.run(equilibration)  # type: ignore[no-untyped-call]
        for _ in range(n_frames):
            dyn.run(interval)  # type: ignore[no-untyped-call]
            snap = work.copy()
            snap.calc = None
            snap.set_constraint()
            snap.arrays.pop("momenta", None)  # labels need positions only
            # apply_constraint=False: the labels are xTB's, not FixCom-projected forces.
            results = {
                "energy": work.get_potential_energy(),
                "forces": work.get_forces(apply_constraint=False),
            }
            if work.pbc.any():
                results["stress"] = work.get_stress(apply_constraint=False)
            snap.calc = SinglePointCalculator(snap, **results)  # type: ignore[no-untyped-call]
            snap.info.update(
                source=f"xtb-md@{temperature:g}K",
                label_settings=settings.tag(),
                md_time_fs=round(dyn.nsteps * timestep, 6),
            )
            frames.append(snap)
    except CalculationFailed as exc:
        if not frames:
            raise MDFailedError(f"xTB MD at {temperature} K failed: {exc}") from exc
    return frames


def perturb(
    atoms: Atoms,
    *,
    n: int,
    seed: int,
    sigma: float = 0.05,
    strain: float = 0.02,
) -> list[Atoms]:
    """`n` copies with Gaussian displacements (std `sigma`, Å, per Cartesian component).

    Periodic copies also get a random symmetric strain with components uniform in
    ±`strain` (atoms move with the cell), so that stress labels vary. Copies carry no calculator
    and `info["source"] = "perturb"`.
    """
    if n < 0:
        raise SimInputError(f"n: must be >= 0, got {n}")
    if sigma < 0:
        raise SimInputError(f"sigma: must be >= 0 Å, got {sigma}")
    if not 0 <= strain < 0.5:
        raise SimInputError(f"strain: must be in [0, 0.5), got {strain}")
    rng = np.random.default_rng(seed)
    out: list[Atoms] = []
    for _ in range(n):
        new = atoms.copy()  # type: ignore[no-untyped-call]
        new.calc = None
        new.arrays.pop("momenta", None)
        for key in ("energy", "free_energy", "stress", "label_settings", "md_time_fs"):
            new.info.pop(key, None)
        if new.pbc.any() and strain > 0:
            eps = rng.uniform(-strain, strain, (3, 3))
            eps = 0.5 * (eps + eps.T)
            new.set_cell(new.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        new.positions += rng.normal(0.0, sigma, new.positions.shape)
        new.info["source"] = "perturb"
        out.append(new)
    return out


def thermal_conformers(
    names: Sequence[str],
    *,
    temperature: float,
    n: int,
    seed: int,
    settings: XtbSettings | None = None,
) -> dict[str, list[Atoms]]:
    """Gas-phase xTB MD conformers of each species, for packing boxes with thermal geometries.

    Box MD with xTB costs seconds a step, so boxes are packed from molecules that were
    thermalised alone (milliseconds a step) instead. Single atoms get their one structure.
    """
    from sim_backend.chem.species import species_atoms

    pool: dict[str, list[Atoms]] = {}
    for k, name in enumerate(dict.fromkeys(names)):
        mol = species_atoms(name, seed=seed)
        if len(mol) == 1:
            pool[name] = [mol]
            continue
        frames = md_sample(
            mol,
            temperature=temperature,
            n_frames=n,
            interval=40,
            equilibration=100,
            seed=seed * 1009 + k,
            settings=settings,
        )
        for f in frames:
            f.calc = None
            f.positions -= f.get_center_of_mass()  # type: ignore[no-untyped-call]
        pool[name] = frames
    return pool
