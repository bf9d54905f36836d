"""The dataset recipe and `generate_dataset`: structures -> sampling -> GFN2-xTB labels.

A recipe is a list of config types (a composition, cluster or periodic box, how many
independent structures, MD temperatures and perturbations). Every frame gets an id built from
the recipe name, the seed, the config type, the system and its place in the recipe, e.g.
``default:s0/Li-EC-cluster/Li+_EC4/1/md450K/2/p0``, so a rerun knows which work is done before
spending any xTB time: a structure whose frames are all in the file is not sampled again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sim_backend.chem.build import build_box, build_cluster, composition_name, parse_composition
from sim_backend.chem.label import (
    DEFAULT_SPLIT,
    FailedFrame,
    ProgressCallback,
    label_frames,
    labelled_ids,
    read_failed,
)
from sim_backend.chem.sample import (
    MDFailedError,
    XtbSettings,
    md_sample,
    perturb,
    thermal_conformers,
)
from sim_backend.errors import SimInputError

if TYPE_CHECKING:
    from ase import Atoms

DATASET_FILE = "dataset.extxyz"
RECIPE_FILE = "recipe.json"


class ConfigSpec(BaseModel):
    """One config type of the recipe: what to build and how to sample it.

    Per structure: MD at each temperature (`md_equilibration` steps discarded, then `md_frames`
    snapshots `md_interval` steps apart), `n_perturb` perturbed copies of every snapshot, and,
    with `include_build`, the packed structure itself plus its perturbed copies (boxes, where
    xTB MD costs seconds a step, are sampled this way from thermal conformers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_type: str = Field(pattern=r"^[A-Za-z0-9+\-_.]+$")
    composition: dict[str, int]
    periodic: bool = False
    density: float | None = Field(default=None, gt=0, description="g/cm3, boxes only")
    n_structures: int = Field(default=1, ge=1)
    temperatures: tuple[float, ...] = (300.0, 450.0, 600.0)
    md_frames: int = Field(default=4, ge=0)
    md_interval: int = Field(default=20, ge=1)
    md_equilibration: int = Field(default=20, ge=0)
    n_perturb: int = Field(default=1, ge=0)
    include_build: bool = False
    # 0.03 Å on top of thermal geometries: off-equilibrium but not extreme (0.05 Å gave force
    # tails above 40 eV/Å, which dominate a force loss)
    perturb_sigma: float = Field(default=0.03, ge=0, description="Å")
    perturb_strain: float = Field(default=0.02, ge=0, lt=0.5)

    @field_validator("composition")
    @classmethod
    def _check_composition(cls, v: dict[str, int]) -> dict[str, int]:
        return parse_composition(v)

    @field_validator("temperatures")
    @classmethod
    def _check_temperatures(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for t in v:
            if not t > 0:
                raise SimInputError(f"temperatures: must be > 0 K, got {t}")
        return v

    @model_validator(mode="after")
    def _check_box(self) -> ConfigSpec:
        if self.periodic and self.density is None:
            raise SimInputError(f"density: required for the periodic config {self.config_type!r}")
        return self

    def frame_keys(self, k: int) -> list[str]:
        """The frame keys (ids without the recipe prefix) of structure `k`, in order."""
        base = f"{self.config_type}/{composition_name(self.composition)}/{k}"
        keys: list[str] = []
        if self.include_build:
            keys.append(f"{base}/build")
            keys += [f"{base}/build/p{j}" for j in range(self.n_perturb)]
        for t in self.temperatures:
            for i in range(self.md_frames):
                keys.append(f"{base}/md{t:g}K/{i}")
                keys += [f"{base}/md{t:g}K/{i}/p{j}" for j in range(self.n_perturb)]
        return keys


class DatasetRecipe(BaseModel):
    """A whole dataset: config types plus MD, conformer, split and xTB settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9\-_.]+$")
    configs: tuple[ConfigSpec, ...]
    timestep_fs: float = Field(default=0.5, gt=0)
    friction_per_fs: float = Field(default=0.02, gt=0)
    conformer_temperature: float = Field(default=400.0, gt=0, description="K, for box conformers")
    n_conformers: int = Field(default=8, ge=1)
    split: tuple[float, float, float] = DEFAULT_SPLIT
    xtb: XtbSettings = XtbSettings()

    @model_validator(mode="after")
    def _check_unique(self) -> DatasetRecipe:
        seen: set[tuple[str, str]] = set()
        for c in self.configs:
            key = (c.config_type, composition_name(c.composition))
            if key in seen:
                raise SimInputError(f"configs: {key[0]} {key[1]} appears twice (frame ids clash)")
            seen.add(key)
        return self

    def n_frames(self) -> int:
        """How many frames the recipe asks for (before any xTB failure)."""
        return sum(len(c.frame_keys(0)) * c.n_structures for c in self.configs)

    @classmethod
    def default(cls) -> DatasetRecipe:
        """The default recipe: all five solvents, Li+ solvation clusters, Li+/PF6- pairs with
        solvent, and small EC and LiPF6/EC boxes; sized for about 10 minutes on one core.
        """
        solvents = ("EC", "PC", "EMC", "DMC", "DEC")
        mono = [
            ConfigSpec(config_type=f"{s.rstrip('+-')}-monomer", composition={s: 1}, md_frames=8)
            for s in (*solvents, "PF6-")
        ]
        li = [
            ConfigSpec(config_type="Li-EC-cluster", composition={"Li+": 1, "EC": n}, n_structures=2)
            for n in (1, 2, 3, 4)
        ] + [
            ConfigSpec(config_type="Li-solvent-cluster", composition={"Li+": 1, s: n})
            for s, n in (("PC", 3), ("EMC", 2), ("DMC", 3), ("DEC", 2))
        ]
        li.append(
            ConfigSpec(config_type="Li-mixed-cluster", composition={"Li+": 1, "EC": 2, "DMC": 2})
        )
        pairs = [
            ConfigSpec(config_type="LiPF6-EC-cluster", composition={"Li+": 1, "PF6-": 1, "EC": n})
            for n in (0, 2, 4)
        ] + [
            ConfigSpec(config_type="LiPF6-DMC-cluster", composition={"Li+": 1, "PF6-": 1, "DMC": 3})
        ]
        solvent_clusters = [
            ConfigSpec(config_type="solvent-cluster", composition=c, md_frames=3)
            for c in ({"EC": 3}, {"EC": 2, "DMC": 2}, {"PC": 1, "EMC": 1, "DEC": 1})
        ]
        # Boxes: xTB MD costs seconds a step, so they are packed from thermal conformers and
        # sampled by perturbation only.
        boxes = [
            ConfigSpec(
                config_type=config_type,
                composition=composition,
                density=density,
                n_structures=n,
                periodic=True,
                temperatures=(),
                include_build=True,
                n_perturb=2,
            )
            for config_type, composition, density, n in (
                ("EC-box", {"EC": 8}, 1.32, 6),
                ("LiPF6-EC-box", {"Li+": 1, "PF6-": 1, "EC": 6}, 1.42, 3),
            )
        ]
        return cls(name="default", configs=(*mono, *li, *pairs, *solvent_clusters, *boxes))

    @classmethod
    def tiny(cls) -> DatasetRecipe:
        """A recipe for tests: a few frames of small systems, seconds on one core."""
        return cls(
            name="tiny",
            configs=(
                ConfigSpec(
                    config_type="EC-monomer",
                    composition={"EC": 1},
                    temperatures=(300.0, 600.0),
                    md_frames=2,
                    md_interval=5,
                    md_equilibration=5,
                ),
                ConfigSpec(
                    config_type="Li-EC-cluster",
                    composition={"Li+": 1, "EC": 1},
                    temperatures=(450.0,),
                    md_frames=2,
                    md_interval=5,
                    md_equilibration=0,
                ),
                ConfigSpec(
                    config_type="LiPF6-EC-cluster",
                    composition={"Li+": 1, "PF6-": 1},
                    temperatures=(),
                    include_build=True,
                    n_perturb=1,
                ),
            ),
            n_conformers=2,
        )


@dataclass(frozen=True)
class DatasetSummary:
    """Counts of a dataset file: frames, atoms, frames per config type, split and source."""

    n_frames: int
    n_atoms: int
    per_config_type: dict[str, int]
    per_split: dict[str, int]
    per_source: dict[str, int]


@dataclass
class DatasetReport:
    """What `generate_dataset` produced: counts from the file, failures, wall time (s)."""

    path: Path
    summary: DatasetSummary
    n_labelled: int = 0
    n_reused: int = 0
    n_skipped: int = 0
    failed: list[FailedFrame] = field(default_factory=list)
    md_failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _unit_seed(seed: int, *parts: object) -> int:
    text = "/".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def generate_dataset(
    spec: DatasetRecipe | None,
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    resume: bool = True,
) -> DatasetReport:
    """Build, sample and label `spec` (default: `DatasetRecipe.default()`) into `out_dir`.

    Writes ``dataset.extxyz`` (plus its failure log) and ``recipe.json`` (the recipe and
    seed). Resuming into a directory made from another recipe or seed is an error: frame ids
    would mean different structures.
    """
    t0 = time.perf_counter()
    recipe = spec or DatasetRecipe.default()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DATASET_FILE
    record = {"seed": seed, "recipe": recipe.model_dump(mode="json")}
    recipe_path = out / RECIPE_FILE
    if resume and recipe_path.exists() and path.exists():
        old = json.loads(recipe_path.read_text())
        if old != json.loads(json.dumps(record)):
            raise SimInputError(
                f"out_dir: {out} holds a dataset from another recipe or seed; "
                "use a new directory or resume=False"
            )
    recipe_path.write_text(json.dumps(record, indent=1))

    done = set(labelled_ids(path)) | {f.frame_id for f in read_failed(path)} if resume else set()
    md_failures: list[str] = []
    frames = _frames(recipe, seed, done, md_failures)
    report = label_frames(
        frames,
        path,
        settings=recipe.xtb,
        method=recipe.xtb.method,
        progress=progress,
        resume=resume,
        split=recipe.split,
        total=recipe.n_frames(),
    )
    return DatasetReport(
        path=path,
        summary=summarize(path),
        n_labelled=report.n_labelled,
        n_reused=report.n_reused,
        n_skipped=report.n_skipped,
        failed=report.failed,
        md_failures=md_failures,
        wall_s=time.perf_counter() - t0,
    )


def _frames(
    recipe: DatasetRecipe, seed: int, done: set[str], md_failures: list[str]
) -> Iterator[Atoms]:
    """Frames of the recipe, lazily; structures whose frames are all done are not sampled."""
    prefix = f"{recipe.name}:s{seed}/"
    box_species = [n for c in recipe.configs if c.periodic for n in c.composition]
    pool: dict[str, list[Atoms]] | None = None
    for cfg in recipe.configs:
        for k in range(cfg.n_structures):
            keys = cfg.frame_keys(k)
            if all(prefix + key in done for key in keys):
                continue
            useed = _unit_seed(seed, cfg.config_type, composition_name(cfg.composition), k)
            meta = {
                "config_type": cfg.config_type,
                "system": composition_name(cfg.composition),
                "seed": useed,
            }
            if cfg.periodic:
                if pool is None:
                    pool = thermal_conformers(
                        box_species,
                        temperature=recipe.conformer_temperature,
                        n=recipe.n_conformers,
                        seed=seed,
                        settings=recipe.xtb,
                    )
                assert cfg.density is not None
                start = build_box(cfg.composition, density=cfg.density, seed=useed, conformers=pool)
            else:
                start = build_cluster(cfg.composition, seed=useed)
            start.info.update(meta)
            base = f"{prefix}{cfg.config_type}/{meta['system']}/{k}"
            if cfg.include_build:
                yield from _with_perturbed(start, f"{base}/build", cfg, useed)
            for t in cfg.temperatures:
                try:
                    snaps = md_sample(
                        start,
                        temperature=t,
                        n_frames=cfg.md_frames,
                        interval=cfg.md_interval,
                        equilibration=cfg.md_equilibration,
                        seed=_unit_seed(useed, t),
                        timestep=recipe.timestep_fs,
                        friction=recipe.friction_per_fs,
                        settings=recipe.xtb,
                    )
                except MDFailedError as exc:
                    md_failures.append(f"{base}/md{t:g}K: {exc}")
                    continue
                for i, snap in enumerate(snaps):
                    snap.info.update(meta)
                    yield from _with_perturbed(snap, f"{base}/md{t:g}K/{i}", cfg, useed + i)


def _with_perturbed(atoms: Atoms, fid: str, cfg: ConfigSpec, seed: int) -> Iterator[Atoms]:
    atoms.info["frame_id"] = fid
    if "source" not in atoms.info:
        atoms.info["source"] = "build"
    yield atoms
    copies = perturb(
        atoms,
        n=cfg.n_perturb,
        seed=_unit_seed(seed, fid),
        sigma=cfg.perturb_sigma,
        strain=cfg.perturb_strain if cfg.periodic else 0.0,
    )
    for j, c in enumerate(copies):
        c.info["frame_id"] = f"{fid}/p{j}"
        c.info["source"] = f"perturb({atoms.info['source']})"
        yield c


def summarize(path: str | Path) -> DatasetSummary:
    """Frame counts per config type, split and source, and the atom total, of a dataset file."""
    import ase.io

    frames = ase.io.read(str(path), index=":", format="extxyz") if Path(path).exists() else []

    def count(key: str) -> dict[str, int]:
        return dict(Counter(str(f.info.get(key, "?")) for f in frames))

    return DatasetSummary(
        n_frames=len(frames),
        n_atoms=sum(len(f) for f in frames),
        per_config_type=count("config_type"),
        per_split=count("split"),
        per_source=count("source"),
    )
