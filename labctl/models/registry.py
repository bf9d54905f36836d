"""A content-addressed store of ONNX models with their metadata, versions and promotion.

Layout under ``root``::

    <root>/<name>/<sha256>.onnx     the model, named by the sha256 of its bytes
    <root>/<name>/<sha256>.json     its :class:`ModelRecord` (also embedded in the ONNX file)
    <root>/<name>/index.json        versions in order, the promoted one and the promotion history

Loading a model hashes the file and refuses a mismatch (:class:`ModelIntegrityError`
names the file and both hashes). New versions are only added; promotion moves a pointer,
so every earlier version stays loadable and :meth:`Registry.rollback` is one step.

Only numpy-free standard library here (plus pydantic and, when adding a model, onnx to
embed the metadata), so reading records is cheap.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "METADATA_KEY",
    "InputSpec",
    "ModelError",
    "ModelIntegrityError",
    "ModelRecord",
    "OutputSpec",
    "Promotion",
    "Registry",
    "RegistryError",
    "TrainingDataInfo",
    "embed_record",
    "sha256_bytes",
    "sha256_file",
]

# Key of the JSON record inside the ONNX file's metadata_props.
METADATA_KEY = "labctl.record"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")


class ModelError(RuntimeError):
    """Base of labctl.models errors."""


class RegistryError(ModelError):
    """A registry operation failed (unknown model or version, bad name)."""


class ModelIntegrityError(ModelError):
    """A stored model's bytes (or record) do not match the hash it is stored under."""

    def __init__(self, path: Path, expected: str, actual: str, what: str = "sha256") -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{path}: {what} mismatch: expected {expected}, got {actual}; "
            "the file was modified or corrupted, refusing to load it"
        )


class InputSpec(BaseModel):
    """One input of a model: name, shape (None = batch axis), units and valid range.

    ``columns`` names the entries of the last axis (e.g. the solvents of a fraction
    vector); ``sums_to_one`` requires rows of the last axis to sum to 1 (within 1e-3).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | None]
    units: str = ""
    min: float
    max: float
    columns: list[str] = Field(default_factory=list)
    sums_to_one: bool = False
    description: str = ""


class OutputSpec(BaseModel):
    """One output of a model."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | None]
    units: str = ""
    description: str = ""


class TrainingDataInfo(BaseModel):
    """What the model was trained on: a query anyone can rerun, and the data's hash."""

    model_config = ConfigDict(extra="forbid")

    query: str
    sha256: str
    rows: int = Field(ge=0)


class ModelRecord(BaseModel):
    """A model's metadata. ``version``, ``sha256`` and ``created`` are set by the registry."""

    # NaN metrics (R^2 of a constant held-out target) must survive the JSON round trip.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    name: str
    kind: str = Field(description="what the model is, e.g. 'property' or 'cell'")
    version: str = ""
    sha256: str = ""
    created: str = ""
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    training_data: TrainingDataInfo
    metrics: dict[str, float] = Field(description="on held-out data")
    primary_metric: str = "rmse"
    higher_is_better: bool = False
    framework: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name: {v!r} must be 1-64 of letters, digits, '_', '.', '-'")
        return v

    def input(self, name: str) -> InputSpec:
        """The input called ``name``."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"no input {name!r}; inputs: {[s.name for s in self.inputs]}")

    def embedded(self) -> str:
        """The JSON embedded in the ONNX file: everything but the file's own hash."""
        return json.dumps(self.model_dump(mode="json", exclude={"sha256"}), sort_keys=True)


class Promotion(BaseModel):
    """The outcome of :meth:`Registry.promote_if_not_worse`."""

    name: str
    candidate: str
    incumbent: str | None
    metric: str
    higher_is_better: bool
    candidate_score: float
    incumbent_score: float | None
    tolerance: float
    promoted: bool
    reason: str


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename, so a crash never leaves a half-written model or index.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embed_record(model: bytes, record: ModelRecord) -> bytes:
    """``model`` (ONNX bytes) with ``record`` in its metadata_props under METADATA_KEY."""
    import onnx

    proto = onnx.load_from_string(model)
    props = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = record.embedded()
    proto.producer_name = "labctl"
    return bytes(proto.SerializeToString())


class Registry:
    """Models stored by content under ``root`` (created when needed)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths and index ------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise RegistryError(f"name: {name!r} must be 1-64 of letters, digits, '_', '.', '-'")
        return self.root / name

    def _index_path(self, name: str) -> Path:
        return self._dir(name) / "index.json"

    def _index(self, name: str) -> dict[str, Any]:
        path = self._index_path(name)
        if not path.exists():
            return {"name": name, "versions": [], "promoted": None, "history": []}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _write_index(self, name: str, index: dict[str, Any]) -> None:
        _atomic_write(self._index_path(name), (json.dumps(index, indent=1) + "\n").encode())

    def names(self) -> list[str]:
        """Model names in the registry."""
        if not self.root.exists():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/index.json"))

    def versions(self, name: str) -> list[ModelRecord]:
        """Every version of ``name``, oldest first."""
        return [self._read_record(name, v["sha256"]) for v in self._index(name)["versions"]]

    def promoted(self, name: str) -> str | None:
        """The promoted version of ``name`` (None before the first promotion)."""
        value = self._index(name)["promoted"]
        return str(value) if value is not None else None

    def path(self, name: str, version: str | None = None) -> Path:
        """The ONNX file of ``version`` (a label like ``v3`` or a sha256 prefix of 8+ hex
        digits; None: the promoted one)."""
        return self._dir(name) / f"{self._resolve(name, version)['sha256']}.onnx"

    def _resolve(self, name: str, version: str | None) -> dict[str, Any]:
        index = self._index(name)
        if not index["versions"]:
            raise RegistryError(f"no model {name!r} in {self.root}")
        if version is None:
            version = index["promoted"]
            if version is None:
                raise RegistryError(f"model {name!r} has no promoted version; give one")
        hits = [v for v in index["versions"] if v["version"] == version]
        if not hits and _HEX.match(version):
            hits = [v for v in index["versions"] if v["sha256"].startswith(version)]
        if len(hits) != 1:
            known = ", ".join(v["version"] for v in index["versions"])
            what = "ambiguous" if hits else "unknown"
            raise RegistryError(f"version: {what} {version!r} of {name!r}; known: {known}")
        entry: dict[str, Any] = hits[0]
        return entry

    def _read_record(self, name: str, sha: str) -> ModelRecord:
        path = self._dir(name) / f"{sha}.json"
        return ModelRecord.model_validate_json(path.read_text())

    # -- adding and loading ---------------------------------------------------------------

    def add(self, model: bytes, record: ModelRecord) -> ModelRecord:
        """Store ``model`` (ONNX bytes) as the next version of ``record.name``.

        Sets the record's version (``v1``, ``v2``...), creation time and sha256, embeds
        the record in the ONNX file, writes both files and the index; does not promote.
        """
        name = record.name
        index = self._index(name)
        version = f"v{len(index['versions']) + 1}"
        draft = record.model_copy(update={"version": version, "created": _now(), "sha256": ""})
        data = embed_record(model, draft)
        sha = sha256_bytes(data)
        final = draft.model_copy(update={"sha256": sha})
        folder = self._dir(name)
        _atomic_write(folder / f"{sha}.onnx", data)
        _atomic_write(folder / f"{sha}.json", (final.model_dump_json(indent=1) + "\n").encode())
        index["versions"].append(
            {"version": version, "sha256": sha, "created": final.created, "metrics": final.metrics}
        )
        self._write_index(name, index)
        return final

    def record(self, name: str, version: str | None = None) -> ModelRecord:
        """The record of ``version`` (None: the promoted one), without hashing the file."""
        return self._read_record(name, self._resolve(name, version)["sha256"])

    def load_bytes(self, name: str, version: str | None = None) -> tuple[bytes, ModelRecord]:
        """The verified ONNX bytes and record of ``version`` (None: the promoted one).

        Raises :class:`ModelIntegrityError` when the file's sha256 is not the one it is
        stored under, or when its record differs from the embedded one.
        """
        entry = self._resolve(name, version)
        expected = entry["sha256"]
        path = self._dir(name) / f"{expected}.onnx"
        if not path.exists():
            raise RegistryError(f"{path}: missing (version {entry['version']} of {name!r})")
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != expected:
            raise ModelIntegrityError(path, expected, actual)
        record = self._read_record(name, expected)
        if record.sha256 != expected:
            raise ModelIntegrityError(
                path.with_suffix(".json"), expected, record.sha256, what="record sha256"
            )
        return data, record

    # -- promotion ------------------------------------------------------------------------

    def promote(self, name: str, version: str) -> ModelRecord:
        """Make ``version`` the one loaded by default (the previous stays in the history)."""
        entry = self._resolve(name, version)
        index = self._index(name)
        if index["promoted"] != entry["version"]:
            index["promoted"] = entry["version"]
            index["history"].append({"version": entry["version"], "time": _now()})
            self._write_index(name, index)
        return self._read_record(name, entry["sha256"])

    def rollback(self, name: str) -> ModelRecord:
        """Promote again the version promoted before the current one; returns its record."""
        index = self._index(name)
        history: list[dict[str, Any]] = index["history"]
        if len(history) < 2:
            raise RegistryError(f"model {name!r}: nothing to roll back to (history: {history})")
        history.pop()
        previous = history[-1]["version"]
        index["promoted"] = previous
        self._write_index(name, index)
        return self.record(name, previous)

    def promote_if_not_worse(
        self,
        name: str,
        version: str,
        *,
        tolerance: float = 0.0,
        candidate_score: float | None = None,
        incumbent_score: float | None = None,
    ) -> Promotion:
        """Promote ``version`` unless its primary metric is worse than the promoted one's.

        "Not worse" allows ``tolerance`` (relative): for a lower-is-better metric the
        candidate passes when ``candidate <= incumbent * (1 + tolerance)``. Scores default
        to the records' primary metric; pass both when they were measured on the same
        data in the same run (what :mod:`labctl.models.update` does on a new held-out
        set, and ``train-bms`` on its tuning profiles).
        """
        if not tolerance >= 0.0:
            raise ValueError(f"tolerance: must be >= 0, got {tolerance!r}")
        candidate = self.record(name, version)
        metric, hib = candidate.primary_metric, candidate.higher_is_better
        c_score = candidate_score if candidate_score is not None else candidate.metrics[metric]
        incumbent_version = self.promoted(name)
        base: dict[str, Any] = {
            "name": name,
            "candidate": candidate.version,
            "incumbent": incumbent_version,
            "metric": metric,
            "higher_is_better": hib,
            "candidate_score": c_score,
            "tolerance": tolerance,
        }
        if incumbent_version is None:
            self.promote(name, candidate.version)
            return Promotion(
                **base, incumbent_score=None, promoted=True, reason="no promoted version yet"
            )
        if incumbent_version == candidate.version:
            return Promotion(
                **base, incumbent_score=c_score, promoted=True, reason="already promoted"
            )
        incumbent = self.record(name, incumbent_version)
        i_score = incumbent_score if incumbent_score is not None else incumbent.metrics[metric]
        import math

        if not math.isfinite(c_score):
            ok = False
        elif hib:
            ok = c_score >= i_score - abs(i_score) * tolerance
        else:
            ok = c_score <= i_score + abs(i_score) * tolerance
        word = "not worse than" if ok else "worse than"
        reason = (
            f"{metric} {c_score:.6g} of {candidate.version} is {word} {i_score:.6g} of "
            f"{incumbent_version} ({'higher' if hib else 'lower'} is better, "
            f"tolerance {tolerance:g})"
        )
        if ok:
            self.promote(name, candidate.version)
        return Promotion(**base, incumbent_score=i_score, promoted=ok, reason=reason)
