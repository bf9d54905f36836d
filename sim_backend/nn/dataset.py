"""Labelled frames (extended XYZ with energy, forces, stress) to batched tensors.

Frames are ASE ``Atoms`` with a SinglePointCalculator (the dataset contract of
sim_backend's labeller). Training converts each frame once to a :class:`Sample` with its
neighbour list precomputed (positions never move during training), then
:func:`collate` concatenates samples into a :class:`Batch` in the batched representation
of sim_backend (positions [N, 3], cell [S, 3, 3], system_idx [N], ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sim_backend.errors import SimInputError
from sim_backend.nn.neighbors import neighbor_list

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "Batch",
    "Sample",
    "collate",
    "frames_hash",
    "frames_to_batch",
    "prepare",
    "read_frames",
    "split_frames",
]


@dataclass(frozen=True)
class Sample:
    """One labelled frame as tensors, neighbour list included (edge_index is local)."""

    positions: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    charge: float
    energy: float
    forces: Tensor
    stress: Tensor | None
    edge_index: Tensor
    cell_offsets: Tensor


@dataclass(frozen=True)
class Batch:
    """Frames concatenated into sim_backend's batched representation, with targets.

    ``stress`` holds zeros where a frame has none; ``has_stress`` [S] says which are real.
    """

    positions: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    system_idx: Tensor
    charge: Tensor
    energy: Tensor
    forces: Tensor
    stress: Tensor
    has_stress: Tensor
    edge_index: Tensor
    cell_offsets: Tensor
    n_systems: int

    @property
    def n_atoms_per_system(self) -> Tensor:
        """Atoms in each system, [S] (float, for per-atom energies)."""
        return torch.bincount(self.system_idx, minlength=self.n_systems).to(self.positions.dtype)

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``."""
        kw = {
            f: getattr(self, f).to(device)
            for f in self.__dataclass_fields__
            if isinstance(getattr(self, f), Tensor)
        }
        return replace(self, **kw)


def read_frames(path: str | Path, index: str = ":") -> list[Atoms]:
    """Frames of an extended XYZ (or any ASE-readable) file, each with energy and forces."""
    from ase.io import read

    p = Path(path)
    if not p.is_file():
        raise SimInputError(f"dataset file not found: path={p}")
    frames = read(p, index=index)
    out = frames if isinstance(frames, list) else [frames]
    for k, at in enumerate(out):
        if at.calc is None or "energy" not in at.calc.results or "forces" not in at.calc.results:
            raise SimInputError(f"{p}: frame {k} lacks energy/forces labels")
    return out


def _frame_key(at: Atoms) -> bytes:
    return (
        np.ascontiguousarray(at.numbers, dtype=np.int64).tobytes()
        + np.round(np.asarray(at.positions, dtype=np.float64), 6).tobytes()
        + np.round(np.asarray(at.cell.array, dtype=np.float64), 6).tobytes()
    )


def frames_hash(frames: Iterable[Atoms]) -> str:
    """A stable SHA-256 of the frames' geometry (what a model records as its training data)."""
    h = hashlib.sha256()
    for at in frames:
        h.update(_frame_key(at))
    return h.hexdigest()


def split_frames(
    frames: Sequence[Atoms], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, list[Atoms]]:
    """Split into "train", "val", "test".

    A frame's ``info["split"]`` wins; otherwise a hash of its geometry picks the split, so
    the split is stable when frames are added or reordered.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise SimInputError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions!r}"
        )
    out: dict[str, list[Atoms]] = {"train": [], "val": [], "test": []}
    for at in frames:
        name = at.info.get("split")
        if name is None:
            u = int.from_bytes(hashlib.sha256(_frame_key(at)).digest()[:8], "big") / 2.0**64
            name = (
                "train"
                if u < fractions[0]
                else "val"
                if u < fractions[0] + fractions[1]
                else "test"
            )
        if name not in out:
            raise SimInputError(f"info['split'] must be train, val or test, got {name!r}")
        out[str(name)].append(at)
    return out


def prepare(
    frames: Sequence[Atoms], cutoff: float, dtype: torch.dtype = torch.float32
) -> list[Sample]:
    """Frames to :class:`Sample` tensors (CPU) with neighbour lists for ``cutoff``."""
    samples = []
    for k, at in enumerate(frames):
        res = at.calc.results if at.calc is not None else {}
        if "energy" not in res or "forces" not in res:
            raise SimInputError(f"frame {k} lacks energy/forces labels")
        pos = torch.tensor(np.asarray(at.positions), dtype=dtype)
        cell = torch.tensor(np.asarray(at.cell.array), dtype=dtype)
        pbc = torch.tensor(np.asarray(at.pbc, dtype=bool))
        nl = neighbor_list(
            pos, cell[None], pbc[None], torch.zeros(len(at), dtype=torch.long), cutoff
        )
        stress = None
        if "stress" in res and bool(pbc.all()):
            s = np.asarray(res["stress"], dtype=np.float64)
            if s.shape == (6,):
                xx, yy, zz, yz, xz, xy = s
                s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
            stress = torch.tensor(s, dtype=dtype)
        samples.append(
            Sample(
                positions=pos,
                numbers=torch.tensor(np.asarray(at.numbers), dtype=torch.long),
                cell=cell,
                pbc=pbc,
                charge=float(at.info.get("total_charge", 0.0)),
                energy=float(res["energy"]),
                forces=torch.tensor(np.asarray(res["forces"]), dtype=dtype),
                stress=stress,
                edge_index=nl.edge_index,
                cell_offsets=nl.cell_offsets,
            )
        )
    return samples


def collate(samples: Sequence[Sample]) -> Batch:
    """Concatenate samples into one :class:`Batch` (edge indices shifted per system)."""
    if not samples:
        raise SimInputError("collate needs at least one sample, got 0")
    counts = [s.positions.shape[0] for s in samples]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dtype = samples[0].positions.dtype
    return Batch(
        positions=torch.cat([s.positions for s in samples]),
        numbers=torch.cat([s.numbers for s in samples]),
        cell=torch.stack([s.cell for s in samples]),
        pbc=torch.stack([s.pbc for s in samples]),
        system_idx=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        charge=torch.tensor([s.charge for s in samples], dtype=dtype),
        energy=torch.tensor([s.energy for s in samples], dtype=torch.float64),
        forces=torch.cat([s.forces for s in samples]),
        stress=torch.stack(
            [s.stress if s.stress is not None else torch.zeros(3, 3, dtype=dtype) for s in samples]
        ),
        has_stress=torch.tensor([s.stress is not None for s in samples]),
        edge_index=torch.cat(
            [s.edge_index + int(o) for s, o in zip(samples, starts, strict=True)], dim=1
        ),
        cell_offsets=torch.cat([s.cell_offsets for s in samples]),
        n_systems=len(samples),
    )


def frames_to_batch(
    frames: Sequence[Atoms], cutoff: float, dtype: torch.dtype = torch.float32
) -> Batch:
    """Shortcut: :func:`prepare` then :func:`collate`."""
    return collate(prepare(frames, cutoff, dtype))
