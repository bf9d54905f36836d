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
) -> dict[str, Any]:
    """Train the potential on the labelled extxyz ``data`` (its train/val/test split) and
    save it to ``out``; returns the metrics (energy and force MAE on each split)."""
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
    )
    meta = {k: metrics[k] for k in ("train", "val", "test", "train_data_hash", "seed")}
    meta["data"] = str(path)
    save_model(model, out, metadata=meta)
    return {k: v for k, v in metrics.items() if k != "history"} | {"model": str(out)}


def solvent_box(
    composition: Mapping[str, int], *, density: float | None = None, seed: int = 0
) -> Any:
    """A periodic box of ``composition`` (e.g. {"EC": 24, "Li+": 1, "PF6-": 1}) at
    ``density`` (default: the solvents' liquid density, plus the salt's share)."""
    from sim_backend.chem.build import build_box, parse_composition
    from sim_backend.chem.species import molar_mass

    comp = parse_composition(composition)
    if density is None:
        solvents = {k: n for k, n in comp.items() if k in SOLVENT_DENSITY}
        if not solvents:
            raise SimInputError(f"composition: no solvent in {dict(comp)}; give density")
        mass = {k: n * molar_mass(k) for k, n in solvents.items()}
        total = sum(mass.values())
        density = total / sum(m / SOLVENT_DENSITY[k] for k, m in mass.items())
        salt_mol = comp.get("Li+", 0)
        molality = salt_mol / (total / 1000.0)  # mol per kg of solvent
        density += SALT_DENSITY_PER_MOLAL * molality
    return build_box(comp, density=density, seed=seed)


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
