"""Helpers for the data tests: the session's embedded Tiled servers, a counting device.

Every module asks for the server of its kind through :func:`session_server`; the first
starts it in a per-session directory, the others find it by its record (what
``ensure_server`` promises), and it is stopped when the session ends.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from bluesky.protocols import Triggerable
from bluesky.run_engine import RunEngineResult
from ophyd_async.core import AsyncStatus, StandardReadable, soft_signal_r_and_setter, soft_signal_rw

from labctl.data import DataConfig, ServerRecord, ensure_server, stop_server

PG_CATALOG = "postgresql+asyncpg://postgres@127.0.0.1:5432/labctl_test"


def session_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    **settings: Any,
) -> tuple[DataConfig, ServerRecord]:
    """The session's embedded server of ``kind`` ("sqlite" or "postgresql")."""
    base = tmp_path_factory.getbasetemp()
    catalog = PG_CATALOG if kind == "postgresql" else None
    config = DataConfig(directory=base / f"tiled-{kind}", catalog=catalog, **settings)
    record = ensure_server(config)
    # Called from session-scoped fixtures: runs at session end. Idempotent: whichever
    # module's fixture finalizes first stops the server, the others find no record.
    request.addfinalizer(lambda: stop_server(config.directory))
    return config, record


def uids_of(result: Any) -> list[str]:
    """The run start uids of what ``RE(plan)`` returned (``call_returns_result=True``)."""
    assert isinstance(result, RunEngineResult), result
    return list(result.run_start_uids)


def new_campaign() -> str:
    """A campaign id no other test (or earlier session on the same database) uses."""
    return f"T-{uuid.uuid4().hex[:12]}"


class Counter(StandardReadable, Triggerable):
    """Soft device: each trigger counts one up (``value``, as float); ``setpoint`` is fixed."""

    def __init__(self, name: str = "counter") -> None:
        self._n = itertools.count(1)
        with self.add_children_as_readables():
            self.value, self._set_value = soft_signal_r_and_setter(float, units="count")
            self.setpoint = soft_signal_rw(float, initial_value=0.5, units="V")
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        self._set_value(float(next(self._n)))
