"""MACE (mace-torch) as a peer model behind sim_backend's :class:`Potential` interface.

A small ``mace.modules.ScaleShiftMACE`` built from scratch (nothing downloads: no
``mace_mp()``), trained by :func:`sim_backend.nn.train.train` with ``model_kind="mace"``
on the same data and loss as the moment potential. The wrapper maps sim_backend's
batched representation onto MACE's input dict:

====================================  ==============================================
sim_backend                           MACE
====================================  ==============================================
``numbers`` -> index in ``species``   ``node_attrs`` (one-hot over ``species``)
``edge_index`` (i centre, j neighbour) ``edge_index`` (sender i, receiver j)
``cell_offsets @ cell[system(i)]``    ``shifts`` (Å); ``cell_offsets`` = ``unit_shifts``
``system_idx``, ``n_systems``         ``batch``, ``ptr``
====================================  ==============================================

Both conventions give ``r_ij = x_j - x_i + shift``. The wrapper returns MACE's total
energy per system (per-species E0s + scaled interaction energy); forces and stress come
from :func:`sim_backend.nn.evaluate.evaluate` by autograd through ``positions`` and
``cell`` like every other potential (MACE is called with ``compute_force=False``), so
the MD engine, the ASE calculator and the benchmark take it unchanged. Pairs beyond
``cutoff`` (an MD list carries a skin) are dropped before MACE sees them; MACE's
polynomial envelope already gives them zero weight, dropping them only saves work.

Charge: MACE has no charge input. The per-species E0s (``atomic_energies``) and a term
linear in the system's total charge come from the same least-squares reference fit as
the moment model's; the charge term is added outside the network, so it shifts the
energy of a charged system but never its forces (charge is tied to composition in these
electrolytes: Li is always Li+, PF6 always PF6-).

mace-torch is the optional ``sim-peers`` extra and is imported lazily: without it,
building or loading a MACE model raises :class:`MaceUnavailableError` naming the extra.
Model files: ``save_model(model, path, kind="mace")`` stores the state dict and the JSON
:attr:`MacePotential.hyper` (``avg_num_neighbors`` included), so ``load_model`` /
``load_calculator`` rebuild it with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from sim_backend.errors import SimError, SimInputError
from sim_backend.nn.model import DEFAULT_SPECIES, register_model_kind
from sim_backend.nn.potential import Potential

if TYPE_CHECKING:
    from sim_backend.nn.dataset import Sample

__all__ = [
    "MACE_HYPER",
    "MacePotential",
    "MaceUnavailableError",
    "build_mace",
    "load_mace",
]

#: Model hyper-parameters of the MACE peer (and its training overrides), the defaults of
#: ``train(..., model_kind="mace")``. Sized to train in minutes on one CPU core.
MACE_HYPER: dict[str, Any] = {
    "cutoff": 5.0,
    "species": list(DEFAULT_SPECIES),
    "hidden_irreps": "16x0e+16x1o",
    "max_ell": 1,
    "correlation": 2,
    "num_interactions": 2,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "mlp_irreps": "16x0e",
    "radial_mlp": [32, 32],
    "lr": 1e-2,  # MACE's own default learning rate
}

#: The constructor arguments of MacePotential that ``train`` takes from its hyper dict.
_MODEL_KEYS = (
    "cutoff",
    "species",
    "hidden_irreps",
    "max_ell",
    "correlation",
    "num_interactions",
    "num_bessel",
    "num_polynomial_cutoff",
    "mlp_irreps",
    "radial_mlp",
)


class MaceUnavailableError(SimError, ImportError):
    """mace-torch (the ``sim-peers`` extra) is not installed."""


@contextlib.contextmanager
def _quiet_mace() -> Iterator[None]:
    """Silence the known deprecation noise of e3nn/mace on recent torch (TorchScript)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated.*")
        warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
        yield


def _import_mace() -> Any:
    """``mace.modules``, imported on first use.

    e3nn 0.4.4 (mace-torch's pin) reads its own ``constants.pt`` with a bare
    ``torch.load``, which torch >= 2.6 refuses under ``weights_only=True`` because the
    file holds ``slice`` objects; ``slice`` is allow-listed for that one import.
    mace-torch prints a notice about cuequivariance to stdout on import; it is swallowed
    so that ``labctl sim ... --json`` output stays one JSON object.
    """
    try:
        with (
            torch.serialization.safe_globals([slice]),
            _quiet_mace(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            import e3nn.o3  # type: ignore[import-untyped]  # noqa: F401
            from mace import modules
    except ImportError as exc:
        raise MaceUnavailableError(
            "MACE models need mace-torch, the optional 'sim-peers' extra: "
            f"pip install '.[sim-peers]' (or pip install 'labctl[sim-peers]'); import failed: {exc}"
        ) from exc
    return modules


class MacePotential(Potential):
    """A from-scratch ``ScaleShiftMACE`` returning one energy per system (eV).

    Hyper-parameters (all JSON, see :attr:`hyper`): ``cutoff`` (Å), ``species``,
    ``hidden_irreps``, ``max_ell``, ``correlation``, ``num_interactions``,
    ``num_bessel``, ``num_polynomial_cutoff``, ``mlp_irreps``, ``radial_mlp`` and
    ``avg_num_neighbors`` (MACE's message normalisation, from the training data).
    E0s, the interaction scale/shift and the charge term are buffers (state dict).
    """

    z_to_index: Tensor
    charge_energy: Tensor

    def __init__(
        self,
        cutoff: float = 5.0,
        species: tuple[int, ...] = DEFAULT_SPECIES,
        *,
        hidden_irreps: str = "16x0e+16x1o",
        max_ell: int = 1,
        correlation: int = 2,
        num_interactions: int = 2,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        mlp_irreps: str = "16x0e",
        radial_mlp: Sequence[int] = (32, 32),
        avg_num_neighbors: float = 20.0,
        atomic_energies: Sequence[float] | None = None,
        scale: float = 1.0,
        shift: float = 0.0,
    ) -> None:
        if not cutoff > 0:
            raise SimInputError(f"cutoff must be > 0 Å, got {cutoff!r}")
        if len(species) == 0 or len(set(species)) != len(species):
            raise SimInputError(f"species must be distinct atomic numbers, got {species!r}")
        if any(not 1 <= z <= 118 for z in species):
            raise SimInputError(f"species must be atomic numbers 1..118, got {species!r}")
        if max_ell < 0 or correlation < 1 or num_interactions < 1 or num_bessel < 1:
            raise SimInputError(
                f"max_ell >= 0, correlation, num_interactions and num_bessel >= 1 required, got "
                f"{max_ell!r}, {correlation!r}, {num_interactions!r}, {num_bessel!r}"
            )
        if not avg_num_neighbors > 0:
            raise SimInputError(f"avg_num_neighbors must be > 0, got {avg_num_neighbors!r}")
        modules = _import_mace()
        from e3nn import o3

        super().__init__(cutoff, tuple(sorted(int(z) for z in species)))
        n_sp = len(self.species)
        if atomic_energies is None:
            e0 = np.zeros(n_sp)
        else:
            e0 = np.asarray(list(atomic_energies), dtype=np.float64)
            if e0.shape != (n_sp,):
                raise SimInputError(
                    f"atomic_energies must have one value per species ({n_sp}), got {e0.shape}"
                )
        self._hyper: dict[str, Any] = {
            "cutoff": self.cutoff,
            "species": list(self.species),
            "hidden_irreps": str(hidden_irreps),
            "max_ell": int(max_ell),
            "correlation": int(correlation),
            "num_interactions": int(num_interactions),
            "num_bessel": int(num_bessel),
            "num_polynomial_cutoff": int(num_polynomial_cutoff),
            "mlp_irreps": str(mlp_irreps),
            "radial_mlp": [int(w) for w in radial_mlp],
            "avg_num_neighbors": float(avg_num_neighbors),
        }
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.species)] = torch.arange(n_sp)
        self.register_buffer("z_to_index", lookup)
        self.register_buffer("charge_energy", torch.zeros(()))
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        try:
            hidden = o3.Irreps(hidden_irreps)
            mlp = o3.Irreps(mlp_irreps)
        except (ValueError, AssertionError) as exc:
            raise SimInputError(f"bad irreps {hidden_irreps!r} / {mlp_irreps!r}: {exc}") from exc
        with _quiet_mace():
            self.mace = modules.ScaleShiftMACE(
                atomic_inter_scale=float(scale),
                atomic_inter_shift=float(shift),
                r_max=self.cutoff,
                num_bessel=int(num_bessel),
                num_polynomial_cutoff=int(num_polynomial_cutoff),
                max_ell=int(max_ell),
                interaction_cls=block,
                interaction_cls_first=block,
                num_interactions=int(num_interactions),
                num_elements=n_sp,
                hidden_irreps=hidden,
                MLP_irreps=mlp,
                atomic_energies=e0,
                avg_num_neighbors=float(avg_num_neighbors),
                atomic_numbers=list(self.species),
                correlation=int(correlation),
                gate=torch.nn.functional.silu,
                radial_MLP=[int(w) for w in radial_mlp],
            )

    @property
    def hyper(self) -> dict[str, Any]:
        """JSON-able constructor arguments (what :func:`save_model` stores)."""
        return dict(self._hyper)

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
        """Total energy per system (eV); ``charge`` [S] in e only shifts the energy."""
        dtype, device = positions.dtype, positions.device
        idx = self.z_to_index[numbers]
        if bool((idx < 0).any()):
            bad = sorted({int(z) for z in numbers[idx < 0].tolist()})
            raise SimInputError(
                f"numbers contains elements {bad} not in the model's species {self.species}"
            )
        i, j = edge_index[0], edge_index[1]
        shifts = torch.einsum(
            "ek,ekc->ec",
            cell_offsets.to(dtype),
            cell.index_select(0, system_idx.index_select(0, i)),
        )
        with torch.no_grad():
            vec = positions.index_select(0, j) - positions.index_select(0, i) + shifts
            keep = (vec * vec).sum(-1) < self.cutoff**2
        if not bool(keep.all()):
            edge_index, shifts, cell_offsets = edge_index[:, keep], shifts[keep], cell_offsets[keep]
        counts = torch.bincount(system_idx, minlength=n_systems)
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        # MACE's prepare_graph calls positions.requires_grad_(True): hand it a fresh leaf
        # when the caller's tensor does not require grad, so the caller's is left untouched.
        pos = positions if positions.requires_grad else positions.detach()
        data = {
            "positions": pos,
            "node_attrs": torch.nn.functional.one_hot(idx, len(self.species)).to(dtype),
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": cell_offsets.to(dtype),
            "cell": cell,
            "batch": system_idx,
            "ptr": ptr,
        }
        out = self.mace(data, training=False, compute_force=False)
        energy: Tensor = out["energy"].reshape(n_systems)
        if charge is not None:
            energy = energy + self.charge_energy.to(dtype) * charge.to(dtype)
        return energy.to(device)


def load_mace(hyper: Mapping[str, Any], state: Mapping[str, Tensor]) -> Potential:
    """Rebuild a :class:`MacePotential` from a model file's hyper dict and state dict."""
    known = {*_MODEL_KEYS, "avg_num_neighbors"}
    unknown = set(hyper) - known
    if unknown:
        raise SimInputError(f"MACE model file has unknown hyper-parameters {sorted(unknown)}")
    kw = {k: v for k, v in hyper.items() if k not in ("cutoff", "species")}
    model = MacePotential(float(hyper["cutoff"]), tuple(int(z) for z in hyper["species"]), **kw)
    model.load_state_dict(dict(state))
    return model


register_model_kind("mace", load_mace)


def build_mace(hyper: Mapping[str, Any], samples: Sequence[Sample]) -> MacePotential:
    """A fresh MACE peer for training on ``samples`` (``train(model_kind="mace")``).

    E0s and the charge term come from the least-squares reference fit shared with the
    moment model; ``avg_num_neighbors`` is the mean number of neighbours per atom
    within the cutoff; the interaction energy is scaled by the RMS force component (MACE's
    ``rms_forces_scaling``) with zero shift (the fit already centres the residual).
    """
    from sim_backend.nn.train import fit_reference_energies

    species = tuple(sorted(int(z) for z in hyper["species"]))
    fit = fit_reference_energies(species, samples)
    n_edges = sum(int(s.edge_index.shape[1]) for s in samples)
    n_atoms = sum(int(s.positions.shape[0]) for s in samples)
    avg = max(n_edges / max(n_atoms, 1), 1.0)
    kw = {k: hyper[k] for k in _MODEL_KEYS if k not in ("cutoff", "species")}
    model = MacePotential(
        float(hyper["cutoff"]),
        species,
        avg_num_neighbors=avg,
        atomic_energies=fit.ref_energy.tolist(),
        scale=max(fit.force_rms, 1e-3),
        shift=0.0,
        **kw,
    )
    with torch.no_grad():
        model.charge_energy.fill_(fit.charge_energy)
    return model
