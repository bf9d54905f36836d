"""Make one electrolyte gravimetrically and measure its conductivity.

The plan is a generator of ``Msg``: dry-run it with ``bluesky.simulators``
(``summarize_plan``) before any instrument moves. Streams: ``dosing`` (every
weighing), ``conductivity`` (the meter's readings). The stop document's
``reason`` is empty on success; the start document carries the recipe.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg

from labctl.devices.lab import LabDevices
from labctl.plans.dosing import DoseResult, dose_gravimetric, weigh
from labctl.recipes import SOLVENTS, Reagent, Recipe, composition, plan_doses

SMILES = {"EC": "C1COC(=O)O1", "PC": "CC1COC(=O)O1", "EMC": "CCOC(=O)OC", "DMC": "COC(=O)OC",
          "DEC": "CCOC(=O)OCC", "LiPF6": "[Li+].F[P-](F)(F)(F)(F)F"}  # fmt: skip


def prepare_and_measure(
    lab: LabDevices,
    recipe: Recipe,
    reagents: dict[str, Reagent],
    *,
    vial_station: str = "rack/1",
    temperature_c: float = 25.0,
    mix_rpm: float = 600.0,
    mix_time_s: float = 5.0,
    equilibrate_s: float = 2.0,
    readings: int = 3,
    tolerance_g: float = 0.003,
    operator: str = "demo",
    results: dict[str, Any] | None = None,
) -> Generator[Msg, Any, dict[str, Any]]:
    """Dose ``recipe`` into the vial at ``vial_station``, mix it, measure it, put it back.

    ``mix_time_s`` and ``equilibrate_s`` are wall-clock seconds (the plan cannot know
    a simulator's time acceleration). ``results`` (optional) receives the summary.
    """
    balance, pumps, robot = lab.role("balance"), lab.role("pumps"), lab.role("robot")
    stirrer, chamber, meter = lab.role("stirrer"), lab.role("chamber"), lab.role("meter")
    doses = plan_doses(recipe, reagents)
    sample_id = f"S-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = results if results is not None else {}
    md = {
        "plan_name": "prepare_and_measure",
        "sample_id": sample_id,
        "operator": operator,
        "recipe": recipe.model_dump(),
        "components": {k: SMILES[k] for k in [*recipe.fractions, "LiPF6"]},
        "target_doses_g": {d.reagent: d.target_g for d in doses},
        "temperature_c": temperature_c,
    }

    def inner() -> Generator[Msg, Any, None]:
        yield from bps.trigger(robot.home, wait=True)
        yield from bps.mv(robot.transfer, (vial_station, "balance"))
        yield from bps.trigger(balance.tare, wait=True)
        dosed: list[DoseResult] = []
        for dose in doses:
            pump = pumps.pump[dose.reagent]
            result = yield from dose_gravimetric(
                pump, balance, dose.target_g, reagents[dose.reagent].density_g_ml,
                tolerance_g=tolerance_g,
            )  # fmt: skip
            dosed.append(result)
        total = yield from weigh(balance)
        actual = {r.reagent: r.actual_g for r in dosed}
        fractions, molality = composition(actual, reagents)
        out.update(
            sample_id=sample_id,
            doses=[r.as_dict() for r in dosed],
            liquid_g=total,
            fractions={k: fractions.get(k, 0.0) for k in SOLVENTS if k in fractions},
            salt_molality=molality,
        )
        # Mix on the stirrer while the chamber comes to temperature.
        yield from bps.mv(robot.transfer, ("balance", "stirrer"))
        yield from bps.abs_set(chamber, temperature_c, group="chamber")
        yield from bps.mv(stirrer.speed, mix_rpm)
        yield from bps.sleep(mix_time_s)
        yield from bps.mv(stirrer.speed, 0.0)
        yield from bps.wait(group="chamber")
        yield from bps.mv(robot.transfer, ("stirrer", "meter"))
        yield from bps.sleep(equilibrate_s)
        values = []
        for _ in range(readings):
            reading = yield from bps.trigger_and_read([meter, chamber], name="conductivity")
            values.append(float(reading[meter.conductivity.name]["value"]))
        out.update(
            conductivity_mS_cm=sum(values) / len(values),
            conductivity_readings=values,
            temperature_c=float(reading[meter.temperature.name]["value"]),
        )
        yield from bps.mv(robot.transfer, ("meter", vial_station))

    yield from bpp.run_wrapper(inner(), md=md)  # type: ignore[no-untyped-call]
    return out
