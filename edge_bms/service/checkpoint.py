"""Estimator checkpoints in SQLite (WAL mode): one row per pack, every save one transaction.

A save either lands whole or not at all: SQLite's WAL commit is atomic, so a process
killed (SIGKILL) mid-save leaves the previous checkpoint readable. ``synchronous=NORMAL``
is crash safe for the process; a power cut may lose the last save or two, never the
file's consistency.

    store = CheckpointStore("state.sqlite")
    store.save({"p1": {"seq": 41, "ts": 1.7e9, ...}})   # "seq"/"ts" also go to columns
    store.load()                                         # {"p1": {...}}
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edge_bms.errors import CheckpointError

FORMAT = "edge_bms.service.checkpoint/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    pack TEXT PRIMARY KEY,
    seq INTEGER,
    ts REAL,
    saved_at REAL NOT NULL,
    state TEXT NOT NULL
);
"""


class CheckpointStore:
    """A SQLite file of pack states; safe to call from one thread at a time, any thread
    (a lock guards the connection, so the writer may run in an executor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CheckpointError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif row[0] != FORMAT:
                raise CheckpointError(f"{self.path}: format {row[0]!r}, expected {FORMAT!r}")
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointError(f"{self.path}: cannot open the checkpoint: {exc}") from exc

    def save(self, pack_states: Mapping[str, Mapping[str, Any]]) -> None:
        """Write (insert or replace) these packs' states in one transaction."""
        now = time.time()
        rows = []
        for pack, state in pack_states.items():
            try:
                text = json.dumps(state, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"pack {pack!r}: state is not JSON-able: {exc}") from exc
            rows.append((pack, state.get("seq"), state.get("ts"), now, text))
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise CheckpointError(f"{self.path}: checkpoint not written: {exc}") from exc

    def delete(self, packs: Iterable[str]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM packs WHERE pack = ?", [(p,) for p in packs])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise CheckpointError(f"{self.path}: cannot delete: {exc}") from exc

    def load(self) -> dict[str, dict[str, Any]]:
        """Every pack's last saved state. A row that does not parse raises CheckpointError
        (naming the pack): a checkpoint is not guessed at."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT pack, state FROM packs ORDER BY pack").fetchall()
            except sqlite3.Error as exc:
                raise CheckpointError(f"{self.path}: cannot read: {exc}") from exc
        out: dict[str, dict[str, Any]] = {}
        for pack, text in rows:
            try:
                state = json.loads(text)
            except ValueError as exc:
                raise CheckpointError(f"{self.path}: pack {pack!r}: not JSON: {exc}") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{self.path}: pack {pack!r}: not an object")
            out[str(pack)] = state
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
