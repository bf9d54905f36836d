"""The plans labctl offers by name: callable + parameter model (for the CLI and queues).

``PLANS["prepare_electrolyte"]`` is a :class:`PlanSpec`:

* ``spec.params``: the pydantic model of its parameters (``spec.validate(values)``
  raises :class:`~labctl.plans.common.PlanParameterError` naming each bad field and
  value; use it to refuse a queue item before it is queued);
* ``spec.parse(["key=value", ...])``: command-line assignments to parameter values
  (JSON where it parses, text otherwise; ``a.b=1`` sets a nested field);
* ``spec.build(lab, values, reagents=..., time_scale=...)``: the plan generator;
* ``spec.signature()``: an :class:`inspect.Signature` of the parameters (keyword-only,
  with annotations and defaults), e.g. for a generated queueserver profile function;
* ``spec.dry_run(values)``: every message of the plan against mock devices, with the
  limits checked (``bluesky.simulators.check_limits``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from bluesky import RunEngine
from bluesky.simulators import check_limits_async
from bluesky.utils import Msg
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from labctl.devices.lab import LabDevices
from labctl.plans.common import CommonParams, Plan, PlanParameterError, validate
from labctl.plans.cycling import CycleCellParams, HppcParams, cycle_cell, hppc
from labctl.plans.electrolyte import (
    MeasureConductivityParams,
    MoveVialParams,
    PrepareElectrolyteParams,
    measure_conductivity,
    move_vial,
    prepare_electrolyte,
)
from labctl.recipes import Reagent

__all__ = ["PLANS", "PlanSpec", "get_plan", "parse_assignments"]


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    return get_origin(annotation) is not None and str in get_args(annotation)


def _optional(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


def _convert(annotation: Any, raw: str) -> Any:
    """A command-line value for a field: text for text fields, else JSON when it parses
    (numbers, booleans, lists, objects), else the text (for the model's own parsers:
    recipe labels, comma lists, protocol presets)."""
    if _optional(annotation) and raw.strip().lower() in ("null", "none"):
        return None
    if _is_text(annotation) and not raw.lstrip().startswith(("{", "[")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_assignments(model: type[BaseModel], plan: str, items: Sequence[str]) -> dict[str, Any]:
    """``["recipe=EC0.5:DMC0.5+LiPF6 1m", "protocol.rest_s=60"]`` -> parameter values.

    ``a.b=v`` sets a nested value; together with ``a=NAME`` (a preset) it changes that
    preset: ``{"preset": NAME, "b": v}``.
    """
    out: dict[str, Any] = {}
    errors: list[tuple[str, Any, str]] = []
    fields = model.model_fields
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append((item, item, "expected key=value"))
            continue
        path = key.split(".")
        field = fields.get(path[0])
        if field is None:
            errors.append((key, raw, f"unknown parameter; known: {', '.join(fields)}"))
            continue
        if len(path) == 1:
            value = _convert(field.annotation, raw)
            if isinstance(out.get(key), dict) and isinstance(value, str):
                out[key] = {**out[key], "preset": value}  # nested keys came first
            else:
                out[key] = value
            continue
        node = out.setdefault(path[0], {})
        if isinstance(node, str):
            # "protocol=quick protocol.rest_s=60": change the named preset.
            node = out[path[0]] = {"preset": node}
        if not isinstance(node, dict):
            errors.append((key, raw, f"{path[0]} is already set as a whole"))
            continue
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = json.loads(raw)
        except json.JSONDecodeError:
            node[path[-1]] = raw
    if errors:
        raise PlanParameterError(plan, errors)
    return out


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is None and hasattr(annotation, "__name__"):
        return str(annotation.__name__)
    # "labctl.recipes.Recipe | None" -> "Recipe | None"
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+", "", str(annotation))


@dataclass(frozen=True)
class PlanSpec:
    """One plan: its function, parameter model and the instruments it needs."""

    name: str
    func: Callable[..., Plan]
    params: type[CommonParams]
    roles: tuple[str, ...]
    sim_speed: float  # a good speed for the simulated lab to run it at
    needs_reagents: bool = False

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.func) or ""

    @property
    def summary(self) -> str:
        return self.doc.split("\n", 1)[0]

    def signature(self) -> inspect.Signature:
        """Keyword-only parameters of the model (annotation, default)."""
        params = []
        for name, field in self.params.model_fields.items():
            if field.default is not PydanticUndefined:
                default: Any = field.default
            elif field.default_factory is not None:
                default = field.default_factory()  # type: ignore[call-arg]
            else:
                default = inspect.Parameter.empty
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=field.annotation,
                )
            )
        # Required parameters first, as a function would declare them.
        params.sort(key=lambda p: p.default is not inspect.Parameter.empty)
        return inspect.Signature(params)

    def describe(self) -> dict[str, Any]:
        """Name, documentation and parameters as JSON-able data."""
        out = []
        common = set(CommonParams.model_fields)
        fields = sorted(
            self.params.model_fields.items(),
            key=lambda kv: (not kv[1].is_required(), kv[0] in common),
        )
        for name, field in fields:
            required = field.is_required()
            default = None if required else self.signature().parameters[name].default
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            out.append(
                {
                    "name": name,
                    "type": _type_name(field.annotation),
                    "required": required,
                    "default": default,
                    "description": field.description or "",
                }
            )
        return {
            "name": self.name,
            "summary": self.summary,
            "doc": self.doc,
            "instruments": list(self.roles),
            "parameters": out,
        }

    def validate(self, values: Mapping[str, Any]) -> CommonParams:
        return validate(self.params, self.name, values)

    def parse(self, items: Sequence[str]) -> dict[str, Any]:
        return parse_assignments(self.params, self.name, items)

    def build(
        self,
        lab: LabDevices,
        values: Mapping[str, Any] | CommonParams,
        *,
        reagents: Mapping[str, Reagent] | None = None,
        time_scale: float | None = None,
    ) -> Plan:
        """The plan for ``values`` (validated first); ``time_scale`` fills in when the
        values do not set it (the simulated lab's speed)."""
        data = (
            values.model_dump(exclude_unset=True) if isinstance(values, BaseModel) else dict(values)
        )
        if time_scale is not None:
            data.setdefault("time_scale", time_scale)
        p = self.validate(data)
        kwargs = {k: getattr(p, k) for k in data if k in self.params.model_fields}
        kwargs.setdefault("operator", p.operator)
        if self.needs_reagents:
            kwargs["reagents"] = reagents
        return self.func(lab, **kwargs)

    def dry_run(
        self,
        values: Mapping[str, Any],
        *,
        RE: RunEngine | None = None,  # noqa: N803 - bluesky's name for it
        check: bool = True,
    ) -> list[Msg]:
        """Every message of the plan against mock devices (nothing is opened); with
        ``check``, setpoints outside a device's limits raise first."""
        from labctl.plans.session import mock_lab

        engine = RE if RE is not None else RunEngine(call_returns_result=True)
        lab = mock_lab(engine)
        if check:
            with warnings.catch_warnings():
                # check_limits warns once per device that has no limits to check
                # (pumps, robot, stirrer): expected, not a finding.
                warnings.filterwarnings("ignore", message=".*has no check_value.*")
                future = asyncio.run_coroutine_threadsafe(
                    check_limits_async(self.build(lab, values)),  # type: ignore[no-untyped-call]
                    engine.loop,
                )
                future.result(60)
        return list(self.build(lab, values))


PLANS: dict[str, PlanSpec] = {
    spec.name: spec
    for spec in (
        PlanSpec(
            "prepare_electrolyte",
            prepare_electrolyte,
            PrepareElectrolyteParams,
            ("balance", "pumps", "robot", "stirrer"),
            500.0,
            needs_reagents=True,
        ),
        PlanSpec(
            "measure_conductivity",
            measure_conductivity,
            MeasureConductivityParams,
            ("robot", "chamber", "meter"),
            500.0,
        ),
        PlanSpec("cycle_cell", cycle_cell, CycleCellParams, ("cycler",), 2000.0),
        PlanSpec("hppc", hppc, HppcParams, ("cycler",), 2000.0),
        PlanSpec("move_vial", move_vial, MoveVialParams, ("robot",), 500.0),
    )
}


def get_plan(name: str) -> PlanSpec:
    """The spec of ``name``; a KeyError lists the known plans."""
    try:
        return PLANS[name]
    except KeyError:
        raise KeyError(f"unknown plan {name!r}; known: {', '.join(PLANS)}") from None
