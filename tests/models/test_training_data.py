"""Training rows from run data: a fake Store for every branch, then the real thing
(the simulated lab measuring into the embedded Tiled server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from bluesky import RunEngine

from labctl.data import DataConfig, RunInfo, RunSummary, ServerRecord, StreamInfo, open_store
from labctl.models.property import SOLVENTS
from labctl.models.training_data import conductivity_table, table_sha256
from tests.conftest import start_lab
from tests.data import new_campaign, session_server


def summary(uid: str, plan: str, sample: str, status: str = "success") -> RunSummary:
    return RunSummary(uid, 1.0, plan, sample, "C", "op", status, "", 1.0)  # type: ignore[arg-type]


def composition(fractions: dict[str, float], molality: float) -> pd.DataFrame:
    row = {f"fraction_{s}": fractions.get(s, 0.0) for s in SOLVENTS}
    return pd.DataFrame([{**row, "salt_molality": molality, "sample_id": "x"}])


def points(*rows: tuple[float, float, bool]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"setpoint_c": t, "temperature_c": t + 0.1, "conductivity_mS_cm": k, "equilibrated": e}
            for t, k, e in rows
        ]
    )


class FakeStore:
    """The Store methods conductivity_table uses, over in-memory runs."""

    url = "memory://"

    def __init__(self) -> None:
        self.summaries = [
            summary("a1", "prepare_and_measure", "S1"),
            summary("a2", "prepare_and_measure", "S2", status="fail"),
            summary("b1", "measure_conductivity", "S3"),
            summary("b2", "measure_conductivity", "S4"),
            summary("b3", "measure_conductivity", ""),
            summary("p3", "prepare_electrolyte", "S3"),
        ]
        self.streams: dict[str, dict[str, pd.DataFrame]] = {
            "a1": {
                "composition": composition({"EC": 0.3, "EMC": 0.7}, 1.1),
                "conductivity": points((25.0, 9.5, True), (35.0, 11.0, False)),
            },
            "a2": {"conductivity": points((25.0, 1.0, True))},
            "b1": {"conductivity": points((25.0, 7.0, True))},
            "b2": {"conductivity": points((40.0, 8.0, True))},
            "b3": {"conductivity": points((25.0, 5.0, True))},
            "p3": {"composition": composition({"PC": 0.5, "DMC": 0.5}, 0.9)},
        }
        self.starts = {
            "b2": {"recipe": {"fractions": {"EC": 0.2, "DEC": 0.8}, "salt_molality": 1.0}}
        }

    def runs(self, *, campaign: Any = None, plan: Any = None, sample: Any = None,
             limit: Any = None) -> list[RunSummary]:  # fmt: skip
        return [
            s
            for s in self.summaries
            if (plan is None or s.plan_name == plan) and (sample is None or s.sample_id == sample)
        ]

    def run(self, uid: str) -> RunInfo:
        s = next(x for x in self.summaries if x.uid == uid)
        streams = {k: StreamInfo(k, len(v), list(v), {}) for k, v in self.streams[uid].items()}
        return RunInfo(s, self.starts.get(uid, {}), None, streams)

    def read(self, uid: str, stream: str) -> pd.DataFrame:
        return self.streams[uid][stream]


def test_rows_come_from_the_best_composition_source() -> None:
    table = conductivity_table(FakeStore())  # type: ignore[arg-type]
    f = table.frame.set_index("run_uid")
    assert list(f.index) == ["a1", "b1", "b2"]
    assert f.loc["a1", "EC"] == pytest.approx(0.3) and f.loc["a1", "salt_molality"] == 1.1
    assert f.loc["a1", "conductivity_mS_cm"] == 9.5  # the 35 C point did not equilibrate
    assert f.loc["a1", "temperature_c"] == pytest.approx(25.1)
    assert f.loc["b1", "composition_source"] == "prepare_electrolyte p3"
    assert f.loc["b1", "PC"] == pytest.approx(0.5) and f.loc["b1", "salt_molality"] == 0.9
    assert f.loc["b2", "composition_source"] == "recipe (target)"
    assert f.loc["b2", "DEC"] == pytest.approx(0.8)
    assert table.runs == ["a1", "b1", "b2"]
    assert table.skipped == {
        "a2": "exit status fail",
        "b3": "no composition: no stream, no prepared sample, no recipe",
    }
    assert table.sha256 == table_sha256(table.frame.sample(frac=1.0, random_state=0))
    changed = table.frame.copy()
    changed.loc[0, "conductivity_mS_cm"] += 1e-9
    assert table_sha256(changed) != table.sha256
    everything = conductivity_table(FakeStore(), equilibrated_only=False)  # type: ignore[arg-type]
    assert len(everything.frame) == 4 and everything.sha256 != table.sha256
    assert '"equilibrated_only": true' in table.query and "memory://" in table.query


@pytest.fixture(scope="module")
def sqlite_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ServerRecord]:
    return session_server(request, tmp_path_factory, "sqlite")


def test_measurements_in_tiled_become_training_rows(
    sqlite_server: tuple[DataConfig, ServerRecord], RE: RunEngine, call: Callable[..., Any]
) -> None:
    from labctl.devices.lab import build_lab_devices
    from labctl.plans.electrolyte import prepare_and_measure
    from labctl.recipes import default_reagents

    speed = 1000.0
    lab = start_lab(
        "balance", "pump", "robot", "stirrer", "chamber", "meter", transport="tcp", speed=speed
    )
    devices = build_lab_devices(
        lab.call(lab.lab.describe),
        reagents=list(default_reagents()),
        pump_options={"contents_ml": 10.0, "rate_ml_min": 5.0},
    )
    campaign = new_campaign()
    results: dict[str, Any] = {}
    try:
        call(devices.connect(timeout=20))
        with open_store(sqlite_server[0]) as store:
            store.subscribe(RE)
            RE(
                prepare_and_measure(
                    devices, "EC0.3:EMC0.7+LiPF6 1.1m", mix_time_s=30, equilibrate_s=30,
                    temperature_c=[25.0, 35.0], campaign_id=campaign, operator="tester",
                    time_scale=speed, results=results,
                )
            )  # fmt: skip
            table = conductivity_table(store, campaign=campaign)
            again = conductivity_table(store, campaign=campaign)
    finally:
        call(devices.disconnect())
        lab.stop()

    frame = table.frame
    assert len(table.runs) == 1 and table.skipped == {}
    assert list(frame["setpoint_c"]) == [25.0, 35.0]
    measured = {p["setpoint_c"]: p for p in results["points"]}
    for _, row in frame.iterrows():
        point = measured[row["setpoint_c"]]
        assert row["conductivity_mS_cm"] == pytest.approx(point["conductivity_mS_cm"])
        assert row["temperature_c"] == pytest.approx(point["temperature_c"])
    # Achieved composition (by the balance), close to the recipe.
    assert (frame["composition_source"] == "composition").all()
    assert frame["EC"].iloc[0] == pytest.approx(results["fractions"]["EC"])
    assert frame["EC"].iloc[0] == pytest.approx(0.3, abs=0.01)
    assert frame["salt_molality"].iloc[0] == pytest.approx(results["salt_molality"])
    assert frame[list(SOLVENTS)].sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert frame["conductivity_mS_cm"].iloc[1] > frame["conductivity_mS_cm"].iloc[0] > 1.0
    assert again.sha256 == table.sha256 and campaign in table.query


def test_cycled_cells_come_back_from_tiled_with_severson_features(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    RE: RunEngine,
    call: Callable[..., Any],
) -> None:
    """A real cycle_cell run on the simulated cycler, stored in Tiled, read back as a
    CellCycles whose numbers match the run's own summary."""
    from hardware_mocks.lab import LabThread
    from labctl.devices.lab import build_lab_devices
    from labctl.models.cell import severson_features
    from labctl.models.training_data import cell_cycles_table
    from labctl.plans.cycling import cycle_cell
    from tests.conftest import lab_config

    config, _ = session_server(request, tmp_path_factory, "sqlite")
    cfg = lab_config("cycler")
    cfg.instruments[0].options.update(capacity_ah=2.0, internal_step_s=5.0)
    lab = LabThread(cfg, transport="tcp", speed=5000.0).start()
    campaign = new_campaign()
    try:
        devices = build_lab_devices(lab.call(lab.lab.describe), reagents=[])
        call(devices.connect(timeout=20))
        cycling = {"cycles": 3, "charge_c_rate": 2.0, "discharge_c_rate": 2.0}
        protocol = {"nominal_capacity_ah": 2.0, "rest_s": 60.0, "formation": None,
                    "rate_test": None, "cycling": cycling}  # fmt: skip
        with open_store(config) as store:
            store.subscribe(RE)
            out = RE(cycle_cell(devices, 1, protocol, cell_id="C-7", campaign_id=campaign,
                                time_scale=5000.0))  # fmt: skip
            assert out.exit_status == "success"  # type: ignore[union-attr]
            (cell,), skipped = cell_cycles_table(store, campaign=campaign)
        call(devices.disconnect())
    finally:
        lab.stop()
    assert skipped == {}
    assert cell.cell_id == "C-7"
    assert list(cell.summary["cycle"]) == [1, 2, 3] and sorted(cell.qv) == [1, 2, 3]
    result = out.plan_result["cycles"]  # type: ignore[union-attr]
    assert list(cell.summary["discharge_capacity_ah"]) == pytest.approx(
        [c["discharge_ah"] for c in result])  # fmt: skip
    assert (cell.summary["discharge_capacity_ah"] > 1.5).all()
    r = cell.summary["resistance_ohm"]
    assert (r > 0.005).all() and (r < 0.5).all()  # a 2 Ah cell's DC resistance, ohm
    v, q = cell.qv[2]
    assert min(v) < 3.0 < max(v) and max(q) == pytest.approx(result[1]["discharge_ah"], rel=0.02)
    features = severson_features(cell)  # cycles 1 and 3: the earliest pair available
    assert all(np.isfinite(list(features.values()))), features
