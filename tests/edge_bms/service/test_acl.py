"""Commands are only taken from clients the broker's ACL allows: a private Mosquitto with
a password file (mosquitto_passwd -b) and the shipped deploy/mosquitto/edge_bms.acl."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import aiomqtt
import pytest

from tests.edge_bms.service.brokers import (
    REPO,
    Mosquitto,
    collecting,
    config_for,
    publisher,
    running_service,
    simulator,
    telemetry_ticks,
)

pytestmark = [pytest.mark.broker, pytest.mark.subprocess]

ACL = REPO / "deploy" / "mosquitto" / "edge_bms.acl"
USERS = {"edge-bms": "svc-pw", "operator": "op-pw", "pack-000": "dev-pw", "intruder": "in-pw"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, pw in USERS.items():
        subprocess.run([tool, "-b", str(passwd), user, pw], check=True, capture_output=True)
    m = Mosquitto(
        tmp_path,
        ["allow_anonymous false", f"password_file {passwd}", f"acl_file {ACL}"],
    )
    m.start()
    yield m
    m.stop()


class Creds(TypedDict):
    username: str
    password: str


def _as(user: str) -> Creds:
    return {"username": user, "password": USERS[user]}


async def test_only_the_operator_can_command(broker: Mosquitto) -> None:
    sim = simulator("bms/v1", n_packs=1, n_cells=4)  # the ACL is written for bms/v1
    config = config_for(sim, broker.url, broker=_as("edge-bms"))
    ticks = [tick[0] for tick in telemetry_ticks(sim, 6, dt=2.0)]
    state_t = "bms/v1/pack-000/state"
    cmd_t = "bms/v1/pack-000/cmd/reset_soc"
    reset = json.dumps({"soc": 0.2}).encode()

    async with (
        running_service(config) as (_service, _),
        collecting(broker.url, ["bms/v1/+/state", "bms/v1/+/cmd_ack"], **_as("operator")) as col,
        publisher(broker.url, **_as("pack-000")) as device,
        publisher(broker.url, **_as("intruder")) as intruder,
        publisher(broker.url, **_as("operator")) as operator,
    ):

        async def step(k: int) -> float:
            await device.publish(*ticks[k], qos=1)
            await col.wait_for(lambda c: len(c.on("/state")) == k + 1, 10.0, f"state {k}")
            soc: float = col.on("/state")[-1].json()["pack_soc"]
            return soc

        soc0 = await step(0)
        soc1 = await step(1)
        assert abs(soc0 - 0.2) > 0.1, "pick a simulator seed whose SOC is far from 0.2"
        # Denied publishes are acknowledged (QoS 1) and dropped by the broker.
        await intruder.publish(cmd_t, reset, qos=1)
        await device.publish(cmd_t, reset, qos=1)  # a pack may send telemetry only
        await device.publish(state_t, b'{"pack_soc": 0.99}', qos=1)  # no spoofed state
        soc2 = await step(2)
        assert abs(soc2 - soc1) < 0.02
        assert not col.on("/cmd_ack")
        assert all(m.json()["seq"] in (0, 1, 2) for m in col.on("/state"))
        # Anonymous clients are refused outright.
        with pytest.raises(aiomqtt.MqttError):
            async with publisher(broker.url):
                pass
        # The operator's command is taken.
        await operator.publish(cmd_t, reset, qos=1)
        await col.wait_for(lambda c: bool(c.on("/cmd_ack")), 10.0, "the ack")
        ack = col.on("/cmd_ack")[0].json()
        assert ack["ok"] is True
        soc3 = await step(3)
        assert abs(soc3 - 0.2) < 0.03
