"""Training a potential on energies and forces (and stress when labelled).

Reference energies per species (plus a term linear in the total charge) are fitted by
least squares first, so the network only learns the small residual; descriptor
statistics of the training set normalise the network's inputs. Then Adam with
plateau LR decay and early stopping on the validation loss. A checkpoint is written
each epoch (atomically) and ``train(..., checkpoint=path)`` resumes from it.

``model_kind`` picks the model family: ``"moment-mlp"`` (the default, MomentPotential)
or ``"mace"`` (the MACE peer of :mod:`sim_backend.nn.mace`, needs the ``sim-peers``
extra). Both share the loss, optimiser, early stopping and checkpoints; each kind has
its own model hyper-parameters (``model_hyper_defaults(kind)``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.nn.dataset import Batch, Sample, collate, frames_hash, prepare
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.model import DEFAULT_SPECIES, MomentPotential
from sim_backend.nn.potential import Potential

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "DEFAULT_HYPER",
    "MODEL_KINDS",
    "ReferenceFit",
    "evaluate_metrics",
    "fit_reference_energies",
    "model_hyper_defaults",
    "train",
]

#: Defaults of every training hyper-parameter (``train(hyper=...)`` overrides any subset).
DEFAULT_HYPER: dict[str, Any] = {
    "cutoff": 5.0,
    "species": list(DEFAULT_SPECIES),
    "n_basis": 8,
    "n_channels": 16,
    "hidden": [64, 64],
    "lr": 3e-3,
    "min_lr": 1e-5,
    "lr_factor": 0.5,
    "lr_patience": 8,
    "batch_size": 16,
    "energy_weight": 20.0,  # on (eV/atom)^2
    "force_weight": 1.0,  # on (eV/Å)^2
    "stress_weight": 0.0,  # on (eV/Å^3)^2
    "grad_clip": 10.0,
    "patience": 30,  # epochs without validation improvement before stopping
    "dtype": "float32",
}


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise SimInputError(f"hyper['dtype'] must be 'float32' or 'float64', got {name!r}")
    return torch.float32 if name == "float32" else torch.float64


#: Model hyper-parameters of the moment potential (the rest of DEFAULT_HYPER is training).
_MOMENT_KEYS = ("n_basis", "n_channels", "hidden")
#: Model kinds ``train`` can build (their names in model files, see ``save_model(kind=)``).
MODEL_KINDS: tuple[str, ...] = ("moment-mlp", "mace")

#: kind's builder: (hyper, training samples) -> an initialised potential.
ModelBuilder = Callable[[dict[str, Any], Sequence[Sample]], Potential]


class ReferenceFit(NamedTuple):
    """Least-squares per-species reference energies (eV), charge term (eV/e), the std of
    the per-atom residual (eV/atom) and the RMS force component (eV/Å) of a training set."""

    ref_energy: np.ndarray
    charge_energy: float
    resid_std: float
    force_rms: float


def fit_reference_energies(species: Sequence[int], samples: Sequence[Sample]) -> ReferenceFit:
    """E ~ sum_Z n_Z E_Z + q E_q by least squares over ``samples`` (E0s for any model)."""
    species = [int(z) for z in species]
    counts = np.zeros((len(samples), len(species) + 1))
    energy = np.array([s.energy for s in samples])
    n_atoms = np.array([s.numbers.shape[0] for s in samples], dtype=np.float64)
    for k, s in enumerate(samples):
        zs, cs = np.unique(s.numbers.numpy(), return_counts=True)
        for z, c in zip(zs, cs, strict=True):
            if int(z) not in species:
                raise SimInputError(
                    f"training frame {k} has element Z={int(z)} not in species {species}"
                )
            counts[k, species.index(int(z))] = c
        counts[k, -1] = s.charge
    coef, *_ = np.linalg.lstsq(counts, energy, rcond=None)
    resid = (energy - counts @ coef) / n_atoms
    f_rms = float(torch.cat([s.forces.reshape(-1) for s in samples]).double().pow(2).mean().sqrt())
    return ReferenceFit(
        ref_energy=np.asarray(coef[:-1], dtype=np.float64),
        charge_energy=float(coef[-1]),
        resid_std=float(np.std(resid)),
        force_rms=f_rms,
    )


def _fit_references(model: MomentPotential, samples: Sequence[Sample]) -> None:
    """Least-squares species reference energies + charge term; residual sets the scale."""
    fit = fit_reference_energies(model.species, samples)
    scale = max(fit.resid_std, 0.01) if len(samples) > 1 else 0.1
    # Forces also set the scale of atomic energies: a network of unit output moves ~scale eV.
    scale = max(scale, 0.1 * fit.force_rms)
    with torch.no_grad():
        model.ref_energy.copy_(torch.tensor(fit.ref_energy))
        model.charge_energy.copy_(torch.tensor(fit.charge_energy))
        model.energy_scale.fill_(scale)


def _fit_normalisation(
    model: MomentPotential, samples: Sequence[Sample], batch_size: int = 64
) -> None:
    feats = []
    with torch.no_grad():
        for k in range(0, len(samples), batch_size):
            b = collate(samples[k : k + batch_size])
            feats.append(
                model.descriptors(
                    b.positions.float(),
                    b.numbers,
                    b.cell.float(),
                    b.system_idx,
                    b.edge_index,
                    b.cell_offsets.float(),
                )
            )
        f = torch.cat(feats)
        model.feat_mean.copy_(f.mean(0))
        model.feat_std.copy_(f.std(0).clamp(min=1e-4) if f.shape[0] > 1 else torch.ones_like(f[0]))


def _build_moment(h: dict[str, Any], samples: Sequence[Sample]) -> Potential:
    model = MomentPotential(
        cutoff=float(h["cutoff"]),
        species=tuple(int(z) for z in h["species"]),
        n_basis=int(h["n_basis"]),
        n_channels=int(h["n_channels"]),
        hidden=tuple(int(x) for x in h["hidden"]),
    )
    _fit_references(model, samples)
    _fit_normalisation(model, samples)
    return model


def _build_mace(h: dict[str, Any], samples: Sequence[Sample]) -> Potential:
    from sim_backend.nn.mace import build_mace  # the optional sim-peers extra

    return build_mace(h, samples)


def model_hyper_defaults(model_kind: str = "moment-mlp") -> dict[str, Any]:
    """Every hyper-parameter ``train(model_kind=...)`` accepts, with its default."""
    if model_kind == "moment-mlp":
        return dict(DEFAULT_HYPER)
    if model_kind == "mace":
        from sim_backend.nn.mace import MACE_HYPER

        common = {k: v for k, v in DEFAULT_HYPER.items() if k not in _MOMENT_KEYS}
        return common | dict(MACE_HYPER)
    raise SimInputError(f"model_kind must be one of {list(MODEL_KINDS)}, got {model_kind!r}")


def _loss_terms(model: Potential, b: Batch, create_graph: bool) -> dict[str, Tensor]:
    out = evaluate(
        model,
        b.positions,
        b.numbers,
        b.cell,
        b.pbc,
        b.system_idx,
        neighbors=_neighbors(b),
        charge=b.charge,
        forces=True,
        stress=bool(b.has_stress.any()),
        create_graph=create_graph,
    )
    n = b.n_atoms_per_system
    de = (out.energy.double() - b.energy) / n.double()
    assert out.forces is not None
    df = out.forces - b.forces
    terms = {
        "e_mse": (de * de).mean(),
        "e_mae": de.abs().mean(),
        "f_mse": (df * df).mean(),
        "f_mae": df.abs().mean(),
    }
    if out.stress is not None and bool(b.has_stress.any()):
        ds = (out.stress - b.stress)[b.has_stress]
        terms["s_mse"] = (ds * ds).mean()
    return terms


def _neighbors(b: Batch) -> Any:
    from sim_backend.nn.neighbors import NeighborList

    return NeighborList(b.edge_index, b.cell_offsets)


def evaluate_metrics(
    model: Potential, samples: Sequence[Sample], batch_size: int = 32, device: str = "cpu"
) -> dict[str, float]:
    """Energy MAE (meV/atom), force MAE (meV/Å) and RMSEs over ``samples``."""
    if not samples:
        return {}
    e_abs, e_sq, f_abs, f_sq, n_f, n_e = 0.0, 0.0, 0.0, 0.0, 0, 0
    for k in range(0, len(samples), batch_size):
        b = collate(samples[k : k + batch_size]).to(device)
        t = _loss_terms(model, b, create_graph=False)
        ns, nf = b.n_systems, b.forces.numel()
        e_abs += float(t["e_mae"]) * ns
        e_sq += float(t["e_mse"]) * ns
        f_abs += float(t["f_mae"]) * nf
        f_sq += float(t["f_mse"]) * nf
        n_e += ns
        n_f += nf
    return {
        "energy_mae_mev_per_atom": 1e3 * e_abs / n_e,
        "energy_rmse_mev_per_atom": 1e3 * math.sqrt(e_sq / n_e),
        "force_mae_mev_per_a": 1e3 * f_abs / n_f,
        "force_rmse_mev_per_a": 1e3 * math.sqrt(f_sq / n_f),
        "n_frames": float(n_e),
    }


def train(
    train_frames: Sequence[Atoms],
    val_frames: Sequence[Atoms],
    *,
    hyper: dict[str, Any] | None = None,
    epochs: int = 200,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    test_frames: Sequence[Atoms] = (),
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    model_kind: str = "moment-mlp",
) -> tuple[Potential, dict[str, Any]]:
    """Train a potential of ``model_kind``; returns (best model by validation loss, metrics).

    ``model_kind``: ``"moment-mlp"`` (:class:`MomentPotential`) or ``"mace"``
    (:class:`sim_backend.nn.mace.MacePotential`); ``hyper`` keys are checked against
    ``model_hyper_defaults(model_kind)``.
    ``progress`` is called after every epoch with a dict (epoch, losses, MAEs, lr).
    ``checkpoint``: a file written each epoch; when it exists, training resumes from it.
    Metrics hold train/val/test energy MAE (meV/atom) and force MAE (meV/Å).
    """
    defaults = model_hyper_defaults(model_kind)
    build: ModelBuilder = _build_moment if model_kind == "moment-mlp" else _build_mace
    h = dict(defaults)
    unknown = set(hyper or {}) - set(defaults)
    if unknown:
        raise SimInputError(
            f"unknown hyper-parameters {sorted(unknown)} for model_kind {model_kind!r}; "
            f"known: {sorted(defaults)}"
        )
    h.update(hyper or {})
    if not train_frames:
        raise SimInputError("train_frames is empty")
    if not val_frames:
        raise SimInputError("val_frames is empty (early stopping needs a validation set)")
    if epochs < 0:
        raise SimInputError(f"epochs must be >= 0, got {epochs!r}")
    dtype = _dtype(str(h["dtype"]))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cutoff = float(h["cutoff"])
    if not cutoff > 0:
        raise SimInputError(f"cutoff must be > 0 Å, got {cutoff!r}")
    tr = prepare(train_frames, cutoff, dtype)
    va = prepare(val_frames, cutoff, dtype)
    te = prepare(test_frames, cutoff, dtype) if test_frames else []
    model = build(h, tr).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=float(h["lr"]))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=float(h["lr_factor"]), patience=int(h["lr_patience"]), min_lr=float(h["min_lr"])
    )
    start_epoch, best_val, best_epoch = 0, math.inf, -1
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    history: list[dict[str, float]] = []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best_state = state["best_state"]
        start_epoch, best_val, best_epoch = (
            int(state["epoch"]) + 1,
            float(state["best_val"]),
            int(state["best_epoch"]),
        )
        history = list(state["history"])
        gen.manual_seed(seed + start_epoch)
    w_e, w_f, w_s = float(h["energy_weight"]), float(h["force_weight"]), float(h["stress_weight"])
    bs = int(h["batch_size"])
    for epoch in range(start_epoch, epochs):
        if epoch - best_epoch > int(h["patience"]) and best_epoch >= 0:
            break
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(tr), generator=gen).tolist()
        run_loss, n_b = 0.0, 0
        for k in range(0, len(perm), bs):
            b = collate([tr[i] for i in perm[k : k + bs]]).to(device)
            t = _loss_terms(model, b, create_graph=True)
            loss = w_e * t["e_mse"].to(dtype) + w_f * t["f_mse"]
            if "s_mse" in t and w_s > 0:
                loss = loss + w_s * t["s_mse"]
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            # Perturbed frames carry forces of tens of eV/Å: clip so one batch cannot derail Adam.
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(h["grad_clip"]))
            opt.step()
            run_loss += float(loss.detach())
            n_b += 1
        model.eval()
        vm = evaluate_metrics(model, va, device=device)
        val_loss = (
            w_e * (vm["energy_rmse_mev_per_atom"] / 1e3) ** 2
            + w_f * (vm["force_rmse_mev_per_a"] / 1e3) ** 2
        )
        sched.step(val_loss)
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rec = {
            "epoch": float(epoch),
            "train_loss": run_loss / max(n_b, 1),
            "val_loss": val_loss,
            "val_energy_mae_mev_per_atom": vm["energy_mae_mev_per_atom"],
            "val_force_mae_mev_per_a": vm["force_mae_mev_per_a"],
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        if ckpt is not None:
            _save_checkpoint(
                ckpt, model, opt, sched, best_state, epoch, best_val, best_epoch, history
            )
        if progress is not None:
            progress(dict(rec))
    model.load_state_dict(best_state)
    model.eval()
    metrics: dict[str, Any] = {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "train": evaluate_metrics(model, tr, device=device),
        "val": evaluate_metrics(model, va, device=device),
        "test": evaluate_metrics(model, te, device=device),
        "train_data_hash": frames_hash([*train_frames, *val_frames]),
        "hyper": h,
        "model_kind": model_kind,
        "seed": seed,
        "history": history,
    }
    return model, metrics


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau,
    best_state: dict[str, Tensor],
    epoch: int,
    best_val: float,
    best_epoch: int,
    history: list[dict[str, float]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "best_state": best_state,
            "epoch": epoch,
            "best_val": best_val,
            "best_epoch": best_epoch,
            "history": history,
        },
        tmp,
    )
    os.replace(tmp, path)
