"""Contract-5 payloads: telemetry in (validated, per message, without pydantic), state,
alarms, errors and acks out (compact JSON).

:func:`decode_telemetry` is the gate in front of the estimator: whatever it returns the
estimator takes (types, finiteness, ranges and lengths are checked here, within the
estimator's own bounds), and whatever is wrong raises :class:`Rejected` with a short
stable ``code`` and a ``detail`` a person can act on. Order/duplicate checks need the
pack's history and live in :mod:`edge_bms.service.core`.

Telemetry: ``{"ts": float, "seq": int, "current_a": float, "cell_v": [n floats],
"temp_c": [k floats]}``; ``ts`` >= 0 (s), ``seq`` an integer >= 0; a ``null`` in
``cell_v`` is a missing voltage (that cell is predicted only); unknown keys are ignored
(forward compatible). ``NaN``/``Infinity`` are refused (they are not JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_bms.errors import BmsError
from edge_bms.service.config import LimitsConfig

FloatArray = npt.NDArray[np.float64]

MAX_SEQ = 2**63 - 1
DETAIL_MAX = 240  # an error message never echoes a whole payload back
_NUMBER = (float, int)
_NUMBER_OR_NULL = (float, int, type(None))


class Rejected(BmsError):  # noqa: N818 (the name of the service API)
    """An input the service refuses: ``code`` is a short stable id, one of
    "oversize", "json", "schema", "type", "nonfinite", "range", "future", "cell_count",
    "duplicate", "out_of_order", "unknown_pack", "too_many_packs", "topic",
    "unknown_command", "bad_command", "internal"; ``seq`` when the payload had one."""

    def __init__(self, code: str, detail: str, *, seq: int | None = None) -> None:
        detail = detail if len(detail) <= DETAIL_MAX else detail[: DETAIL_MAX - 3] + "..."
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Telemetry:
    """One decoded sample; ``cell_v`` [n] (NaN: missing), ``temp_c`` [k] as sent."""

    ts: float
    seq: int
    current_a: float
    cell_v: FloatArray
    temp_c: FloatArray


def _refuse_constant(name: str) -> Any:
    raise Rejected("nonfinite", f"{name} is not a JSON number (NaN/Infinity are refused)")


def loads(payload: bytes, *, max_bytes: int) -> Any:
    """JSON of a payload of at most ``max_bytes`` (raises Rejected)."""
    if not isinstance(payload, bytes | bytearray | str):
        try:  # a memoryview, or whatever an MQTT client hands over
            payload = bytes(payload)
        except TypeError:
            raise Rejected("json", f"payload is {type(payload).__name__}, not bytes") from None
    if len(payload) > max_bytes:
        raise Rejected("oversize", f"{len(payload)} bytes, the limit is {max_bytes}")
    try:
        return json.loads(payload, parse_constant=_refuse_constant)
    except Rejected:
        raise
    except RecursionError:
        raise Rejected("json", "nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise Rejected("json", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise Rejected("json", f"malformed JSON: {exc}") from None


def decode_telemetry(
    payload: bytes, *, n_cells: int, limits: LimitsConfig, n_temp: int | None = None
) -> Telemetry:
    """A validated telemetry sample of a pack of ``n_cells`` cells with ``n_temp``
    temperature values (default: one per cell). Raises :class:`Rejected`."""
    data = loads(payload, max_bytes=limits.max_payload_bytes)
    return telemetry_from_obj(
        data, n_cells=n_cells, n_temp=n_cells if n_temp is None else n_temp, limits=limits
    )


def telemetry_from_obj(
    data: Any, *, n_cells: int | None, n_temp: int | None, limits: LimitsConfig
) -> Telemetry:
    """:func:`decode_telemetry` after the JSON step; ``None`` sizes accept any length
    (a pack created from its first message)."""
    if type(data) is not dict:
        raise Rejected("schema", f"telemetry must be a JSON object, got {_kind(data)}")
    seq = _seq(data)
    try:
        ts = data["ts"]
        current = data["current_a"]
        cell_v = data["cell_v"]
        temp_c = data["temp_c"]
    except KeyError as exc:
        raise Rejected("schema", f"missing field {exc.args[0]!r}", seq=seq) from None
    ts = _number("ts", ts, seq)
    if not ts >= 0.0:
        raise Rejected("range", f"ts = {ts!r} is negative", seq=seq)
    current = _number("current_a", current, seq)
    if not abs(current) <= limits.current_a_abs:
        raise Rejected(
            "range", f"current_a = {current!r} A is beyond +-{limits.current_a_abs:g} A", seq=seq
        )
    v = _array("cell_v", cell_v, n_cells, seq, nullable=True)
    lo, hi = limits.voltage_v
    # both comparisons are False for NaN (a null): those pass here, as missing
    if (v <= lo).any() or (v >= hi).any():
        j = int(np.flatnonzero((v <= lo) | (v >= hi))[0])
        raise Rejected(
            "range", f"cell_v[{j}] = {float(v[j])!r} V is outside ({lo:g}, {hi:g}) V", seq=seq
        )
    t = _array("temp_c", temp_c, n_temp, seq, nullable=False)
    lo, hi = limits.temperature_c
    if not (lo <= float(t.min()) and float(t.max()) <= hi):
        j = int(np.flatnonzero(~((t >= lo) & (t <= hi)))[0])
        raise Rejected(
            "range", f"temp_c[{j}] = {float(t[j])!r} C is outside [{lo:g}, {hi:g}] C", seq=seq
        )
    return Telemetry(ts, seq, current, v, t)


def _seq(data: dict[str, Any]) -> int:
    if "seq" not in data:
        raise Rejected("schema", "missing field 'seq'")
    seq = data["seq"]
    if type(seq) is not int:
        raise Rejected("type", f"seq must be an integer, got {_kind(seq)} {_short(seq)}")
    if not 0 <= seq <= MAX_SEQ:
        raise Rejected("range", f"seq = {seq} is outside 0..2**63-1")
    return seq


def _number(name: str, value: Any, seq: int) -> float:
    # type() not isinstance(): True/False are ints to Python, not numbers to us
    if type(value) not in _NUMBER:
        raise Rejected(
            "type", f"{name} must be a number, got {_kind(value)} {_short(value)}", seq=seq
        )
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float
        raise Rejected("range", f"{name} = {_short(value)} is too large", seq=seq) from None
    if not math.isfinite(x):  # 1e999 parses as inf
        raise Rejected("nonfinite", f"{name} = {x!r} is not finite", seq=seq)
    return x


def _array(name: str, value: Any, n: int | None, seq: int, *, nullable: bool) -> FloatArray:
    if type(value) is not list:
        raise Rejected("type", f"{name} must be a list of numbers, got {_kind(value)}", seq=seq)
    if n is not None and len(value) != n:
        raise Rejected("cell_count", f"{name} has {len(value)} values, expected {n}", seq=seq)
    if not value:
        raise Rejected("cell_count", f"{name} is empty", seq=seq)
    # one pass over the element types (numpy would take "4.1" or True as a number)
    allowed = _NUMBER_OR_NULL if nullable else _NUMBER
    types = set(map(type, value))
    if not types.issubset(allowed):
        j, bad = next((j, x) for j, x in enumerate(value) if type(x) not in allowed)
        what = "a number or null" if nullable else "a number"
        raise Rejected(
            "type", f"{name}[{j}] must be {what}, got {_kind(bad)} {_short(bad)}", seq=seq
        )
    try:
        a = np.array(value, dtype=np.float64)
    except OverflowError:
        raise Rejected("range", f"{name} holds an integer too large for a float", seq=seq) from None
    if nullable and type(None) in types:
        if all(x is None for x in value):
            raise Rejected("range", f"{name} has no value at all (every one is null)", seq=seq)
        finite = np.isfinite(a) | np.array([x is None for x in value])
    else:
        finite = np.isfinite(a)
    if not finite.all():
        j = int(np.flatnonzero(~finite)[0])
        raise Rejected("nonfinite", f"{name}[{j}] = {float(a[j])!r} is not finite", seq=seq)
    return a


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if type(value) in (str, int, float, bool) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- out -----------------------------------------------------------------------------------
def dumps(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON; NaN never leaves (as null, via the callers' rounding helpers)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def rounded(a: npt.ArrayLike, digits: int) -> list[float | None]:
    """A float list rounded to ``digits`` (short JSON), NaN -> null."""
    x = np.round(np.asarray(a, dtype=np.float64), digits)
    if np.isfinite(x).all():
        out: list[float | None] = x.tolist()
        return out
    return [v if math.isfinite(v) else None for v in x.tolist()]


def encode_state(
    *,
    pack: str,
    ts: float,
    seq: int,
    soc: npt.ArrayLike,
    soc_sigma: npt.ArrayLike,
    pack_soc: float,
    capacity_ah: npt.ArrayLike,
    sop: Mapping[str, Any] | None,
    model: Mapping[str, Any],
    instance: str,
    alarms_active: int = 0,
    dropout: Sequence[int] = (),
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The contract-5 state message (SOC to 1e-6, sigma to 3 significant-ish digits)."""
    obj: dict[str, Any] = {
        "ts": ts,
        "seq": seq,
        "pack": pack,
        "soc": rounded(soc, 6),
        "soc_sigma": rounded(soc_sigma, 6),
        "pack_soc": round(float(pack_soc), 6) if math.isfinite(pack_soc) else None,
        "sop": None if sop is None else dict(sop),
        "model": dict(model),
        "capacity_ah": rounded(capacity_ah, 4),
        "alarms_active": alarms_active,
        "instance": instance,
    }
    if dropout:
        obj["dropout"] = list(dropout)
    if extra:
        obj.update(extra)
    return dumps(obj)


def encode_alarms(
    *,
    pack: str,
    ts: float,
    events: Sequence[Mapping[str, Any]],
    active: Sequence[Mapping[str, Any]],
) -> bytes:
    """``{"ts","pack","events":[trip/clear records],"active":[alarms now active]}``."""
    return dumps(
        {
            "ts": ts,
            "pack": pack,
            "events": [dict(e) for e in events],
            "active": [dict(a) for a in active],
        }
    )


def encode_error(
    *, ts: float, pack: str | None, topic: str, code: str, detail: str, seq: int | None = None
) -> bytes:
    """``{"ts","pack","topic","code","detail"[,"seq"]}`` for one rejected input."""
    obj: dict[str, Any] = {"ts": ts, "pack": pack, "topic": topic, "code": code, "detail": detail}
    if seq is not None:
        obj["seq"] = seq
    return dumps(obj)


def encode_ack(
    *,
    ts: float,
    pack: str,
    command: str,
    ok: bool,
    result: Mapping[str, Any],
    request_id: Any = None,
) -> bytes:
    """``{"ts","pack","command","ok","result"[,"id"]}`` answering one command."""
    obj: dict[str, Any] = {
        "ts": ts,
        "pack": pack,
        "command": command,
        "ok": ok,
        "result": dict(result),
    }
    if request_id is not None:
        obj["id"] = request_id
    return dumps(obj)
