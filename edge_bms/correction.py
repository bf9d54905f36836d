"""The learned part of the filter: an ONNX network that corrects the 2-RC voltage model.

A 2-RC equivalent circuit misses what a DFN cell does at low temperature, low SOC and
after long pulses (solid diffusion, electrolyte polarisation). The network sees what
the filter knows at each step (its SOC, the cell temperature, the current and three
exponential moving averages of it: 10 s, 60 s, 300 s) and predicts

* ``dv_v``: the voltage the ECM gets wrong, added to its predicted terminal voltage, and
* ``log_var``: the log variance of what is left, used as the filter's measurement noise
  (where the ECM is poor the filter leans on coulomb counting; KalmanNet-like, but with
  the Kalman structure kept).

It is trained in torch by ``labctl models train-bms`` (``labctl.models.bms``) and shipped
as ONNX plus a JSON record (the labctl model record: inputs with units and ranges,
training data query and hash, held-out metrics, version). Loading verifies the file's
sha256 against the record and refuses a mismatch; at run time, cells whose features
leave the training range fall back to the plain filter, and :class:`CorrectionOutput`
says which cells used the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_bms.errors import CorrectionModelError

if TYPE_CHECKING:
    from edge_bms.estimator import CorrectionInputs

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

KIND = "bms-correction"
DEFAULT_MODEL = "bms-correction"
# The features, in the order of the network's input columns.
FEATURES = ("soc", "temperature_c", "current_a", "i_ema_10s", "i_ema_60s", "i_ema_300s")
EMA_TAUS_S = (10.0, 60.0, 300.0)
FallbackReason = Literal["", "missing", "integrity", "metadata", "range"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    min: float | None = None
    max: float | None = None
    columns: list[str] = []


class CorrectionRecord(BaseModel):
    """The fields of the labctl model record that the edge needs (others are kept)."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    version: str
    sha256: str
    inputs: list[_Spec]
    outputs: list[_Spec]
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {}


_TAUS = np.asarray(EMA_TAUS_S)
_ALL = np.logical_and.reduce  # ndarray.all() without its Python wrapper


def ema_step(
    ema: FloatArray,
    current_a: FloatArray,
    dt_s: float | FloatArray,
    out: FloatArray | None = None,
) -> FloatArray:
    """Moving averages of current with time constants EMA_TAUS_S: ``ema`` is [n, 3];
    ``out`` may be ``ema`` itself (in place)."""
    if isinstance(dt_s, float | int):
        alpha = _alpha(float(dt_s))
    else:
        alpha = -np.expm1(-np.asarray(dt_s, dtype=float)[..., None] / _TAUS)
    d = np.asarray(current_a, dtype=float)[..., None] - ema
    d *= alpha
    res: FloatArray = np.add(ema, d, out=out)
    return res


@functools.lru_cache(maxsize=64)
def _alpha(dt_s: float) -> FloatArray:
    # A pack sampled at a fixed rate asks for the same few dt values: compute them once.
    a: FloatArray = -np.expm1(-dt_s / _TAUS)
    a.flags.writeable = False
    return a


def features(
    soc: FloatArray, temperature_c: FloatArray, current_a: FloatArray, ema: FloatArray
) -> npt.NDArray[np.float32]:
    """The network's input rows [n, len(FEATURES)], float32."""
    n = soc.shape[0]
    out = np.empty((n, len(FEATURES)), dtype=np.float32)
    out[:, 0] = soc
    out[:, 1] = temperature_c
    out[:, 2] = current_a
    out[:, 3:] = ema
    return out


@dataclass(frozen=True)
class CorrectionOutput:
    """Per cell: the voltage correction, the measurement variance, and whether it applied."""

    dv_v: FloatArray
    r_var_v2: FloatArray  # NaN where the network did not apply: the filter keeps its own R
    used: BoolArray


class VoltageCorrectionNet:
    """An onnxruntime session of the correction network with its verified record.

    One object serves one pack, from one thread: it keeps that pack's moving averages and
    reuses its input/output buffers between calls (the array :meth:`features` returns is
    overwritten by the next :meth:`features` or :meth:`predict`). For several packs, give
    each a ``copy.copy`` of it: the copies share the onnxruntime session, not the buffers.
    """

    def __init__(self, model: bytes, record: CorrectionRecord, source: str) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        self.record = record
        self.source = source
        self.version = record.version
        if record.kind != KIND:
            raise CorrectionModelError(f"{source}: kind {record.kind!r}, expected {KIND!r}")
        extra = record.extra
        cols = list(extra.get("features", []))
        if cols != list(FEATURES):
            raise CorrectionModelError(
                f"{source}: features {cols} differ from what this edge_bms computes "
                f"{list(FEATURES)}; retrain with this version"
            )
        ranges = extra.get("feature_ranges", {})
        try:
            # float32 like the features, so the range check needs no upcast
            self.lo = np.array([float(ranges[c][0]) for c in FEATURES], dtype=np.float32)
            self.hi = np.array([float(ranges[c][1]) for c in FEATURES], dtype=np.float32)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CorrectionModelError(
                f"{source}: extra.feature_ranges must give [min, max] for each of {FEATURES}"
            ) from exc
        self.r_floor_v2 = float(extra.get("r_floor_v2", 1e-6))
        # The network's variance is per sample; its errors are correlated over minutes, so
        # the filter would count the same error many times. train-bms picks this factor on
        # the training profiles.
        self.r_inflation = float(extra.get("r_inflation", 1.0))
        if not self.r_inflation > 0:
            raise CorrectionModelError(f"{source}: extra.r_inflation must be > 0")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # One thread: a gateway runs many packs; and at 200 rows threads cost more than they win.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CorrectionModelError(f"{source}: onnxruntime cannot load it: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.output_names != ["dv_v", "log_var"]:
            raise CorrectionModelError(
                f"{source}: outputs {self.output_names}, expected ['dv_v', 'log_var']"
            )

        self._ema: FloatArray | None = None
        self._io: _IoBuffers | None = None
        self._ort = ort

    def __copy__(self) -> VoltageCorrectionNet:
        # a copy shares the session and the record, not this pack's averages and buffers
        # (the buffers hold the averages in place: sharing them would step both packs)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._io = None
        new._ema = None if self._ema is None else self._ema.copy()
        return new

    # -- the estimator's VoltageCorrection protocol ----------------------------------------
    def features(self, inputs: CorrectionInputs) -> npt.NDArray[np.float32]:
        """This step's feature rows; updates the current's moving averages (kept here).

        The rows are written into a buffer of this object that the next call reuses (the
        network reads it in place): copy them to keep them past the next step.
        """
        i = np.asarray(inputs.current_a, dtype=float)
        n = i.shape[0]
        io = self._io
        if io is None or io.x.shape[0] != n:
            io = self._buffers(n)
        ema = self._ema
        if ema is None or ema.shape[0] != n:
            # A fresh start: the history is unknown, so the averages start at this current.
            io.ema_t[...] = i
        else:
            if ema is not io.ema:  # set elsewhere (load_state_dict): take it over
                io.ema[...] = ema
            ema_step(io.ema, i, inputs.dt_s, out=io.ema)
        self._ema = io.ema
        out = io.x
        out[:, 0] = inputs.soc
        out[:, 1] = inputs.temp_c
        out[:, 2] = i
        out[:, 3:] = io.ema
        return out

    def predict(self, x: npt.NDArray[np.float32]) -> CorrectionOutput:
        """Per cell: voltage correction, measurement variance, and whether it applied."""
        io = self._io
        if io is None or x is not io.x:  # not the rows features() wrote: check them
            if not (
                isinstance(x, np.ndarray)
                and x.dtype == np.float32
                and x.ndim == 2
                and x.shape[1] == len(FEATURES)
            ):
                return self._predict_plain(x)
            io = self._buffers(x.shape[0])
            np.copyto(io.x, x)
        # the range check on the flat rows against bounds tiled to match (a [n, 6] compare
        # would loop over rows of 6); all in range is the usual step
        np.greater_equal(io.x_flat, io.lo_flat, out=io.cmp[0])
        np.less_equal(io.x_flat, io.hi_flat, out=io.cmp[1])
        ok: BoolArray = io.all_ok
        if not _ALL(io.cmp_flat):
            both = io.cmp[0] & io.cmp[1]
            ok = cast(BoolArray, both.reshape(-1, len(FEATURES)).all(axis=1))
        self.session.run_with_iobinding(io.binding)  # writes io.out: [2, n, 1] float32
        # new float64 arrays (the caller may keep them); exp computed in float64
        dv: FloatArray = io.out_dv.astype(np.float64)
        var: FloatArray = np.exp(io.out_log_var, dtype=np.float64)
        return self._output(dv, var, ok, ok is io.all_ok)

    def _predict_plain(self, x: npt.NDArray[np.float32]) -> CorrectionOutput:
        """:meth:`predict` for any input onnxruntime takes (no preallocated buffers)."""
        ok = self.in_range(x)
        dv, log_var = self.session.run(self.output_names, {self.input_name: x})
        dv64 = dv[:, 0].astype(np.float64)
        var = np.exp(log_var[:, 0], dtype=np.float64)
        return self._output(dv64, var, ok, bool(ok.all()))

    def _output(
        self, dv: FloatArray, var: FloatArray, ok: BoolArray, all_ok: bool
    ) -> CorrectionOutput:
        """The network's outputs (float64, ``var`` = exp(log_var), floored and inflated in
        place) as a correction."""
        np.maximum(var, self.r_floor_v2, out=var)
        if self.r_inflation != 1.0:
            var *= self.r_inflation
        if all_ok:  # the usual step: no masking to do
            return CorrectionOutput(dv, var, ok)
        return CorrectionOutput(np.where(ok, dv, 0.0), np.where(ok, var, np.nan), ok)

    def in_range(self, x: npt.NDArray[np.float32]) -> BoolArray:
        ok: BoolArray = np.all((x >= self.lo) & (x <= self.hi), axis=1)
        return ok

    def _buffers(self, n: int) -> _IoBuffers:
        """The feature, range-check and output buffers of an n-cell pack, with the
        session's io binding to them (made at the first step and when n changes)."""
        io = self._io
        if io is None or io.x.shape[0] != n:
            io = self._io = _IoBuffers(self, n)
        return io

    def state_dict(self) -> dict[str, Any]:
        """The moving averages (JSON-able), for the estimator's checkpoint."""
        return {"version": self.version, "ema": None if self._ema is None else self._ema.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state.get("ema")
        self._ema = None if ema is None else np.asarray(ema, dtype=float).reshape(-1, 3)


class _IoBuffers:
    """Preallocated arrays of one pack size and an onnxruntime io binding to them: a step
    then runs the session without building feeds or allocating its outputs."""

    def __init__(self, net: VoltageCorrectionNet, n: int) -> None:
        m = len(FEATURES)
        self.x = np.zeros((n, m), dtype=np.float32)
        self.x_flat = self.x.reshape(-1)  # a view
        self.lo_flat = np.tile(net.lo, n)
        self.hi_flat = np.tile(net.hi, n)
        self.cmp = np.empty((2, n * m), dtype=bool)
        self.cmp_flat = self.cmp.reshape(-1)  # a view
        self.out = np.empty((2, n, 1), dtype=np.float32)  # dv_v, log_var
        self.out_dv = self.out[0, :, 0]  # [n] views
        self.out_log_var = self.out[1, :, 0]
        self.ema_t = np.zeros((len(EMA_TAUS_S), n))
        self.ema = self.ema_t.T  # [n, 3] view: the net's _ema while it uses these buffers
        all_ok = np.ones(n, dtype=bool)
        all_ok.flags.writeable = False  # shared by every step where all cells are in range
        self.all_ok = all_ok
        ort = net._ort
        # the OrtValues share these arrays' memory (CPU); they are kept alive here
        self._values = [
            ort.OrtValue.ortvalue_from_numpy(self.x),
            ort.OrtValue.ortvalue_from_numpy(self.out[0]),
            ort.OrtValue.ortvalue_from_numpy(self.out[1]),
        ]
        self.binding = net.session.io_binding()
        self.binding.bind_ortvalue_input(net.input_name, self._values[0])
        self.binding.bind_ortvalue_output("dv_v", self._values[1])
        self.binding.bind_ortvalue_output("log_var", self._values[2])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pair(path: str | Path) -> tuple[bytes, CorrectionRecord, Path]:
    """The ONNX bytes and record of ``path`` (``X.onnx`` beside ``X.json``), hash verified."""
    p = Path(path)
    onnx_path = p if p.suffix == ".onnx" else p.with_suffix(".onnx")
    json_path = onnx_path.with_suffix(".json")
    try:
        model = onnx_path.read_bytes()
        raw = json.loads(json_path.read_text())
    except FileNotFoundError as exc:
        raise CorrectionModelError(
            f"correction model file not found: {exc.filename}", "missing"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CorrectionModelError(f"{json_path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    try:
        record = CorrectionRecord.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise CorrectionModelError(f"{json_path}: {where}: {err['msg']}") from exc
    actual = _sha256(model)
    if actual != record.sha256:
        raise CorrectionModelError(
            f"{onnx_path}: sha256 mismatch: the record says {record.sha256}, the file is "
            f"{actual}; the file was modified or corrupted, refusing to load it",
            "integrity",
        )
    return model, record, onnx_path


def load_correction(name_or_path: str | Path | None = None) -> VoltageCorrectionNet:
    """The shipped network (``bms-correction``) or one at a path, hash verified.

    Raises :class:`CorrectionModelError`; :func:`try_load_correction` turns that into a
    fallback with a reason instead.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path)
    if p.suffix in (".onnx", ".json") or p.exists():
        model, record, where = read_pair(p)
        return VoltageCorrectionNet(model, record, str(where))
    shipped = resources.files("edge_bms") / "data" / "models" / f"{name_or_path}.onnx"
    if not shipped.is_file():
        raise CorrectionModelError(
            f"no correction model named {str(name_or_path)!r} is shipped", "missing"
        )
    with resources.as_file(shipped) as f:
        model, record, where = read_pair(f)
        return VoltageCorrectionNet(model, record, str(where))


def try_load_correction(
    name_or_path: str | Path | None = None,
) -> tuple[VoltageCorrectionNet | None, FallbackReason, str]:
    """(network, "", "") or (None, reason, message): the plain filter runs on failure."""
    try:
        return load_correction(name_or_path), "", ""
    except CorrectionModelError as exc:
        reason = cast(FallbackReason, exc.reason)  # set by every raise above
        return None, reason, str(exc)
