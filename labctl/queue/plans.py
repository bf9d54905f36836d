"""Queueserver-friendly plans: the registry's plans with JSON-able signatures.

The RE Manager describes each plan of its profile from its signature: annotations it
cannot rebuild are dropped and every default must survive ``ast.literal_eval``. So each
wrapper here keeps the registry's parameter names, turns model defaults into their JSON
form and keeps only builtin annotations; the registry's pydantic model still validates
every value when the plan is built (and :func:`labctl.queue.manager.add_plan` validates
it before the item is queued).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Generator, Iterator
from typing import Any, get_args, get_origin

from bluesky import plan_stubs as bps
from bluesky.utils import Msg
from pydantic import BaseModel

from labctl.plans.registry import PLANS, PlanSpec
from labctl.plans.session import LabSession

__all__ = ["noop", "queue_plans", "queue_ranges", "queue_signature"]

_SIMPLE = (str, int, float, bool, list, dict, type(None))


def _simple_annotation(annotation: Any) -> Any:
    """The annotation if queueserver can validate it from builtins, else none."""
    if annotation in _SIMPLE:
        return annotation
    origin = get_origin(annotation)
    if origin is not None and all(a in _SIMPLE for a in get_args(annotation)):
        return annotation
    return inspect.Parameter.empty


def _plain_default(default: Any) -> Any:
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json")
    # Tuples, paths, enums: their JSON form, which the model parses back.
    return json.loads(json.dumps(default, default=str))


def queue_signature(spec: PlanSpec) -> inspect.Signature:
    """``spec.signature()`` with builtin annotations only and literal defaults."""
    params = []
    for p in spec.signature().parameters.values():
        default = p.default
        if default is not inspect.Parameter.empty:
            default = _plain_default(default)
        params.append(p.replace(annotation=_simple_annotation(p.annotation), default=default))
    return inspect.Signature(params)


def queue_ranges(spec: PlanSpec) -> dict[str, dict[str, float]]:
    """``{"parameters": {name: {"min": .., "max": ..}}}``-style bounds of the numeric
    parameters (from the pydantic model's ge/gt/le/lt), for queueserver to refuse an
    out-of-range value at ``item_add`` even from a client that bypasses `labctl queue
    add`. Exclusive bounds become inclusive ones here; the model still checks exactly."""
    import annotated_types as at

    out: dict[str, dict[str, float]] = {}
    for name, field in spec.params.model_fields.items():
        annotation = field.annotation
        kinds = set(get_args(annotation)) - {type(None)} if get_origin(annotation) else {annotation}
        if not kinds or not kinds <= {int, float}:
            continue  # ranges apply to every number inside a structure: numbers only
        bounds: dict[str, float] = {}
        for m in field.metadata:
            if isinstance(m, at.Ge | at.Gt):
                bounds["min"] = float(m.ge if isinstance(m, at.Ge) else m.gt)  # type: ignore[arg-type]
            elif isinstance(m, at.Le | at.Lt):
                bounds["max"] = float(m.le if isinstance(m, at.Le) else m.lt)  # type: ignore[arg-type]
        if bounds:
            out[name] = bounds
    return out


def _wrapper(spec: PlanSpec, session: LabSession) -> Callable[..., Iterator[Msg]]:
    def plan(**values: Any) -> Generator[Msg, Any, Any]:
        return (
            yield from spec.build(
                session.devices,
                values,
                reagents=session.reagents,
                time_scale=session.time_scale,
            )
        )

    plan.__name__ = plan.__qualname__ = spec.name
    plan.__doc__ = spec.doc
    plan.__signature__ = queue_signature(spec)  # type: ignore[attr-defined]
    plan.__module__ = __name__
    ranges = queue_ranges(spec)
    if ranges:
        from bluesky_queueserver import parameter_annotation_decorator  # type: ignore[import-untyped]

        plan = parameter_annotation_decorator({"parameters": ranges})(plan)
    return plan


def noop() -> Iterator[Msg]:
    """Do nothing (one null message, no run): measures the queue's own round trip."""
    yield from bps.null()


def queue_plans(session: LabSession) -> dict[str, Callable[..., Iterator[Msg]]]:
    """Every registry plan bound to ``session``'s devices, plus :func:`noop`."""
    out: dict[str, Callable[..., Iterator[Msg]]] = {
        name: _wrapper(spec, session) for name, spec in PLANS.items()
    }
    out["noop"] = noop
    return out
