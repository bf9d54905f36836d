"""Runs into the embedded Tiled server (SQLite) through TiledWriter, and back out.

Real server process, real RunEngine, real plans (``bp.count`` over the simulated
balance and over a soft counter), real HTTP; the values read back are compared with
the documents the RunEngine emitted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pandas
import pytest
from bluesky import RunEngine
from bluesky.utils import Msg
from typer.testing import CliRunner

from labctl.cli import app
from labctl.data import DataConfig, DataConfigError, DataError, ServerRecord, Store, open_store
from labctl.data.config import redact
from labctl.data.server import RECORD, ensure_server, read_record, stop_server, write_record
from labctl.devices.balance import Balance
from tests.conftest import start_lab
from tests.data import Counter, new_campaign, uids_of

Docs = list[tuple[str, dict[str, Any]]]


def record(RE: RunEngine, store: Store) -> Docs:
    """Subscribe ``store`` and a list to ``RE``; the list gets every document."""
    docs: Docs = []
    store.subscribe(RE)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))  # type: ignore[no-untyped-call]
    return docs


def gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` ends within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def event_data(docs: Docs, stream: str = "primary") -> list[dict[str, Any]]:
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d["data"] for n, d in docs if n == "event" and d["descriptor"] in uids]


def test_count_of_the_simulated_balance_reads_back_as_emitted(
    store: Store, RE: RunEngine, call: Callable[..., Any], opened: list[Any]
) -> None:
    campaign = new_campaign()
    lab = start_lab("balance", transport="tcp", speed=200.0)
    try:
        balance = Balance(lab.urls["balance"], "balance", immediate=True)
        call(balance.connect(timeout=10))
        opened.append(balance)
        docs = record(RE, store)
        (uid,) = uids_of(
            RE(bp.count([balance], num=4), campaign_id=campaign, sample_id="S-bal", operator="ann")
        )
    finally:
        lab.stop()

    (summary,) = store.runs(campaign=campaign)
    assert (summary.uid, summary.exit_status, summary.reason) == (uid, "success", "")
    assert (summary.sample_id, summary.operator, summary.plan_name) == ("S-bal", "ann", "count")
    assert summary.num_events == {"primary": 4}
    frame = store.read(uid, "primary")
    emitted = event_data(docs)
    assert list(frame["seq_num"]) == [1, 2, 3, 4]
    assert list(frame["balance-weight"]) == [e["balance-weight"] for e in emitted]
    assert list(frame["balance-stable"]) == [e["balance-stable"] for e in emitted]
    info = store.run(uid[:10])  # a prefix is enough
    assert info.summary.uid == uid
    assert info.streams["primary"].rows == 4
    assert info.streams["primary"].units["balance-weight"] == "g"
    assert info.start["campaign_id"] == campaign
    assert info.stop is not None and info.stop["exit_status"] == "success"


def test_runs_are_found_by_metadata_newest_first(
    store: Store, RE: RunEngine, counter: Counter
) -> None:
    a, b = new_campaign(), new_campaign()
    record(RE, store)
    uids = []
    for campaign, sample in ((a, "S1"), (b, "S2"), (a, "S3")):
        result = RE(bp.count([counter], num=2), campaign_id=campaign, sample_id=sample)
        uids.append(uids_of(result)[0])
    assert [r.uid for r in store.runs(campaign=a)] == [uids[2], uids[0]]
    assert [r.uid for r in store.runs(campaign=b)] == [uids[1]]
    assert [r.uid for r in store.runs(campaign=a, sample="S1")] == [uids[0]]
    assert [r.uid for r in store.runs(campaign=a, limit=1)] == [uids[2]]
    assert store.runs(campaign=a, plan="no_such_plan") == []
    assert [r.uid for r in store.runs(sample="S2", campaign=b, num_points=2)] == [uids[1]]
    with pytest.raises(DataError, match="no run"):
        store.run("0000dead")


def failing_plan(counter: Counter) -> Generator[Msg, Any, None]:
    def inner() -> Generator[Msg, Any, None]:
        yield from bps.trigger_and_read([counter])
        yield from bps.trigger_and_read([counter])
        raise RuntimeError("pump P2 stalled")

    yield from bpp.run_wrapper(inner(), md={"plan_name": "failing_plan"})  # type: ignore[no-untyped-call]


def test_a_failed_run_keeps_its_events_and_the_reason(
    store: Store, RE: RunEngine, counter: Counter
) -> None:
    campaign = new_campaign()
    record(RE, store)
    with pytest.raises(RuntimeError, match="stalled"):
        RE(failing_plan(counter), campaign_id=campaign)
    (summary,) = store.runs(campaign=campaign)
    assert summary.exit_status == "fail"
    assert "pump P2 stalled" in summary.reason
    assert list(store.read(summary.uid, "primary")["counter-value"]) == [1.0, 2.0]


def test_export_writes_one_file_per_stream_and_the_metadata(
    store: Store, RE: RunEngine, counter: Counter, tmp_path: Path
) -> None:
    campaign = new_campaign()
    record(RE, store)

    def two_streams() -> Generator[Msg, Any, None]:
        def inner() -> Generator[Msg, Any, None]:
            for _ in range(3):
                yield from bps.trigger_and_read([counter], name="primary")
            yield from bps.trigger_and_read([counter], name="baseline")

        yield from bpp.run_wrapper(inner(), md={"plan_name": "two_streams"})  # type: ignore[no-untyped-call]

    (uid,) = uids_of(RE(two_streams(), campaign_id=campaign))
    files = store.export(uid, "csv", tmp_path / "csv")
    assert sorted(p.name for p in files) == ["baseline.csv", "metadata.json", "primary.csv"]
    primary = pandas.read_csv(tmp_path / "csv" / "primary.csv")
    assert list(primary["counter-value"]) == [1.0, 2.0, 3.0]
    assert list(pandas.read_csv(tmp_path / "csv" / "baseline.csv")["counter-value"]) == [4.0]
    meta = json.loads((tmp_path / "csv" / "metadata.json").read_text())
    assert meta["start"]["campaign_id"] == campaign
    assert meta["streams"]["primary"]["units"] == {
        "counter-value": "count",
        "counter-setpoint": "V",
    }
    assert meta["exit_status"] == "success"

    store.export(uid, "parquet", tmp_path / "pq")
    parquet = pandas.read_parquet(tmp_path / "pq" / "primary.parquet")
    pandas.testing.assert_frame_equal(parquet, store.read(uid, "primary"))
    with pytest.raises(DataError, match="format"):
        store.export(uid, "xlsx", tmp_path / "x")  # type: ignore[arg-type]


def test_cli_lists_shows_and_exports_runs(
    sqlite_server: tuple[DataConfig, ServerRecord],
    store: Store,
    RE: RunEngine,
    counter: Counter,
    tmp_path: Path,
) -> None:
    campaign = new_campaign()
    record(RE, store)
    (uid,) = uids_of(RE(bp.count([counter], num=3), campaign_id=campaign, sample_id="S-cli"))
    data = ["--data", str(sqlite_server[0].directory)]
    runner = CliRunner()

    out = runner.invoke(app, ["runs", "list", "--campaign", campaign, "--json", *data])
    assert out.exit_code == 0, out.output
    (listed,) = json.loads(out.stdout)
    assert (listed["uid"], listed["sample_id"], listed["exit_status"]) == (uid, "S-cli", "success")
    assert listed["num_events"] == {"primary": 3}

    out = runner.invoke(app, ["runs", "list", "--campaign", campaign, *data])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith(uid[:8]))
    assert "S-cli" in line and "success" in line and line.split()[-1] == "3"

    out = runner.invoke(app, ["runs", "show", uid[:8], *data])
    assert out.exit_code == 0, out.output
    assert "status    success" in out.stdout
    assert f"campaign  {campaign}" in out.stdout
    stream_line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("primary"))
    assert "3 rows" in stream_line and "counter-value [count]" in stream_line

    dest = tmp_path / "exported"
    out = runner.invoke(
        app, ["runs", "export", uid[:8], "--format", "parquet", "--out", str(dest), *data]
    )
    assert out.exit_code == 0, out.output
    assert {Path(p).name for p in out.stdout.split()} == {"primary.parquet", "metadata.json"}
    assert list(pandas.read_parquet(dest / "primary.parquet")["counter-value"]) == [1.0, 2.0, 3.0]

    out = runner.invoke(app, ["runs", "show", "0000dead", *data])
    assert out.exit_code == 1
    assert "no run '0000dead'" in out.output
    out = runner.invoke(app, ["runs", "export", uid, "--format", "xls", *data])
    assert out.exit_code == 2
    out = runner.invoke(app, ["runs", "list", "--url", "ftp://nowhere", *data])
    assert out.exit_code == 2
    assert "url = 'ftp://nowhere'" in out.output


def test_runs_survive_a_restart_and_a_stale_record_is_replaced(
    sqlite_server: tuple[DataConfig, ServerRecord], RE: RunEngine, counter: Counter
) -> None:
    config = sqlite_server[0]
    first = ensure_server(config)
    assert ensure_server(config) == first  # found again by its record, not restarted
    campaign = new_campaign()
    with open_store(config) as store:
        record(RE, store)
        (uid,) = uids_of(RE(bp.count([counter], num=2), campaign_id=campaign))
    assert stop_server(config.directory) == first
    assert read_record(config.directory) is None
    assert gone(first.pid, within_s=10)
    # A record left by a server that died without removing it.
    dead = ServerRecord(
        url="http://127.0.0.1:9", api_key="x", pid=first.pid, catalog=first.catalog,
        tabular=first.tabular, files=first.files, started=0.0, tiled_version="0",
    )  # fmt: skip
    write_record(config.directory, dead)
    second = ensure_server(config)
    assert second.pid != first.pid and second.url != dead.url
    assert (config.directory / RECORD).stat().st_mode & 0o777 == 0o600
    with open_store(config) as store:
        assert [r.uid for r in store.runs(campaign=campaign)] == [uid]
        assert list(store.read(uid, "primary")["counter-value"]) == [1.0, 2.0]
    with pytest.raises(DataError, match="serves catalog"):
        ensure_server(DataConfig(directory=config.directory, catalog="sqlite:///other.db"))


def test_config_errors_name_the_field_and_value(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"catalog = 'mysql://x/y'"):
        DataConfig.from_env(directory=tmp_path, catalog="mysql://x/y")
    with pytest.raises(DataConfigError, match=r"batch_size = 0"):
        DataConfig.from_env(directory=tmp_path, batch_size=0)
    with pytest.raises(DataConfigError, match="give one or the other"):
        DataConfig.from_env(url="http://h:8000", catalog="sqlite:///c.db")
    with pytest.raises(DataError, match="labctl starts no server"):
        ensure_server(DataConfig(url="http://h:8000"))


def test_config_from_env_and_resolved_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABCTL_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("LABCTL_TILED_CATALOG", "postgresql://u:pw@db:5432/lab")
    config = DataConfig.from_env()
    assert config.directory == tmp_path / "d"
    assert config.catalog_uri == "postgresql+asyncpg://u:pw@db:5432/lab"
    assert config.tabular_uri == "postgresql://u:pw@db:5432/lab"
    assert redact(config.catalog_uri) == "postgresql+asyncpg://u:***@db:5432/lab"
    monkeypatch.delenv("LABCTL_TILED_CATALOG")
    default = DataConfig.from_env(batch_size=5)
    assert default.catalog_uri == f"sqlite+aiosqlite:///{tmp_path / 'd' / 'catalog.db'}"
    assert default.tabular_uri == f"sqlite:///{tmp_path / 'd' / 'tables.db'}"
    assert default.batch_size == 5
    monkeypatch.delenv("LABCTL_DATA")
    assert DataConfig.from_env().directory == Path("data/tiled")
    assert redact("http://h/api?api_key=secret&x=1") == "http://h/api?x=1"


def test_cli_server_reports_the_running_server_without_its_key(
    sqlite_server: tuple[DataConfig, ServerRecord], tmp_path: Path
) -> None:
    config = sqlite_server[0]
    current = ensure_server(config)
    out = CliRunner().invoke(app, ["runs", "server", "--json", "--data", str(config.directory)])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)
    assert (shown["url"], shown["pid"]) == (current.url, current.pid)
    assert current.api_key not in out.output
    out = CliRunner().invoke(app, ["runs", "server", "--stop", "--data", str(tmp_path)])
    assert out.exit_code == 0
    assert f"no server recorded in {tmp_path}" in out.stdout


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    config = DataConfig(
        directory=tmp_path / "tiled", catalog="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    )
    with pytest.raises(DataError, match="exited while starting") as caught:
        ensure_server(config)
    assert "cannot reach or create postgresql+asyncpg://postgres@127.0.0.1:1/nowhere" in str(
        caught.value
    )
    assert read_record(config.directory) is None
