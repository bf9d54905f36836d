"""An electrolyte made and measured on the simulated lab, every document stored in Tiled.

``prepare_and_measure`` runs through a real RunEngine against the in-process simulated
lab with the embedded (SQLite) Tiled server subscribed; the dosing and conductivity
streams and the recipe are then read back from the server and compared with what
the RunEngine emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from bluesky import RunEngine

from labctl.data import DataConfig, ServerRecord, open_store
from labctl.devices.lab import build_lab_devices
from labctl.plans.electrolyte import prepare_and_measure
from labctl.recipes import default_reagents
from tests.conftest import start_lab
from tests.data import new_campaign

SPEED = 1000.0


def test_prepare_and_measure_is_stored_with_its_recipe_and_streams(
    sqlite_server: tuple[DataConfig, ServerRecord],
    RE: RunEngine,
    call: Callable[..., Any],
) -> None:
    lab = start_lab(
        "balance", "pump", "robot", "stirrer", "chamber", "meter", transport="tcp", speed=SPEED
    )
    devices = build_lab_devices(
        lab.call(lab.lab.describe),
        reagents=list(default_reagents()),
        pump_options={"contents_ml": 10.0, "rate_ml_min": 5.0},
    )
    campaign = new_campaign()
    docs: list[tuple[str, dict[str, Any]]] = []
    try:
        call(devices.connect(timeout=20))
        with open_store(sqlite_server[0]) as store:
            store.subscribe(RE)
            RE.subscribe(lambda name, doc: docs.append((name, doc)))  # type: ignore[no-untyped-call]
            RE(
                prepare_and_measure(
                    devices, "EC0.3:EMC0.7+LiPF6 1.1m", mix_time_s=30, equilibrate_s=30,
                    temperature_c=[25.0, 35.0], campaign_id=campaign, operator="tester",
                    time_scale=SPEED,
                )
            )  # fmt: skip
            (summary,) = store.runs(campaign=campaign)
            info = store.run(summary.uid)
            streams = {name: store.read(summary.uid, name) for name in info.streams}
    finally:
        call(devices.disconnect())
        lab.stop()

    start = next(d for n, d in docs if n == "start")
    assert summary.uid == start["uid"]
    assert (summary.plan_name, summary.operator) == ("prepare_and_measure", "tester")
    assert summary.exit_status == "success", summary.reason
    assert summary.sample_id == start["sample_id"] and summary.sample_id
    assert info.start["recipe"] == start["recipe"]
    assert info.start["recipe"]["salt_molality"] == pytest.approx(1.1)
    assert info.start["recipe"]["fractions"] == pytest.approx({"EC": 0.3, "EMC": 0.7})

    emitted_streams = {d["name"] for n, d in docs if n == "descriptor"}
    assert {"dosing", "conductivity"} <= emitted_streams
    assert set(info.streams) == emitted_streams
    for name in emitted_streams:
        uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == name}
        events = [d for n, d in docs if n == "event" and d["descriptor"] in uids]
        frame = streams[name]
        assert info.streams[name].rows == len(events) == len(frame) > 0
        assert summary.num_events[name] == len(events)
        for key in events[0]["data"]:
            assert list(frame[key]) == [e["data"][key] for e in events], (name, key)

    weights = [c for c in streams["dosing"].columns if c.endswith("weight")]
    assert weights and info.streams["dosing"].units[weights[0]] == "g"
    conductivity = streams["conductivity"]
    assert len(conductivity) == 2  # one event per temperature
    value = next(c for c in conductivity.columns if c.startswith("conductivity"))
    assert (conductivity[value] > 1.0).all()  # mS/cm of a 1.1 m LiPF6 carbonate blend
