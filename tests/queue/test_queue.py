"""labctl's plans queued through a real RE Manager (Redis, 0MQ) against the simulated lab.

The manager runs as a subprocess with :mod:`labctl.queue.profile`; its worker connects
to a ``labctl mocks serve`` process over TCP and writes every document to the session's
embedded Tiled server, which the test then reads back. Each manager gets free 0MQ ports
and its own Redis key prefix, so parallel sessions cannot share a queue.
"""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine
from bluesky_queueserver.manager.profile_ops import (  # type: ignore[import-untyped]
    existing_plans_and_devices_from_nspace,
)
from bluesky_queueserver_api import BPlan  # type: ignore[import-untyped]
from bluesky_queueserver_api.comm_base import RequestFailedError  # type: ignore[import-untyped]
from typer.testing import CliRunner

from labctl.cli.queue import queue as cli
from labctl.data import DataConfig, ServerRecord, open_store
from labctl.plans.common import PlanParameterError
from labctl.plans.registry import PLANS
from labctl.plans.session import LabSession, mock_lab
from labctl.queue import QueueConfig, QueueError, QueueManager, add_plan, clear_queue_keys
from labctl.queue.plans import queue_plans, queue_signature
from labctl.recipes import default_reagents
from labctl.simlab import SimulatedLabProcess
from tests.data import session_server

ROOT = Path(__file__).resolve().parents[2]
SPEED = 1000.0
runner = CliRunner()


@pytest.fixture(scope="module")
def sqlite_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ServerRecord]:
    return session_server(request, tmp_path_factory, "sqlite")


@pytest.fixture(scope="module")
def manager(sqlite_server: tuple[DataConfig, ServerRecord]) -> Iterator[tuple[QueueConfig, Any]]:
    """A running RE Manager with its environment open, and its API client."""
    config, _ = sqlite_server
    queue = QueueConfig.unique("labctl_test")
    env = {"LABCTL_DATA": str(config.directory)}
    with ExitStack() as stack:
        stack.callback(clear_queue_keys, queue)  # after the manager stopped
        lab = stack.enter_context(SimulatedLabProcess(transport="tcp", speed=SPEED))
        control = str(lab.records[0]["control"])
        m = stack.enter_context(
            QueueManager(queue, lab=control, speed=SPEED, env=env, keep_log=False)
        )
        api = stack.enter_context(queue.connect())
        api.environment_open()
        api.wait_for_idle(timeout=60)
        assert api.status()["worker_environment_exists"], m.tail()
        yield queue, api
        api.environment_close()
        api.wait_for_idle(timeout=30)


def test_every_plan_has_a_signature_queueserver_accepts() -> None:
    for spec in PLANS.values():
        for p in queue_signature(spec).parameters.values():
            if p.default is not p.empty:
                ast.literal_eval(repr(p.default))  # what queueserver requires of defaults
    engine = RunEngine({}, context_managers=[])
    session = LabSession(
        devices=mock_lab(engine),
        reagents=default_reagents(),
        time_scale=1.0,
        records=[],
        source="mock",
        RE=engine,
    )
    plans, _, _, _ = existing_plans_and_devices_from_nspace(
        nspace=queue_plans(session), ignore_invalid_plans=False
    )
    assert sorted(plans) == sorted([*PLANS, "noop"])
    params = {p["name"]: p for p in plans["prepare_electrolyte"]["parameters"]}
    assert "default" not in params["recipe"]  # required
    assert params["tolerance_g"]["default"] == "0.003"
    assert params["tolerance_g"]["annotation"]["type"] == "float"
    assert (float(params["tolerance_g"]["min"]), float(params["tolerance_g"]["max"])) == (0, 0.5)
    cycle = {p["name"]: p for p in plans["cycle_cell"]["parameters"]}
    assert set(cycle) == set(PLANS["cycle_cell"].params.model_fields)


def test_invalid_parameters_are_refused_before_queueing(
    manager: tuple[QueueConfig, Any],
) -> None:
    _, api = manager
    before = api.queue_get()["items"]
    with pytest.raises(PlanParameterError) as err:
        add_plan(api, "prepare_electrolyte", {"recipe": "EC1.0+LiPF6 1m", "tolerance_g": -1})
    assert "tolerance_g = -1" in str(err.value)
    with pytest.raises(PlanParameterError) as err:
        add_plan(api, "measure_conductivity", {"temperatures": [25.0], "window": 1})
    assert "window = 1" in str(err.value)
    with pytest.raises(KeyError, match="unknown plan 'calibrate'"):
        add_plan(api, "calibrate")
    # The manager's own check, for clients that skip add_plan: names and builtin types.
    with pytest.raises(RequestFailedError, match="unexpected keyword argument 'speed'"):
        api.item_add(BPlan("move_vial", source="rack/1", destination="meter", speed=3))
    with pytest.raises(RequestFailedError, match="tolerance_g") as failed:
        api.item_add(BPlan("prepare_electrolyte", recipe="EC1.0", tolerance_g="lots"))
    assert "lots" in str(failed.value)
    # ... and numeric bounds, from the same pydantic model (queue_ranges).
    with pytest.raises(RequestFailedError, match="out of range: key='tolerance_g'"):
        api.item_add(BPlan("prepare_electrolyte", recipe="EC1.0", tolerance_g=-1))
    with pytest.raises(RequestFailedError, match="out of range: key='channel'"):
        api.item_add(BPlan("cycle_cell", channel=0))
    assert api.queue_get()["items"] == before


def test_three_plans_run_from_the_queue_and_land_in_tiled(
    manager: tuple[QueueConfig, Any], sqlite_server: tuple[DataConfig, ServerRecord]
) -> None:
    _, api = manager
    campaign = f"Q-{uuid.uuid4().hex[:10]}"
    common = {"campaign_id": campaign, "sample_id": "S-Q1"}
    add_plan(
        api,
        "prepare_electrolyte",
        {"recipe": "EC0.5:DMC0.5+LiPF6 1.0m", "vial_station": "rack/4", "mix_time_s": 30,
         "equilibrate_s": 30, **common},
    )  # fmt: skip
    add_plan(
        api,
        "measure_conductivity",
        {"vial_station": "rack/4", "temperatures": [25.0], "dwell_s": 30,
         "reading_interval_s": 10, **common},
    )  # fmt: skip
    add_plan(api, "move_vial", {"source": "rack/2", "destination": "meter", **common})
    assert len(api.queue_get()["items"]) == 3
    api.queue_start()
    api.wait_for_idle(timeout=100)
    history = api.history_get()["items"][-3:]
    assert [h["name"] for h in history] == ["prepare_electrolyte", "measure_conductivity",
                                           "move_vial"]  # fmt: skip
    assert [h["result"]["exit_status"] for h in history] == ["completed"] * 3, [
        h["result"].get("msg") for h in history
    ]
    uids = [h["result"]["run_uids"][0] for h in history]
    with open_store(sqlite_server[0]) as store:
        runs = store.runs(campaign=campaign)
        assert sorted(r.uid for r in runs) == sorted(uids)
        assert {r.plan_name for r in runs} == {"prepare_electrolyte", "measure_conductivity",
                                               "move_vial"}  # fmt: skip
        assert all(r.exit_status == "success" for r in runs)
        doses = store.read(uids[0], "doses")
        assert len(doses) == 4
        conductivity = store.run(uids[1])
        assert conductivity.summary.sample_id == "S-Q1"


def test_noop_round_trip(manager: tuple[QueueConfig, Any]) -> None:
    """Time from item_add + queue_start to completion seen by the API (the report's figure)."""
    queue, default_api = manager
    # The API's default status polling (0.5 s) dominates; a 10 ms poll shows the manager's.
    medians = {}
    with queue.connect(status_polling_period=0.01, status_expiration_period=0.01) as fast:
        for label, api in (("default polling", default_api), ("10 ms polling", fast)):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                add_plan(api, "noop")
                api.queue_start()
                api.wait_for_idle(timeout=20)
                times.append(time.perf_counter() - t0)
                assert api.history_get()["items"][-1]["result"]["exit_status"] == "completed"
            times.sort()
            medians[label] = times[2]
            print(f"noop round trip ({label}): median {times[2] * 1000:.0f} ms, "
                  f"min {times[0] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms")  # fmt: skip
    assert medians["10 ms polling"] < 1.0
    assert medians["default polling"] < 3.0


def test_a_manager_that_cannot_start_says_why() -> None:
    queue = QueueConfig.unique("labctl_test", redis_addr="127.0.0.1:1")
    manager = QueueManager(queue, lab="tcp://127.0.0.1:1", start_timeout=20, keep_log=False)
    with pytest.raises(QueueError, match=r"no Redis at 127\.0\.0\.1:1 for the queue"):
        manager.start()
    assert manager.proc is None  # refused before starting anything


def test_cli_add_validates_then_queues_and_status_shows_it(
    manager: tuple[QueueConfig, Any],
) -> None:
    queue, api = manager
    ports = ["--control-port", str(queue.control_port), "--info-port", str(queue.info_port)]
    refused = runner.invoke(cli, ["add", "measure_conductivity", "window=1", *ports])
    assert refused.exit_code == 2
    assert "window = 1" in refused.output
    unknown = runner.invoke(cli, ["add", "move_vial", "source=rack/1", "speed=3", *ports])
    assert unknown.exit_code == 2
    assert "speed = '3': unknown parameter" in unknown.output
    assert api.queue_get()["items"] == []
    added = runner.invoke(cli, ["add", "move_vial", "source=rack/3", "destination=balance", *ports])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout.splitlines()[-1])["kwargs"] == {
        "source": "rack/3",
        "destination": "balance",
    }
    shown = runner.invoke(cli, ["status", "--json", *ports])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.stdout)
    assert status["environment_open"] is True
    assert status["items_in_queue"] == 1
    assert status["queue"] == [
        {"name": "move_vial", "kwargs": {"source": "rack/3", "destination": "balance"}}
    ]
    assert "prepare_electrolyte" in status["plans"]
    api.queue_clear()


def _group_alive(pgid: int) -> list[int]:
    """PIDs of live (not zombie) processes in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ")"
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_a_manager_killed_on_stop_leaves_no_process_behind(
    sqlite_server: tuple[DataConfig, ServerRecord],
) -> None:
    """start-re-manager forks its manager and worker processes, which ignore SIGTERM: a
    stop that has to kill (timeout 0 here: a manager stuck shutting down) must take the
    whole process group, not only the process it started (which left two orphans)."""
    config, _ = sqlite_server
    queue = QueueConfig.unique("labctl_kill")
    env = {"LABCTL_DATA": str(config.directory)}
    with ExitStack() as stack:
        stack.callback(clear_queue_keys, queue)
        lab = stack.enter_context(SimulatedLabProcess(transport="tcp", speed=SPEED))
        m = QueueManager(queue, lab=str(lab.records[0]["control"]), speed=SPEED, env=env)
        stack.callback(m.stop)
        m.start()
        assert m.proc is not None
        with queue.connect() as api:
            api.environment_open()
            api.wait_for_idle(timeout=60)
            assert api.status()["worker_environment_exists"], m.tail()
        pgid = m.proc.pid
        assert len(_group_alive(pgid)) >= 3, m.tail()  # watchdog, manager, worker
        m.stop(timeout=0.0)
        deadline = time.monotonic() + 10.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_alive(pgid) == []
        m.log.unlink(missing_ok=True)


def test_cli_start_with_a_lab_file_serves_until_sigterm_and_stop_now_aborts(
    request: pytest.FixtureRequest, sqlite_server: tuple[DataConfig, ServerRecord], tmp_path: Path
) -> None:
    queue = QueueConfig.unique("labctl_cli")
    ports = ["--control-port", str(queue.control_port), "--info-port", str(queue.info_port)]
    request.addfinalizer(lambda: clear_queue_keys(queue))
    lab_toml = tmp_path / "bench-lab.toml"
    lab_toml.write_text((ROOT / "hardware_mocks" / "default_lab.toml").read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "labctl.cli.queue", "start", "--speed", "1000",
         "--lab", str(lab_toml),
         "--prefix", queue.name_prefix, "--data", str(sqlite_server[0].directory), *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # one JSON line once the environment is open
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        assert info["control"] == queue.control_addr
        assert info["prefix"] == queue.name_prefix
        assert info["lab"].startswith("tcp://127.0.0.1:")  # the lab the TOML started
        shown = runner.invoke(cli, ["status", *ports])
        assert shown.exit_code == 0, shown.output
        assert f"{queue.control_addr}: idle, environment open, 0 queued" in shown.stdout
        # `queue stop --now` aborts a running plan (40000 lab s of rest: 40 s at 1000x).
        campaign = f"Q-{uuid.uuid4().hex[:10]}"
        with queue.connect() as api:
            add_plan(api, "prepare_electrolyte", {
                "recipe": "EC1.0", "vial_station": "rack/8", "mix_time_s": 10,
                "equilibrate_s": 40000, "campaign_id": campaign})  # fmt: skip
            api.queue_start()
            api.wait_for_condition(lambda st: st["manager_state"] == "executing_queue", timeout=10)
            time.sleep(3.0)
            stopped = runner.invoke(cli, ["stop", "--now", *ports])
            assert stopped.exit_code == 0, stopped.output
            assert "running plan aborted; queue stopped" in stopped.stdout
            api.wait_for_idle(timeout=30)
            assert api.history_get()["items"][-1]["result"]["exit_status"] == "aborted"
            api.queue_clear()
        with open_store(sqlite_server[0]) as store:
            (run,) = store.runs(campaign=campaign)
            assert run.exit_status == "abort"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "stopped" in err
        Path(info["log"]).unlink()  # the CLI keeps the manager's log for users
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_pause_then_abort_a_queued_plan_and_the_queue_goes_on(
    manager: tuple[QueueConfig, Any], sqlite_server: tuple[DataConfig, ServerRecord]
) -> None:
    """Runs last on the module's lab: the aborted preparation may leave its vial out."""
    _, api = manager
    campaign = f"Q-{uuid.uuid4().hex[:10]}"
    # 40000 s of equilibration: 40 s at 1000x. Pausing there, after the doses (a few
    # seconds), pauses a plain wait rather than a dose in flight.
    add_plan(
        api,
        "prepare_electrolyte",
        {"recipe": "EC1.0+LiPF6 0.5m", "vial_station": "rack/6", "mix_time_s": 10,
         "equilibrate_s": 40000, "campaign_id": campaign},
    )  # fmt: skip
    api.queue_start()
    api.wait_for_condition(lambda st: st["manager_state"] == "executing_queue", timeout=10)
    time.sleep(5.0)
    api.re_pause(option="immediate")
    api.wait_for_idle_or_paused(timeout=30)
    state = api.status()["manager_state"]
    assert state == "paused", api.history_get()["items"][-1]["result"].get("msg")
    api.re_abort()
    api.wait_for_idle(timeout=30)
    result = api.history_get()["items"][-1]["result"]
    assert result["exit_status"] == "aborted"
    with open_store(sqlite_server[0]) as store:
        (run,) = store.runs(campaign=campaign)
        assert run.uid == result["run_uids"][0]
        assert run.exit_status == "abort"
    # The aborted item went back to the front of the queue; the queue still works.
    assert [i["name"] for i in api.queue_get()["items"]] == ["prepare_electrolyte"]
    api.queue_clear()
    add_plan(api, "noop")
    api.queue_start()
    api.wait_for_idle(timeout=20)
    assert api.history_get()["items"][-1]["result"]["exit_status"] == "completed"
