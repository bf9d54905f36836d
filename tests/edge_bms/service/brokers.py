"""Real brokers for the service's MQTT tests: the machine's Mosquitto (127.0.0.1:1883) and
private ``mosquitto -c`` processes that a test may kill and restart.

A test that cannot get its broker fails (never skips): the service's MQTT behaviour is
only checked against a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge_bms.service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[3]
MOSQUITTO = "/usr/sbin/mosquitto"
SYSTEM_HOST, SYSTEM_PORT = "127.0.0.1", 1883


def require_port(host: str, port: int, what: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError as exc:
        pytest.fail(f"no MQTT broker at {host}:{port} ({exc}): {what}")


def require_system_broker() -> str:
    require_port(
        SYSTEM_HOST,
        SYSTEM_PORT,
        "start Mosquitto (`mosquitto -d -p 1883`); these tests need a real broker",
    )
    return f"mqtt://{SYSTEM_HOST}:{SYSTEM_PORT}"


def unique_prefix() -> str:
    """A topic prefix of this test alone, so tests sharing the system broker never see
    each other's messages."""
    return f"test-{uuid.uuid4().hex[:10]}/bms/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> float:
    """Block until 127.0.0.1:port accepts; return time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Mosquitto:
    """A private Mosquitto on a free port, configured by ``extra`` conf lines."""

    def __init__(self, workdir: Path, extra: Iterable[str] = ()) -> None:
        if not os.access(MOSQUITTO, os.X_OK):
            pytest.fail(f"{MOSQUITTO} is not installed: the broker tests need Mosquitto")
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", *extra]
        if os.geteuid() == 0:  # else it drops to user "mosquitto", who cannot write here
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it; return time.monotonic() when it accepts connections."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            return wait_port(self.port)
        except OSError:
            self.stop()
            pytest.fail(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no persistence save, sockets reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    t: float  # loop time of receipt

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Collector:
    """Everything a subscriber saw, with a way to wait for a condition on it."""

    messages: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, topic_suffix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    async def wait_for(
        self, predicate: Callable[[Collector], bool], timeout: float, what: str
    ) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                topics = sorted({m.topic for m in self.messages})
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; "
                    f"{len(self.messages)} messages on {topics[:12]}"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))


@contextlib.asynccontextmanager
async def collecting(
    url: str,
    filters: Iterable[str],
    *,
    qos: int = 1,
    username: str | None = None,
    password: str | None = None,
    identifier: str | None = None,
    persistent: bool = False,
    collector: Collector | None = None,
) -> AsyncIterator[Collector]:
    """A subscriber on ``filters`` for the duration of the block."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    col = collector or Collector()
    client = aiomqtt.Client(
        host,
        int(port),
        username=username,
        password=password,
        identifier=identifier,
        clean_session=not persistent,
    )
    async with client:
        for f in filters:
            await client.subscribe(f, qos=qos)

        async def pump() -> None:
            loop = asyncio.get_running_loop()
            async for m in client.messages:
                p = m.payload
                col.messages.append(
                    Received(
                        m.topic.value,
                        p if isinstance(p, bytes) else str(p).encode(),
                        m.qos,
                        m.retain,
                        loop.time(),
                    )
                )
                col.changed.set()

        task = asyncio.create_task(pump())
        try:
            yield col
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.asynccontextmanager
async def publisher(
    url: str, *, username: str | None = None, password: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    async with aiomqtt.Client(host, int(port), username=username, password=password) as c:
        yield c


def write_config(path: Path, config: ServiceConfig) -> Path:
    """``config`` as the TOML that ``edge-bms run --config`` reads."""
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text(_toml(data))
    return path


def _toml(data: dict[str, Any]) -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    out = [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"\n[{k}]")
            out.extend(
                f"{kk} = {json.dumps(vv)}" for kk, vv in v.items() if not isinstance(vv, dict)
            )
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    out.append(f"\n[{k}.{kk}]")
                    out.extend(f"{a} = {json.dumps(b)}" for a, b in vv.items())
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"\n[[{k}]]")
                out.extend(f"{a} = {json.dumps(b)}" for a, b in item.items())
    return "\n".join(out) + "\n"


def service_process(config_path: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m edge_bms.service.cli run --config ...`` with no broker credentials
    from this machine's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_BMS_MQTT_")}
    env["PYTHONPATH"] = str(REPO)
    with log.open("ab") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_bms.service.cli",
                "run",
                "--config",
                str(config_path),
                *extra,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


# -- telemetry and configs ------------------------------------------------------------------
def simulator(prefix: str, *, n_packs: int = 2, n_cells: int = 4, seed: int = 0, **kw: Any) -> Any:
    """A pack simulator publishing under ``prefix``; ts starts well in the past so that a
    fast simulated clock never runs ahead of the service's."""
    from hardware_mocks.packs import PackSimulator

    return PackSimulator(
        n_packs=n_packs,
        n_cells=n_cells,
        seed=seed,
        topic_prefix=prefix,
        start_ts=time.time() - 50_000.0,
        record_every=0,
        **kw,
    )


def telemetry_ticks(sim: Any, n: int, dt: float) -> list[list[tuple[str, bytes]]]:
    """``n`` ticks of every pack's (topic, payload), ``dt`` simulated seconds apart."""
    ticks = []
    for k in range(n):
        if k:
            sim.advance(dt)
        ticks.append([(m.topic, m.json()) for m in sim.telemetry()])
    return ticks


def config_for(sim: Any, url: str, **overrides: Any) -> ServiceConfig:
    """A service config serving ``sim``'s packs through ``url`` (fast reconnects, the
    plain filter unless ``estimator`` says otherwise)."""
    from edge_bms.service.config import PackConfig

    data: dict[str, Any] = {
        "instance": f"t-{uuid.uuid4().hex[:8]}",
        "prefix": sim.config.topic_prefix,
        "broker": {"url": url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "packs": [
            PackConfig(
                id=p, n_cells=sim.n_cells, cells_per_temp_sensor=sim.config.cells_per_temp_sensor
            ).model_dump()
            for p in sim.pack_ids
        ],
        "estimator": {"correction": "none", "sop_interval_s": 0.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ServiceConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running_service(
    config: ServiceConfig, **kw: Any
) -> AsyncIterator[tuple[Any, list[float]]]:
    """``run_service`` in this process until the block ends; yields the PackService and
    the loop times at which ``ready`` was called (one per connection)."""
    from edge_bms.service.core import PackService
    from edge_bms.service.mqtt import run_service

    service = PackService(config)
    stop = asyncio.Event()
    readies: list[float] = []
    first = asyncio.Event()
    loop = asyncio.get_running_loop()

    def ready() -> None:
        readies.append(loop.time())
        first.set()

    task = asyncio.create_task(run_service(config, stop=stop, ready=ready, service=service, **kw))
    waiter = asyncio.create_task(first.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=15.0, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        stop.set()
        if task.done():
            task.result()  # raises what stopped it
        raise AssertionError("the service did not connect within 15 s")
    try:
        yield service, readies
    finally:
        stop.set()
        await asyncio.wait_for(task, 15.0)


async def clear_retained(url: str, topics: Iterable[str]) -> None:
    """Remove retained messages (the status) a test left on a shared broker."""
    async with publisher(url) as pub:
        for t in topics:
            await pub.publish(t, b"", qos=1, retain=True)
