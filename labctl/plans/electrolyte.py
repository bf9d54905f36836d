"""Make electrolytes gravimetrically and measure their conductivity.

Plans (generators of ``Msg``; dry-run them with ``bluesky.simulators.summarize_plan``
and ``check_limits`` before any instrument moves):

* :func:`prepare_electrolyte`: vial to the balance, tare, dose every reagent of the
  recipe by gravimetric feedback, compute the achieved composition, mix on the stirrer,
  let it rest, put the vial back. Streams: ``dosing`` (every weighing), ``doses`` (one
  event per reagent: target vs actual), ``composition`` (one event: target vs achieved).
* :func:`measure_conductivity`: vial to the meter (inside the temperature chamber); at
  each temperature, set the chamber and wait until it is stable, dwell, then read the
  meter until the last ``window`` readings are all flagged stable, agree within
  ``tolerance_pct`` and sit within ``temperature_tolerance_c`` of the setpoint. Streams:
  ``conductivity_readings`` (every reading), ``conductivity`` (one event per
  temperature).
* :func:`move_vial`: one robot transfer (e.g. to clear a station after a failed run).
* :func:`prepare_and_measure`: both in one run (one run per experiment of a campaign).

Every plan returns its results as a dict (``RE(plan).plan_result`` with
``RunEngine(call_returns_result=True)``) and writes them as events, so they are stored
with the run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg
from pydantic import Field, field_validator, model_validator

from labctl.devices.lab import LabDevices
from labctl.plans.common import (
    SMILES,
    CommonParams,
    Plan,
    PlanError,
    PlanParameterError,
    Record,
    base_metadata,
    emit,
    fresh_read,
    lab_run,
    new_sample_id,
    read_signal,
    sleep_lab,
    validate,
)
from labctl.plans.dosing import DoseResult, dose_gravimetric, dosing_record, weigh
from labctl.recipes import SOLVENTS, Reagent, Recipe, composition, default_reagents, plan_doses

__all__ = [
    "SMILES",
    "MeasureConductivityParams",
    "MoveVialParams",
    "PrepareElectrolyteParams",
    "measure_conductivity",
    "move_vial",
    "parse_recipe",
    "prepare_and_measure",
    "prepare_electrolyte",
]

_LABEL = re.compile(
    r"^\s*(?P<blend>[A-Za-z]+\s*[0-9.]+(?:\s*:\s*[A-Za-z]+\s*[0-9.]+)*)\s*"
    r"(?:\+\s*LiPF6\s*(?P<m>[0-9.]+)\s*m)?\s*$"
)


def parse_recipe(value: Any) -> Any:
    """A recipe from a dict, a JSON object, or a label ``"EC0.3:EMC0.7+LiPF6 1.0m"``.

    Anything else is returned unchanged for pydantic to reject with its own message.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    m = _LABEL.match(text)
    if m is None:
        raise ValueError(
            f"not a recipe: {value!r}; use a JSON object or a label like 'EC0.3:EMC0.7+LiPF6 1.0m'"
        )
    fractions: dict[str, float] = {}
    for part in m.group("blend").split(":"):
        name = re.match(r"\s*([A-Za-z]+)\s*([0-9.]+)", part)
        assert name is not None  # the pattern above guarantees it
        fractions[name.group(1).upper()] = float(name.group(2))
    return {"fractions": fractions, "salt_molality": float(m.group("m") or 0.0)}


def _station(v: str) -> str:
    v = v.strip()
    if not v or not v.isprintable():
        raise ValueError("must be a station name like 'rack/1'")
    return v


class PrepareElectrolyteParams(CommonParams):
    """Parameters of :func:`prepare_electrolyte` (times in lab seconds)."""

    recipe: Recipe = Field(description="what to make: JSON or 'EC0.5:DMC0.5+LiPF6 1.0m'")
    vial_station: str = Field(default="rack/1", description="where the empty vial is")
    return_station: str | None = Field(default=None, description="where it goes (default: back)")
    tolerance_g: float = Field(default=0.003, gt=0.0, le=0.5, description="per dose, g")
    first_fraction: float = Field(default=0.97, gt=0.5, le=1.0, description="of the first dispense")
    max_corrections: int = Field(default=4, ge=0, le=20, description="corrections per dose")
    mix_rpm: float = Field(default=600.0, ge=50.0, le=1500.0, description="stirrer speed")
    mix_time_s: float = Field(default=120.0, ge=0.0, le=86400.0, description="stirring time")
    equilibrate_s: float = Field(default=300.0, ge=0.0, le=86400.0, description="rest after mixing")

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, v: Any) -> Any:
        return parse_recipe(v)

    @field_validator("vial_station", "return_station")
    @classmethod
    def _stations(cls, v: str | None) -> str | None:
        return v if v is None else _station(v)


class MeasureConductivityParams(CommonParams):
    """Parameters of :func:`measure_conductivity` (times in lab seconds)."""

    temperatures: list[float] = Field(
        default_factory=lambda: [25.0], min_length=1, max_length=20, description="degC, in order"
    )
    vial_station: str = Field(default="rack/1", description="where the sample vial is")
    return_station: str | None = Field(default=None, description="where it goes (default: back)")
    dwell_s: float = Field(default=300.0, ge=0.0, le=86400.0, description="once chamber stable")
    reading_interval_s: float = Field(default=30.0, ge=0.0, le=3600.0, description="between")
    window: int = Field(default=3, ge=2, le=20, description="readings that must agree")
    tolerance_pct: float = Field(default=2.0, gt=0.0, le=50.0, description="max spread, %")
    temperature_tolerance_c: float = Field(default=0.5, gt=0.0, le=10.0, description="vs setpoint")
    max_readings: int = Field(default=20, ge=2, le=500, description="per temperature")
    require_equilibrium: bool = Field(default=False, description="fail when not reached")
    park_temperature_c: float | None = Field(
        default=None, ge=-40.0, le=150.0, description="chamber setpoint at the end"
    )
    recipe: Recipe | None = Field(default=None, description="the sample's recipe (metadata)")

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, v: Any) -> Any:
        return parse_recipe(v)

    @field_validator("vial_station", "return_station")
    @classmethod
    def _stations(cls, v: str | None) -> str | None:
        return v if v is None else _station(v)

    @field_validator("temperatures", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip().startswith("["):
            return [float(x) for x in v.split(",") if x.strip()]
        return v

    @field_validator("temperatures")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not (math.isfinite(t) and -40.0 <= t <= 150.0)]
        if bad:
            raise ValueError(f"temperatures must be within -40..150 degC, got {bad}")
        return v

    @model_validator(mode="after")
    def _window(self) -> MeasureConductivityParams:
        if self.max_readings < self.window:
            raise ValueError(
                f"max_readings ({self.max_readings}) must be >= window ({self.window})"
            )
        return self


class MoveVialParams(CommonParams):
    """Parameters of :func:`move_vial`."""

    source: str = Field(description="station the vial is at")
    destination: str = Field(description="free station to put it")

    @field_validator("source", "destination")
    @classmethod
    def _stations(cls, v: str) -> str:
        return _station(v)


# -- records ------------------------------------------------------------------------------

DOSES_FIELDS: dict[str, tuple[Any, str]] = {
    "reagent": ("string", ""),
    "target_g": ("number", "g"),
    "actual_g": ("number", "g"),
    "error_g": ("number", "g"),
    "volume_ml": ("number", "mL"),
    "steps": ("integer", ""),
    "within_tolerance": ("boolean", ""),
}
COMPOSITION_FIELDS: dict[str, tuple[Any, str]] = {
    "sample_id": ("string", ""),
    **{f"fraction_{s}": ("number", "") for s in SOLVENTS},
    **{f"target_fraction_{s}": ("number", "") for s in SOLVENTS},
    "salt_molality": ("number", "mol/kg"),
    "target_salt_molality": ("number", "mol/kg"),
    "liquid_g": ("number", "g"),
    "within_tolerance": ("boolean", ""),
}
READING_FIELDS: dict[str, tuple[Any, str]] = {
    "setpoint_c": ("number", "degC"),
    "reading": ("integer", ""),
}
CONDUCTIVITY_FIELDS: dict[str, tuple[Any, str]] = {
    "sample_id": ("string", ""),
    "setpoint_c": ("number", "degC"),
    "temperature_c": ("number", "degC"),
    "chamber_temperature_c": ("number", "degC"),
    "conductivity_mS_cm": ("number", "mS/cm"),
    "spread_pct": ("number", "%"),
    "readings": ("integer", ""),
    "stable": ("boolean", ""),
    "equilibrated": ("boolean", ""),
}


# -- helpers ------------------------------------------------------------------------------


def _check_stations(lab: LabDevices, plan: str, **stations: str | None) -> None:
    deck = getattr(lab.robot, "deck", None)
    if deck is None:
        return
    bad = [
        (field, value, f"unknown station; known: {', '.join(deck)}")
        for field, value in stations.items()
        if value is not None and value not in deck
    ]
    if bad:
        raise PlanParameterError(plan, bad)


def _home_if_needed(robot: Any, live: bool) -> Plan:
    homed = yield from read_signal(robot.homed, live=live)
    if not homed:
        yield from bps.trigger(robot.home, wait=True)


def _transfer(robot: Any, source: str, destination: str) -> Plan:
    yield from bps.checkpoint()
    yield from bps.mv(robot.transfer, (source, destination))


def _recipe_md(recipe: Recipe) -> dict[str, Any]:
    components = [*recipe.fractions, *(["LiPF6"] if recipe.salt_molality > 0 else [])]
    return {
        "recipe": recipe.model_dump(mode="json"),
        "components": {k: SMILES[k] for k in components},
    }


class _Prepare:
    """The preparation stage, shared by prepare_electrolyte and prepare_and_measure."""

    def __init__(
        self, lab: LabDevices, p: PrepareElectrolyteParams, reagents: Mapping[str, Reagent]
    ) -> None:
        lab.require("balance", "pumps", "robot", "stirrer")
        self.lab = lab
        self.p = p
        self.reagents = dict(reagents)
        try:
            self.doses = plan_doses(p.recipe, self.reagents)
        except ValueError as exc:
            raise PlanParameterError(
                "prepare_electrolyte", [("recipe", p.recipe.name, str(exc))]
            ) from None
        on_pumps = set(lab.pumps.pump.keys()) if lab.pumps is not None else set()
        missing = [d.reagent for d in self.doses if d.reagent not in on_pumps]
        if missing:
            raise PlanParameterError(
                "prepare_electrolyte",
                [("recipe", p.recipe.name, f"needs {missing}; on the pumps: {sorted(on_pumps)}")],
            )
        self.dosing = dosing_record()
        self.dose = Record("dose_result", DOSES_FIELDS)
        self.composition = Record("composition", COMPOSITION_FIELDS)

    def streams(self) -> list[tuple[str, Sequence[Any]]]:
        return [
            ("dosing", [self.lab.balance, self.dosing]),
            ("doses", [self.dose]),
            ("composition", [self.composition]),
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            **_recipe_md(self.p.recipe),
            "target_doses_g": {d.reagent: d.target_g for d in self.doses},
            "tolerance_g": self.p.tolerance_g,
            "vial_station": self.p.vial_station,
            "expected_events": {"doses": len(self.doses), "composition": 1},
        }

    def run(self, live: bool, *, end_at: str | None) -> Generator[Msg, Any, dict[str, Any]]:
        """Dose, mix, rest; leave the vial at ``end_at`` (None: on the stirrer)."""
        lab, p = self.lab, self.p
        balance, pumps, robot, stirrer = lab.balance, lab.pumps, lab.robot, lab.stirrer
        assert balance is not None
        assert pumps is not None
        assert stirrer is not None
        yield from _home_if_needed(robot, live)
        yield from _transfer(robot, p.vial_station, "balance")
        yield from bps.checkpoint()
        yield from bps.trigger(balance.tare, wait=True)
        dosed: list[DoseResult] = []
        for dose in self.doses:
            yield from bps.checkpoint()
            result = yield from dose_gravimetric(
                pumps.pump[dose.reagent],
                balance,
                dose.target_g,
                self.reagents[dose.reagent].density_g_ml,
                tolerance_g=p.tolerance_g,
                first_fraction=p.first_fraction,
                max_corrections=p.max_corrections,
                reagent=dose.reagent,
                record=self.dosing,
                live=live,
            )
            dosed.append(result)
            yield from emit(
                self.dose,
                "doses",
                reagent=result.reagent,
                target_g=result.target_g,
                actual_g=result.actual_g,
                error_g=result.actual_g - result.target_g,
                volume_ml=result.volume_ml,
                steps=result.steps,
                within_tolerance=result.within_tolerance,
            )
        yield from bps.checkpoint()
        self.dosing.put(reagent="(all)", dose_step=0, target_g=sum(d.target_g for d in self.doses),
                        volume_ml=sum(d.volume_ml for d in dosed))  # fmt: skip
        total = yield from weigh(balance, "dosing", context=self.dosing, live=live)
        actual = {r.reagent: r.actual_g for r in dosed}
        fractions, molality = composition(actual, self.reagents)
        liquid = total if total is not None else sum(actual.values())
        ok = all(r.within_tolerance for r in dosed)
        yield from emit(
            self.composition,
            "composition",
            sample_id=p.sample_id,
            **{f"fraction_{s}": fractions.get(s, 0.0) for s in SOLVENTS},
            **{f"target_fraction_{s}": p.recipe.fractions.get(s, 0.0) for s in SOLVENTS},
            salt_molality=molality,
            target_salt_molality=p.recipe.salt_molality,
            liquid_g=liquid,
            within_tolerance=ok,
        )
        yield from _transfer(robot, "balance", "stirrer")
        yield from bps.checkpoint()
        if p.mix_time_s > 0:
            yield from bps.mv(stirrer.speed, p.mix_rpm)
            yield from sleep_lab(p.mix_time_s, p.time_scale, live=live)
            yield from bps.mv(stirrer.speed, 0.0)
        yield from bps.checkpoint()
        yield from sleep_lab(p.equilibrate_s, p.time_scale, live=live)
        if end_at is not None:
            yield from _transfer(robot, "stirrer", end_at)
        return {
            "sample_id": p.sample_id,
            "recipe": p.recipe.name,
            "doses": [r.as_dict() for r in dosed],
            "liquid_g": liquid,
            "fractions": {k: v for k, v in fractions.items() if v > 0},
            "salt_molality": molality,
            "target_fractions": dict(p.recipe.fractions),
            "target_salt_molality": p.recipe.salt_molality,
            "within_tolerance": ok,
            "vial_station": end_at if end_at is not None else "stirrer",
        }

    def safe_state(self) -> list[Callable[[], Plan]]:
        return [lambda: bps.stop(self.lab.pumps), lambda: bps.stop(self.lab.stirrer)]


class _Measure:
    """The conductivity stage, shared by measure_conductivity and prepare_and_measure."""

    def __init__(self, lab: LabDevices, p: MeasureConductivityParams) -> None:
        lab.require("robot", "chamber", "meter")
        self.lab = lab
        self.p = p
        self.context = Record("reading_context", READING_FIELDS)
        self.summary = Record("conductivity_summary", CONDUCTIVITY_FIELDS)

    def streams(self) -> list[tuple[str, Sequence[Any]]]:
        return [
            ("conductivity_readings", [self.lab.meter, self.lab.chamber, self.context]),
            ("conductivity", [self.summary]),
        ]

    def metadata(self) -> dict[str, Any]:
        p = self.p
        md: dict[str, Any] = {
            "temperatures_c": list(p.temperatures),
            "equilibration": {
                "dwell_s": p.dwell_s,
                "window": p.window,
                "tolerance_pct": p.tolerance_pct,
                "temperature_tolerance_c": p.temperature_tolerance_c,
                "max_readings": p.max_readings,
                "meter_stable_flag": True,
            },
            "expected_events": {"conductivity": len(p.temperatures)},
        }
        if p.recipe is not None:
            md.update(_recipe_md(p.recipe))
        return md

    def at_temperature(self, setpoint: float, live: bool) -> Plan:
        """Chamber at ``setpoint`` and stable (a move a pause switched off is redone)."""
        chamber = self.lab.chamber
        assert chamber is not None
        for _ in range(3):
            yield from bps.mv(chamber, setpoint)
            running = yield from read_signal(chamber.running, live=live)
            if running is None or running:
                return
        raise PlanError(f"{chamber.name}: did not hold {setpoint:g} degC")

    def run(
        self, live: bool, *, start_at: str, end_at: str | None
    ) -> Generator[Msg, Any, dict[str, Any]]:
        p, lab = self.p, self.lab
        meter, chamber, robot = lab.meter, lab.chamber, lab.robot
        assert meter is not None
        assert chamber is not None
        yield from _home_if_needed(robot, live)
        yield from _transfer(robot, start_at, "meter")
        points = []
        for setpoint in p.temperatures:
            yield from bps.checkpoint()
            yield from self.at_temperature(setpoint, live)
            yield from sleep_lab(p.dwell_s, p.time_scale, live=live)
            window: list[tuple[float, float, bool, float]] = []
            n = 0
            equilibrated = False
            while n < p.max_readings:
                yield from bps.checkpoint()
                n += 1
                self.context.put(setpoint_c=float(setpoint), reading=n)
                reading = yield from fresh_read(
                    [meter, chamber, self.context],
                    "conductivity_readings",
                    meter.conductivity.name,
                    live=live,
                )
                if reading is None:  # dry run: nominal, equilibrated readings
                    window.append((math.nan, setpoint, True, setpoint))
                else:
                    window.append(
                        (
                            float(reading[meter.conductivity.name]["value"]),
                            float(reading[meter.temperature.name]["value"]),
                            bool(reading[meter.stable.name]["value"]),
                            float(reading[chamber.temperature.name]["value"]),
                        )
                    )
                window = window[-p.window :]
                if len(window) == p.window and self._agree(window, setpoint, live):
                    equilibrated = True
                    break
                yield from sleep_lab(p.reading_interval_s, p.time_scale, live=live)
            kappas = [w[0] for w in window]
            mean = sum(kappas) / len(kappas)
            spread = (max(kappas) - min(kappas)) / mean * 100.0 if live and mean > 0 else 0.0
            point = {
                "setpoint_c": float(setpoint),
                "temperature_c": sum(w[1] for w in window) / len(window),
                "chamber_temperature_c": window[-1][3],
                "conductivity_mS_cm": mean if live else 0.0,
                "spread_pct": spread,
                "readings": n,
                "stable": all(w[2] for w in window),
                "equilibrated": equilibrated,
            }
            yield from emit(self.summary, "conductivity", sample_id=p.sample_id, **point)
            points.append(point)
            if p.require_equilibrium and not equilibrated:
                raise PlanError(
                    f"conductivity at {setpoint:g} degC did not equilibrate in {n} readings "
                    f"(last {p.window}: {', '.join(f'{k:.4g}' for k in kappas)} mS/cm)"
                )
        if p.park_temperature_c is not None:
            yield from bps.checkpoint()
            yield from self.at_temperature(p.park_temperature_c, live)
        if end_at is not None:
            yield from _transfer(robot, "meter", end_at)
        return {
            "sample_id": p.sample_id,
            "points": points,
            "vial_station": end_at if end_at is not None else "meter",
        }

    def _agree(
        self, window: list[tuple[float, float, bool, float]], setpoint: float, live: bool
    ) -> bool:
        if not live:
            return True
        p = self.p
        kappas = [w[0] for w in window]
        mean = sum(kappas) / len(kappas)
        if mean <= 0 or not all(w[2] for w in window):
            return False
        spread = (max(kappas) - min(kappas)) / mean * 100.0
        temp = sum(w[1] for w in window) / len(window)
        return spread <= p.tolerance_pct and abs(temp - setpoint) <= p.temperature_tolerance_c


# -- the plans ----------------------------------------------------------------------------


def prepare_electrolyte(
    lab: LabDevices,
    recipe: Recipe | Mapping[str, Any] | str,
    *,
    reagents: Mapping[str, Reagent] | None = None,
    vial_station: str = "rack/1",
    return_station: str | None = None,
    tolerance_g: float = 0.003,
    first_fraction: float = 0.97,
    max_corrections: int = 4,
    mix_rpm: float = 600.0,
    mix_time_s: float = 120.0,
    equilibrate_s: float = 300.0,
    sample_id: str = "",
    campaign_id: str = "",
    operator: str | None = None,
    time_scale: float = 1.0,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Make ``recipe`` gravimetrically in the vial at ``vial_station``; mix it; put it back.

    Doses every reagent (pure solvents and LiPF6 stocks, see ``labctl.recipes``) by
    dispense-weigh-correct to ``tolerance_g``, stirs ``mix_time_s`` at ``mix_rpm``, rests
    ``equilibrate_s`` (lab seconds; divided by ``time_scale`` on the wall clock). The
    start document carries the recipe, component SMILES and target doses; the result
    (and the ``doses`` and ``composition`` streams) the actual masses and the achieved
    composition. ``sample_id`` defaults to a new ``S-<date>-<time>-<hex>``.
    """
    values = {k: v for k, v in locals().items() if k not in ("lab", "reagents") and v is not None}
    p = validate(PrepareElectrolyteParams, "prepare_electrolyte", values)
    if not p.sample_id:
        p = p.model_copy(update={"sample_id": new_sample_id()})
    _check_stations(
        lab, "prepare_electrolyte", vial_station=p.vial_station, return_station=p.return_station
    )
    stage = _Prepare(lab, p, reagents if reagents is not None else default_reagents())
    md = base_metadata("prepare_electrolyte", p, **stage.metadata())
    end = p.return_station or p.vial_station
    return lab_run(
        lambda live: stage.run(live, end_at=end),
        md,
        safe_state=stage.safe_state,
        streams=stage.streams(),
    )


def measure_conductivity(
    lab: LabDevices,
    sample_id: str,
    temperatures: Sequence[float] | str = (25.0,),
    *,
    vial_station: str = "rack/1",
    return_station: str | None = None,
    dwell_s: float = 300.0,
    reading_interval_s: float = 30.0,
    window: int = 3,
    tolerance_pct: float = 2.0,
    temperature_tolerance_c: float = 0.5,
    max_readings: int = 20,
    require_equilibrium: bool = False,
    park_temperature_c: float | None = None,
    recipe: Recipe | Mapping[str, Any] | str | None = None,
    campaign_id: str = "",
    operator: str | None = None,
    time_scale: float = 1.0,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Conductivity of the sample at ``vial_station`` at each of ``temperatures``.

    Per temperature: chamber set and stable, ``dwell_s`` more for the vial to follow,
    then a reading every ``reading_interval_s`` until the last ``window`` readings are
    all flagged stable by the meter, agree within ``tolerance_pct`` (max - min over the
    mean) and average within ``temperature_tolerance_c`` of the setpoint; at most
    ``max_readings`` (then ``equilibrated`` is False, or the run fails with
    ``require_equilibrium``). One event per temperature in the ``conductivity`` stream.
    """
    values = {
        k: (list(v) if k == "temperatures" and not isinstance(v, str) else v)
        for k, v in locals().items()
        if k != "lab" and v is not None
    }
    p = validate(MeasureConductivityParams, "measure_conductivity", values)
    _check_stations(
        lab, "measure_conductivity", vial_station=p.vial_station, return_station=p.return_station
    )
    stage = _Measure(lab, p)
    md = base_metadata("measure_conductivity", p, **stage.metadata())
    end = p.return_station or p.vial_station
    return lab_run(
        lambda live: stage.run(live, start_at=p.vial_station, end_at=end),
        md,
        streams=stage.streams(),
    )


def move_vial(
    lab: LabDevices,
    source: str,
    destination: str,
    *,
    sample_id: str = "",
    campaign_id: str = "",
    operator: str | None = None,
    time_scale: float = 1.0,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Move the vial at ``source`` to the free station ``destination`` (homes first)."""
    values = {k: v for k, v in locals().items() if k != "lab" and v is not None}
    p = validate(MoveVialParams, "move_vial", values)
    lab.require("robot")
    _check_stations(lab, "move_vial", source=p.source, destination=p.destination)

    def body(live: bool) -> Generator[Msg, Any, dict[str, Any]]:
        yield from _home_if_needed(lab.robot, live)
        yield from _transfer(lab.robot, p.source, p.destination)
        return {"source": p.source, "destination": p.destination}

    return lab_run(body, base_metadata("move_vial", p))


def prepare_and_measure(
    lab: LabDevices,
    recipe: Recipe | Mapping[str, Any] | str,
    reagents: Mapping[str, Reagent] | None = None,
    *,
    vial_station: str = "rack/1",
    temperature_c: float | Sequence[float] = 25.0,
    mix_rpm: float = 600.0,
    mix_time_s: float = 5.0,
    equilibrate_s: float = 2.0,
    readings: int = 3,
    tolerance_g: float = 0.003,
    operator: str = "demo",
    sample_id: str = "",
    campaign_id: str = "",
    time_scale: float = 1.0,
    measure: Mapping[str, Any] | None = None,
    results: dict[str, Any] | None = None,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Make ``recipe`` and measure its conductivity in one run; put the vial back.

    The preparation of :func:`prepare_electrolyte`, then (the chamber coming to the
    first temperature while the vial rests) the measurement of
    :func:`measure_conductivity` with a ``readings``-wide window; ``measure`` overrides
    its other parameters. Times are lab seconds (``time_scale`` 1: wall seconds).
    ``results`` (optional) receives the summary, also returned: the preparation's keys
    plus ``points``, ``conductivity_mS_cm`` and ``temperature_c`` (first temperature).
    """
    single = isinstance(temperature_c, int | float)
    temps = [float(temperature_c)] if single else list(temperature_c)  # type: ignore[arg-type]
    common = {"campaign_id": campaign_id, "operator": operator, "time_scale": time_scale}
    prep = validate(
        PrepareElectrolyteParams,
        "prepare_and_measure",
        {"recipe": recipe, "vial_station": vial_station, "mix_rpm": mix_rpm,
         "mix_time_s": mix_time_s, "equilibrate_s": equilibrate_s, "tolerance_g": tolerance_g,
         "sample_id": sample_id or new_sample_id(), **common},
    )  # fmt: skip
    meas = validate(
        MeasureConductivityParams,
        "prepare_and_measure",
        {"temperatures": temps, "vial_station": vial_station, "window": readings,
         "max_readings": max(20, readings), "dwell_s": 0.0, "reading_interval_s": 0.0,
         "sample_id": prep.sample_id, "recipe": prep.recipe.model_dump(), **common,
         **dict(measure or {})},
    )  # fmt: skip
    _check_stations(lab, "prepare_and_measure", vial_station=vial_station)
    prepare = _Prepare(lab, prep, reagents if reagents is not None else default_reagents())
    measuring = _Measure(lab, meas)
    extra = {**prepare.metadata(), **measuring.metadata()}
    extra["expected_events"] = {"doses": len(prepare.doses), "conductivity": len(meas.temperatures)}
    md = base_metadata("prepare_and_measure", prep, **extra)
    out: dict[str, Any] = results if results is not None else {}

    def body(live: bool) -> Generator[Msg, Any, dict[str, Any]]:
        made = yield from prepare.run(live, end_at=None)
        out.update(made)
        measured = yield from measuring.run(live, start_at="stirrer", end_at=vial_station)
        first = measured["points"][0]
        out.update(
            points=measured["points"],
            conductivity_mS_cm=first["conductivity_mS_cm"],
            temperature_c=first["temperature_c"],
            vial_station=vial_station,
        )
        return out

    return lab_run(
        body,
        md,
        safe_state=prepare.safe_state,
        streams=[*prepare.streams(), *measuring.streams()],
    )
