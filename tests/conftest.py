"""Shared fixtures: a simulated lab in a background thread, a RunEngine, helpers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from hypothesis import settings

from hardware_mocks.config import LabConfig, load_lab_config
from hardware_mocks.lab import LabThread

# No per-example deadline (a loaded 2-core CI machine is slow, not wrong). In CI,
# derandomized so a run is reproducible; locally, random to keep exploring.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def lab_config(*kinds: str, **overrides: Any) -> LabConfig:
    """The default lab, restricted to instruments of ``kinds`` (all when empty)."""
    cfg = load_lab_config()
    if kinds:
        cfg.instruments = [i for i in cfg.instruments if i.kind in kinds]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session", autouse=True)
def run_data_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where commands that store runs by default (`labctl plans run`, the demo) put them:
    a directory of this session (LABCTL_DATA, inherited by subprocesses), never the
    checkout's ./data; the embedded server started there is stopped at the end."""
    from labctl.data import stop_server

    directory = tmp_path_factory.mktemp("labctl-data")
    saved = os.environ.get("LABCTL_DATA")
    os.environ["LABCTL_DATA"] = str(directory)
    yield str(directory)
    stop_server(directory)
    if saved is None:
        os.environ.pop("LABCTL_DATA", None)
    else:
        os.environ["LABCTL_DATA"] = saved


@pytest.fixture
def RE() -> Iterator[RunEngine]:
    engine = RunEngine(call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()  # type: ignore[no-untyped-call]


@pytest.fixture
def call(RE: RunEngine) -> Callable[..., Any]:
    """Run a coroutine on the RunEngine's loop (where devices live) and return its result."""

    def run(coro: Any, timeout: float | None = 60.0) -> Any:
        return call_in_bluesky_event_loop(coro, timeout=timeout)

    return run


@pytest.fixture
def opened(call: Callable[..., Any]) -> Iterator[list[Any]]:
    """Devices to disconnect after the test (append them); ports are never left to the GC."""
    devices: list[Any] = []
    yield devices

    async def close_all() -> None:
        for device in devices:
            await device.disconnect()

    call(close_all())


@pytest.fixture(params=["pty", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` (simulator state, read across threads) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


def start_lab(
    *kinds: str, transport: str = "tcp", speed: float = 50.0, **overrides: Any
) -> LabThread:
    return LabThread(lab_config(*kinds, **overrides), transport=transport, speed=speed).start()  # type: ignore[arg-type]
