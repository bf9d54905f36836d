"""GFN2-xTB labels (tblite) written frame by frame to an extended XYZ file, resumable.

Each labelled frame is appended as one complete extxyz record and flushed before the next is
computed, so a crash loses at most the frame in progress; a torn record left at the end of the
file by a kill is cut off on the next run. On restart, frames whose `frame_id` is already in the
file (or in the failure log next to it) are skipped. A frame on which xTB fails (SCF not
converged, bad geometry) is logged to ``<out>.failed.jsonl``, reported, and skipped.

Each written frame carries the provenance keys of the shared convention in `info`: `method`,
`code`, `config_type`, `system`, `source`, `seed`, `total_charge`, `uhf`, plus `frame_id`,
`split` (train/val/test from a hash of the frame id, so it never changes) and `label_settings`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sim_backend.chem.sample import XtbSettings, xtb_calculator
from sim_backend.errors import SimInputError

if TYPE_CHECKING:
    from ase import Atoms

Status = Literal["labelled", "reused", "skipped", "failed"]
Split = Literal["train", "val", "test"]
DEFAULT_SPLIT: tuple[float, float, float] = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class LabelProgress:
    """One event per input frame: what happened to it and how long it took (s)."""

    index: int
    total: int | None
    frame_id: str
    status: Status
    seconds: float
    n_atoms: int
    message: str = ""


@dataclass(frozen=True)
class FailedFrame:
    """A frame xTB could not label, and why."""

    frame_id: str
    reason: str


@dataclass
class LabelReport:
    """What one `label_frames` call did. `failed` includes failures logged by earlier runs."""

    out_path: Path
    n_input: int = 0
    n_labelled: int = 0
    n_reused: int = 0
    n_skipped: int = 0
    failed: list[FailedFrame] = field(default_factory=list)
    wall_s: float = 0.0


ProgressCallback = Callable[[LabelProgress], None]


def tblite_version() -> str:
    """The installed tblite version, for the `code` provenance key."""
    from importlib.metadata import version

    return version("tblite")


def content_id(atoms: Atoms) -> str:
    """A content hash of a frame (numbers, positions to 1e-6 Å, cell, pbc, charge).

    Used as the frame id of frames that come without one.
    """
    h = hashlib.sha1()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(atoms.positions, 6).astype(np.float64).tobytes())
    h.update(np.round(atoms.cell.array, 6).astype(np.float64).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    h.update(str(int(atoms.info.get("total_charge", 0))).encode())
    return "h-" + h.hexdigest()[:20]


def frame_id(atoms: Atoms) -> str:
    """`info["frame_id"]` when set, else the content hash."""
    fid = atoms.info.get("frame_id")
    return str(fid) if fid else content_id(atoms)


def split_group(fid: str) -> str:
    """The structure a frame comes from: its id without the sampling suffix
    (``.../Li+_EC4/1/md450K/2/p1`` -> ``.../Li+_EC4/1``; ``.../EC8/0/build/p3`` ->
    ``.../EC8/0``).

    Every frame of one structure must land in the same split: a perturbed copy is nearly
    its parent, and MD snapshots 10 fs apart are nearly each other (0.15 A RMSD), so
    splitting them apart made the test set a copy of the training set.
    """
    return re.sub(r"(/(md\d+(\.\d+)?K/\d+|build))?(/p\d+)*$", "", fid)


def split_of(fid: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT) -> Split:
    """Train/val/test membership from a hash of the frame's split group: stable across runs and
    machines, and a perturbed copy always shares its parent's split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise SimInputError(
            f"split: fractions must be 3 numbers >= 0 summing to 1, got {fractions}"
        )
    u = int(hashlib.sha256(split_group(fid).encode()).hexdigest()[:15], 16) / 16**15
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def failed_log_path(out_path: Path) -> Path:
    """Where failures of `out_path` are logged (one JSON object per line)."""
    return out_path.with_name(out_path.name + ".failed.jsonl")


def read_failed(out_path: Path) -> list[FailedFrame]:
    """Failures logged next to `out_path` by earlier runs."""
    log = failed_log_path(Path(out_path))
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append(FailedFrame(str(rec["frame_id"]), str(rec["reason"])))
    return out


def labelled_ids(out_path: Path, *, repair: bool = True) -> list[str]:
    """Frame ids already in an extxyz file, in order.

    Scans record boundaries (count line, comment line, atom lines) instead of parsing every
    frame; a torn last record (from a kill mid-write) is cut off when `repair` is true.
    """
    from ase.io.extxyz import key_val_str_to_dict

    path = Path(out_path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    ids: list[str] = []
    i = 0
    good = 0
    offset = 0
    while i < len(lines):
        try:
            n = int(lines[i].strip())
        except ValueError:
            break
        if i + 2 + n > len(lines) or not lines[i + 1 + n].endswith(b"\n"):
            break
        info = key_val_str_to_dict(lines[i + 1].decode())  # type: ignore[no-untyped-call]
        ids.append(str(info.get("frame_id", "")))
        offset += sum(len(x) for x in lines[i : i + 2 + n])
        good = offset
        i += 2 + n
    if good < len(raw) and repair:
        with path.open("r+b") as f:
            f.truncate(good)
    return ids


def label_frames(
    frames: Iterable[Atoms],
    out_path: str | Path,
    *,
    method: str = "GFN2-xTB",
    settings: XtbSettings | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = True,
    reuse_labels: bool = True,
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    total: int | None = None,
) -> LabelReport:
    """Label `frames` with xTB and append them to the extxyz file `out_path`.

    `resume=True` skips frames whose id is already in the file or its failure log;
    `resume=False` starts the file (and log) afresh. Frames that already carry labels computed
    with the same settings (`info["label_settings"]`, e.g. xTB MD snapshots) are written as they
    are when `reuse_labels` is true. Charge and uhf come from `info["total_charge"]` / `["uhf"]`
    (default 0). `progress` is called after every frame; an exception it raises stops the run
    with every frame before it safely on disk.
    """
    t0 = time.perf_counter()
    settings = settings or XtbSettings(method=method)
    if settings.method != method:
        raise SimInputError(f"method: {method!r} differs from settings.method {settings.method!r}")
    split_of("x", split)  # validates the fractions up front
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = failed_log_path(path)
    if not resume:
        path.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    report = LabelReport(out_path=path)
    done = set(labelled_ids(path))
    previous_failures = {f.frame_id: f for f in read_failed(path)}
    report.failed.extend(previous_failures.values())
    if total is None and isinstance(frames, Sized):
        total = len(frames)
    code = f"tblite {tblite_version()}"
    _XTB_FAILURES = _xtb_failures()  # noqa: N806 (a constant, imported lazily)
    tag = settings.tag()

    for index, atoms in enumerate(frames):
        report.n_input += 1
        start = time.perf_counter()
        fid = frame_id(atoms)
        if fid in done or fid in previous_failures:
            report.n_skipped += 1
            _emit(progress, index, total, fid, "skipped", start, len(atoms))
            continue
        out = atoms.copy()  # type: ignore[no-untyped-call]
        charge = int(atoms.info.get("total_charge", 0))
        uhf = int(atoms.info.get("uhf", 0))
        status: Status = "labelled"
        if reuse_labels and _has_labels(atoms) and atoms.info.get("label_settings") == tag:
            assert atoms.calc is not None
            results = dict(atoms.calc.results)
            status = "reused"
        else:
            try:
                results = _xtb_single_point(atoms, settings, charge, uhf)
            except _XTB_FAILURES as exc:
                reason = f"{type(exc).__name__}: {exc}"
                failure = FailedFrame(fid, reason)
                report.failed.append(failure)
                previous_failures[fid] = failure
                with log.open("a") as f:
                    f.write(json.dumps({"frame_id": fid, "reason": reason}) + "\n")
                _emit(progress, index, total, fid, "failed", start, len(atoms), reason)
                continue
        _attach(out, results)
        out.info.update(
            frame_id=fid,
            method=settings.method,
            code=code,
            label_settings=tag,
            config_type=str(atoms.info.get("config_type", "unspecified")),
            system=str(atoms.info.get("system", atoms.get_chemical_formula())),  # type: ignore[no-untyped-call]
            source=str(atoms.info.get("source", "unspecified")),
            seed=int(atoms.info.get("seed", -1)),
            total_charge=charge,
            uhf=uhf,
            split=split_of(fid, split),
        )
        _append(path, out)
        done.add(fid)
        if status == "reused":
            report.n_reused += 1
        else:
            report.n_labelled += 1
        _emit(progress, index, total, fid, status, start, len(atoms))
    report.wall_s = time.perf_counter() - t0
    return report


def _xtb_failures() -> tuple[type[BaseException], ...]:
    from ase.calculators.calculator import CalculationFailed, InputError

    return (CalculationFailed, InputError, RuntimeError, FloatingPointError)


def _emit(
    progress: ProgressCallback | None,
    index: int,
    total: int | None,
    fid: str,
    status: Status,
    start: float,
    n_atoms: int,
    message: str = "",
) -> None:
    if progress is not None:
        seconds = time.perf_counter() - start
        progress(LabelProgress(index, total, fid, status, seconds, n_atoms, message))


def _has_labels(atoms: Atoms) -> bool:
    calc = atoms.calc
    if calc is None:
        return False
    need = {"energy", "forces"} | ({"stress"} if atoms.pbc.any() else set())
    return need <= set(getattr(calc, "results", {}))


def _xtb_single_point(
    atoms: Atoms, settings: XtbSettings, charge: int, uhf: int
) -> dict[str, np.ndarray | float]:
    """Energy (eV), forces (eV/Å) and, for periodic frames, stress (eV/Å^3, Voigt) from tblite."""
    work = atoms.copy()  # type: ignore[no-untyped-call]
    work.calc = xtb_calculator(settings, charge=charge, uhf=uhf)
    results: dict[str, np.ndarray | float] = {
        "energy": float(work.get_potential_energy()),
        "forces": np.array(work.get_forces()),
    }
    if work.pbc.any():
        results["stress"] = np.array(work.get_stress())
    for key, value in results.items():
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"non-finite {key} from xTB")
    return results


def _attach(atoms: Atoms, results: dict[str, np.ndarray | float]) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator

    keep = {k: results[k] for k in ("energy", "forces", "stress") if k in results}
    atoms.calc = SinglePointCalculator(atoms, **keep)  # type: ignore[no-untyped-call]


def _append(path: Path, atoms: Atoms) -> None:
    """Append one complete extxyz record in a single write, then flush it to the OS."""
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    with path.open("a") as f:
        f.write(buf.getvalue())
        f.flush()
