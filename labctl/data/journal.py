"""A write-ahead journal in front of Tiled: every document durable in microseconds, written
to Tiled in batches by a background thread, replayed into Tiled after a crash.

Why: bluesky-tiled-plugins' ``TiledWriter`` either writes every event with its own HTTP
request (durable, but 50-80 ms per event: slower than an accelerated cycler streams) or
buffers up to ``batch_size`` events in memory (fast, but a killed process loses them).
:class:`JournaledWriter` does both jobs apart:

* On the RunEngine's thread it appends each document as one JSON line to
  ``<journal>/<run uid>.jsonl`` (one ``write`` on an ``O_APPEND`` descriptor; optionally
  ``fsync``). Once the callback returns, the document survives a SIGKILL of the process
  (and, with ``fsync=True``, a power cut).
* A drain thread feeds the documents to a ``TiledWriter`` and, after each batch (whatever
  queued while the previous write was in flight, up to ``max_batch`` documents), writes
  the buffered rows: one HTTP append per stream per batch. When a run's stop document is
  in Tiled its journal file is removed.
* A run whose journal file is left behind (the process was killed, or Tiled failed mid-run)
  is rewritten from its journal by :func:`recover`: the partial copy in Tiled, if any, is
  deleted and the run is written again from its first document. A run without a stop
  document stays incomplete (no stop), as the process left it. ``open_store`` recovers
  before it returns, so readers see every journaled event.

Each live journal file holds an exclusive ``flock`` while its writer runs, so recovery
never touches a run that another process is still writing; the kernel drops the lock
when a process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
_STOP = object()  # tells the drain thread to end


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars (and anything with ``tolist``) as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot journal a {type(value).__name__}: {value!r}")


def encode(name: str, doc: dict[str, Any]) -> bytes:
    """One journal line: ``[name, doc]`` as JSON, newline-terminated."""
    return (json.dumps([name, doc], default=_jsonable, separators=(",", ":")) + "\n").encode()


@dataclass
class JournalRead:
    """What one journal file holds."""

    path: Path
    uid: str
    documents: list[tuple[str, dict[str, Any]]]
    torn_tail: bool
    """The last line was cut short (the process died inside a write); it is left out."""

    @property
    def complete(self) -> bool:
        return any(name == "stop" for name, _ in self.documents)

    @property
    def events(self) -> int:
        n = 0
        for name, doc in self.documents:
            if name == "event":
                n += 1
            elif name == "event_page":
                n += len(doc.get("seq_num", ()))
        return n


class JournalError(RuntimeError):
    """A journal file cannot be read back (a bad line other than a torn last one)."""


def read_journal(path: Path) -> JournalRead:
    """The documents of one journal file, in the order they were written."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a torn last line
    docs: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        try:
            name, doc = json.loads(line)
        except (ValueError, TypeError) as exc:
            raise JournalError(
                f"{path}:{number}: not a journal line ({exc}): {line[:80]!r}"
            ) from None
        docs.append((str(name), doc))
    if not docs or docs[0][0] != "start":
        raise JournalError(f"{path}: does not begin with a start document")
    return JournalRead(path, str(docs[0][1]["uid"]), docs, torn_tail=bool(tail))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass
class _Run:
    uid: str
    fd: int
    path: Path
    failed: str | None = None  # why writing it live to Tiled stopped (journal still has it)
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class RecoveredRun:
    uid: str
    events: int
    complete: bool
    replaced: bool
    """A partial copy was already in Tiled and was replaced by the journal's."""
    error: str | None = None
    """Why the journal could not be replayed (it is renamed ``*.unreadable`` and kept)."""


@dataclass
class WriterStats:
    documents: int = 0
    events: int = 0
    batches: int = 0
    written_events: int = 0
    failures: list[str] = field(default_factory=list)


def _ends_batch(item: Any) -> bool:
    return item is _STOP or item[1] == "stop"


class _Batcher:
    """A ``TiledWriter`` that buffers events until :meth:`flush` writes them.

    ``TiledWriter`` writes buffered rows only when ``batch_size`` fill up or at a run's
    stop; the drain thread wants them written at the end of every batch. This reaches
    into ``bluesky_tiled_plugins.writing.tiled_writer._RunWriter`` (private, hence the
    exact version pin in pyproject.toml and tests/data/test_journal.py exercising it).
    """

    def __init__(self, client: Any) -> None:
        from bluesky_tiled_plugins import TiledWriter
        from bluesky_tiled_plugins.writing import tiled_writer as tw

        run_writers = self.run_writers = {}  # type: dict[str, Any]

        class _Normalizer(tw.RunNormalizer):  # type: ignore[misc]
            # RunNormalizer checks every document against its JSON schema: ~0.7 ms per
            # event, most of the drain's cost. Events come from a RunEngine whose
            # descriptor was checked (or from a journal of them): check all but events.
            def emit(self, name: Any, doc: dict[str, Any]) -> None:
                if getattr(name, "name", name) != "event":  # a DocumentNames member
                    tw.schema_validators[name].validate(doc)
                self.dispatcher.process(name, doc)

        class _Writer(TiledWriter):  # type: ignore[misc]
            def _factory(self, name: str, doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
                run_writer = tw._RunWriter(
                    self.client, batch_size=1 << 30, max_array_size=self._max_array_size
                )
                run_writers[str(doc["uid"])] = run_writer
                cb = _Normalizer(patches=self.patches, spec_to_mimetype=self.spec_to_mimetype)
                cb.subscribe(run_writer)
                return [cb], []

        self.writer = _Writer(client)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.writer(name, doc)
        if name == "stop":
            self.run_writers.pop(str(doc["run_start"]), None)

    def flush(self, uid: str) -> None:
        """Write the buffered rows of run ``uid``."""
        rw = self.run_writers.get(uid)
        if rw is None:
            return
        for desc_name, rows in rw._internal_data_cache.items():
            if rows:
                rw._write_internal_data(rows, desc_node=rw._desc_nodes[desc_name])
                rows.clear()

    def forget(self, uid: str) -> None:
        """Drop run ``uid`` (its live writing failed; the journal will rewrite it)."""
        self.run_writers.pop(uid, None)


class JournaledWriter:
    """A RunEngine callback: journal each document, write it to Tiled in the background.

    ``client``: a writable Tiled container (the runs' root). ``directory``: the journal
    (created if missing). ``max_batch``: most documents per drain step. ``fsync``: also
    ``fsync`` each line (survives a power cut; costs a disk flush per document).
    ``linger_s``: how long the drain gathers documents before a write (a stop document
    or ``max_batch`` ends it sooner). ``stop_wait_s``: at a run's stop document, wait up
    to this long for the drain to put the run's last batch in Tiled, so that whoever ran
    the plan reads it complete (0: do not wait). Call :meth:`flush` to wait for
    everything so far, :meth:`close` at the end.
    """

    def __init__(
        self,
        client: Any,
        directory: Path,
        *,
        max_batch: int = 1000,
        fsync: bool = False,
        linger_s: float = 0.2,
        stop_wait_s: float = 30.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch!r}")
        self.client = client
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_batch = max_batch
        self.fsync = fsync
        self.stop_wait_s = stop_wait_s
        self.linger_s = linger_s
        self.stats = WriterStats()
        self._runs: dict[str, _Run] = {}  # open runs by start uid (RunEngine thread)
        self._owner: dict[str, str] = {}  # descriptor/resource uid -> run uid
        self._last_run: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="labctl-tiled-drain", daemon=True)
        self._thread.start()

    # -- the RunEngine's side ------------------------------------------------------------

    def _run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        if name == "start":
            return str(doc["uid"])
        for key in ("run_start", "descriptor", "resource", "stream_resource"):
            owner = doc.get(key)
            if isinstance(owner, str):
                return self._owner.get(owner, owner if key == "run_start" else None)
        return self._last_run

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("JournaledWriter is closed")
        uid = self._run_of(name, doc)
        if uid is None:
            raise ValueError(f"{name} document {doc.get('uid')!r} belongs to no open run")
        if name == "start":
            path = self.directory / f"{uid}{SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise RuntimeError(f"journal {path} is locked by another writer")
            self._runs[uid] = _Run(uid, fd, path)
        run = self._runs.get(uid)
        if run is None:
            raise ValueError(f"{name} document for run {uid!r}, which is not open here")
        if name in ("descriptor", "resource", "stream_resource") and "uid" in doc:
            self._owner[str(doc["uid"])] = uid
        line = encode(name, doc)
        os.write(run.fd, line)
        if self.fsync:
            os.fsync(run.fd)
        self._last_run = uid
        self.stats.documents += 1
        if name == "event":
            self.stats.events += 1
        if name == "stop":
            del self._runs[uid]
            self._owner = {k: v for k, v in self._owner.items() if v != uid}
        self._queue.put((run, name, doc))
        if name == "stop" and self.stop_wait_s > 0:
            run.finished.wait(self.stop_wait_s)

    # -- the drain thread ----------------------------------------------------------------

    def _drain(self) -> None:
        batcher = _Batcher(self.client)
        while True:
            batch = [self._queue.get()]
            # Linger: gather what arrives for a moment (a run's stop ends the wait), so
            # each HTTP request carries many rows; its per-request cost is what competes
            # with the RunEngine for the CPU.
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch and not _ends_batch(batch[-1]):
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._write(batch, batcher)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if any(item is _STOP for item in batch):
                return

    def _write(self, batch: list[Any], batcher: _Batcher) -> None:
        touched: dict[str, _Run] = {}
        done: list[_Run] = []
        for item in batch:
            if item is _STOP:
                continue
            run, name, doc = item
            touched[run.uid] = run
            if name == "stop":
                done.append(run)
            if run.failed:
                continue
            try:
                batcher(name, doc)  # a stop writes the run's buffered rows first
                if name == "event":
                    self.stats.written_events += 1
            except Exception as exc:  # Tiled down, HTTP error: the journal keeps the run
                self._fail(run, exc, batcher)
        for run in touched.values():
            if not run.failed:
                try:
                    batcher.flush(run.uid)
                except Exception as exc:
                    self._fail(run, exc, batcher)
        self.stats.batches += 1
        for run in done:
            if run.failed:
                self._rewrite(run)
            self._finish(run)

    def _fail(self, run: _Run, exc: Exception, batcher: _Batcher) -> None:
        batcher.forget(run.uid)
        run.failed = f"{type(exc).__name__}: {exc}"
        self.stats.failures.append(f"{run.uid}: {run.failed}")
        logger.warning(
            "run %s: writing to Tiled failed (%s); its journal %s keeps every document and "
            "it will be rewritten at its stop or by the next recovery",
            run.uid, run.failed, run.path,
        )  # fmt: skip

    def _rewrite(self, run: _Run) -> None:
        """Tiled failed during the run: write it again from its journal now, if Tiled is back."""
        if not _reachable(self.client):  # skip tiled's retries (tens of seconds) when it is down
            logger.warning("run %s: Tiled unreachable; the run stays in %s", run.uid, run.path)
            return
        try:
            replay(self.client, read_journal(run.path))
            run.failed = None
        except Exception as exc:
            logger.warning(
                "run %s: still cannot write it to Tiled (%s); left in %s", run.uid, exc, run.path
            )

    def _finish(self, run: _Run) -> None:
        if not run.failed:
            run.path.unlink(missing_ok=True)
        os.close(run.fd)  # drops the lock; a journal left behind is recover()'s
        run.finished.set()

    # -- lifetime --------------------------------------------------------------------------

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every document so far has been handled by the drain thread
        (written to Tiled, or left in the journal after a failure); False on timeout."""
        if timeout is None:
            self._queue.join()
            return True
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush, end the drain thread and close open runs' journals (kept for recovery)."""
        if self._closed:
            return True
        self._closed = True
        self._queue.put(_STOP)
        ok = self.flush(timeout)
        self._thread.join(timeout=1.0 if timeout is None else max(timeout, 1.0))
        for run in self._runs.values():
            os.close(run.fd)
        self._runs.clear()
        return ok


# -- recovery ----------------------------------------------------------------------------


def _reachable(client: Any, timeout: float = 2.0) -> bool:
    """Whether the client's server answers at all (one GET, no retries)."""
    try:
        http = client.context.http_client
        http.get(str(client.context.api_uri), timeout=timeout)
    except Exception:
        return False
    return True


def replay(client: Any, journal: JournalRead) -> bool:
    """Write one run into Tiled from its journal; returns whether a partial copy was replaced."""
    batcher = _Batcher(client)
    replaced = journal.uid in client
    if replaced:
        client.delete_contents(journal.uid, recursive=True, external_only=False)
    for name, doc in journal.documents:
        batcher(name, doc)
    batcher.flush(journal.uid)
    return replaced


def pending(directory: Path) -> list[Path]:
    """Journal files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)


@dataclass
class _Locked:
    path: Path
    fd: int


def _locked_journals(directory: Path) -> Iterator[_Locked]:
    """Each journal file no live writer holds, locked for the caller."""
    for path in pending(directory):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if not _try_lock(fd):
            os.close(fd)
            continue
        try:
            yield _Locked(path, fd)
        finally:
            os.close(fd)


def recover(client: Any, directory: Path) -> list[RecoveredRun]:
    """Rewrite into Tiled every run whose journal a dead (or failed) writer left behind.

    Journals of live writers are skipped. A journal is removed once its run is in Tiled;
    one that cannot be read (a bad line before its last) is renamed ``*.unreadable``, kept
    for a person to look at, and reported with the file and line. Tiled errors raise.
    """
    recovered = []
    for held in _locked_journals(directory):
        if not held.path.exists():  # finished between listing and locking
            continue
        try:
            journal = read_journal(held.path)
        except JournalError as exc:
            held.path.rename(held.path.with_name(held.path.name + ".unreadable"))
            logger.error("%s", exc)
            recovered.append(RecoveredRun(held.path.stem, 0, False, False, error=str(exc)))
            continue
        replaced = replay(client, journal)
        held.path.unlink()
        recovered.append(RecoveredRun(journal.uid, journal.events, journal.complete, replaced))
        logger.info("recovered run %s from %s (%d events)", journal.uid, held.path, journal.events)
    return recovered
