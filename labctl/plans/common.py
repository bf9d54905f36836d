"""What every labctl plan shares: parameters, metadata, records, the run wrapper.

* :class:`CommonParams`: ``sample_id``, ``campaign_id``, ``operator`` and ``time_scale``
  (lab seconds per wall second: 1 for a real lab, the simulator's speed for a simulated
  one; only the plan's own waits are divided by it, instruments keep their own time).
* :func:`validate`: pydantic validation whose error names the plan, every bad field and
  its value (:class:`PlanParameterError`).
* :class:`Record`: a Readable holding values the plan computed (a dose's outcome, a
  cycle's capacity), so that they become events in declared streams next to the
  instruments' readings.
* :func:`lab_run`: opens the run with rich metadata, runs the body with the RunEngine
  not rewindable (see docs/decisions/0008-pause-resume-continue-in-place.md), puts the
  instruments in a safe state when the body fails or is aborted, and closes the run
  with the failure's reason (an instrument's error is raised again as
  :class:`InstrumentFailedError`, whose message is that reason).
* Dry runs: :func:`is_live` tells a live RunEngine (which answers every message) from
  ``bluesky.simulators`` and ``list(plan)`` (which send ``None``). Plans use it so that
  a dry run walks the whole plan on nominal values instead of stopping at a missing
  reading.
"""

from __future__ import annotations

import getpass
import math
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

import bluesky.plan_stubs as bps
from bluesky.utils import FailedStatus, Msg, RunEngineControlException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import labctl
from labctl import recipes
from labctl.devices.errors import InstrumentError

Plan = Generator[Msg, Any, Any]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# bluesky is untyped: Msg(...) through a typed alias keeps mypy --strict quiet.
_Msg = cast(Callable[..., Msg], Msg)

SMILES = recipes.SMILES  # re-exported: plans put them in start documents


class PlanError(RuntimeError):
    """A plan could not do what it was asked (the run ends with exit status ``fail``)."""


class InstrumentFailedError(PlanError):
    """An instrument failed mid-plan; the message names it and carries its error."""


class PlanParameterError(ValueError):
    """Parameters failed validation. ``errors`` lists ``(field, value, message)``."""

    def __init__(self, plan: str, errors: Sequence[tuple[str, Any, str]]) -> None:
        self.plan = plan
        self.errors = list(errors)
        lines = [f"{field} = {value!r}: {message}" for field, value, message in self.errors]
        super().__init__(f"{plan}: invalid parameters:\n  " + "\n  ".join(lines))


_MISSING = object()


def _value_at(values: Any, loc: Sequence[int | str]) -> Any:
    for key in loc:
        try:
            values = values[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return values


def validate(model: type[M], plan: str, values: Mapping[str, Any]) -> M:
    """``model.model_validate(values)``; a failure names every field and its value."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            field = ".".join(str(p) for p in loc) or "(parameters)"
            value = _value_at(values, loc)
            if value is _MISSING:
                value = err.get("input")
            message = str(err["msg"]).removeprefix("Value error, ")
            errors.append((field, value, message))
        raise PlanParameterError(plan, errors) from None


def default_operator() -> str:
    """``$LABCTL_OPERATOR``, else the login name, else ``"unknown"``."""
    name = os.environ.get("LABCTL_OPERATOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def new_sample_id() -> str:
    """``S-YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique by the random suffix."""
    return f"S-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class CommonParams(BaseModel):
    """Parameters every plan takes (recorded in the run's start document)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_id: str = Field(default="", max_length=100, description="sample (vial) identifier")
    campaign_id: str = Field(default="", max_length=100, description="campaign this run serves")
    operator: str = Field(
        default_factory=default_operator, max_length=100, description="who runs it"
    )
    time_scale: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0e6,
        description="lab seconds per wall second (1: real lab; a simulator's speed)",
    )

    @field_validator("sample_id", "campaign_id", "operator")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must be printable text")
        return v.strip()


def base_metadata(plan_name: str, params: CommonParams, **extra: Any) -> dict[str, Any]:
    """Start-document metadata: plan name and arguments, ids, operator, version."""
    md: dict[str, Any] = {
        "plan_name": plan_name,
        "plan_args": params.model_dump(mode="json"),
        "sample_id": params.sample_id,
        "campaign_id": params.campaign_id,
        "operator": params.operator,
        "time_scale": params.time_scale,
        "labctl_version": labctl.__version__,
    }
    md.update(extra)
    return md


# -- records: computed values as events ---------------------------------------------------

DType = Literal["number", "integer", "string", "boolean"]
_PYTYPES: dict[str, tuple[type, ...]] = {
    "number": (float, int),
    "integer": (int,),
    "string": (str,),
    "boolean": (bool,),
}


class Record:
    """A Readable whose reading is whatever the plan last :meth:`put` into it.

    ``Record("dose", {"reagent": ("string", ""), "actual_g": ("number", "g")})``. Its
    data keys are the field names as given (no device prefix), so a stream of records
    reads like a table. Not Triggerable: ``trigger_and_read([record])`` just reads.
    """

    def __init__(self, name: str, fields: Mapping[str, tuple[DType, str]]) -> None:
        self._name = name
        self.fields = dict(fields)
        self._values: dict[str, Any] = {}
        self._stamp = time.time()

    @property
    def name(self) -> str:
        return self._name

    @property
    def parent(self) -> None:
        return None

    def put(self, **values: Any) -> None:
        """Set every field (all at once: a record is one row)."""
        missing = sorted(set(self.fields) - set(values))
        unknown = sorted(set(values) - set(self.fields))
        if missing or unknown:
            raise KeyError(f"{self._name}: missing fields {missing}, unknown fields {unknown}")
        for key, value in values.items():
            dtype = self.fields[key][0]
            ok = isinstance(value, _PYTYPES[dtype]) and not (
                dtype in ("number", "integer") and isinstance(value, bool)
            )
            if not ok:
                raise TypeError(f"{self._name}.{key}: expected {dtype}, got {value!r}")
        self._values = {
            k: float(v) if self.fields[k][0] == "number" else v for k, v in values.items()
        }
        self._stamp = time.time()

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, (dtype, units) in self.fields.items():
            dk: dict[str, Any] = {"source": f"labctl:{self._name}", "dtype": dtype, "shape": []}
            if units:
                dk["units"] = units
            out[key] = dk
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        if not self._values:
            raise RuntimeError(f"{self._name}: read before any put()")
        return {k: {"value": v, "timestamp": self._stamp} for k, v in self._values.items()}


def emit(record: Record, stream: str, **values: Any) -> Plan:
    """Put ``values`` into ``record`` and save them as one event in ``stream``."""
    record.put(**values)
    yield from bps.create(name=stream)
    yield from bps.read(record)
    yield from bps.save()


# -- live or dry run ----------------------------------------------------------------------


def is_live() -> Generator[Msg, Any, bool]:
    """True under a RunEngine; False in ``bluesky.simulators`` and ``list(plan)``.

    A RunEngine answers ``Msg("rewindable", None, None)`` with its rewindable flag;
    dry runs send ``None`` back for every message.
    """
    return (yield _Msg("rewindable", None, None)) is not None


def reading_value(
    reading: Mapping[str, Any] | None, key: str, since: float | None = None
) -> Any | None:
    """The value of ``key`` in a reading, or None when absent (dry run, interrupted
    read) or older than ``since`` (a read that returned a cached value because the
    trigger before it was interrupted by a pause)."""
    if not reading or key not in reading:
        return None
    entry = reading[key]
    if since is not None and float(entry.get("timestamp", math.inf)) < since:
        return None
    return entry.get("value")


def fresh_read(
    devices: Sequence[Any], stream: str, key: str, *, live: bool, attempts: int = 3
) -> Generator[Msg, Any, dict[str, Any] | None]:
    """``trigger_and_read(devices, stream)`` whose ``key`` is fresh; None in a dry run.

    After a pause, the RunEngine continues the plan where it stopped: a trigger that
    the pause interrupted may leave the following read with the previous value. Such a
    reading (older than the trigger) is taken again.
    """
    for _ in range(attempts):
        since = time.time()
        reading = yield from bps.trigger_and_read(list(devices), name=stream)
        if not live:
            return None
        if reading_value(reading, key, since) is not None:
            return dict(reading)
    raise PlanError(f"{stream}: no fresh reading of {key} after {attempts} tries")


def read_signal(signal: Any, *, live: bool, attempts: int = 3) -> Generator[Msg, Any, Any]:
    """The value of a readable signal (no event); None in a dry run."""
    for _ in range(attempts):
        reading = yield from bps.read(signal)
        if not live:
            return None
        value = reading_value(reading, signal.name)
        if value is not None:
            return value
    raise PlanError(f"{signal.name}: no reading after {attempts} tries")


def call(factory: Callable[[], Any], *, live: bool) -> Generator[Msg, Any, Any]:
    """Await ``factory()`` on the RunEngine's loop; its result (None in a dry run or
    when a pause interrupted the wait). Its exception is raised into the plan."""
    futures = yield from bps.wait_for([factory])
    if not live or not futures:
        return None
    return futures[0].result()


def sleep_lab(seconds: float, time_scale: float, *, live: bool = True) -> Plan:
    """Wait ``seconds`` of lab time (``seconds / time_scale`` on the wall clock).

    The wait is measured on the wall clock: a pause in the middle counts towards it
    (the stirrer keeps stirring, the vial keeps resting), and the rest of it is waited
    after the resume.
    """
    if seconds <= 0:
        return
    wall = seconds / time_scale
    deadline = time.monotonic() + wall
    yield from bps.sleep(wall)
    while live and (left := deadline - time.monotonic()) > 1e-3:
        yield from bps.sleep(left)


# -- the run -------------------------------------------------------------------------------


def failure_reason(exc: BaseException) -> str:
    """What went wrong, naming the instrument: the device error behind a FailedStatus."""
    if isinstance(exc, FailedStatus):
        cause = exc.__cause__
        if cause is None and exc.args:
            status = exc.args[0]
            get = getattr(status, "exception", None)
            cause = get() if callable(get) else None
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def safely(steps: Iterable[Callable[[], Plan]]) -> Generator[Msg, Any, list[str]]:
    """Run each cleanup step; a step that fails is noted and the next one still runs."""
    problems: list[str] = []
    for step in steps:
        try:
            yield from step()
        except Exception as exc:  # cleanup goes on whatever one instrument does
            problems.append(failure_reason(exc))
    return problems


def lab_run(
    body: Callable[[bool], Generator[Msg, Any, T]],
    md: Mapping[str, Any],
    *,
    safe_state: Callable[[], Iterable[Callable[[], Plan]]] = lambda: (),
    streams: Sequence[tuple[str, Sequence[Any]]] = (),
) -> Generator[Msg, Any, T]:
    """One run around ``body(live)``: not rewindable, safe state on failure or abort.

    ``streams`` are declared right after the start document (name, readables), so a
    live viewer knows them before the first event. On an exception (an instrument
    failure, a stop condition, ``RE.abort()``) the ``safe_state`` steps run (pumps
    stopped, cycler output off...). A failure closes the run with exit status ``fail``
    and a reason naming the instrument and its error; an abort is closed by the
    RunEngine with its own status and reason.
    """

    def whole(live: bool) -> Generator[Msg, Any, T]:
        yield from bps.open_run(dict(md))
        try:
            for name, objs in streams:
                yield from bps.declare_stream(*objs, name=name)
            result = yield from body(live)
        except RunEngineControlException:
            yield from safely(safe_state())
            raise  # the RunEngine closes the run with 'abort' and the abort's reason
        except Exception as exc:
            problems = yield from safely(safe_state())
            reason = failure_reason(exc)
            if problems:  # an instrument that could not be made safe must be reported
                reason += f" (safe state incomplete: {'; '.join(problems)})"
            yield from bps.close_run(exit_status="fail", reason=reason)
            if isinstance(exc, FailedStatus | InstrumentError):
                raise InstrumentFailedError(reason) from exc
            raise
        yield from bps.close_run()
        return result

    # A RunEngine answers with its flag; a dry run with None (see is_live).
    rewindable = yield _Msg("rewindable", None, None)
    live = rewindable is not None
    # Not rewindable: after a pause the plan continues where it stopped; see 0008.
    if rewindable is not False:
        yield _Msg("rewindable", None, False)
    restore = True
    try:
        return (yield from whole(live))
    except GeneratorExit:
        restore = False  # closed (RE.halt): a closing generator may not yield
        raise
    finally:
        if restore and rewindable is not False:
            yield _Msg("rewindable", None, True)
