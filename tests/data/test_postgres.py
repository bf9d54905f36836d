"""At scale: the embedded server with its catalog and event tables in PostgreSQL.

Uses the ``labctl_test`` database on 127.0.0.1:5432 (created when missing); runs of
earlier sessions stay there, so every test keeps to a campaign id of its own.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import bluesky.plans as bp
from bluesky import RunEngine
from typer.testing import CliRunner

from labctl.cli import app
from labctl.data import DataConfig, ServerRecord, open_store
from labctl.data.server import ensure_postgres_database
from tests.data import Counter, new_campaign, uids_of

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fetch(sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(ADMIN)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def test_runs_go_to_postgresql_and_are_queried_back(
    postgresql_server: tuple[DataConfig, ServerRecord], RE: RunEngine, call: Callable[..., Any]
) -> None:
    config, server = postgresql_server
    assert server.catalog == "postgresql+asyncpg://postgres@127.0.0.1:5432/labctl_test"
    assert server.tabular == "postgresql://postgres@127.0.0.1:5432/labctl_test"
    counter = Counter()
    call(counter.connect())
    campaign, other = new_campaign(), new_campaign()
    with open_store(config) as store:
        store.subscribe(RE)
        uids = [
            uids_of(RE(bp.count([counter], num=n), campaign_id=c, sample_id=f"S{n}"))[0]
            for n, c in ((3, campaign), (2, other), (4, campaign))
        ]
        found = store.runs(campaign=campaign)
        assert [r.uid for r in found] == [uids[2], uids[0]]
        assert [r.num_events for r in found] == [{"primary": 4}, {"primary": 3}]
        assert [r.uid for r in store.runs(campaign=campaign, sample="S3")] == [uids[0]]
        frame = store.read(uids[2], "primary")
        assert list(frame["counter-value"]) == [6.0, 7.0, 8.0, 9.0]  # after 3 + 2 triggers
        assert store.run(uids[2][:8]).streams["primary"].rows == 4
    # The catalog really is PostgreSQL: the run's node is a row of labctl_test's nodes.
    rows = fetch("SELECT 1 FROM pg_database WHERE datname = 'labctl_test'")
    assert len(rows) == 1

    async def node_count() -> int:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/labctl_test")
        try:
            return int(await conn.fetchval("SELECT count(*) FROM nodes WHERE key = $1", uids[0]))
        finally:
            await conn.close()

    assert asyncio.run(node_count()) == 1

    out = CliRunner().invoke(
        app, ["runs", "list", "--campaign", campaign, "--json", "--data", str(config.directory)]
    )
    assert out.exit_code == 0, out.output
    assert [r["uid"] for r in json.loads(out.stdout)] == [uids[2], uids[0]]


def test_a_missing_database_is_created() -> None:
    name = f"labctl_tmp_{uuid.uuid4().hex[:8]}"
    uri = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        assert ensure_postgres_database(uri) is True
        assert ensure_postgres_database(uri) is False  # there now
        assert fetch("SELECT datname FROM pg_database WHERE datname = $1", name)
    finally:
        fetch(f'DROP DATABASE IF EXISTS "{name}"')
