"""Serve stored ONNX models with onnxruntime: provider choice, input checks, batching.

The CUDA provider is used only when ``onnxruntime.get_available_providers()`` lists it
*and* a tiny model really runs on it (an onnxruntime-gpu wheel without a working CUDA
runtime lists the provider, then silently falls back to CPU or fails at session
creation). Otherwise the CPU provider runs. :attr:`OnnxModel.provider` says which.

No torch here: serving needs numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
from numpy.typing import NDArray

from labctl.models.registry import (
    METADATA_KEY,
    ModelError,
    ModelIntegrityError,
    ModelRecord,
    Registry,
)

if TYPE_CHECKING:
    import onnxruntime  # type: ignore[import-untyped]

__all__ = [
    "CPU",
    "CUDA",
    "InputRangeError",
    "OnnxModel",
    "Predictor",
    "ProviderChoice",
    "check_inputs",
    "cuda_usable",
    "load_model",
    "select_provider",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ProviderChoice = Literal["auto", "cpu", "cuda"]
DEFAULT_BATCH = 4096
SUM_TOLERANCE = 1e-3


class InputRangeError(ModelError, ValueError):
    """An input is missing, mis-shaped, not finite or outside the model's valid range."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {value!r} {reason}")


def _tiny_model() -> bytes:
    """A one-node ONNX model (y = x + x), to check a provider really runs."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime >= 1.14 reads
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def cuda_usable(ort: Any = None) -> bool:
    """True when CUDA is listed by onnxruntime and a tiny session really runs on it."""
    if ort is None:
        import onnxruntime

        ort = onnxruntime
    if CUDA not in ort.get_available_providers():
        return False
    try:
        with warnings.catch_warnings():
            # onnxruntime warns (UserWarning) and falls back to CPU when CUDA cannot be
            # loaded: that fallback is what we detect below, so the warning is expected.
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(_tiny_model(), providers=[CUDA, CPU])
            if session.get_providers()[:1] != [CUDA]:
                return False
            out = session.run(None, {"x": np.array([1.0, 2.0], dtype=np.float32)})[0]
    except Exception:  # any failure to build or run on CUDA means: do not use it
        return False
    return bool(np.allclose(out, [2.0, 4.0]))


def select_provider(prefer: ProviderChoice = "auto") -> list[str]:
    """The providers for a session: ``[CUDA, CPU]`` when CUDA is usable (and wanted),
    else ``[CPU]``. ``prefer="cuda"`` raises when CUDA is not usable."""
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider: must be 'auto', 'cpu' or 'cuda', got {prefer!r}")
    if prefer == "cpu":
        return [CPU]
    if cuda_usable():
        return [CUDA, CPU]
    if prefer == "cuda":
        raise ModelError("provider: 'cuda' asked for, but CUDAExecutionProvider is not usable")
    return [CPU]


def check_inputs(record: ModelRecord, inputs: Mapping[str, Any]) -> dict[str, NDArray[np.float32]]:
    """Inputs as float32 arrays of one batch size, checked against ``record.inputs``.

    Raises :class:`InputRangeError` naming the input (and column), the offending value
    and the valid range.
    """
    unknown = set(inputs) - {s.name for s in record.inputs}
    if unknown:
        raise InputRangeError(
            sorted(unknown)[0], "(given)", f"is not an input of {record.name}; "
            f"inputs: {[s.name for s in record.inputs]}",
        )  # fmt: skip
    out: dict[str, NDArray[np.float32]] = {}
    batch: int | None = None
    for spec in record.inputs:
        if spec.name not in inputs:
            raise InputRangeError(spec.name, None, "is missing")
        arr = np.asarray(inputs[spec.name], dtype=np.float64)
        inner = spec.shape[1:]
        if arr.ndim == len(spec.shape) - 1:  # one sample without the batch axis
            arr = arr[None, ...]
        if arr.ndim != len(spec.shape) or list(arr.shape[1:]) != inner:
            raise InputRangeError(
                spec.name, f"shape {arr.shape}", f"must have shape {['n', *inner]}"
            )
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise InputRangeError(
                spec.name, f"{arr.shape[0]} rows", f"must have {batch} rows like the others"
            )
        bad = ~np.isfinite(arr) | (arr < spec.min) | (arr > spec.max)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            field = spec.name
            if spec.columns and arr.ndim == 2:
                field = f"{spec.name}[{spec.columns[idx[1]]}]"
            value = float(arr[idx])
            raise InputRangeError(
                field,
                value,
                f"(row {idx[0]}) is outside the valid range [{spec.min:g}, {spec.max:g}]"
                f"{' ' + spec.units if spec.units else ''} of model {record.name} "
                f"{record.version}",
            )
        if spec.sums_to_one:
            sums = arr.reshape(arr.shape[0], -1).sum(axis=1)
            off = np.abs(sums - 1.0) > SUM_TOLERANCE
            if off.any():
                row = int(np.argmax(off))
                raise InputRangeError(
                    spec.name, float(sums[row]), f"(row {row}) must sum to 1 (sum of the row)"
                )
        out[spec.name] = arr.astype(np.float32)
    return out


class OnnxModel:
    """An onnxruntime session of a stored model, with its record.

    Build one with :func:`load_model` (verifies the hash) or from verified bytes.
    """

    def __init__(
        self, model: bytes, record: ModelRecord, *, provider: ProviderChoice = "auto"
    ) -> None:
        import onnxruntime as ort

        self.record = record
        providers = select_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its info lines are noise for users
        self.session: onnxruntime.InferenceSession = ort.InferenceSession(
            model, sess_options=options, providers=providers
        )
        self.provider: str = str(self.session.get_providers()[0])
        """The execution provider that runs this model: CUDA... or CPUExecutionProvider."""
        meta = self.session.get_modelmeta().custom_metadata_map
        embedded = meta.get(METADATA_KEY)
        if embedded is not None and embedded != record.embedded():
            # The sidecar JSON was edited: the hash only covers the ONNX file.
            raise ModelIntegrityError(
                Path(f"{record.sha256}.json"),
                _digest(embedded),
                _digest(record.embedded()),
                what="record (embedded vs stored) digest",
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        declared = [s.name for s in record.inputs]
        if sorted(declared) != sorted(self.input_names):
            raise ModelError(
                f"model {record.name} {record.version}: graph inputs {self.input_names} "
                f"differ from its record's {declared}"
            )

    def run(
        self, inputs: Mapping[str, Any], *, batch_size: int = DEFAULT_BATCH, check: bool = True
    ) -> dict[str, NDArray[np.float32]]:
        """Outputs by name for a batch of inputs, run in chunks of ``batch_size`` rows.

        With ``check`` (default) the inputs are validated first (:func:`check_inputs`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")
        arrays = (
            check_inputs(self.record, inputs)
            if check
            else {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
        )
        n = next(iter(arrays.values())).shape[0] if arrays else 0
        chunks: list[list[NDArray[np.float32]]] = []
        for start in range(0, max(n, 1), batch_size):
            feed = {k: v[start : start + batch_size] for k, v in arrays.items()}
            chunks.append(self.session.run(self.output_names, feed))
        return {
            name: np.concatenate([c[i] for c in chunks], axis=0)
            for i, name in enumerate(self.output_names)
        }


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def load_model(
    registry: str | Path | Registry,
    name: str,
    version: str | None = None,
    *,
    provider: ProviderChoice = "auto",
) -> OnnxModel:
    """The stored model ``name`` (``version``; None: the promoted one), hash verified."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    data, record = reg.load_bytes(name, version)
    return OnnxModel(data, record, provider=provider)


def metadata_of(model: OnnxModel) -> dict[str, Any]:
    """The record embedded in the running model, as a dict."""
    meta = model.session.get_modelmeta().custom_metadata_map
    data: dict[str, Any] = json.loads(meta[METADATA_KEY])
    return data


class Predictor:
    """A stored ONNX model of one ``kind``, served by onnxruntime (no torch).

    Subclasses set ``kind`` and ``default_name`` and add their ``predict``.
    """

    kind: str = ""
    default_name: str = ""

    def __init__(self, model: OnnxModel) -> None:
        if model.record.kind != self.kind:
            raise ValueError(
                f"model {model.record.name}: kind {model.record.kind!r}, not a {self.kind} model"
            )
        self.model = model
        self.record: ModelRecord = model.record
        self.provider: str = model.provider

    @classmethod
    def load(
        cls,
        registry: str | Path | Registry,
        name: str | None = None,
        version: str | None = None,
        *,
        provider: ProviderChoice = "auto",
    ) -> Self:
        """The model ``name`` (default: the kind's) from ``registry`` (``version``; None:
        the promoted one)."""
        return cls(load_model(registry, name or cls.default_name, version, provider=provider))
