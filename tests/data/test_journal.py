"""The write-ahead journal in front of Tiled (labctl/data/journal.py).

Real embedded Tiled servers, a real RunEngine. What must hold: documents are written to
Tiled in batches (far fewer HTTP appends than events) and all arrive, in order; a run
whose Tiled went away mid-run is complete in Tiled after recovery; a torn last line or a
garbled journal loses nothing that can be read; a live writer's journal is never touched
by another process's recovery.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from hypothesis import given, settings
from hypothesis import strategies as st

from labctl.data import DataConfig, ServerRecord, Store, ensure_server, open_store, stop_server
from labctl.data.journal import (
    JournaledWriter,
    JournalError,
    encode,
    pending,
    read_journal,
    recover,
)
from tests.data import Counter, new_campaign, uids_of


def test_events_are_written_in_batches_and_all_arrive_in_order(
    store: Store, RE: RunEngine, counter: Counter
) -> None:
    writer = store.writer()
    assert isinstance(writer, JournaledWriter)
    RE.subscribe(writer)  # type: ignore[no-untyped-call]
    campaign = new_campaign()
    n = 400
    t = time.perf_counter()
    (uid,) = uids_of(RE(bp.count([counter], num=n), campaign_id=campaign))
    elapsed = time.perf_counter() - t
    # The stop waited for the drain: Tiled holds the whole run when RE(...) returns,
    # and the run's journal is gone.
    assert not (store.config.journal_directory / f"{uid}.jsonl").exists()
    assert writer.stats.events == writer.stats.written_events == n
    assert writer.stats.failures == []
    # Batching: documents arrive faster than single HTTP writes, so the drain wrote many
    # per batch. (A per-event writer would need n + 3 batches.)
    assert writer.stats.batches < n / 3, writer.stats
    frame = store.read(uid, "primary")
    assert list(frame["seq_num"]) == list(range(1, n + 1))
    assert list(frame["counter-value"]) == [float(i) for i in range(1, n + 1)]
    (summary,) = store.runs(campaign=campaign)
    assert summary.exit_status == "success"
    print(f"\n{n} events journaled + written in {elapsed:.2f} s ({n / elapsed:.0f} events/s)")


def test_a_run_survives_tiled_going_away_mid_run(
    tmp_path: Path, RE: RunEngine, counter: Counter
) -> None:
    """The server dies before the run; the plan still succeeds; the run is complete in
    Tiled once a server is back and the journal is recovered."""
    config = DataConfig(directory=tmp_path / "tiled", stop_wait_s=10)
    ensure_server(config)
    try:
        store = open_store(config)
        writer = store.writer()
        RE.subscribe(writer)  # type: ignore[no-untyped-call]
        stop_server(config.directory)
        campaign = new_campaign()
        (uid,) = uids_of(RE(bp.count([counter], num=25), campaign_id=campaign))
        assert writer.flush(30)
        assert writer.stats.failures, "writes to a dead server should have failed"
        (left,) = pending(config.journal_directory)
        assert left.name == f"{uid}.jsonl"
        assert read_journal(left).events == 25
        store.close()

        with open_store(config) as again:  # starts a new server; recovers first
            (run,) = again.recovered
            assert (run.uid, run.events, run.complete, run.error) == (uid, 25, True, None)
            assert pending(config.journal_directory) == []
            (summary,) = again.runs(campaign=campaign)
            assert summary.exit_status == "success"
            frame = again.read(uid, "primary")
            assert list(frame["counter-value"]) == [float(i) for i in range(1, 26)]
    finally:
        stop_server(config.directory)


def _documents(uid: str, events: int) -> list[tuple[str, dict[str, Any]]]:
    """A minimal, valid run: start, descriptor, ``events`` events (no stop)."""
    now = time.time()
    desc = f"{uid}-d"
    key = {"dtype": "number", "shape": [], "source": "test", "units": "V"}
    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", {"uid": uid, "time": now, "campaign_id": "J", "scan_id": 1}),
        ("descriptor", {
            "uid": desc, "run_start": uid, "time": now, "name": "primary",
            "data_keys": {"v": key}, "object_keys": {"x": ["v"]}, "configuration": {},
            "hints": {}},
        ),
    ]  # fmt: skip
    for i in range(1, events + 1):
        docs.append(
            ("event", {
                "uid": f"{uid}-e{i}", "descriptor": desc, "seq_num": i, "time": now + i,
                "data": {"v": i * 0.5}, "timestamps": {"v": now + i}, "filled": {}},
            )
        )  # fmt: skip
    return docs


def test_a_torn_last_line_is_dropped_and_the_rest_recovered(
    sqlite_server: tuple[DataConfig, ServerRecord], tmp_path: Path
) -> None:
    uid = f"torn-{new_campaign()}"
    body = b"".join(encode(n, d) for n, d in _documents(uid, 7))
    path = tmp_path / f"{uid}.jsonl"
    path.write_bytes(body + b'["event",{"uid":"x","descrip')  # killed inside a write
    journal = read_journal(path)
    assert journal.torn_tail and journal.events == 7 and not journal.complete

    with open_store(sqlite_server[0], recover=False) as store:
        (run,) = recover(store.client, tmp_path)
        assert (run.uid, run.events, run.complete) == (uid, 7, False)
        assert not path.exists()
        info = store.run(uid)
        assert info.stop is None and info.summary.exit_status == "incomplete"
        assert list(store.read(uid, "primary")["v"]) == [i * 0.5 for i in range(1, 8)]


def test_a_garbled_journal_is_kept_aside_and_named(
    sqlite_server: tuple[DataConfig, ServerRecord], tmp_path: Path
) -> None:
    uid = f"bad-{new_campaign()}"
    lines = [encode(n, d) for n, d in _documents(uid, 3)]
    lines.insert(2, b"\x00\x01 not json\n")
    path = tmp_path / f"{uid}.jsonl"
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalError, match=rf"{uid}\.jsonl:3: not a journal line"):
        read_journal(path)
    with open_store(sqlite_server[0], recover=False) as store:
        (run,) = recover(store.client, tmp_path)
    assert run.error is not None and ".jsonl:3:" in run.error
    assert not path.exists()
    assert (tmp_path / f"{uid}.jsonl.unreadable").read_bytes() == b"".join(lines)
    assert pending(tmp_path) == []


def test_recovery_leaves_a_live_writers_journal_alone(
    sqlite_server: tuple[DataConfig, ServerRecord], tmp_path: Path
) -> None:
    uid = f"live-{new_campaign()}"
    docs = _documents(uid, 2)
    with open_store(sqlite_server[0], recover=False) as store:
        writer = JournaledWriter(store.client, tmp_path, stop_wait_s=30)
        for name, doc in docs:
            writer(name, doc)
        assert writer.flush(30)
        # Another process's recovery (here: the same call a new store makes) skips it.
        assert recover(store.client, tmp_path) == []
        (path,) = pending(tmp_path)
        assert read_journal(path).events == 2
        stop = {"uid": f"{uid}-s", "run_start": uid, "time": time.time(),
                "exit_status": "success", "reason": "", "num_events": {"primary": 2}}  # fmt: skip
        writer("stop", stop)
        assert pending(tmp_path) == []  # the stop waited for Tiled; the journal is gone
        assert writer.close()
        assert store.run(uid).summary.exit_status == "success"


@settings(max_examples=60, deadline=None)
@given(
    data=st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(-(2**53), 2**53),
            st.text(max_size=30),
            st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5),
        ),
        max_size=6,
    )
)
def test_journal_lines_round_trip_any_json_document(data: dict[str, Any]) -> None:
    import numpy as np

    doc = {"uid": "u", "run_start": "r", "data": data, "arr": np.arange(3.0)}
    line = encode("event", doc)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one document, one line
    name, back = json.loads(line)
    assert name == "event"
    assert back["data"] == data and back["arr"] == [0.0, 1.0, 2.0]


def test_unjournalable_values_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="cannot journal a object"):
        encode("event", {"data": {"x": object()}})
