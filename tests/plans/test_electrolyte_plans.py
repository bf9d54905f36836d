"""prepare_electrolyte and measure_conductivity through a real RunEngine on the simulated lab.

Pause, resume, abort and an instrument failure are checked against the simulators'
ground truth (the pumps' state, what really left each syringe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from bluesky import RunEngine
from bluesky.utils import Msg, RunEngineInterrupted

from hardware_mocks.instruments.pump import PumpNetworkSimulator
from hardware_mocks.lab import LabThread
from hardware_mocks.physics.electrolyte import landesfeind_blend
from labctl.devices.lab import LabDevices, build_lab_devices
from labctl.plans.common import InstrumentFailedError
from labctl.plans.electrolyte import measure_conductivity, move_vial, prepare_electrolyte
from labctl.recipes import default_reagents
from tests.conftest import start_lab

SPEED = 1000.0
Docs = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def lab() -> Iterator[LabThread]:
    lab = start_lab(
        "balance", "pump", "robot", "stirrer", "chamber", "meter", transport="tcp", speed=SPEED
    )
    yield lab
    lab.stop()


@pytest.fixture
def devices(lab: LabThread, RE: RunEngine, call: Callable[..., Any]) -> Iterator[LabDevices]:
    devices = build_lab_devices(
        lab.call(lab.lab.describe),
        reagents=list(default_reagents()),
        pump_options={"contents_ml": 10.0, "rate_ml_min": 5.0},
    )
    call(devices.connect(timeout=20))
    yield devices
    call(devices.disconnect())


def events(docs: Docs, stream: str) -> list[dict[str, Any]]:
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d["data"] for n, d in docs if n == "event" and d["descriptor"] in uids]


def only(docs: Docs, name: str) -> dict[str, Any]:
    (doc,) = [d for n, d in docs if n == name]
    return doc


async def set_rate(devices: LabDevices, reagent: str, ml_min: float) -> None:
    assert devices.pumps is not None
    await devices.pumps.pump[reagent].rate.set(ml_min)


def pumps_truth(lab: LabThread) -> dict[str, tuple[str, float]]:
    sim = cast(PumpNetworkSimulator, lab.lab.simulators["pumps"])

    def read() -> dict[str, tuple[str, float]]:
        return {p.reagent: (p.state, p.delivered_true_ml) for p in sim.pumps.values()}

    result: dict[str, tuple[str, float]] = lab.call(read)
    return result


def test_prepare_electrolyte_doses_by_weight_and_records_the_composition(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    docs: Docs = []
    result = RE(
        prepare_electrolyte(
            devices,
            "EC0.3:PC0.1:EMC0.6+LiPF6 1.2m",
            vial_station="rack/2",
            campaign_id="C-7",
            operator="ada",
            mix_time_s=60,
            equilibrate_s=60,
            time_scale=SPEED,
        ),
        lambda n, d: docs.append((n, d)),
    )
    out = result.plan_result  # type: ignore[union-attr]
    start, stop = only(docs, "start"), only(docs, "stop")
    assert stop["exit_status"] == "success"
    assert start["plan_name"] == "prepare_electrolyte"
    assert (start["campaign_id"], start["operator"]) == ("C-7", "ada")
    assert start["sample_id"] == out["sample_id"]
    assert start["sample_id"].startswith("S-")
    assert start["components"]["PC"] == "CC1COC(=O)O1"
    assert start["recipe"]["fractions"] == {"EC": 0.3, "PC": 0.1, "EMC": 0.6}
    assert start["plan_args"]["vial_station"] == "rack/2"
    # Declared streams come before any event, in order.
    names = [d["name"] for n, d in docs if n == "descriptor"]
    assert names == ["dosing", "doses", "composition"]
    first_event = next(i for i, (n, _) in enumerate(docs) if n == "event")
    assert max(i for i, (n, _) in enumerate(docs) if n == "descriptor") < first_event
    # Target vs actual: every dose within tolerance, by the balance; one event each.
    doses = events(docs, "doses")
    assert [d["reagent"] for d in doses] == ["LiPF6-EC", "EC", "LiPF6-PC", "PC", "LiPF6-EMC", "EMC"]
    assert all(abs(d["error_g"]) <= 0.003 and d["within_tolerance"] for d in doses)
    assert {d["reagent"]: d["target_g"] for d in doses} == pytest.approx(start["target_doses_g"])
    # Every weighing is an event that names its dose; corrections happened.
    dosing = events(docs, "dosing")
    assert {d["reagent"] for d in dosing} >= {"EC", "PC", "EMC"}
    assert all(d["dose_step"] >= 0 for d in dosing)
    assert sum(d["steps"] for d in doses) >= len(doses) + 1
    # The achieved composition: what the balance says, and what is really in the vial.
    (comp,) = events(docs, "composition")
    truth = lab.call(lab.world.snapshot)["vials"]["V02"]
    assert truth["station"] == "rack/2"
    assert comp["salt_molality"] == pytest.approx(1.2, abs=0.01)
    assert comp["salt_molality"] == pytest.approx(truth["salt_molality"], abs=0.01)
    for solvent, w in {"EC": 0.3, "PC": 0.1, "EMC": 0.6}.items():
        assert comp[f"fraction_{solvent}"] == pytest.approx(w, abs=0.003)
        assert comp[f"target_fraction_{solvent}"] == w
        assert truth["fractions"][solvent] == pytest.approx(w, abs=0.005)
    assert comp["fraction_DMC"] == 0.0
    assert out["within_tolerance"] is True
    assert out["liquid_g"] == pytest.approx(truth["liquid_g"], abs=0.01)
    assert truth["mixed"] > 0.95  # stirred


def test_measure_conductivity_equilibrates_at_each_temperature(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    RE(prepare_electrolyte(devices, "EC0.5:DMC0.5+LiPF6 1.0m", mix_time_s=60, time_scale=SPEED))
    docs: Docs = []
    result = RE(
        measure_conductivity(
            devices, "S-42", [15.0, 35.0], dwell_s=120, reading_interval_s=20, time_scale=SPEED
        ),
        lambda n, d: docs.append((n, d)),
    )
    out = result.plan_result  # type: ignore[union-attr]
    start = only(docs, "start")
    assert start["sample_id"] == "S-42"
    assert start["temperatures_c"] == [15.0, 35.0]
    assert start["equilibration"]["window"] == 3
    points = events(docs, "conductivity")
    assert [p["setpoint_c"] for p in points] == [15.0, 35.0]
    truth = lab.call(lab.world.snapshot)["vials"]["V01"]
    assert truth["station"] == "rack/1"
    readings = events(docs, "conductivity_readings")
    for p in points:
        assert p["equilibrated"] and p["stable"]
        assert p["spread_pct"] <= 2.0
        assert p["temperature_c"] == pytest.approx(p["setpoint_c"], abs=0.5)
        model = landesfeind_blend(truth["fractions"], truth["salt_molality"], p["temperature_c"])
        assert p["conductivity_mS_cm"] == pytest.approx(model, rel=0.02)
        mine = [r for r in readings if r["setpoint_c"] == p["setpoint_c"]]
        assert len(mine) == p["readings"] >= 3
        assert all(r["chamber-setpoint"] == p["setpoint_c"] for r in mine)
    assert points[1]["conductivity_mS_cm"] > 1.2 * points[0]["conductivity_mS_cm"]
    assert out["points"] == [{k: v for k, v in p.items() if k != "sample_id"} for p in points]


def pause_during_first_move_of(
    RE: RunEngine, device: str, when: Callable[[], bool] | None = None
) -> list[threading.Thread]:
    """Request a pause once the RunEngine has started moving ``device``: 0.1 s later (so
    the pause lands while it waits for the move, where a cancellation always gets
    through), or as soon as ``when()`` holds (polled; 10 s at most)."""
    threads: list[threading.Thread] = []

    def pause_soon() -> None:
        if when is None:
            time.sleep(0.1)
        else:
            deadline = time.monotonic() + 10
            while not when():
                assert time.monotonic() < deadline, "the pause condition never held"
                time.sleep(0.002)
        RE.request_pause()  # type: ignore[no-untyped-call]

    def hook(msg: Msg) -> None:
        if msg.command == "set" and getattr(msg.obj, "name", "") == device and not threads:
            threads.append(threading.Thread(target=pause_soon))
            threads[0].start()

    RE.msg_hook = hook  # type: ignore[assignment]
    return threads


def test_pause_mid_dispense_stops_the_pump_and_resume_completes_the_dose(
    lab: LabThread, devices: LabDevices, RE: RunEngine, call: Callable[..., Any]
) -> None:
    call(set_rate(devices, "EC", 0.3))  # a long dispense to pause in
    paused = pause_during_first_move_of(RE, "pumps-pump-EC")
    docs: Docs = []
    with pytest.raises(RunEngineInterrupted):
        RE(
            prepare_electrolyte(devices, "EC1.0", mix_time_s=0, equilibrate_s=0, time_scale=SPEED),
            lambda n, d: docs.append((n, d)),
        )
    paused[0].join()
    assert RE.state == "paused"
    state, delivered = pumps_truth(lab)["EC"]
    assert state == "S"  # the RunEngine stopped the pump
    assert 0.05 < delivered < 0.97 * 4.0 / 1.321  # part of the first dispense
    time.sleep(0.3)
    assert pumps_truth(lab)["EC"] == (state, delivered)  # and it stays stopped
    RE.msg_hook = None
    result = RE.resume()  # type: ignore[no-untyped-call]
    assert result.exit_status == "success"
    (dose,) = events(docs, "doses")
    assert dose["within_tolerance"]
    assert dose["steps"] >= 2  # the correction dosed what the pause cut short
    truth = lab.call(lab.world.snapshot)["vials"]["V01"]
    assert truth["contents_g"]["EC"] == pytest.approx(4.0, abs=0.004)


def test_pause_during_a_robot_transfer_finishes_it_and_resume_completes_the_plan(
    lab: LabThread, devices: LabDevices, RE: RunEngine
) -> None:
    """A pause lands while the gantry carries the vial to the balance: the transfer
    finishes (the vial is put down, not left in the jaws), the run pauses, and resume
    goes on to dose as if nothing happened."""
    assert devices.robot is not None

    def in_the_jaws() -> bool:  # V01 has left rack/1 and not reached the balance
        return bool(lab.call(lab.world.snapshot)["vials"]["V01"]["station"] == "gripper")

    paused = pause_during_first_move_of(RE, devices.robot.transfer.name, when=in_the_jaws)
    docs: Docs = []
    with pytest.raises(RunEngineInterrupted):
        RE(
            prepare_electrolyte(devices, "EC1.0", mix_time_s=0, equilibrate_s=0, time_scale=SPEED),
            lambda n, d: docs.append((n, d)),
        )
    paused[0].join()
    assert RE.state == "paused"
    world = lab.call(lab.world.snapshot)
    assert world["vials"]["V01"]["station"] == "balance"  # put down, not in the jaws
    RE.msg_hook = None
    result = RE.resume()  # type: ignore[no-untyped-call]
    assert result.exit_status == "success"
    (dose,) = events(docs, "doses")
    assert dose["within_tolerance"]
    truth = lab.call(lab.world.snapshot)["vials"]["V01"]
    assert truth["station"] == "rack/1"
    assert truth["contents_g"]["EC"] == pytest.approx(4.0, abs=0.004)


def test_abort_while_paused_ends_the_run_safely(
    lab: LabThread, devices: LabDevices, RE: RunEngine, call: Callable[..., Any]
) -> None:
    call(set_rate(devices, "DMC", 0.3))
    docs: Docs = []
    pausing = pause_during_first_move_of(RE, "pumps-pump-DMC")
    with pytest.raises(RunEngineInterrupted):
        RE(
            prepare_electrolyte(devices, "DMC1.0", time_scale=SPEED),
            lambda n, d: docs.append((n, d)),
        )
    pausing[0].join()
    RE.msg_hook = None
    assert RE.state == "paused"
    result = RE.abort("operator: wrong vial")  # type: ignore[no-untyped-call]
    assert result.exit_status == "abort"
    stop = only(docs, "stop")
    assert (stop["exit_status"], stop["reason"]) == ("abort", "operator: wrong vial")
    truth = pumps_truth(lab)
    assert all(state == "S" for state, _ in truth.values())
    assert 0.0 < truth["DMC"][1] < 0.97 * 4.0 / 1.063
    assert events(docs, "doses") == []  # the dose never completed
    # The next plan runs: the vial back to its rack.
    assert RE(move_vial(devices, "balance", "rack/1")).exit_status == "success"  # type: ignore[union-attr]
    assert lab.call(lab.world.snapshot)["vials"]["V01"]["station"] == "rack/1"


def test_pump_failure_mid_dispense_fails_the_run_stops_the_pumps_next_plan_runs(
    lab: LabThread, devices: LabDevices, RE: RunEngine, call: Callable[..., Any]
) -> None:
    call(set_rate(devices, "EC", 0.3))
    sim = cast(PumpNetworkSimulator, lab.lab.simulators["pumps"])
    injected = threading.Event()
    started: list[threading.Thread] = []

    def inject_when_running() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if lab.call(lambda: sim.pump("EC").state) == "I":
                # Line noise on the status poll and on the read of the volume after it.
                sim.faults.inject("garbage", count=2)
                injected.set()
                return
            time.sleep(0.002)

    def hook(msg: Msg) -> None:
        if msg.command == "set" and getattr(msg.obj, "name", "") == "pumps-pump-EC" and not started:
            started.append(threading.Thread(target=inject_when_running))
            started[0].start()

    RE.msg_hook = hook  # type: ignore[assignment]
    docs: Docs = []
    with pytest.raises(InstrumentFailedError, match="pumps-pump-EC"):
        RE(
            prepare_electrolyte(devices, "EC1.0", time_scale=SPEED),
            lambda n, d: docs.append((n, d)),
        )
    RE.msg_hook = None
    started[0].join()
    assert injected.is_set()
    stop = only(docs, "stop")
    assert stop["exit_status"] == "fail"
    assert stop["reason"].startswith("ProtocolError: pumps-pump-EC")
    truth = pumps_truth(lab)
    assert all(state == "S" for state, _ in truth.values())
    assert truth["EC"][1] < 0.97 * 4.0 / 1.321  # stopped mid-dispense, not run to the end
    time.sleep(0.3)
    assert pumps_truth(lab)["EC"] == truth["EC"]
    # The next plans run: clear the balance, then make another electrolyte.
    assert RE(move_vial(devices, "balance", "rack/1")).exit_status == "success"  # type: ignore[union-attr]
    call(set_rate(devices, "EC", 5.0))
    again = RE(
        prepare_electrolyte(
            devices, "EC0.5:DMC0.5", vial_station="rack/3", mix_time_s=0, time_scale=SPEED
        )
    )
    assert again.exit_status == "success"  # type: ignore[union-attr]
    assert again.plan_result["within_tolerance"]  # type: ignore[union-attr]
