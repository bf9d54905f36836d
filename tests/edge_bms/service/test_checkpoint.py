"""Checkpoints: SQLite WAL, one transaction per save, survive SIGKILL; a restored service
continues the SOC of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_bms.errors import CheckpointError
from edge_bms.service.checkpoint import CheckpointStore
from edge_bms.service.core import PackService

from .packdata import Clock, encode, samples, service_config

TOPIC = "bms/v1/p1/telemetry"


def test_store_round_trip_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "ck.sqlite"
    with CheckpointStore(path) as store:
        store.save({"a": {"seq": 3, "ts": 1.5, "x": [0.1, None]}, "b": {"seq": None}})
        store.save({"a": {"seq": 4, "ts": 2.5, "x": [0.2]}})
        assert store.load() == {"a": {"seq": 4, "ts": 2.5, "x": [0.2]}, "b": {"seq": None}}
        store.delete(["b"])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT pack, seq, ts FROM packs").fetchall() == [("a", 4, 2.5)]
    with pytest.raises(CheckpointError, match="not JSON-able"):
        CheckpointStore(path).save({"a": {"x": float("nan")}})


def test_a_file_that_is_not_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ck.sqlite"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(CheckpointError, match="cannot open"):
        CheckpointStore(path)


WRITER = """
import sys
from edge_bms.service.checkpoint import CheckpointStore
store = CheckpointStore(sys.argv[1])
k = 0
while True:
    k += 1
    store.save({p: {"seq": k, "ts": float(k), "blob": [k] * 20000} for p in ("a", "b", "c")})
    if k == 3:
        print("ready", flush=True)
"""


def test_sigkill_during_saves_leaves_a_consistent_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    states = CheckpointStore(path).load()
    seqs = {p: s["seq"] for p, s in states.items()}
    assert set(seqs) == {"a", "b", "c"}
    assert len(set(seqs.values())) == 1  # all packs of one save, never a mix
    assert seqs["a"] >= 3
    assert all(s["blob"] == [s["seq"]] * 20000 for s in states.values())


def run(service: PackService, data: list[dict[str, Any]]) -> None:
    for d in data:
        out = service.handle(TOPIC, encode(d))
        assert out[0].topic.endswith("/state"), out[0].payload


def soc(service: PackService) -> np.ndarray:
    st = service.estimator("p1").state
    assert st is not None
    out: np.ndarray = st.x[0].copy()
    return out


@pytest.mark.parametrize("correction", ["none", "default"])
def test_restored_at_the_last_step_continues_exactly(tmp_path: Path, correction: str) -> None:
    data = samples(400)
    over: dict[str, Any] = {"estimator": {"correction": correction, "soh": True}}
    ref = PackService(service_config(**over), now=Clock())
    run(ref, data)
    cfg = service_config(**over, checkpoint={"path": str(tmp_path / "ck.sqlite")})
    first = PackService(cfg, now=Clock())
    run(first, data[:250])
    assert first.checkpoint_now()
    first.close()
    second = PackService(cfg, now=Clock())  # restores on construction
    assert second.counters["restored"] == 1
    run(second, data[250:])
    assert np.array_equal(soc(second), soc(ref))
    assert second.pack_state("p1")["estimator"] == ref.pack_state("p1")["estimator"]


def test_after_a_kill_the_soc_continues_within_half_a_point(tmp_path: Path) -> None:
    data = samples(900)
    ref = PackService(service_config(), now=Clock())
    run(ref, data)
    clock = Clock(data[0]["ts"])
    cfg = service_config(checkpoint={"path": str(tmp_path / "ck.sqlite"), "interval_s": 10.0})
    first = PackService(cfg, now=clock)
    saved_at = None
    for k, d in enumerate(data[:300]):
        clock.t = d["ts"]
        run(first, [d])
        if first.maybe_checkpoint():
            saved_at = k
    assert saved_at is not None
    assert 300 - 10 <= saved_at < 300
    # killed: no checkpoint_now; the last samples after the save are lost with it
    second = PackService(cfg, now=clock)
    assert second.pack_state("p1")["seq"] == saved_at
    # the publisher went on meanwhile: the restored service resumes 60 s later
    clock.t = data[-1]["ts"]
    run(second, data[360:])
    gap = np.abs(soc(second) - soc(ref)).max()
    assert gap < 0.005, gap


def test_a_checkpoint_that_does_not_fit_the_config_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "ck.sqlite"
    first = PackService(service_config(checkpoint={"path": str(path)}), now=Clock())
    run(first, samples(5))
    first.checkpoint_now()
    first.close()
    other = PackService(service_config(n_cells=4, checkpoint={"path": str(path)}), now=Clock())
    assert other.counters["checkpoint_skipped"] == 1
    assert other.pack_state("p1")["seq"] is None
    st = json.loads(sqlite3.connect(path).execute("SELECT state FROM packs").fetchone()[0])
    assert st["n_cells"] == 8


def test_maybe_checkpoint_waits_for_the_interval_and_for_changes(tmp_path: Path) -> None:
    clock = Clock()
    cfg = service_config(checkpoint={"path": str(tmp_path / "ck.sqlite"), "interval_s": 10.0})
    s = PackService(cfg, now=clock)
    run(s, samples(1))
    assert not s.maybe_checkpoint()  # too early
    clock.t += 10
    assert s.maybe_checkpoint()
    clock.t += 10
    assert not s.maybe_checkpoint()  # nothing changed
    assert s.counters["checkpoints"] == 1
