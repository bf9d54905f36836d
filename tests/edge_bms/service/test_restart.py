"""SIGKILL and restart: ``edge-bms run`` as a subprocess on the machine's Mosquitto with a
SQLite checkpoint, killed midway through a drive cycle and started again. Telemetry keeps
coming while it is dead (the broker queues it for the persistent session). The SOC it
publishes afterwards must stay within 0.5 points of an uninterrupted run over the same
telemetry (the reference: a PackService fed every message in this process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_bms.service.config import CheckpointConfig
from edge_bms.service.core import PackService
from tests.edge_bms.service.brokers import (
    clear_retained,
    collecting,
    config_for,
    kill,
    publisher,
    require_system_broker,
    service_process,
    simulator,
    telemetry_ticks,
    unique_prefix,
    write_config,
)

pytestmark = [pytest.mark.broker, pytest.mark.subprocess]

# 1 Hz telemetry (DT simulated s per tick) sent ~50 ticks per wall second, checkpoints
# every 0.2 wall s: at most ~10 samples are lost with the killed process, as with the
# default interval_s = 10 at 1 Hz in the field.
N_TICKS, KILL_AT, DT = 240, 120, 1.0


async def test_soc_continues_after_sigkill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = require_system_broker()
    sim = simulator(unique_prefix(), n_packs=2, n_cells=8, seed=3)
    prefix = sim.config.topic_prefix
    db = tmp_path / "state.sqlite"
    config = config_for(
        sim,
        url,
        broker={"qos": 1},
        checkpoint={"path": str(db), "interval_s": 0.2},
        estimator={"correction": "default", "sop_interval_s": 10.0},
    )
    cfg = write_config(tmp_path / "service.toml", config)
    ticks = telemetry_ticks(sim, N_TICKS, dt=DT)

    # The uninterrupted run.
    ref = PackService(config.model_copy(update={"checkpoint": CheckpointConfig(path=None)}))
    ref_states: dict[tuple[str, int], dict[str, Any]] = {}
    for tick in ticks:
        for topic, payload in tick:
            for out in ref.handle(topic, payload):
                if out.topic.endswith("/state"):
                    s = json.loads(out.payload)
                    ref_states[(s["pack"], s["seq"])] = s
    assert len(ref_states) == N_TICKS * sim.n_packs

    log = tmp_path / "service.log"
    proc = service_process(cfg, log=log)
    status = f"{prefix}/status/{config.instance}"
    try:
        async with (
            collecting(url, [f"{prefix}/+/state", status]) as col,
            publisher(url) as pub,
        ):

            def status_is(state: str, n: int) -> bool:
                return sum(m.json().get("state") == state for m in col.on(status)) >= n  # type: ignore[no-any-return]

            async def send(ks: range) -> None:
                for k in ks:
                    await asyncio.gather(*(pub.publish(t, p, qos=1) for t, p in ticks[k]))
                    await asyncio.sleep(0.02)

            await col.wait_for(lambda c: status_is("online", 1), 30.0, "the service online")
            await send(range(KILL_AT))
            # Killed while telemetry is still arriving: whatever it estimated after its
            # last checkpoint is lost with it.
            await col.wait_for(
                lambda c: len(c.on("/state")) >= (KILL_AT - 5) * sim.n_packs, 20.0, "states"
            )
            kill(proc)
            n_before = len(col.on("/state"))
            await col.wait_for(lambda c: status_is("offline", 1), 10.0, "the last will")
            sender = asyncio.create_task(send(range(KILL_AT, N_TICKS)))
            proc = service_process(cfg, log=log)
            await sender
            last = [(p, N_TICKS - 1) for p in sim.pack_ids]
            await col.wait_for(
                lambda c: all(
                    any((m.json()["pack"], m.json()["seq"]) == k for m in c.on("/state"))
                    for k in last
                ),
                40.0,
                "the last states after the restart",
            )
            # SIGTERM: checkpoint, retained offline, exit 0.
            proc.terminate()
            rc = await asyncio.to_thread(proc.wait, 15)
            await col.wait_for(lambda c: status_is("offline", 2), 10.0, "the offline status")
    finally:
        kill(proc)
        await clear_retained(url, [status])
    after = [m.json() for m in col.on("/state")[n_before:]]
    errs = []
    for s in after:
        r = ref_states[(s["pack"], s["seq"])]
        errs.append(
            (
                abs(s["pack_soc"] - r["pack_soc"]),
                float(np.max(np.abs(np.subtract(s["soc"], r["soc"])))),
            )
        )
    pack_err = max(e[0] for e in errs)
    cell_err = max(e[1] for e in errs)
    final = {p: ref_states[(p, N_TICKS - 1)]["pack_soc"] for p in sim.pack_ids}
    first_seq = min(s["seq"] for s in after)
    end_err = max(
        abs(s["pack_soc"] - ref_states[(s["pack"], s["seq"])]["pack_soc"])
        for s in after
        if s["seq"] == N_TICKS - 1
    )
    with capsys.disabled():
        print(
            f"\nrestart: killed after tick {KILL_AT} ({n_before} states), first state after "
            f"restart seq {first_seq}; over {len(after)} states after the restart, max |pack "
            f"SOC - uninterrupted| = {100 * pack_err:.3f} points, max per cell "
            f"{100 * cell_err:.3f} points, at the last tick {100 * end_err:.3f} points "
            f"(final reference pack SOC {final})"
        )
    assert rc == 0, log.read_text()[-2000:]
    assert len(after) >= (N_TICKS - KILL_AT) * sim.n_packs - 10
    assert pack_err < 0.005
    assert cell_err < 0.005
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
