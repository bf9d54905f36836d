"""Fixtures of the data tests: the session's embedded Tiled servers, a store, a counter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from labctl.data import DataConfig, ServerRecord, Store, open_store
from tests.data import Counter, session_server


@pytest.fixture(scope="session")
def sqlite_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ServerRecord]:
    return session_server(request, tmp_path_factory, "sqlite")


@pytest.fixture(scope="session")
def postgresql_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DataConfig, ServerRecord]:
    return session_server(request, tmp_path_factory, "postgresql")


@pytest.fixture
def store(sqlite_server: tuple[DataConfig, ServerRecord]) -> Iterator[Store]:
    with open_store(sqlite_server[0]) as s:
        yield s


@pytest.fixture
def counter(call: Callable[..., Any]) -> Counter:
    device = Counter()
    call(device.connect())
    return device
