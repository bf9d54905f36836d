"""sim_backend's narrow entry for labctl (the CLI and the campaign's dry tests).

labctl imports only this module (import-linter checks it), so the inside of sim_backend
(chem, nn, md, active) can move without breaking the lab. Every function takes plain
values (paths, dicts, numbers) and returns JSON-able dicts; heavy imports happen inside.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sim_backend.errors import SimInputError

Say = Callable[[str], None]

#: Liquid densities (g/cm^3, ~25 C) to pack a solvent box at; a mixture takes the
#: mass-weighted harmonic mean (ideal mixing of volumes).
SOLVENT_DENSITY = {"EC": 1.32, "PC": 1.20, "EMC": 1.01, "DMC": 1.07, "DEC": 0.975}
#: Electrolyte solutions are denser than their solvent (1 M LiPF6 in EC/DMC: ~1.3 vs 1.2).
SALT_DENSITY_PER_MOLAL = 0.1


def label(
    out_dir: str | Path,
    *,
    recipe: str = "default",
    seed: int = 0,
    fresh: bool = False,
    say: Say = print,
) -> dict[str, Any]:
    """Generate (or resume) a GFN2-xTB-labelled dataset in ``out_dir``: ``recipe`` is
    ``default``, ``tiny`` or a JSON file of a DatasetRecipe. Returns the summary."""
    from sim_backend.chem.dataset import DatasetRecipe, generate_dataset
    from sim_backend.chem.label import LabelProgress

    if recipe == "default":
        rec = DatasetRecipe.default()
    elif recipe == "tiny":
        rec = DatasetRecipe.tiny()
    else:
        path = Path(recipe)
        if not path.is_file():
            raise SimInputError(f"recipe: {recipe!r} is not 'default', 'tiny' or a JSON file")
        rec = DatasetRecipe.model_validate_json(path.read_text())
    t0 = time.perf_counter()

    def progress(p: LabelProgress) -> None:
        total = p.total if p.total is not None else "?"
        say(
            f"[{time.perf_counter() - t0:7.1f} s] {p.index + 1}/{total} {p.status:8s} "
            f"{p.frame_id} ({p.n_atoms} atoms, {p.seconds:.2f} s)"
        )

    report = generate_dataset(rec, Path(out_dir), seed=seed, progress=progress, resume=not fresh)
    s = report.summary
    return {
        "path": str(report.path),
        "n_frames": s.n_frames,
        "per_config_type": s.per_config_type,
        "per_split": s.per_split,
        "n_labelled": report.n_labelled,
        "n_reused": report.n_reused,
        "failed": len(report.failed),
        "wall_s": round(report.wall_s, 1),
    }


def train_model(
    data: str | Path,
    out: str | Path,
    *,
    epochs: int = 200,
    seed: int = 0,
    hyper: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    say: Say = print,
    kind: str = "moment-mlp",
) -> dict[str, Any]:
    """Train the potential on the labelled extxyz ``data`` (its train/val/test split) and
    save it to ``out``; returns the metrics (energy and force MAE on each split).

    ``kind``: ``"moment-mlp"`` (the default model) or ``"mace"`` (the MACE peer; needs
    the ``sim-peers`` extra); the file records it, so ``load_calculator(out)`` works."""
    from sim_backend.nn.dataset import read_frames, split_frames
    from sim_backend.nn.model import save_model
    from sim_backend.nn.train import train

    path = Path(data)
    if not path.is_file():
        raise SimInputError(f"data: no such file {path}")
    split = split_frames(read_frames(path))
    say(f"{path}: {', '.join(f'{k} {len(v)}' for k, v in split.items())} frames")

    def progress(rec: dict[str, Any]) -> None:
        say(
            f"epoch {int(rec['epoch']):4d}  loss {rec['train_loss']:.4g}  "
            f"val E {rec['val_energy_mae_mev_per_atom']:.2f} meV/atom  "
            f"F {rec['val_force_mae_mev_per_a']:.1f} meV/A  lr {rec['lr']:.1e}"
        )

    model, metrics = train(
        split["train"],
        split["val"],
        hyper=dict(hyper or {}),
        epochs=epochs,
        seed=seed,
        progress=progress,
        test_frames=split["test"],
        checkpoint=checkpoint,
        model_kind=kind,
    )
    meta = {k: metrics[k] for k in ("train", "val", "test", "train_data_hash", "seed")}
    meta["data"] = str(path)
    meta["model_kind"] = kind
    save_model(model, out, metadata=meta, kind=kind)
    return {k: v for k, v in metrics.items() if k != "history"} | {"model": str(out)}


def solution_density(composition: Mapping[str, int]) -> float:
    """The density (g/cm^3) a box of ``composition`` is packed at: the solvents' ideal
    mixture (mass-weighted harmonic mean of :data:`SOLVENT_DENSITY`) plus
    :data:`SALT_DENSITY_PER_MOLAL` per mol/kg of Li+."""
    from sim_backend.chem.build import parse_composition
    from sim_backend.chem.species import molar_mass

    comp = parse_composition(composition)
    solvents = {k: n for k, n in comp.items() if k in SOLVENT_DENSITY}
    if not solvents:
        raise SimInputError(f"composition: no solvent in {dict(comp)}; give density")
    mass = {k: n * molar_mass(k) for k, n in solvents.items()}
    total = sum(mass.values())
    density = total / sum(m / SOLVENT_DENSITY[k] for k, m in mass.items())
    molality = comp.get("Li+", 0) / (total / 1000.0)  # mol per kg of solvent
    return density + SALT_DENSITY_PER_MOLAL * molality


def solvent_box(
    composition: Mapping[str, int], *, density: float | None = None, seed: int = 0
) -> Any:
    """A periodic box of ``composition`` (e.g. {"EC": 24, "Li+": 1, "PF6-": 1}) at
    ``density`` (default: :func:`solution_density`)."""
    from sim_backend.chem.build import pack_box, parse_composition

    comp = parse_composition(composition)
    if density is None:
        density = solution_density(comp)
    # pack_box, not build_box: its one 1.9 A distance can take minutes at liquid density
    return pack_box(comp, density=density, seed=seed)


def dry_test(
    composition: Mapping[str, int],
    *,
    model: str | Path | None = None,
    temperature_k: float = 313.0,
    replicas: int = 4,
    steps: int = 1000,
    equil_steps: int = 200,
    timestep_fs: float = 1.0,
    sample_every: int = 10,
    viscosity_pa_s: float | None = None,
    density: float | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Batched MD of a box of ``composition`` with the potential ``model`` (None: the
    shipped default): density, self-diffusion per species, Li-O coordination,
    Nernst-Einstein conductivity, each with an uncertainty, and the stability report."""
    from sim_backend.md.runner import dry_test as run
    from sim_backend.nn.calculator import resolve_model_path
    from sim_backend.nn.model import load_model

    path = resolve_model_path(model)
    pot = load_model(path)
    box = solvent_box(composition, density=density, seed=seed)
    result = run(
        box,
        pot,
        temperature_k=temperature_k,
        n_replicas=replicas,
        timestep_fs=timestep_fs,
        n_equil_steps=equil_steps,
        n_steps=steps,
        sample_every=sample_every,
        viscosity_pa_s=viscosity_pa_s,
        device=device,
        seed=seed,
        progress=progress,
    )
    result["composition"] = dict(composition)
    result["model"] = str(path)
    result["n_atoms"] = len(box)
    out: dict[str, Any] = json.loads(json.dumps(result, default=_jsonable))
    return out


#: Molality is weighed against mass fractions in :func:`formulation_composition`: an
#: error of this many mol/kg counts as much as a whole unit of mass fraction.
MOLALITY_SCALE = 2.0
#: Default range of solvent molecules in a formulation box (~300-450 atoms with the ions).
N_SOLVENT = (24, 32)


def formulation_composition(
    fractions: Mapping[str, float],
    salt_molality: float,
    *,
    n_solvent: int | tuple[int, int] = N_SOLVENT,
) -> dict[str, Any]:
    """Molecule counts that best realise a formulation (DESIGN contract 2's terms:
    solvent **mass** fractions over EC, PC, EMC, DMC, DEC summing to 1; LiPF6 molality in
    mol/kg of solvent) in a box of ``n_solvent`` solvent molecules (an int, or a range
    ``(lo, hi)`` searched whole).

    Integer rounding: for every total N in the range, each solvent's count is the floor
    or the ceiling of N times its mole fraction (from the mass fractions and molar
    masses), and the ion pairs the floor or the ceiling of molality x solvent mass (at
    least one when the molality is > 0, so that Li+ is there to be measured); of all
    those combinations the one with the smallest ``sum |w_real - w| + |m_real - m| /
    MOLALITY_SCALE`` wins, fewer molecules breaking ties. Li+ and PF6- come in pairs, so
    the box is neutral. Returns the counts and the realised fractions and molality.
    """
    import itertools
    import math

    from sim_backend.chem.species import molar_mass

    w = _check_fractions(fractions)
    m = _check_number("salt_molality", salt_molality, 0.0, 10.0, "mol/kg")
    lo, hi = _check_n_solvent(n_solvent)
    names = [k for k, v in w.items() if v > 0]
    masses = {k: molar_mass(k) for k in SOLVENT_DENSITY}
    per_mol = {k: w[k] / masses[k] for k in names}
    x = {k: v / sum(per_mol.values()) for k, v in per_mol.items()}
    best: tuple[float, int, dict[str, int], int] | None = None
    for n in range(lo, hi + 1):
        floors = {k: math.floor(n * x[k]) for k in names}
        for ups in itertools.product((0, 1), repeat=len(names)):
            counts = {k: floors[k] + u for k, u in zip(names, ups, strict=True)}
            if sum(counts.values()) != n:
                continue
            solvent_g = sum(c * masses[k] for k, c in counts.items())
            wr = {k: counts[k] * masses[k] / solvent_g for k in names}
            ideal = m * solvent_g / 1000.0
            pairs = {math.floor(ideal), math.ceil(ideal)}
            for n_salt in sorted({max(p, 1) if m > 0 else 0 for p in pairs}):
                mr = n_salt / (solvent_g / 1000.0)
                score = sum(abs(wr[k] - w[k]) for k in w if w[k] > 0 or k in wr)
                score += abs(mr - m) / MOLALITY_SCALE
                key = (round(score, 12), n + 2 * n_salt, counts, n_salt)
                if best is None or key[:2] < best[:2]:
                    best = key
    if best is None:  # every N in range leaves some present solvent without a count
        raise SimInputError(f"n_solvent: no box of {lo}..{hi} solvent molecules fits {w}")
    _, _, counts, n_salt = best
    solvent_g = sum(c * masses[k] for k, c in counts.items())
    realised = {k: counts[k] * masses[k] / solvent_g for k in names if counts[k] > 0}
    molality = n_salt / (solvent_g / 1000.0)
    comp: dict[str, int] = {k: c for k, c in counts.items() if c > 0}
    if n_salt:
        comp = {"Li+": n_salt, "PF6-": n_salt} | comp
    return {
        "counts": comp,
        "n_solvent": sum(counts.values()),
        "n_ion_pairs": n_salt,
        "fractions": realised,
        "salt_molality": molality,
        "target": {"fractions": {k: v for k, v in w.items() if v > 0}, "salt_molality": m},
        "fraction_error_max": max(abs(realised.get(k, 0.0) - w[k]) for k in w),
        "salt_molality_error": molality - m,
        "rounding": "floor/ceil per solvent and salt over N in "
        f"{lo}..{hi}; min sum|dw| + |dm|/{MOLALITY_SCALE:g} mol/kg",
    }


def formulation_box(
    fractions: Mapping[str, float],
    salt_molality: float,
    *,
    n_solvent: int | tuple[int, int] = N_SOLVENT,
    density: float | None = None,
    seed: int = 0,
) -> Any:
    """A periodic box (ASE Atoms) of the formulation: counts from
    :func:`formulation_composition`, packed at :func:`solution_density` (or ``density``,
    g/cm^3) by :func:`pack_box`.

    ``info["formulation"]`` holds the realised composition (counts, fractions, molality,
    their errors), ``info["density_g_cm3"]``, ``info["pack_scale"]`` and
    ``info["pack_s"]``."""
    comp = formulation_composition(fractions, salt_molality, n_solvent=n_solvent)
    rho = solution_density(comp["counts"]) if density is None else density
    if isinstance(rho, bool) or not (isinstance(rho, int | float) and 0.3 <= rho <= 3.0):
        raise SimInputError(f"density: must be within 0.3..3.0 g/cm3, got {density!r}")
    t0 = time.perf_counter()
    from sim_backend.chem.build import pack_box

    box = pack_box(comp["counts"], density=float(rho), seed=seed)
    box.info.update(formulation=comp, density_g_cm3=float(rho), pack_s=time.perf_counter() - t0)
    return box


def formulation_dry_test(
    fractions: Mapping[str, float],
    salt_molality: float,
    *,
    temperature_c: float = 25.0,
    replicas: int = 2,
    steps: int = 300,
    equil_steps: int = 100,
    timestep_fs: float = 1.0,
    sample_every: int = 5,
    n_solvent: int | tuple[int, int] = N_SOLVENT,
    viscosity_pa_s: float | None = None,
    device: str | None = None,
    seed: int = 0,
    model: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """A dry test of a formulation (contract 2's terms): its box
    (:func:`formulation_box`), Langevin equilibration, CSVR production on ``replicas``
    replicas in one batch, the properties of :func:`sim_backend.md.runner.dry_test`.

    Returns a JSON-able dict: those properties (``diffusion_m2_s`` by Hill formula and
    ``diffusion_by_species`` by species name, ``li_o_coordination``,
    ``conductivity_ms_cm``, ``n_stable`` of ``n_replicas``, ``stability``), the realised
    ``formulation``, the ``settings``, the ``model`` file (path and sha256) and
    ``wall_s`` (box, model and MD). Errors name the field."""
    import hashlib

    from sim_backend.md.runner import dry_test as run
    from sim_backend.nn.calculator import resolve_model_path
    from sim_backend.nn.model import load_model

    t0 = time.perf_counter()
    t_c = _check_number("temperature_c", temperature_c, -60.0, 200.0, "C")
    for name, value, least in (("replicas", replicas, 1), ("equil_steps", equil_steps, 0),
                               ("sample_every", sample_every, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SimInputError(f"{name}: must be an integer >= {least}, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 50 * sample_every:
        raise SimInputError(
            f"steps: must be an integer >= 50 x sample_every ({50 * sample_every}: with one "
            f"stable replica left, D's error comes from 5 blocks of >= 10 frames), got {steps!r}"
        )
    dt = _check_number("timestep_fs", timestep_fs, 0.1, 4.0, "fs")
    box = formulation_box(fractions, salt_molality, n_solvent=n_solvent, seed=seed)
    path = resolve_model_path(model)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    pot = load_model(path)
    settings = {"temperature_c": t_c, "temperature_k": t_c + 273.15, "replicas": replicas,
                "steps": steps, "equil_steps": equil_steps, "timestep_fs": dt,
                "sample_every": sample_every, "n_solvent": list(_check_n_solvent(n_solvent)),
                "viscosity_pa_s": viscosity_pa_s, "device": device, "seed": seed,
                "pack_scale": box.info["pack_scale"],
                "ensemble": "Langevin, then CSVR"}  # fmt: skip
    result = run(
        box, pot, temperature_k=t_c + 273.15, n_replicas=replicas, timestep_fs=dt,
        n_equil_steps=equil_steps, n_steps=steps, sample_every=sample_every,
        viscosity_pa_s=viscosity_pa_s, device=device, seed=seed, progress=progress,
    )  # fmt: skip
    hill = {_hill(k): k for k in box.info["formulation"]["counts"]}
    result["diffusion_by_species"] = {
        hill.get(k, k): v for k, v in result.get("diffusion_m2_s", {}).items()
    }
    result["formulation"] = box.info["formulation"] | {
        "density_g_cm3": box.info["density_g_cm3"],
        "n_atoms": len(box),
        "box_length_A": float(box.cell[0, 0]),
        "pack_s": box.info["pack_s"],
    }
    result["settings"] = settings
    result["model"] = {"path": str(path), "sha256": digest}
    result["md_wall_s"] = result.pop("wall_s", None)
    result["wall_s"] = time.perf_counter() - t0
    out: dict[str, Any] = json.loads(json.dumps(result, default=_jsonable))
    return out


def _hill(species: str) -> str:
    from ase.formula import Formula

    from sim_backend.chem.species import species_atoms

    return str(Formula(species_atoms(species).get_chemical_formula()).format("hill"))  # type: ignore[no-untyped-call]


def _check_number(field: str, value: Any, lo: float, hi: float, unit: str) -> float:
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SimInputError(f"{field}: must be a finite number ({unit}), got {value!r}")
    if not lo <= value <= hi:
        raise SimInputError(f"{field}: must be within {lo:g}..{hi:g} {unit}, got {value!r}")
    return float(value)


def _check_fractions(fractions: Any) -> dict[str, float]:
    """Solvent mass fractions: known solvents, each 0..1, summing to 1 (within 1e-3);
    returned normalised over every solvent (absent ones 0)."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise SimInputError(f"fractions: expected a mapping solvent -> mass fraction, got "
                            f"{fractions!r}")  # fmt: skip
    out = dict.fromkeys(SOLVENT_DENSITY, 0.0)
    for name, value in fractions.items():
        if name not in SOLVENT_DENSITY:
            raise SimInputError(f"fractions[{name!r}]: not a solvent (known: "
                                f"{', '.join(SOLVENT_DENSITY)})")  # fmt: skip
        out[name] = _check_number(f"fractions[{name!r}]", value, 0.0, 1.0, "mass fraction")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-3:
        raise SimInputError(f"fractions: must sum to 1, got {total:.6g} ({dict(fractions)})")
    return {k: v / total for k, v in out.items()}


def _check_n_solvent(n_solvent: Any) -> tuple[int, int]:
    pair = (n_solvent, n_solvent) if isinstance(n_solvent, int) else n_solvent
    ok = (
        isinstance(pair, tuple | list) and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        and 2 <= pair[0] <= pair[1] <= 200
    )  # fmt: skip
    if not ok:
        raise SimInputError(
            f"n_solvent: an integer or a range (lo, hi) with 2 <= lo <= hi <= 200, "
            f"got {n_solvent!r}"
        )
    return int(pair[0]), int(pair[1])


def active_learn(
    data: str | Path,
    out_dir: str | Path,
    *,
    seeds: list[Mapping[str, int]] | None = None,
    config: Mapping[str, Any] | None = None,
    say: Say = print,
) -> dict[str, Any]:
    """DP-GEN iterations (sim_backend.active) on ``data``, exploring from clusters of the
    given compositions (default: EC, DMC, Li+(EC)4)."""
    from sim_backend.active import ActiveLearningConfig
    from sim_backend.active import active_learn as run
    from sim_backend.chem.build import build_cluster
    from sim_backend.chem.species import species_atoms

    structures = []
    for k, comp in enumerate(seeds or [{"EC": 1}, {"DMC": 1}, {"Li+": 1, "EC": 4}]):
        if sum(comp.values()) == 1:
            (name,) = comp
            structures.append(species_atoms(name))
        else:
            structures.append(build_cluster(comp, seed=k))
    cfg = ActiveLearningConfig.model_validate(dict(config or {}))
    return run(data, structures, out_dir, cfg, say=say).to_dict()


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")
