"""The pack telemetry simulator: physics, controller, sensors, faults, truth and MQTT."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hardware_mocks.physics.cell as cm
from hardware_mocks.packs import (
    RECHARGE,
    Fault,
    PackConfigError,
    PackSimConfig,
    PackSimulator,
    load_truth,
    parse_broker_url,
    run_publisher,
)
from hardware_mocks.packs.loads import battery_power_w, speed_trace

BROKER_HOST, BROKER_PORT = "127.0.0.1", 1883
T0 = 1_700_000_000.0


def _sim(**kw: Any) -> PackSimulator:
    base: dict[str, Any] = {"n_packs": 2, "n_cells": 16, "start_ts": T0, "seed": 3}
    return PackSimulator(**{**base, **kw})


# ------------------------------------------------------------------------ config


def test_config_errors_name_field_and_value() -> None:
    with pytest.raises(PackConfigError) as e:
        PackSimConfig.from_mapping({"n_packs": 0, "v_noise_mv": -1.0, "loads": ["teleport"]})
    msg = str(e.value)
    assert "n_packs = 0" in msg
    assert "v_noise_mv = -1.0" in msg
    assert "loads.0 = 'teleport'" in msg
    with pytest.raises(PackConfigError, match=r"initial_soc must be \(low, high\).*\(0\.9, 0\.2\)"):
        PackSimConfig.from_mapping({"initial_soc": [0.9, 0.2]})
    with pytest.raises(PackConfigError, match=r"v_max = 4\.5"):
        PackSimConfig.from_mapping({"v_max": 4.5})
    with pytest.raises(PackConfigError, match="bogus"):
        PackSimulator(bogus=1)
    assert PackSimConfig(n_packs=3, pack_id_prefix="p").pack_ids == ["p000", "p001", "p002"]
    assert PackSimConfig(n_cells=96, cells_per_temp_sensor=12).n_temp_sensors == 8
    assert PackSimConfig(n_cells=100, cells_per_temp_sensor=12).n_temp_sensors == 9


# ------------------------------------------------------------------------ physics


def test_soc_falls_by_charge_over_capacity() -> None:
    sim = _sim(loads=["constant"], constant_c_rate=1.0, initial_soc=(0.6, 0.6), max_step_s=1.0)
    soc0, cap = sim.soc.copy(), sim.capacity_ah.copy()
    sim.advance(1.0)
    i = sim.current_a
    assert np.allclose(i, 5.0, rtol=1e-12)  # 1 C of 5 Ah, nothing derated
    expected = i[:, None] * 1.0 / 3600.0 / cap
    assert np.allclose((soc0 - sim.soc) / expected, 1.0, rtol=0, atol=1e-6)
    # Sub-steps: the recorded mean current over the advance carries the charge.
    sim = _sim(loads=["constant"], constant_c_rate=0.7, initial_soc=(0.6, 0.6), max_step_s=0.25)
    soc0 = sim.soc.copy()
    sim.advance(10.0)  # 40 sub-steps
    i_mean = sim.truth().current_a[-1]
    assert np.allclose(i_mean, 3.5, rtol=1e-12)
    expected = i_mean[:, None] * 10.0 / 3600.0 / sim.capacity_ah
    assert np.allclose((soc0 - sim.soc) / expected, 1.0, rtol=0, atol=1e-6)
    # A drive cycle, step by step, both signs: charge is stored with coulombic efficiency.
    sim = _sim(loads=["drive"], initial_soc=(0.7, 0.7))
    signs = set()
    for _ in range(400):
        soc0 = sim.soc.copy()
        sim.advance(1.0)
        i = sim.current_a[:, None]
        eta = np.where(i < 0.0, sim.params.coulombic_efficiency, 1.0)
        expected = i * eta / 3600.0 / sim.capacity_ah
        moving = np.abs(i[:, 0]) > 1e-3
        ratio = (soc0 - sim.soc)[moving] / expected[moving]
        assert np.allclose(ratio, 1.0, rtol=0, atol=1e-6)
        signs.update(np.sign(i[moving, 0]).tolist())
    assert signs == {-1.0, 1.0}


def test_series_string_same_current_and_voltage_limits() -> None:
    # Nearly empty packs under a hard drive and CC, nearly full packs with strong regen.
    cfg = {"n_cells": 12, "peak_c_rate": 4.0, "constant_c_rate": 2.0, "capacity_spread": 0.03}
    low = _sim(loads=["drive", "constant"], initial_soc=(0.05, 0.08), **cfg)
    high = _sim(loads=["urban", "pulse"], initial_soc=(0.97, 1.0), **cfg)
    modes = []
    for sim in (low, high):
        for _ in range(900):
            sim.advance(1.0)
            modes.append(sim.mode.copy())
        tr = sim.truth()
        assert tr.cell_v.min() >= sim.config.v_min - 1e-6
        assert tr.cell_v.max() <= sim.config.v_max + 1e-6
        # The limit was reached (so the controller is what kept it): v_min when nearly
        # empty, v_max (regen, charge pulses) when nearly full.
        if sim is low:
            assert tr.cell_v.min() < sim.config.v_min + 1e-3
        else:
            assert tr.cell_v.max() > sim.config.v_max - 1e-3
        # A series string: every cell moved the same charge (SOC * capacity) each step.
        dq = np.diff(tr.soc * tr.capacity_ah, axis=0)
        discharge = tr.current_a[1:] >= 0  # charging stores only eta of it, same for all
        assert np.allclose(dq, dq[:, :, :1], atol=1e-12)
        assert discharge.any()
    # Both empty packs stopped discharging and went to recharge.
    assert np.array(modes[:900]).max(axis=0).tolist() == [RECHARGE, RECHARGE]
    assert low.soc[1].min() > 0.05


def test_variation_seeded_and_reproducible() -> None:
    kw: dict[str, Any] = {"n_packs": 8, "n_cells": 100, "start_ts": T0}
    a, b = PackSimulator(seed=5, **kw), PackSimulator(seed=5, **kw)
    c = PackSimulator(seed=6, **kw)
    assert np.array_equal(a.soc, b.soc)
    assert np.array_equal(a.capacity_ah, b.capacity_ah)
    assert np.array_equal(a.resistance_factor, b.resistance_factor)
    assert not np.array_equal(a.capacity_ah, c.capacity_ah)
    # Spreads as configured (800 cells): capacity 1 %, R0 5 %, SOC 0.01 within a pack.
    assert np.std(a.capacity_ah / 5.0) == pytest.approx(0.01, rel=0.15)
    assert np.std(a.resistance_factor) == pytest.approx(0.05, rel=0.15)
    assert np.mean(np.std(a.soc, axis=1)) == pytest.approx(0.01, rel=0.15)
    # The resistance spread is real: a cell's IR drop under 1 C follows its factor.
    for s in (a, b):
        s.advance(5.0)
    assert np.array_equal(a.cell_v, b.cell_v)
    assert np.array_equal(a.telemetry()[0].payload["cell_v"], b.telemetry()[0].payload["cell_v"])
    sim = PackSimulator(seed=5, n_packs=1, n_cells=200, loads=["constant"], constant_c_rate=1.0,
                        initial_soc=(0.5, 0.5), soc_spread=0.0, capacity_spread=0.0)  # fmt: skip
    # the factor is R0 itself over the design's R0 (not only correlated with it)
    design = cm.resistances(cm.init_state(1, params=sim.params), sim.params)[0]
    np.testing.assert_allclose(
        cm.resistances(sim.state, sim.params)[0] / design, sim.resistance_factor.ravel(), rtol=1e-9
    )
    ocv_v = sim.cell_v.copy()
    sim.advance(0.1)
    drop = (ocv_v - sim.cell_v)[0]
    assert np.corrcoef(drop, sim.resistance_factor[0])[0, 1] > 0.95


def test_temperature_rises_under_load_and_not_at_rest() -> None:
    sim = _sim(loads=["constant", "rest"], constant_c_rate=2.0, initial_soc=(0.9, 0.9),
               ambient_c=20.0, max_step_s=5.0)  # fmt: skip
    sim.advance(600.0)
    loaded, idle = sim.temp_c
    assert loaded.min() > 20.0 + 2.0  # 10 A through ~25 mOhm for 10 min
    assert np.allclose(idle, 20.0, atol=1e-3)
    # Hotter cells are the more resistive ones (same current, I^2 R).
    assert np.corrcoef(loaded, sim.resistance_factor[0])[0, 1] > 0.8


def test_drive_cycle_has_traction_and_regen() -> None:
    v = speed_trace("urban", seed=1, duration_s=1800)
    assert v.shape == (1800,)
    assert v.max() < 60 / 3.6 and np.mean(v == 0.0) > 0.1  # stop and go
    hw = speed_trace("highway", seed=1, duration_s=1800)
    assert hw.max() > 80 / 3.6
    p = battery_power_w(v)
    assert p.max() > 10_000 and p.min() < -2_000  # acceleration and braking
    sim = _sim(n_packs=4, loads=["drive"], initial_soc=(0.6, 0.6))
    demands = []
    for _ in range(300):
        sim.advance(1.0)
        demands.append(sim.current_a.copy())
    d = np.array(demands)
    assert d.max() > 3.0 and d.min() < -1.0
    # Phase offsets: the packs do not run the same trace in lock step.
    assert not np.allclose(d[:, 0], d[:, 1])


# ------------------------------------------------------------------------ telemetry


def test_telemetry_schema_seq_and_ts() -> None:
    sim = _sim(n_packs=3, n_cells=20, cells_per_temp_sensor=8, topic_prefix="lab/bms/")
    seen: dict[str, list[dict[str, Any]]] = {}
    for _ in range(5):
        for m in sim.telemetry():
            data = json.loads(m.json())
            assert data == m.payload
            assert m.topic == f"lab/bms/{m.pack_id}/telemetry"
            assert set(data) == {"ts", "seq", "current_a", "cell_v", "temp_c"}
            assert isinstance(data["ts"], float) and isinstance(data["seq"], int)
            assert isinstance(data["current_a"], float)
            assert len(data["cell_v"]) == 20 and len(data["temp_c"]) == 3
            assert all(isinstance(x, float) for x in data["cell_v"] + data["temp_c"])
            seen.setdefault(m.pack_id, []).append(data)
        sim.advance(2.0)
    assert sorted(seen) == ["pack-000", "pack-001", "pack-002"]
    for msgs in seen.values():
        assert [d["seq"] for d in msgs] == [0, 1, 2, 3, 4]
        assert np.allclose(np.diff([d["ts"] for d in msgs]), 2.0)
        assert msgs[0]["ts"] == T0
    assert len(sim.telemetry()[0].json()) < 1000


def test_sensor_noise_quantization_and_errors() -> None:
    sim = _sim(n_packs=4, n_cells=50, loads=["constant"], v_noise_mv=2.0, i_noise_a=0.02,
               t_noise_c=0.1, t_offset_c=0.5, cells_per_temp_sensor=50)  # fmt: skip
    sim.advance(1.0)
    errs, i_res, t_err = [], [], []
    for _ in range(200):  # sensors only; the physics stays where it is
        i, v, t = sim.measure()
        assert np.allclose(v * 1000.0, np.round(v * 1000.0), atol=1e-6)  # 1 mV steps
        errs.append(v - sim.cell_v)
        i_res.append(i - (sim.current_a * sim.i_gain + sim.i_offset_a))
        t_err.append(t[:, 0] - sim.temp_c.mean(axis=1))
    e = np.array(errs)
    # Gaussian 2 mV plus uniform quantization of 1 mV: sqrt(4 + 1/12) mV.
    assert np.std(e) * 1000 == pytest.approx(np.sqrt(4 + 1 / 12), rel=0.05)
    assert abs(np.mean(e)) < 1e-4
    assert np.std(i_res) == pytest.approx(0.02, rel=0.1)
    # Fixed current gain errors and offsets differ per pack; temperature offsets persist.
    assert np.std(sim.i_gain) > 0 and np.std(sim.i_offset_a) > 0
    te = np.array(t_err)
    assert np.allclose(te.mean(axis=0), sim.t_offset_c[:, 0], atol=0.03)
    quiet = _sim(v_noise_mv=0.0, i_noise_a=0.0, i_gain_error=0.0, i_offset_a=0.0)
    quiet.advance(3.0)
    i, v, _ = quiet.measure()
    assert np.allclose(v, np.round(quiet.cell_v, 3), atol=1e-9)
    assert np.allclose(i, quiet.current_a, atol=1e-4)


# ------------------------------------------------------------------------ faults


def _cells(sim: PackSimulator, pack: str) -> list[float] | None:
    for m in sim.telemetry():
        if m.pack_id == pack:
            return list(m.payload["cell_v"])
    return None


def test_stuck_sensor_freezes_one_cell() -> None:
    sim = _sim(loads=["constant"], constant_c_rate=1.0)
    before = _cells(sim, "pack-001")
    assert before is not None
    sim.inject("pack-001", Fault.STUCK, cell=4, duration_s=100.0)
    readings = []
    for _ in range(50):
        sim.advance(1.0)
        cells = _cells(sim, "pack-001")
        assert cells is not None
        readings.append(cells)
    r = np.array(readings)
    assert np.all(r[:, 4] == before[4])  # frozen while the true voltage moves
    assert sim.cell_v[1, 4] < before[4] - 0.02
    assert np.std(r[:, 5]) > 0.001  # its neighbour still reads live values
    sim.advance(60.0)  # past the duration
    cells = _cells(sim, "pack-001")
    assert cells is not None and abs(cells[4] - sim.cell_v[1, 4]) < 0.015
    assert sim.active_faults == []


def test_dropout_skips_messages_and_leaves_a_seq_gap() -> None:
    sim = _sim(n_packs=3)
    sim.inject(1, "dropout", duration_s=3.0)
    got: dict[str, list[int]] = {}
    for _ in range(6):
        for m in sim.telemetry():
            got.setdefault(m.pack_id, []).append(m.payload["seq"])
        sim.advance(1.0)
    assert got["pack-000"] == [0, 1, 2, 3, 4, 5]
    assert got["pack-001"] == [3, 4, 5]
    tr = sim.truth()
    assert tr.faults == [
        {"id": 1, "pack_id": "pack-001", "fault": "dropout", "cell": None,
         "start_t_s": 0.0, "end_t_s": 3.0}
    ]  # fmt: skip


def test_noise_burst_raises_noise_on_one_cell() -> None:
    sim = _sim(loads=["rest"], v_noise_mv=2.0)
    sim.inject(0, "noise_burst", cell=7, sigma_mv=80.0)
    v = np.array([sim.measure()[1] for _ in range(200)])
    err = v - sim.cell_v
    assert np.std(err[:, 0, 7]) == pytest.approx(0.080, rel=0.15)
    assert np.std(err[:, 0, 6]) < 0.003 and np.std(err[:, 1, 7]) < 0.003
    assert sim.clear(0, "noise_burst") == 1
    v = np.array([sim.measure()[1] for _ in range(100)])
    assert np.std(v[:, 0, 7] - sim.cell_v[0, 7]) < 0.003
    sim.inject(1, Fault.NOISE_BURST)  # whole pack
    v = np.array([sim.measure()[1] for _ in range(100)])
    assert np.all(np.std(v[:, 1] - sim.cell_v[1], axis=0) > 0.02)


def test_open_wire_reads_zero_and_neighbour_reads_the_sum() -> None:
    sim = _sim(n_cells=8)
    true = sim.cell_v.copy()
    sim.inject(0, Fault.OPEN_WIRE, cell=3)
    sim.inject(1, Fault.OPEN_WIRE, cell=7)  # the last cell: its lower neighbour reads the sum
    _, v, _ = sim.measure()
    assert 0.0 <= v[0, 3] <= 0.051
    assert v[0, 4] == pytest.approx(true[0, 3] + true[0, 4] - v[0, 3], abs=0.015)
    assert v[1, 6] == pytest.approx(true[1, 6] + true[1, 7] - v[1, 7], abs=0.015)
    assert v[0].sum() == pytest.approx(true[0].sum(), abs=0.03)  # the string total holds
    assert np.all(np.abs(np.delete(v[0], [3, 4]) - np.delete(true[0], [3, 4])) < 0.012)
    assert sim.clear() == 2
    _, v, _ = sim.measure()
    assert np.all(np.abs(v - true) < 0.012)


def test_inject_rejects_bad_arguments() -> None:
    sim = _sim()
    with pytest.raises(ValueError, match="needs a cell"):
        sim.inject(0, "stuck")
    with pytest.raises(ValueError, match="whole pack"):
        sim.inject(0, "dropout", cell=1)
    with pytest.raises(ValueError, match=r"cell must be within 0\.\.15, got 16"):
        sim.inject(0, "open_wire", cell=16)
    with pytest.raises(ValueError, match="unknown pack 'pack-009'"):
        sim.inject("pack-009", "dropout")
    with pytest.raises(ValueError, match="'melt'"):
        sim.inject(0, "melt")
    with pytest.raises(ValueError, match="duration_s"):
        sim.inject(0, "dropout", duration_s=0.0)


# ------------------------------------------------------------------------ truth


def test_truth_round_trip_npz_and_csv(tmp_path: Path) -> None:
    sim = _sim(n_packs=2, n_cells=5)
    sim.inject(1, "stuck", cell=2, duration_s=2.0)
    for _ in range(4):
        sim.advance(1.5)
    tr = sim.truth()
    assert tr.soc.shape == (5, 2, 5) and tr.current_a.shape == (5, 2) and tr.n_steps == 5
    assert np.allclose(np.diff(tr.t_s), 1.5) and tr.ts[0] == T0
    assert np.array_equal(tr.soc[-1], sim.soc)
    assert tr.pack_soc.shape == (5, 2)
    npz = load_truth(tr.save(tmp_path / "t.npz"))
    for name in ("t_s", "ts", "current_a", "soc", "temp_c", "cell_v", "capacity_ah"):
        assert np.array_equal(getattr(npz, name), getattr(tr, name)), name
    assert npz.pack_ids == tr.pack_ids and npz.faults == tr.faults
    assert npz.faults[0]["end_t_s"] == 2.0
    csv_t = load_truth(tr.save(tmp_path / "t.csv"))
    assert csv_t.pack_ids == ["pack-000", "pack-001"]
    for name in ("t_s", "ts", "current_a", "soc", "temp_c", "cell_v", "capacity_ah"):
        assert np.array_equal(getattr(csv_t, name), getattr(tr, name)), name
    with pytest.raises(ValueError, match=r"\.npz or \.csv"):
        tr.save(tmp_path / "t.txt")
    off = _sim(record_every=0)
    off.advance(1.0)
    assert off.truth().n_steps == 0


# ------------------------------------------------------------------------ MQTT


def test_parse_broker_url() -> None:
    b = parse_broker_url("mqtts://user:p%40ss@broker.example:8884")
    assert (b.host, b.port, b.username, b.password, b.tls) == (
        "broker.example", 8884, "user", "p@ss", True
    )  # fmt: skip
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url("http://127.0.0.1:1883")


def _require_broker() -> None:
    try:
        socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2.0).close()
    except OSError as exc:
        pytest.fail(
            f"no MQTT broker at {BROKER_HOST}:{BROKER_PORT} ({exc}); start Mosquitto "
            "(`mosquitto -d -p 1883`) to run the pack simulator's broker test"
        )


@pytest.mark.broker
async def test_publishes_through_mosquitto() -> None:
    import aiomqtt

    _require_broker()
    prefix = f"test/{uuid.uuid4().hex[:12]}/bms/v1"
    sim = _sim(n_packs=2, n_cells=24, topic_prefix=prefix)
    received: list[tuple[str, dict[str, Any]]] = []
    async with aiomqtt.Client(BROKER_HOST, BROKER_PORT) as sub:
        await sub.subscribe(f"{prefix}/+/telemetry", qos=1)

        async def collect() -> None:
            async for msg in sub.messages:
                assert isinstance(msg.payload, bytes)
                received.append((str(msg.topic), json.loads(msg.payload)))
                if len(received) == 6:
                    return

        task = asyncio.create_task(collect())
        stats = await run_publisher(
            sim, f"mqtt://{BROKER_HOST}:{BROKER_PORT}", rate_hz=20.0, duration=None,
            speed=10.0, qos=1, max_ticks=3,
        )  # fmt: skip
        await asyncio.wait_for(task, 5.0)
    assert stats.ticks == 3 and stats.messages == 6
    assert stats.sim_s == pytest.approx(1.0)  # two advances of 0.5 s
    by_pack: dict[str, list[dict[str, Any]]] = {}
    for topic, data in received:
        assert topic.startswith(prefix + "/") and topic.endswith("/telemetry")
        by_pack.setdefault(topic.split("/")[-2], []).append(data)
    assert sorted(by_pack) == ["pack-000", "pack-001"]
    for msgs in by_pack.values():
        assert [d["seq"] for d in msgs] == [0, 1, 2]
        assert [d["ts"] for d in msgs] == [T0, T0 + 0.5, T0 + 1.0]
        assert all(len(d["cell_v"]) == 24 and len(d["temp_c"]) == 3 for d in msgs)
        assert all(2.8 <= v <= 4.2 for d in msgs for v in d["cell_v"])


@pytest.mark.broker
@pytest.mark.parametrize("phase", ["spread", "synced"])
async def test_packs_publish_at_their_own_phase_or_on_one_tick(phase: str) -> None:
    """spread: 4 packs at 2 Hz arrive ~period/4 = 125 ms apart within a tick (each BMS on
    its own clock); synced: a tick's 4 messages arrive together. ts is the tick's."""
    import aiomqtt

    _require_broker()
    prefix = f"test/{uuid.uuid4().hex[:12]}/bms/v1"
    sim = _sim(n_packs=4, n_cells=8, topic_prefix=prefix)
    arrivals: list[tuple[float, dict[str, Any]]] = []
    async with aiomqtt.Client(BROKER_HOST, BROKER_PORT) as sub:
        await sub.subscribe(f"{prefix}/+/telemetry", qos=0)

        async def collect() -> None:
            async for msg in sub.messages:
                assert isinstance(msg.payload, bytes)
                arrivals.append((time.monotonic(), json.loads(msg.payload)))
                if len(arrivals) == 8:
                    return

        task = asyncio.create_task(collect())
        await run_publisher(
            sim, f"mqtt://{BROKER_HOST}:{BROKER_PORT}", rate_hz=2.0, duration=None,
            qos=0, max_ticks=2, phase=phase,
        )  # fmt: skip
        await asyncio.wait_for(task, 5.0)
    for tick in (0, 1):
        t = sorted(a for a, d in arrivals if d["seq"] == tick)
        assert {d["ts"] for _, d in arrivals if d["seq"] == tick} == {T0 + 0.5 * tick}
        gaps = np.diff(t)
        if phase == "spread":
            assert gaps.min() > 0.08 and t[-1] - t[0] < 0.5, gaps
        else:
            assert t[-1] - t[0] < 0.05, gaps
    with pytest.raises(ValueError, match="phase"):
        await run_publisher(sim, "mqtt://127.0.0.1:1", max_ticks=1, phase="random")
