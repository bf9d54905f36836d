"""Make and measure one electrolyte on the simulated lab, through a real RunEngine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bluesky import RunEngine

from hardware_mocks.lab import LabThread
from hardware_mocks.physics.electrolyte import landesfeind_blend
from labctl.devices.lab import LabDevices, build_lab_devices
from labctl.plans.electrolyte import prepare_and_measure
from labctl.recipes import Recipe, default_reagents
from tests.conftest import start_lab

SPEED = 300.0


@pytest.fixture
def lab() -> Iterator[LabThread]:
    lab = start_lab(
        "balance", "pump", "robot", "stirrer", "chamber", "meter", transport="pty", speed=SPEED
    )
    yield lab
    lab.stop()


@pytest.fixture
def devices(lab: LabThread, RE: RunEngine, call: Callable[..., Any]) -> Iterator[LabDevices]:
    records = lab.call(lab.lab.describe)
    devices = build_lab_devices(
        records,
        reagents=list(default_reagents()),
        pump_options={"contents_ml": 10.0, "rate_ml_min": 5.0},
    )
    call(devices.connect(timeout=20))
    yield devices
    call(devices.disconnect())


def test_prepare_and_measure_makes_the_recipe_and_measures_it(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    recipe = Recipe(fractions={"EC": 0.3, "PC": 0.1, "EMC": 0.6}, salt_molality=1.2, solvent_g=4.0)
    docs: list[tuple[str, dict[str, Any]]] = []
    result: dict[str, Any] = {}
    RE(
        prepare_and_measure(
            devices, recipe, default_reagents(), mix_time_s=0.3, equilibrate_s=0.5, results=result
        ),
        lambda name, doc: docs.append((name, doc)),
    )
    stop = next(d for n, d in docs if n == "stop")
    assert stop["exit_status"] == "success"
    start = next(d for n, d in docs if n == "start")
    assert start["recipe"]["salt_molality"] == 1.2
    assert start["components"]["EC"] == "C1COC(=O)O1"
    # Every dose within tolerance, by the balance.
    assert all(d["within_tolerance"] for d in result["doses"])
    assert result["salt_molality"] == pytest.approx(1.2, abs=0.01)
    for k, w in recipe.fractions.items():
        assert result["fractions"][k] == pytest.approx(w, abs=0.005)
    # The world agrees with what the balance said was dosed.
    truth = lab.call(lab.world.snapshot)["vials"]["V01"]
    assert truth["station"] == "rack/1"  # put back
    assert truth["salt_molality"] == pytest.approx(result["salt_molality"], abs=0.01)
    # The measured conductivity is the model's value for what is really in the vial.
    expected = landesfeind_blend(
        truth["fractions"], truth["salt_molality"], result["temperature_c"]
    )
    assert result["conductivity_mS_cm"] == pytest.approx(expected, rel=0.03)
    streams = [d["name"] for n, d in docs if n == "descriptor"]
    assert streams == ["dosing", "doses", "composition", "conductivity_readings", "conductivity"]
    (point,) = [d["data"] for n, d in docs if n == "event" and "equilibrated" in d["data"]]
    assert point["conductivity_mS_cm"] == pytest.approx(result["conductivity_mS_cm"])
