"""The service over TLS (``mqtts://``): a private Mosquitto with a TLS listener and a
certificate chain made here with openssl (a CA, and a server certificate for 127.0.0.1
signed by it). The service verifies the broker against the CA; without the CA, or with
the wrong one, it does not connect (and says why) rather than falling back to plaintext.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.edge_bms.service.brokers import (
    Mosquitto,
    config_for,
    publisher,
    running_service,
    simulator,
    telemetry_ticks,
)

pytestmark = [pytest.mark.broker, pytest.mark.subprocess]


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.fail("openssl is not installed: the TLS test makes its certificates with it")
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True)


def make_chain(d: Path, name: str) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) under ``d/name``: a CA and a server certificate
    for 127.0.0.1 (IP SAN) signed by it, valid for a day."""
    out = d / name
    out.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN=labctl test CA {name}",
             cwd=out)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=out)  # fmt: skip
    (out / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext",
             cwd=out)  # fmt: skip
    return out / "ca.crt", out / "server.crt", out / "server.key"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path, Path]]:
    """A Mosquitto whose only listener speaks TLS; yields it, its CA and another CA."""
    ca, crt, key = make_chain(tmp_path, "good")
    other_ca, _, _ = make_chain(tmp_path, "other")
    m = Mosquitto(
        tmp_path,
        [f"cafile {ca}", f"certfile {crt}", f"keyfile {key}", "allow_anonymous true"],
    )
    m.url = f"mqtts://127.0.0.1:{m.port}"
    m.start()
    yield m, ca, other_ca
    m.stop()


async def test_service_estimates_over_tls_verifying_the_broker(
    tls_broker: tuple[Mosquitto, Path, Path],
) -> None:
    broker, ca, _ = tls_broker
    sim = simulator("tls/bms/v1", n_packs=1, n_cells=4)
    config = config_for(sim, broker.url, broker={"tls": {"ca_file": str(ca)}})
    assert config.broker.use_tls and config.broker.port == broker.port
    ticks = [t[0] for t in telemetry_ticks(sim, 5, dt=2.0)]
    plain = f"mqtt://127.0.0.1:{broker.port}"

    # the test's own clients speak TLS too: a tls_params-capable aiomqtt client
    tls = aiomqtt.TLSParameters(ca_certs=str(ca))
    async with (
        running_service(config) as (service, readies),
        _tls_collector(broker.port, tls, ["tls/bms/v1/+/state"]) as states,
    ):
        assert len(readies) == 1
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_params=tls) as device:
            for topic, payload in ticks:
                await device.publish(topic, payload, qos=1)
        deadline = asyncio.get_running_loop().time() + 10.0
        while len(states) < len(ticks):
            assert asyncio.get_running_loop().time() < deadline, f"{len(states)} states"
            await asyncio.sleep(0.05)
        socs = [json.loads(p)["pack_soc"] for p in states]
        assert all(0.0 <= s <= 1.0 for s in socs)
        assert service.counters["accepted"] == len(ticks)
        assert [json.loads(p)["seq"] for p in states] == list(range(len(ticks)))

    # plaintext to the TLS port does not work: nothing silently downgrades
    with pytest.raises(aiomqtt.MqttError):
        async with publisher(plain) as c:
            await c.publish("x", b"y", qos=1)


# paho drops the socket of a failed TLS handshake without closing it (it is a local in
# its connect; nothing outside can reach it): the collector closes it, with a warning.
# Each attempt is a new client, so nothing accumulates between collections.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_service_refuses_a_broker_signed_by_another_ca(
    tls_broker: tuple[Mosquitto, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    broker, _, other_ca = tls_broker
    sim = simulator("tls2/bms/v1", n_packs=1, n_cells=4)
    config = config_for(sim, broker.url, broker={"tls": {"ca_file": str(other_ca)}})
    from edge_bms.service.mqtt import run_service

    stop = asyncio.Event()
    connected: list[bool] = []
    task = asyncio.create_task(run_service(config, stop=stop, ready=lambda: connected.append(True)))
    await asyncio.sleep(2.5)  # several attempts at 0.2-1.0 s backoff
    stop.set()
    await asyncio.wait_for(task, 10.0)
    assert connected == []
    gc.collect()  # the failed handshakes' sockets: closed here, under this test's filter
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "certificate verify" in caplog.text


class _tls_collector:  # noqa: N801 - used like the brokers.collecting context manager
    """Payloads received on ``filters`` over TLS (``collecting`` speaks plain MQTT)."""

    def __init__(self, port: int, tls: aiomqtt.TLSParameters, filters: list[str]) -> None:
        self.client = aiomqtt.Client("127.0.0.1", port, tls_params=tls)
        self.filters = filters
        self.payloads: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> list[bytes]:
        await self.client.__aenter__()
        for f in self.filters:
            await self.client.subscribe(f, qos=1)

        async def read() -> None:
            async for m in self.client.messages:
                self.payloads.append(bytes(m.payload))

        self.task = asyncio.create_task(read())
        return self.payloads

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)
