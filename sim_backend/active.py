"""Active learning, DP-GEN style: a committee explores, xTB labels where it disagrees.

One iteration:

1. **Train** a committee of ``n_models`` potentials on the current training set, each
   with its own seed (initial weights and batch order): members agree where the data
   pins the energy surface and disagree where it does not.
2. **Explore**: batched MD (``sim_backend.md``) of the seed structures with the first
   member at each exploration temperature; every sampled frame of every replica that is
   still alive (the stability monitor stops blown-up replicas) is a candidate.
3. **Select** by the committee's force disagreement, DP-GEN's ``max_devi_f``: for each
   atom the standard deviation of the members' force vectors,
   ``sqrt(mean_m |F_m - mean F|^2)``, and its maximum over the frame's atoms. Frames
   below ``trust_lo`` are already known (labelling them teaches nothing), frames above
   ``trust_hi`` are unphysical (a broken molecule; labelling them wastes xTB time on
   configurations MD should never reach); those in between are labelled, at most
   ``max_new_frames``, spread over the range.
4. **Label** them with GFN2-xTB (``sim_backend.chem.label``), append them to the data
   file, and go on with the enlarged set.

The result records, per iteration, how many candidates fell below, inside and above the
trust levels: a shrinking "inside" count is the sign of convergence.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim_backend.errors import SimInputError

FloatArray = np.ndarray


class ActiveLearningConfig(BaseModel):
    """Settings of :func:`active_learn` (eV/Å for the trust levels)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(default=2, ge=1, le=50)
    n_models: int = Field(default=3, ge=2, le=16)
    epochs: int = Field(default=60, ge=1)
    hyper: dict[str, Any] = Field(default_factory=dict)
    trust_lo: float = Field(default=0.05, gt=0)
    trust_hi: float = Field(default=0.35, gt=0)
    max_new_frames: int = Field(default=24, ge=1)
    temperatures_k: list[float] = Field(default_factory=lambda: [300.0, 500.0])
    md_steps: int = Field(default=400, ge=1)
    sample_every: int = Field(default=20, ge=1)
    timestep_fs: float = Field(default=0.5, gt=0, le=5)
    seed: int = 0

    @model_validator(mode="after")
    def _levels(self) -> ActiveLearningConfig:
        if self.trust_hi <= self.trust_lo:
            raise ValueError(f"trust_hi ({self.trust_hi}) must be above trust_lo ({self.trust_lo})")
        return self


@dataclass
class IterationReport:
    iteration: int
    n_train: int
    n_candidates: int
    below: int
    inside: int
    above: int
    labelled: int
    failed: int
    max_devi_f_median: float
    val_force_mae_mev_a: list[float]
    seconds: float


@dataclass
class ActiveLearningReport:
    data_path: str
    iterations: list[IterationReport] = field(default_factory=list)
    model_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_path": self.data_path,
            "model_path": self.model_path,
            "iterations": [asdict(it) for it in self.iterations],
        }


def _tensors(
    frames: Sequence[Atoms], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unlabelled frames as one batch: positions, numbers, cell, pbc, system_idx, charge."""
    pos = torch.tensor(np.concatenate([a.positions for a in frames]), dtype=dtype)
    num = torch.tensor(np.concatenate([a.numbers for a in frames]), dtype=torch.long)
    cell = torch.tensor(np.stack([np.asarray(a.cell[:]) for a in frames]), dtype=dtype)
    pbc = torch.tensor(np.stack([a.pbc for a in frames]), dtype=torch.bool)
    sys_idx = torch.repeat_interleave(
        torch.arange(len(frames)), torch.tensor([len(a) for a in frames])
    )
    charge = torch.tensor([float(a.info.get("total_charge", 0.0)) for a in frames], dtype=dtype)
    return pos, num, cell, pbc, sys_idx, charge


def committee_forces(
    models: Sequence[torch.nn.Module], frames: Sequence[Atoms], *, chunk: int = 32
) -> np.ndarray:
    """Forces of every member on every frame: [n_models, n_atoms_total, 3] (eV/Å)."""
    from sim_backend.nn.evaluate import evaluate

    if not models or not frames:
        raise SimInputError("committee_forces needs at least one model and one frame")
    out = []
    for m in models:
        dtype = next(m.parameters()).dtype
        parts = []
        for k in range(0, len(frames), chunk):
            pos, num, cell, pbc, idx, q = _tensors(frames[k : k + chunk], dtype)
            res = evaluate(m, pos, num, cell, pbc, idx, charge=q)  # type: ignore[arg-type]
            assert res.forces is not None
            parts.append(res.forces.detach().double().numpy())
        out.append(np.concatenate(parts))
    return np.stack(out)


def max_force_deviation(forces: np.ndarray, frame_sizes: Sequence[int]) -> np.ndarray:
    """DP-GEN's ``max_devi_f`` per frame from committee forces [M, N, 3]: the largest,
    over a frame's atoms, of ``sqrt(mean_m |F_m - mean_m F|^2)``."""
    f = np.asarray(forces, dtype=float)
    if f.ndim != 3 or f.shape[0] < 2 or f.shape[2] != 3:
        raise SimInputError(f"forces must be [n_models >= 2, n_atoms, 3], got {list(f.shape)}")
    if sum(frame_sizes) != f.shape[1]:
        raise SimInputError(
            f"frame sizes sum to {sum(frame_sizes)}, the forces have {f.shape[1]} atoms"
        )
    per_atom = np.sqrt(((f - f.mean(axis=0)) ** 2).sum(axis=2).mean(axis=0))
    bounds = np.cumsum([0, *frame_sizes])
    return np.array([per_atom[a:b].max() for a, b in itertools.pairwise(bounds)])


def select_candidates(
    devi: np.ndarray, trust_lo: float, trust_hi: float, max_frames: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of frames with ``trust_lo <= devi < trust_hi`` (at most ``max_frames``,
    spread evenly over the sorted deviations so both ends of the range are kept), and the
    counts below / inside / above."""
    d = np.asarray(devi, dtype=float)
    inside = np.flatnonzero((d >= trust_lo) & (d < trust_hi))
    counts = {
        "below": int((d < trust_lo).sum()),
        "inside": int(inside.size),
        "above": int((d >= trust_hi).sum() + (~np.isfinite(d)).sum()),
    }
    if inside.size > max_frames:
        order = inside[np.argsort(d[inside])]
        pick = np.unique(np.round(np.linspace(0, order.size - 1, max_frames)).astype(int))
        inside = np.sort(order[pick])
    return inside, counts


def _frames_of(traj: Any, seeds: Sequence[Atoms], source: str) -> list[Atoms]:
    """Every sampled frame of every replica still alive at that frame, as Atoms (wrapped
    back into periodic cells; charge and provenance carried over from the seed)."""
    out: list[Atoms] = []
    for f in range(1, len(traj.times_fs)):  # frame 0 is the seed itself
        for s, seed in enumerate(seeds):
            if not traj.alive[f, s]:
                continue
            at = seed.copy()  # type: ignore[no-untyped-call]
            at.calc = None
            at.positions = traj.positions[f][traj.atoms_of(s)]
            if at.pbc.any():
                at.wrap()
            at.info = {
                k: v for k, v in seed.info.items() if k in ("total_charge", "uhf", "config_type")
            }
            at.info["source"] = source
            at.info["system"] = seed.get_chemical_formula()  # type: ignore[no-untyped-call]
            out.append(at)
    return out


def active_learn(
    data_path: str | Path,
    seeds: Sequence[Atoms],
    out_dir: str | Path,
    config: ActiveLearningConfig | None = None,
    *,
    say: Callable[[str], None] = print,
) -> ActiveLearningReport:
    """Run ``config.iterations`` DP-GEN iterations on the labelled extxyz ``data_path``
    (frames are appended to it), exploring from ``seeds``; the final committee's first
    member is saved as ``out_dir/model.pt`` and the report as ``out_dir/report.json``."""
    from sim_backend.chem.label import label_frames
    from sim_backend.md.runner import run_md
    from sim_backend.nn.dataset import read_frames, split_frames
    from sim_backend.nn.model import save_model
    from sim_backend.nn.train import train

    cfg = config or ActiveLearningConfig()
    data = Path(data_path)
    if not data.is_file():
        raise SimInputError(f"data_path: no labelled data at {data}")
    if not seeds:
        raise SimInputError("seeds: give at least one structure to explore from")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ActiveLearningReport(data_path=str(data))
    models: list[Any] = []
    for it in range(cfg.iterations + 1):  # the last round only trains the final committee
        t0 = time.perf_counter()
        split = split_frames(read_frames(data))
        say(f"iteration {it}: training {cfg.n_models} models on {len(split['train'])} frames")
        models, maes = [], []
        for m in range(cfg.n_models):
            model, metrics = train(
                split["train"],
                split["val"],
                hyper=cfg.hyper,
                epochs=cfg.epochs,
                seed=cfg.seed + 1000 * it + m,
                test_frames=split["test"],
            )
            models.append(model.eval())
            maes.append(float(metrics["val"]["force_mae_mev_per_a"]))
            say(f"  model {m}: validation force MAE {maes[-1]:.1f} meV/A")
        if it == cfg.iterations:
            save_model(models[0], out / "model.pt", metadata={"active_learning": report.to_dict()})
            report.model_path = str(out / "model.pt")
            break
        candidates: list[Atoms] = []
        for temp in cfg.temperatures_k:
            traj = run_md(
                list(seeds),
                models[0],
                ensemble="langevin",
                temperature_k=temp,
                timestep_fs=cfg.timestep_fs,
                n_steps=cfg.md_steps,
                sample_every=cfg.sample_every,
                device="cpu",
                dtype=next(models[0].parameters()).dtype,
                seed=cfg.seed + it,
            )
            candidates += _frames_of(traj, seeds, f"al-iter-{it}@{temp:g}K")
        sizes = [len(a) for a in candidates]
        devi = max_force_deviation(committee_forces(models, candidates), sizes)
        pick, counts = select_candidates(devi, cfg.trust_lo, cfg.trust_hi, cfg.max_new_frames)
        say(
            f"  {len(candidates)} candidates: {counts['below']} below {cfg.trust_lo:g}, "
            f"{counts['inside']} inside, {counts['above']} above {cfg.trust_hi:g} eV/A; "
            f"labelling {pick.size} with xTB"
        )
        lab = label_frames([candidates[k] for k in pick], data, resume=True)
        report.iterations.append(
            IterationReport(
                iteration=it,
                n_train=len(split["train"]),
                n_candidates=len(candidates),
                labelled=int(lab.n_labelled),
                failed=len(lab.failed),
                max_devi_f_median=float(np.median(devi)),
                val_force_mae_mev_a=maes,
                seconds=time.perf_counter() - t0,
                **counts,
            )
        )
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
