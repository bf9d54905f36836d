"""cycle_cell and hppc through a real RunEngine on the simulated cycler.

The cell is a 2 Ah version of the simulator's LG M50-class model, so that 1C and 2C
stay within the channel rating; the lab runs 5000x with 5 s internal steps (one
cycle in about a second). Pause, abort and a wire fault are checked against the
simulator's ground truth: whether the channel runs and what current flows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted

from hardware_mocks.instruments.cycler import CyclerSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.physics import cell as cm
from labctl.devices.lab import LabDevices, build_lab_devices
from labctl.plans.common import InstrumentFailedError, PlanError
from labctl.plans.cycling import cycle_cell, hppc
from tests.conftest import lab_config

SPEED = 5000.0
CAPACITY_AH = 2.0
Docs = list[tuple[str, dict[str, Any]]]


def protocol(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "nominal_capacity_ah": CAPACITY_AH,
        "rest_s": 60.0,
        "formation": None,
        "rate_test": None,
        "cycling": {"cycles": 2, "charge_c_rate": 2.0, "discharge_c_rate": 2.0},
    }
    base.update(overrides)
    return base


def start_cycler(**options: Any) -> LabThread:
    cfg = lab_config("cycler")
    cfg.instruments[0].options.update(capacity_ah=CAPACITY_AH, **options)
    return LabThread(cfg, transport="tcp", speed=SPEED).start()


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[LabThread]:
    """The cycler lab; ``parametrize("lab", [{options}], indirect=True)`` changes it."""
    lab = start_cycler(**getattr(request, "param", {"internal_step_s": 5.0}))
    yield lab
    lab.stop()


@pytest.fixture
def devices(lab: LabThread, RE: RunEngine, call: Callable[..., Any]) -> Iterator[LabDevices]:
    devices = build_lab_devices(lab.call(lab.lab.describe), reagents=[])
    call(devices.connect(timeout=20))
    yield devices
    call(devices.disconnect())


def sim(lab: LabThread) -> CyclerSimulator:
    return cast(CyclerSimulator, lab.lab.simulators["cycler"])


def channel_truth(lab: LabThread, channel: int) -> tuple[bool, float]:
    """(running, current in A) of a channel, read on the lab's thread."""
    s = sim(lab)
    k = channel - 1
    result: tuple[bool, float] = lab.call(lambda: (bool(s.running[k]), float(s.i[k])))
    return result


def events(docs: Docs, stream: str) -> list[dict[str, Any]]:
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d["data"] for n, d in docs if n == "event" and d["descriptor"] in uids]


def stop_doc(docs: Docs) -> dict[str, Any]:
    (doc,) = [d for n, d in docs if n == "stop"]
    return doc


def test_cycle_cell_runs_formation_rate_test_and_cycling_streaming_the_log(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    arrivals: list[tuple[float, str, dict[str, Any]]] = []
    names: dict[str, str] = {}

    def on_doc(name: str, doc: Any) -> None:
        docs.append((name, doc))
        if name == "descriptor":
            names[doc["uid"]] = doc["name"]
        if name == "event":
            arrivals.append((time.monotonic(), names[doc["descriptor"]], doc["data"]))

    proto = protocol(
        formation={"cycles": 1, "c_rate": 1.0},
        rate_test={"discharge_c_rates": [1.0, 2.0], "charge_c_rate": 2.0},
    )
    result = RE(
        cycle_cell(devices, 3, proto, cell_id="cell-A", log_period_s=60, poll_s=0.2),
        on_doc,
    )
    out = result.plan_result  # type: ignore[union-attr]
    start = next(d for n, d in docs if n == "start")
    assert stop_doc(docs)["exit_status"] == "success"
    assert (start["plan_name"], start["channel"], start["cell_id"]) == ("cycle_cell", 3, "cell-A")
    assert start["segments"] == [
        "formation 1 (1C)",
        "rate test 1C",
        "rate test 2C",
        "cycle 1",
        "cycle 2",
    ]
    assert start["protocol"]["nominal_capacity_ah"] == CAPACITY_AH
    assert [d["name"] for n, d in docs if n == "descriptor"] == ["cycling", "cycles"]
    rows = events(docs, "cycling")
    cycles = events(docs, "cycles")
    assert [c["cycle"] for c in cycles] == [1, 2, 3, 4, 5]
    # Streaming: rows of the first cycle arrived while it ran, long before its summary.
    first_row = next(t for t, s, d in arrivals if s == "cycling" and d["cycle"] == 1)
    first_summary = next(t for t, s, _ in arrivals if s == "cycles")
    assert first_summary - first_row > 0.5
    # Rows: one per log period and step end, time increasing, both current signs.
    times = [r["time"] for r in rows]
    assert times == sorted(times)
    assert {r["cycle"] for r in rows} == {1, 2, 3, 4, 5}
    assert min(r["current"] for r in rows) < -1.9  # 2C charge (discharge positive)
    assert max(r["current"] for r in rows) > 3.9  # 2C discharge
    assert all(2.45 < r["voltage"] < 4.25 for r in rows)
    assert {r["step"] for r in rows} == {1, 2, 3, 4}
    # Summaries: a full cell (1C formation charges from 50 % SOC, then full cycles).
    for c in cycles[1:]:
        assert c["charge_ah"] == pytest.approx(CAPACITY_AH, rel=0.06)
        assert c["discharge_ah"] == pytest.approx(CAPACITY_AH, rel=0.06)
        assert 0.97 < c["coulombic_efficiency"] <= 1.0
        assert c["discharge_energy_wh"] == pytest.approx(3.6 * c["discharge_ah"], rel=0.08)
        assert c["attempts"] == 1
    one_c, two_c = cycles[1], cycles[2]
    assert two_c["discharge_ah"] < one_c["discharge_ah"]  # rate capability
    assert two_c["max_temperature_c"] > one_c["max_temperature_c"]  # more I^2 R
    assert cycles[4]["retention"] == pytest.approx(
        cycles[4]["discharge_ah"] / cycles[3]["discharge_ah"]
    )
    assert out["stop_reason"] == "protocol complete"
    assert [c["label"] for c in out["cycles"]] == start["segments"]
    assert channel_truth(lab, 3) == (False, 0.0)


def test_a_log_read_answer_lost_on_the_wire_loses_no_rows(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    # The demo at 4000x: a simulator that lags answers a log read after the client's
    # timeout. The first read of a segment then held every row of its CC-CV charge, and
    # the segment reported charge_ah 0 and CE 0. Here the answer to the first log read
    # of the second segment is dropped after the instrument has executed the read.
    s = sim(lab)
    handle = s.handle
    seen = {"inits": 0, "dropped": 0}

    async def lossy(request: bytes) -> bytes | None:
        reply = await handle(request)
        if b"INIT" in request.upper():
            seen["inits"] += 1
        elif request.startswith(b"DATA:LOG") and seen["inits"] == 2 and not seen["dropped"]:
            seen["dropped"] += 1
            return None  # executed, answer lost: the client times out and retries
        return reply

    s.handle = lossy  # type: ignore[method-assign]
    docs: Docs = []
    result = RE(
        cycle_cell(devices, 2, protocol(), log_period_s=60, poll_s=0.2),
        lambda name, doc: docs.append((name, doc)),
    )
    assert result.exit_status == "success"  # type: ignore[union-attr]
    assert seen == {"inits": 2, "dropped": 1}
    rows = events(docs, "cycling")
    # Every row the instrument logged is in the stream, each once, steps in order.
    assert len(rows) == lab.call(lambda: int(s.log_written[1]))
    for segment in (1, 2):
        steps = [r["step"] for r in rows if r["segment"] == segment]
        assert steps[0] == 1
        assert steps == sorted(steps)
        assert set(steps) == {1, 2, 3, 4}
    times = [r["time"] for r in rows]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    cycles = events(docs, "cycles")
    assert cycles[1]["charge_ah"] == pytest.approx(CAPACITY_AH, rel=0.06)
    assert 0.97 < cycles[1]["coulombic_efficiency"] <= 1.0


@pytest.mark.parametrize("lab", [{"internal_step_s": 5.0, "fade_per_efc": 0.04}], indirect=True)
def test_capacity_retention_ends_cycling_early(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    proto = protocol(
        min_capacity_retention=0.98,
        cycling={"cycles": 5, "charge_c_rate": 2.0, "discharge_c_rate": 2.0},
    )
    result = RE(cycle_cell(devices, 1, proto, log_period_s=120))
    out = result.plan_result  # type: ignore[union-attr]
    assert result.exit_status == "success"  # type: ignore[union-attr]
    retention = [c["retention"] for c in out["cycles"]]
    assert 2 <= len(retention) < 5
    assert retention[-1] < 0.98 <= min(retention[:-1])
    assert out["stop_reason"].startswith("capacity retention 0.9")


def test_cell_temperature_limit_fails_the_run_and_switches_the_output_off(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    with pytest.raises(PlanError, match="stop condition: cell temperature"):
        RE(
            cycle_cell(devices, 2, protocol(max_temperature_c=27.0), log_period_s=30, poll_s=0.1),
            lambda n, d: docs.append((n, d)),
        )
    stop = stop_doc(docs)
    assert stop["exit_status"] == "fail"
    assert "above 27 degC (channel 2" in stop["reason"]
    assert channel_truth(lab, 2) == (False, 0.0)
    assert max(r["temperature"] for r in events(docs, "cycling")) > 27.0


def test_pause_switches_the_output_off_and_resume_reruns_the_segment(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    pausing: list[threading.Thread] = []

    def on_doc(name: str, doc: Any) -> None:
        docs.append((name, doc))
        data = doc.get("data", {})
        if name == "event" and data.get("segment") == 2 and data.get("step") == 3 and not pausing:
            pausing.append(threading.Thread(target=RE.request_pause))  # mid-discharge
            pausing[0].start()

    with pytest.raises(RunEngineInterrupted):
        RE(
            cycle_cell(
                devices,
                4,
                protocol(cycling={"cycles": 3, "charge_c_rate": 2.0, "discharge_c_rate": 2.0}),
                log_period_s=60,
                poll_s=0.1,
            ),
            on_doc,
        )
    pausing[0].join()
    assert RE.state == "paused"
    assert channel_truth(lab, 4) == (False, 0.0)  # output off while paused
    paused_at = lab.call(lambda: float(sim(lab).cells.soc[3]))
    time.sleep(0.3)  # 25 simulated minutes
    assert channel_truth(lab, 4) == (False, 0.0)
    assert lab.call(lambda: float(sim(lab).cells.soc[3])) == pytest.approx(paused_at, abs=1e-9)
    result = RE.resume()  # type: ignore[no-untyped-call]
    assert result.exit_status == "success"
    cycles = events(docs, "cycles")
    assert [c["attempts"] for c in cycles] == [1, 2, 1]
    # The rerun is a whole cycle: charged to full again, then discharged.
    assert cycles[1]["discharge_ah"] == pytest.approx(cycles[2]["discharge_ah"], rel=0.02)
    attempts = {(r["segment"], r["attempt"]) for r in events(docs, "cycling")}
    assert attempts == {(1, 1), (2, 1), (2, 2), (3, 1)}
    times = [r["time"] for r in events(docs, "cycling")]
    assert times == sorted(times)


def test_deferred_pause_waits_for_the_segment_to_end(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    pausing: list[threading.Thread] = []

    def on_doc(name: str, doc: Any) -> None:
        docs.append((name, doc))
        if name == "event" and doc["data"].get("step") == 1 and not pausing:
            pausing.append(threading.Thread(target=RE.request_pause, kwargs={"defer": True}))
            pausing[0].start()

    with pytest.raises(RunEngineInterrupted):
        RE(cycle_cell(devices, 8, protocol(), log_period_s=120, poll_s=0.1), on_doc)
    pausing[0].join()
    # Paused at the checkpoint after the first cycle: it completed, nothing runs.
    assert [c["cycle"] for c in events(docs, "cycles")] == [1]
    assert channel_truth(lab, 8) == (False, 0.0)
    result = RE.resume()  # type: ignore[no-untyped-call]
    assert result.exit_status == "success"
    assert [c["attempts"] for c in events(docs, "cycles")] == [1, 1]


def test_abort_switches_the_output_off_and_the_next_plan_runs(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    pausing: list[threading.Thread] = []

    def on_doc(name: str, doc: Any) -> None:
        docs.append((name, doc))
        if name == "event" and doc["data"].get("step") == 1 and not pausing:
            pausing.append(threading.Thread(target=RE.request_pause))
            pausing[0].start()

    with pytest.raises(RunEngineInterrupted):
        RE(cycle_cell(devices, 5, protocol(), log_period_s=60, poll_s=0.1), on_doc)
    pausing[0].join()
    result = RE.abort("cell swelling")  # type: ignore[no-untyped-call]
    assert result.exit_status == "abort"
    stop = stop_doc(docs)
    assert (stop["exit_status"], stop["reason"]) == ("abort", "cell swelling")
    assert channel_truth(lab, 5) == (False, 0.0)
    again = RE(
        cycle_cell(
            devices,
            5,
            protocol(cycling={"cycles": 1, "charge_c_rate": 2.0, "discharge_c_rate": 2.0}),
            log_period_s=120,
        )
    )
    assert again.exit_status == "success"  # type: ignore[union-attr]


def test_cycler_fault_mid_sequence_fails_the_run_output_off_next_plan_runs(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    injected: list[int] = []

    def on_doc(name: str, doc: Any) -> None:
        docs.append((name, doc))
        if name == "event" and doc["data"].get("step") == 1 and not injected:
            # Line noise on six replies in a row: more than the device's poll retries
            # and the plan's log-fetch retries together can absorb.
            sim(lab).faults.inject("garbage", count=6)
            injected.append(1)

    with pytest.raises(InstrumentFailedError, match="cycler"):
        RE(cycle_cell(devices, 6, protocol(), log_period_s=60, poll_s=0.1), on_doc)
    stop = stop_doc(docs)
    assert stop["exit_status"] == "fail"
    assert stop["reason"].startswith("ProtocolError: cycler")
    assert sim(lab).faults.armed == []  # every garbled reply was used up...
    assert channel_truth(lab, 6) == (False, 0.0)  # ...and the abort went through after them
    again = RE(
        cycle_cell(
            devices,
            6,
            protocol(cycling={"cycles": 1, "charge_c_rate": 2.0, "discharge_c_rate": 2.0}),
            log_period_s=120,
        )
    )
    assert again.exit_status == "success"  # type: ignore[union-attr]


@pytest.mark.parametrize("lab", [{"internal_step_s": 1.0}], indirect=True)
def test_hppc_r0_matches_the_cell_model(lab: LabThread, devices: LabDevices, RE: RunEngine) -> None:
    docs: Docs = []
    result = RE(
        hppc(
            devices,
            7,
            nominal_capacity_ah=CAPACITY_AH,
            soc_points=[0.8, 0.4],
            charge_c_rate=2.0,
            step_c_rate=2.0,
            discharge_pulse_c_rate=2.0,
            charge_pulse_c_rate=1.5,
            soc_rest_s=900,
            log_period_s=120,
            poll_s=0.1,
        ),
        lambda n, d: docs.append((n, d)),
    )
    assert result.exit_status == "success"  # type: ignore[union-attr]
    pulses = events(docs, "pulses")
    assert [(p["soc"], p["direction"]) for p in pulses] == [
        (0.8, "discharge"),
        (0.8, "charge"),
        (0.4, "discharge"),
        (0.4, "charge"),
    ]
    s = sim(lab)
    state, params = lab.call(lambda: (s.cells, s.params))
    for p in pulses:
        # The model's R0 at the pulse's temperature, with the cell's electrolyte and age.
        at = cm.CellState(**{**state.__dict__, "temp_c": np.full(state.n, p["temperature_c"])})
        r0, r1, _ = (float(x[6]) for x in cm.resistances(at, params))
        assert p["r0_ohm"] == pytest.approx(r0, rel=0.02)
        assert p["r0_edge_ohm"] == pytest.approx(r0, rel=0.03)
        assert p["r1_ohm"] == pytest.approx(r1, rel=0.15)
        assert p["tau1_s"] == pytest.approx(params.tau1_s, rel=0.2)
        assert p["rmse_v"] < 5e-4
    assert pulses[0]["ocv_v"] > pulses[2]["ocv_v"] + 0.2  # 80 % vs 40 % SOC
    assert abs(pulses[0]["current_a"] - 2.0 * CAPACITY_AH) < 0.01
    assert abs(pulses[1]["current_a"] + 1.5 * CAPACITY_AH) < 0.01
    rows = events(docs, "cycling")
    pulse_rows = [r for r in rows if r["segment"] in (3, 5)]
    assert np.diff([r["time"] for r in pulse_rows]).min() <= 1.0 + 1e-9  # 1 s logging
    assert result.plan_result["pulses"] == pulses  # type: ignore[union-attr]
