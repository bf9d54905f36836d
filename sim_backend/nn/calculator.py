"""ASE calculator around any sim_backend potential, and ``load_calculator`` (contract 6).

``load_calculator()`` with no argument loads the model file shipped in
``sim_backend/models/default.pt``, offline. Which class rebuilds a file is decided by
the file's ``kind`` (see :func:`sim_backend.nn.model.register_model_kind`), the seam
where a MACE model plugs in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim_backend.errors import ModelFileError, SimInputError
from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.model import load_model
from sim_backend.nn.potential import Potential

try:  # ASE is part of the `sim` extra; keep the import error clear.
    from ase import Atoms
    from ase.calculators.calculator import Calculator, all_changes
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sim_backend.nn.calculator needs ASE: pip install 'labctl[sim]'") from exc

__all__ = ["MODELS_DIR", "MLPCalculator", "load_calculator", "resolve_model_path"]

#: Where shipped model files live; ``load_calculator("name")`` looks for ``name.pt`` here.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class MLPCalculator(Calculator):
    """ASE calculator: energy, free_energy, forces and (fully periodic cells) stress.

    The system's total charge (e) comes from ``atoms.info["total_charge"]`` (default 0).
    """

    # ASE's convention is a mutable class attribute
    implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012

    def __init__(
        self,
        model: Potential,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(device=dev, dtype=dtype).eval()
        self.device = dev
        self.dtype = dtype

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Fill ``self.results`` for ``atoms`` (ASE units: eV, eV/Å, eV/Å^3)."""
        super().calculate(atoms, properties or ["energy"], system_changes)  # type: ignore[no-untyped-call]
        at = self.atoms
        if at is None:
            raise SimInputError("MLPCalculator.calculate needs atoms, got None")
        unknown = sorted({int(z) for z in at.numbers} - set(self.model.species))
        if unknown:
            raise SimInputError(
                f"atoms contain elements Z={unknown} the model was not trained on "
                f"({self.model.species})"
            )
        charge = float(at.info.get("total_charge", 0.0))
        dt, dev = self.dtype, self.device
        pbc = torch.tensor(np.asarray(at.pbc, dtype=bool), device=self.device)[None]
        out = evaluate(
            self.model,
            torch.tensor(np.asarray(at.positions), dtype=dt, device=dev),
            torch.tensor(np.asarray(at.numbers), dtype=torch.long, device=self.device),
            torch.tensor(np.asarray(at.cell.array), dtype=dt, device=dev)[None],
            pbc,
            torch.zeros(len(at), dtype=torch.long, device=self.device),
            charge=torch.tensor([charge], dtype=dt, device=dev),
            forces=True,
            stress=bool(pbc.all()),  # cheap next to the forces; MD barostats want it
        )
        energy = float(out.energy[0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        assert out.forces is not None
        self.results["forces"] = out.forces.detach().cpu().double().numpy()
        if out.stress is not None:
            s = out.stress[0].detach().cpu().double().numpy()
            self.results["stress"] = np.array(
                [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
            )


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """None -> the shipped default; a bare name -> ``MODELS_DIR/name(.pt)``; else a path."""
    if name_or_path is None:
        p = MODELS_DIR / "default.pt"
    else:
        s = str(name_or_path)
        is_name = (
            isinstance(name_or_path, str)
            and "/" not in s
            and "\\" not in s
            and not Path(s).exists()
        )
        p = MODELS_DIR / (s if s.endswith(".pt") else s + ".pt") if is_name else Path(s)
    if not p.is_file():
        shipped = sorted(q.stem for q in MODELS_DIR.glob("*.pt"))
        raise ModelFileError(
            f"model not found: name_or_path={name_or_path!r} -> {p} (shipped models: {shipped})"
        )
    return p


def load_calculator(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> MLPCalculator:
    """An ASE calculator for a model file (contract 6); no argument = the shipped default."""
    if dtype not in (torch.float32, torch.float64):
        raise SimInputError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return MLPCalculator(load_model(resolve_model_path(name_or_path)), device=device, dtype=dtype)
