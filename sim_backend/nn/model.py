"""The learned potential: an E(3)-invariant moment descriptor + MLP atomic energies.

Why this shape: one pass over edges builds, for every atom, species-aware radial
channels R_c(r_ij) (Bessel basis times a smooth cosine cutoff, mixed by the neighbour's
species) and their angular moments of order 0, 1 and 2

    A0_c = sum_j R_c,   A1_c = sum_j R_c u_ij,   A2_c = sum_j R_c u_ij (x) u_ij

(u_ij the unit vector). Their contractions A0_c, A1_c.A1_d and A2_c:A2_d are exactly
invariant to rotation, translation and permutation, include three-body (angular)
information and cost O(edges), like a power-spectrum SOAP/ACE descriptor without any
triplet loop. A shared MLP (with the centre species one-hot and the per-atom share of the
system's total charge as extra inputs) maps them to an atomic energy, added to
per-species reference energies fitted by least squares, so the network learns only the
residual. The cosine cutoff has zero value and slope at ``cutoff``: energy and forces
are continuous as atoms cross it.

Files: :func:`save_model` / :func:`load_model` write and read a plain dict (state dict,
JSON hyper-parameters, JSON metadata) that loads with ``torch.load(weights_only=True)``.
Other model kinds register a loader under their own ``kind`` (MACE: ``"mace"``,
:mod:`sim_backend.nn.mace`, imported only when such a file is loaded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sim_backend.errors import ModelFileError, SimInputError
from sim_backend.nn.potential import Potential, edge_vectors

__all__ = [
    "DEFAULT_SPECIES",
    "FILE_FORMAT",
    "MomentPotential",
    "load_model",
    "read_model_file",
    "register_model_kind",
    "save_model",
]

#: H, Li, C, O, F, P: the elements of carbonate electrolytes with LiPF6.
DEFAULT_SPECIES: tuple[int, ...] = (1, 3, 6, 8, 9, 15)
FILE_FORMAT = "sim_backend.model/1"
_SQRT2 = math.sqrt(2.0)


class MomentPotential(Potential):
    """Invariant moment descriptor + MLP (see the module docstring).

    Hyper-parameters: ``cutoff`` (Å), ``species`` (atomic numbers), ``n_basis`` (radial
    Bessel functions), ``n_channels`` (radial channels per moment order), ``hidden``
    (MLP widths).
    """

    # buffers (declared for the type checker)
    z_to_index: Tensor
    freqs: Tensor
    triu: Tensor
    feat_mean: Tensor
    feat_std: Tensor
    energy_scale: Tensor
    ref_energy: Tensor
    charge_energy: Tensor

    def __init__(
        self,
        cutoff: float = 5.0,
        species: tuple[int, ...] = DEFAULT_SPECIES,
        n_basis: int = 8,
        n_channels: int = 16,
        hidden: tuple[int, ...] = (64, 64),
    ) -> None:
        if not cutoff > 0:
            raise SimInputError(f"cutoff must be > 0 Å, got {cutoff!r}")
        if len(species) == 0 or len(set(species)) != len(species):
            raise SimInputError(f"species must be distinct atomic numbers, got {species!r}")
        if any(not 1 <= z <= 118 for z in species):
            raise SimInputError(f"species must be atomic numbers 1..118, got {species!r}")
        if n_basis < 1 or n_channels < 1 or any(h < 1 for h in hidden):
            raise SimInputError(
                f"n_basis, n_channels and hidden must be positive, got "
                f"{n_basis!r}, {n_channels!r}, {hidden!r}"
            )
        super().__init__(cutoff, tuple(species))
        self.n_basis = int(n_basis)
        self.n_channels = int(n_channels)
        self.hidden = tuple(int(h) for h in hidden)
        n_sp = len(self.species)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.species)] = torch.arange(n_sp)
        self.register_buffer("z_to_index", lookup)
        self.register_buffer("freqs", torch.arange(1, n_basis + 1, dtype=torch.float32) * math.pi)
        # Radial channels: a per-neighbour-species mix of the Bessel basis, one set per order.
        self.radial = torch.nn.Linear(n_sp * n_basis, 3 * n_channels, bias=False)
        tri = torch.triu_indices(n_channels, n_channels)
        self.register_buffer("triu", tri)
        n_feat = n_channels + 2 * tri.shape[1]
        self.n_features = n_feat
        self.register_buffer("feat_mean", torch.zeros(n_feat))
        self.register_buffer("feat_std", torch.ones(n_feat))
        layers: list[torch.nn.Module] = []
        width = n_feat + n_sp + 1
        for h in self.hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.SiLU()]
            width = h
        layers.append(torch.nn.Linear(width, 1))
        self.mlp = torch.nn.Sequential(*layers)
        # Residual scale per species (eV), reference energies (eV) and the charge term (eV/e).
        self.register_buffer("energy_scale", torch.ones(n_sp))
        self.register_buffer("ref_energy", torch.zeros(n_sp))
        self.register_buffer("charge_energy", torch.zeros(()))

    @property
    def hyper(self) -> dict[str, Any]:
        """JSON-able constructor arguments (what :func:`save_model` stores)."""
        return {
            "cutoff": self.cutoff,
            "species": list(self.species),
            "n_basis": self.n_basis,
            "n_channels": self.n_channels,
            "hidden": list(self.hidden),
        }

    def species_index(self, numbers: Tensor) -> Tensor:
        """Index into ``species`` for each atom; raises for elements the model lacks."""
        idx: Tensor = self.z_to_index[numbers]
        if bool((idx < 0).any()):
            bad = sorted({int(z) for z in numbers[idx < 0].tolist()})
            raise SimInputError(
                f"numbers contains elements {bad} not in the model's species {self.species}"
            )
        return idx

    def descriptors(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        system_idx: Tensor,
        edge_index: Tensor,
        cell_offsets: Tensor,
    ) -> Tensor:
        """Raw (unnormalised) invariant features per atom, shape [N, n_features]."""
        n_atoms = positions.shape[0]
        z = self.z_to_index[numbers]
        vec = edge_vectors(positions, cell, system_idx, edge_index, cell_offsets)
        r = torch.sqrt((vec * vec).sum(-1).clamp(min=1e-12))
        u = vec / r[:, None]
        rc = self.cutoff
        inside = r < rc
        fc = torch.where(inside, 0.5 * (torch.cos(math.pi * r / rc) + 1.0), torch.zeros_like(r))
        freqs = self.freqs.to(r.dtype)
        basis = (
            torch.sin(freqs[None, :] * r[:, None] / rc)
            / r[:, None]
            * (fc * math.sqrt(2.0 / rc))[:, None]
        )
        n_sp, k, c = len(self.species), self.n_basis, self.n_channels
        ux, uy, uz = u[:, 0], u[:, 1], u[:, 2]
        angular = torch.stack(
            [
                torch.ones_like(ux),
                ux,
                uy,
                uz,
                ux * ux,
                uy * uy,
                uz * uz,
                _SQRT2 * ux * uy,
                _SQRT2 * ux * uz,
                _SQRT2 * uy * uz,
            ],
            dim=-1,
        )  # [E, 10]: orders 0, 1, 2 (u (x) u in a basis where the dot product is the trace)
        # Scatter basis x angular into (centre atom, neighbour species) slots first and mix
        # the radial channels per atom afterwards: far fewer numbers per edge than mixing
        # per edge.
        per_edge = (basis[:, :, None] * angular[:, None, :]).reshape(-1, k * 10)
        slot = edge_index[0] * n_sp + z.index_select(0, edge_index[1])
        x = torch.zeros(n_atoms * n_sp, k * 10, dtype=r.dtype, device=r.device)
        x = x.index_add(0, slot, per_edge).reshape(n_atoms, n_sp * k, 10)
        w = self.radial.weight.to(r.dtype)  # [3C, n_sp * k]
        a0 = x[:, :, 0] @ w[:c].T  # [N, C]
        a1 = x[:, :, 1:4].transpose(1, 2) @ w[c : 2 * c].T  # [N, 3, C]
        a2 = x[:, :, 4:].transpose(1, 2) @ w[2 * c :].T  # [N, 6, C]
        flat = self.triu[0] * c + self.triu[1]
        p1 = (a1.transpose(1, 2) @ a1).reshape(n_atoms, c * c).index_select(1, flat)
        p2 = (a2.transpose(1, 2) @ a2).reshape(n_atoms, c * c).index_select(1, flat)
        return torch.cat([a0, p1, p2], dim=1)

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
        """Total energy per system (eV); ``charge`` [S] in e, default neutral."""
        dtype, device = positions.dtype, positions.device
        z = self.z_to_index[numbers]
        feats = self.descriptors(positions, numbers, cell, system_idx, edge_index, cell_offsets)
        feats = (feats - self.feat_mean.to(dtype)) / self.feat_std.to(dtype)
        n_per = torch.bincount(system_idx, minlength=n_systems).to(dtype)
        if charge is None:
            charge = torch.zeros(n_systems, dtype=dtype, device=device)
        q_atom = (charge.to(dtype) / n_per.clamp(min=1.0))[system_idx]
        onehot = torch.nn.functional.one_hot(z, len(self.species)).to(dtype)
        x = torch.cat([feats, onehot, q_atom[:, None]], dim=1)
        atomic = (
            self.mlp(x).squeeze(-1) * self.energy_scale.to(dtype)[z] + self.ref_energy.to(dtype)[z]
        )
        energy = torch.zeros(n_systems, dtype=dtype, device=device).index_add(0, system_idx, atomic)
        return energy + self.charge_energy.to(dtype) * charge.to(dtype)


# ----------------------------------------------------------------------------- files

#: kind -> function(hyper, state_dict) building the potential ("moment-mlp", "mace").
_LOADERS: dict[str, Callable[[dict[str, Any], dict[str, Tensor]], Potential]] = {}


def register_model_kind(
    kind: str, loader: Callable[[dict[str, Any], dict[str, Tensor]], Potential]
) -> None:
    """Teach :func:`load_model` to build files whose metadata ``kind`` is ``kind``."""
    _LOADERS[kind] = loader


def _load_moment(hyper: dict[str, Any], state: dict[str, Tensor]) -> Potential:
    model = MomentPotential(
        cutoff=float(hyper["cutoff"]),
        species=tuple(int(z) for z in hyper["species"]),
        n_basis=int(hyper["n_basis"]),
        n_channels=int(hyper["n_channels"]),
        hidden=tuple(int(h) for h in hyper["hidden"]),
    )
    model.load_state_dict(state)
    return model


register_model_kind("moment-mlp", _load_moment)


def _load_mace(hyper: dict[str, Any], state: dict[str, Tensor]) -> Potential:
    # Lazy: mace-torch is the optional sim-peers extra (a clear error names it if missing).
    from sim_backend.nn.mace import load_mace

    return load_mace(hyper, state)


register_model_kind("mace", _load_mace)


def save_model(
    model: Potential,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    kind: str = "moment-mlp",
) -> Path:
    """Write ``model`` to ``path`` (state dict + JSON hyper-parameters + JSON metadata).

    Tensors are stored in float32 on the CPU (the file is small and loads anywhere);
    ``metadata`` should hold species, cutoff, training data hash, metrics and version.
    """
    hyper = getattr(model, "hyper", None)
    if not isinstance(hyper, dict):
        raise SimInputError(f"model {type(model).__name__} has no JSON 'hyper' dict to save")
    meta = dict(metadata or {})
    meta.setdefault("species", list(model.species))
    meta.setdefault("cutoff", model.cutoff)
    state = {
        k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    payload = {
        "format": FILE_FORMAT,
        "kind": kind,
        "hyper_json": json.dumps(hyper),
        "metadata_json": json.dumps(meta),
        "state_dict": state,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return out


def read_model_file(
    path: str | Path,
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """(kind, hyper, metadata, state_dict) of a model file, loaded with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise ModelFileError(f"cannot read model file {p}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(
            f"{p} is not a sim_backend model file (format {fmt!r}, expected {FILE_FORMAT!r})"
        )
    try:
        kind = str(payload["kind"])
        hyper = json.loads(payload["hyper_json"])
        meta = json.loads(payload["metadata_json"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"model file {p} is incomplete or corrupt: {exc!r}") from exc
    return kind, hyper, meta, state


def load_model(path: str | Path) -> Potential:
    """Rebuild the potential stored in ``path``; its metadata is on ``model.metadata``."""
    kind, hyper, meta, state = read_model_file(path)
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ModelFileError(
            f"{path}: unknown model kind {kind!r}; known kinds: {sorted(_LOADERS)}"
        )
    try:
        model = loader(hyper, state)
    except (KeyError, RuntimeError, SimInputError) as exc:
        raise ModelFileError(f"{path}: cannot build a {kind!r} model: {exc}") from exc
    model.metadata = meta
    return model.eval()
