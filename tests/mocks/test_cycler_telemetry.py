"""The cycler's MQTT telemetry (contract 5 + ground truth) against the real Mosquitto on
127.0.0.1:1883, and that the instrument keeps working without a broker."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from typing import Any

import aiomqtt
import numpy as np
import pytest

from hardware_mocks.config import ConfigError, parse_lab_config
from hardware_mocks.instruments.cycler import CyclerSimulator
from hardware_mocks.lab import LabThread, SimulatedLab

BROKER = "mqtt://127.0.0.1:1883"
SPEED = 2000.0
PERIOD_S = 10.0


def _lab_toml(name: str, url: str, prefix: str, *, speed: float = SPEED) -> str:
    return f"""
seed = 5
speed = {speed}
[[instruments]]
name = "{name}"
kind = "cycler"
[instruments.options]
channels = 2
initial_soc = 0.9
telemetry_url = "{url}"
telemetry_prefix = "{prefix}"
telemetry_period_s = {PERIOD_S}
"""


class Scpi:
    """A plain SCPI client over the simulator's TCP socket (an independent client)."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("socket://").rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5.0)
        self.buf = b""

    def write(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def query(self, text: str) -> str:
        self.write(text)
        while b"\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        self.sock.close()


def _discharge(scpi: Scpi) -> None:
    """1C (5 A) discharge for 30 min lab time, then 10 min rest, on channel 101 only."""
    scpi.write("CELL:DEF 1001,(@101)")
    scpi.write("SEQ:STEP:DEF 1,1,DISCHARGE,1800,5,2.5")
    scpi.write("SEQ:STEP:DEF 1,2,REST,600")
    scpi.write("CELL:ENAB (@1001),1")
    scpi.write("CELL:INIT (@1001)")
    assert scpi.query("SYST:ERR?") == '+0,"No error"'


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_telemetry_arrives_with_fields_units_seq_lab_time_and_truth() -> None:
    name = f"cyc{uuid.uuid4().hex[:8]}"
    prefix = f"test-{uuid.uuid4().hex[:8]}/bms/v1"
    config = parse_lab_config(_lab_toml(name, BROKER, prefix))
    tele: list[tuple[str, dict[str, Any]]] = []
    truth: list[tuple[str, dict[str, Any]]] = []
    async with aiomqtt.Client("127.0.0.1", 1883) as client:
        await client.subscribe(f"{prefix}/#")
        await client.subscribe(f"sim/v1/{name}-ch1/truth")
        await client.subscribe(f"sim/v1/{name}-ch2/truth")
        with LabThread(config, transport="tcp") as lab:
            scpi = Scpi(lab.urls[name])
            wall0, epoch0 = time.monotonic(), time.time()
            await asyncio.to_thread(_discharge, scpi)

            async def collect() -> None:
                async for m in client.messages:
                    doc = json.loads(m.payload)
                    (truth if m.topic.value.endswith("/truth") else tele).append(
                        (m.topic.value, doc)
                    )
                    if len(truth) >= 2400 / PERIOD_S:  # discharge + rest, lab time
                        return

            await asyncio.wait_for(collect(), 15.0)
            wall = time.monotonic() - wall0
            # the instrument answered all along
            assert (await asyncio.to_thread(scpi.query, "*IDN?")).startswith("Keysight")
            scpi.close()
            sim = lab.lab.simulators[name]
            assert isinstance(sim, CyclerSimulator)
            assert sim.telemetry is not None and sim.telemetry.dropped == 0

    # only the channel with a cell publishes, on contract-5 topics
    assert {t for t, _ in tele} == {f"{prefix}/{name}-ch1/telemetry"}
    assert {t for t, _ in truth} == {f"sim/v1/{name}-ch1/truth"}
    docs = [d for _, d in tele]
    assert all(set(d) == {"ts", "seq", "current_a", "cell_v", "temp_c"} for d in docs)
    seq = np.array([d["seq"] for d in docs])
    assert seq[0] == 0 and np.all(np.diff(seq) == 1)
    ts = np.array([d["ts"] for d in docs])
    # lab time: one period of the lab clock apart, far more than the wall time that passed
    assert np.allclose(np.diff(ts), PERIOD_S, atol=1.0)
    assert ts[-1] - ts[0] > 2000.0 > 50 * wall
    assert abs(ts[0] - epoch0) < 3600.0  # epoch seconds (lab time started at the wall's now)
    cur = np.array([d["current_a"] for d in docs])
    volt = np.array([d["cell_v"][0] for d in docs])
    temp = np.array([d["temp_c"][0] for d in docs])
    on = cur > 1.0
    assert on.sum() >= 170  # 30 min at 1C
    assert np.allclose(cur[on], 5.0, atol=0.005)  # discharge is positive, amperes
    assert np.all(cur[~on] == 0.0)  # resting: the channel is open
    assert np.all((volt > 3.0) & (volt < 4.2))
    assert volt[on].max() < volt[0] + 1e-3  # voltage falls under load
    assert np.all((temp > 20.0) & (temp < 45.0))  # degrees Celsius
    # truth: same seq and ts; SOC follows coulomb counting of the published current
    tdocs = {d["seq"]: d for _, d in truth}
    paired = [(d, tdocs[d["seq"]]) for d in docs if d["seq"] in tdocs]
    assert len(paired) == len(docs) and all(a["ts"] == b["ts"] for a, b in paired)
    soc = np.array([b["soc"] for _, b in paired])
    cap = paired[0][1]["capacity_ah"]
    assert 4.9 < cap <= 5.0
    assert soc[0] == pytest.approx(0.9, abs=0.01)
    # (current held over each period: within the discharge both ends carry 5 A)
    both = on[1:] & on[:-1]
    counted = -cur[1:][both] * np.diff(ts)[both] / 3600.0 / cap
    assert np.diff(soc)[both] == pytest.approx(counted, rel=2e-3)
    total = -(cur[1:] * np.diff(ts)).sum() / 3600.0 / cap
    assert soc[-1] - soc[0] == pytest.approx(total, abs=0.01)  # 30 min at 1C: -0.5
    assert soc[-1] - soc[0] == pytest.approx(-0.5, abs=0.01)


@pytest.mark.timeout(30)
def test_simulator_keeps_answering_when_the_broker_is_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"mqtt://127.0.0.1:{port}"
    config = parse_lab_config(_lab_toml("cycler", url, "bms/v1", speed=500.0))
    with LabThread(config, transport="tcp") as lab:
        scpi = Scpi(lab.urls["cycler"])
        t0 = time.monotonic()
        _discharge(scpi)
        time.sleep(1.0)  # 500 s of lab time (still discharging): samples, broker retried
        v = float(scpi.query("MEAS:CELL:VOLT? (@1001)"))
        i = float(scpi.query("MEAS:CELL:CURR? (@1001)"))
        assert scpi.query("*IDN?").startswith("Keysight")
        assert time.monotonic() - t0 < 5.0
        scpi.close()
        sim = lab.lab.simulators["cycler"]
        assert isinstance(sim, CyclerSimulator)
        assert sim.telemetry is not None
        assert sim.telemetry.failures >= 1 and sim.telemetry.published == 0
        # every sample so far was dropped and counted (two messages each)
        assert sim.telemetry_samples >= 30
        assert sim.telemetry.dropped == 2 * sim.telemetry_samples
    assert 3.0 < v < 4.0 and i == pytest.approx(-5.0, abs=0.01)  # on the wire: charge +


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("telemetry_url", '"http://127.0.0.1:1883"', "mqtt://"),
        ("telemetry_url", '"mqtt://"', "no host"),
        ("telemetry_prefix", '"bms/+/v1"', "topic levels"),
        ("telemetry_period_s", "-5.0", "greater than 0"),
    ],
)
def test_config_error_names_the_field_and_value(option: str, value: str, why: str) -> None:
    text = f"""
[[instruments]]
name = "cycler"
kind = "cycler"
[instruments.options]
{option} = {value}
"""
    with pytest.raises(ConfigError) as err:
        SimulatedLab(parse_lab_config(text))
    msg = str(err.value)
    shown = value.replace('"', "'")  # TOML string -> Python repr
    assert f"instruments[0] ('cycler'): {option} = {shown}:" in msg, msg
    assert why in msg, msg


def test_telemetry_off_by_default_and_direct_construction_checks() -> None:
    lab = SimulatedLab(parse_lab_config('[[instruments]]\nname = "c"\nkind = "cycler"\n'))
    sim = lab.simulators["c"]
    assert isinstance(sim, CyclerSimulator) and sim.telemetry is None
    with pytest.raises(ValueError, match=r"telemetry_period_s = 0\.0: .*greater than 0"):
        CyclerSimulator("c", lab.world, telemetry_period_s=0.0)
