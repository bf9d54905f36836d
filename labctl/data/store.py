"""Runs in Tiled: write them from a RunEngine, find them by metadata, read and export them.

>>> store = open_store()                      # the embedded server, started if needed
>>> store.subscribe(RE)                       # every run of RE goes to Tiled (journaled)
>>> store.flush()                             # wait until Tiled holds all of it
>>> [r.uid for r in store.runs(campaign="C-7")]
>>> store.run(uid).streams["conductivity"].rows
>>> store.read(uid, "dosing")                 # a pandas DataFrame, one row per event
>>> store.export(uid, "parquet", Path("out"))  # one file per stream + metadata.json
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from labctl.data.config import DataConfig, DataError
from labctl.data.journal import JournaledWriter, RecoveredRun, recover
from labctl.data.server import ServerRecord, ensure_server
from labctl.data.writer import make_writer

if TYPE_CHECKING:
    import pandas
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

ExitStatus = Literal["success", "fail", "abort", "incomplete"]
ExportFormat = Literal["csv", "parquet"]
EXPORT_FORMATS: tuple[str, ...] = ("csv", "parquet")

# Start-document keys labctl plans set and `labctl runs list` shows.
SUMMARY_KEYS = ("plan_name", "sample_id", "campaign_id", "operator")


@dataclass(frozen=True)
class RunSummary:
    """One run as listed: who, what, when, how it ended.

    ``exit_status`` is ``"incomplete"`` when the run has no stop document: it is still
    going, or its process died (events written before that are still readable).
    ``num_events`` (per stream) comes from the stop document, so it is empty then.
    """

    uid: str
    time: float
    plan_name: str
    sample_id: str
    campaign_id: str
    operator: str
    exit_status: ExitStatus
    reason: str
    duration_s: float | None
    num_events: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "time": self.time,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.time)),
            "plan_name": self.plan_name,
            "sample_id": self.sample_id,
            "campaign_id": self.campaign_id,
            "operator": self.operator,
            "exit_status": self.exit_status,
            "reason": self.reason,
            "duration_s": self.duration_s,
            "num_events": dict(self.num_events),
        }


@dataclass(frozen=True)
class StreamInfo:
    """A stream of a run as stored: its rows (events written) and columns with units."""

    name: str
    rows: int
    columns: list[str]
    units: dict[str, str]


@dataclass(frozen=True)
class RunInfo:
    """A run's summary, documents' metadata and streams."""

    summary: RunSummary
    start: dict[str, Any]
    stop: dict[str, Any] | None
    streams: dict[str, StreamInfo]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary.as_dict(),
            "start": self.start,
            "stop": self.stop,
            "streams": {
                s.name: {"rows": s.rows, "columns": s.columns, "units": s.units}
                for s in self.streams.values()
            },
        }


def summarize(uid: str, metadata: dict[str, Any]) -> RunSummary:
    """A :class:`RunSummary` from a run node's metadata (``start`` and maybe ``stop``)."""
    start: dict[str, Any] = metadata.get("start") or {}
    stop: dict[str, Any] | None = metadata.get("stop")
    t0 = float(start.get("time", math.nan))
    status: ExitStatus = "incomplete"
    reason = "no stop document: still running, or its process died"
    duration = None
    events: dict[str, int] = {}
    if stop:
        status = stop.get("exit_status", "incomplete")
        reason = str(stop.get("reason") or "")
        duration = float(stop["time"]) - t0 if "time" in stop else None
        events = {str(k): int(v) for k, v in (stop.get("num_events") or {}).items()}
    return RunSummary(
        uid=str(start.get("uid", uid)),
        time=t0,
        plan_name=str(start.get("plan_name", "")),
        sample_id=str(start.get("sample_id", "")),
        campaign_id=str(start.get("campaign_id", "")),
        operator=str(start.get("operator", "")),
        exit_status=status,
        reason=reason,
        duration_s=duration,
        num_events=events,
    )


class Store:
    """Runs in one Tiled server. Make one with :func:`open_store`."""

    def __init__(self, client: Any, config: DataConfig, server: ServerRecord | None = None) -> None:
        self._client = client
        # Reads go through plain containers and tables: bluesky-tiled-plugins' run and
        # stream clients would import xarray and dask (seconds) for nothing we use.
        self._plain = client.new_variation(structure_clients=_plain_clients())
        self.config = config
        self.server = server
        """The embedded server's record (None when ``config.url`` names another server)."""
        self._writers: list[JournaledWriter] = []
        self.recovered: list[RecoveredRun] = []
        """Runs :meth:`recover` wrote from the journal (``open_store`` calls it)."""

    @property
    def client(self) -> Any:
        """The Tiled client at the root of the runs (``client[uid]`` is a bluesky-tiled-plugins
        ``BlueskyRun``)."""
        return self._client

    @property
    def url(self) -> str:
        """The server's URL (without the API key)."""
        return str(self._client.context.api_uri).removesuffix("/api/v1/").rstrip("/")

    # Writing

    def writer(self) -> JournaledWriter | TiledWriter:
        """A new RunEngine callback writing runs here: journaled (the default; see
        :mod:`labctl.data.journal`), or TiledWriter per ``config.batch_size``."""
        if self.config.journal:
            writer = JournaledWriter(
                self._client,
                self.config.journal_directory,
                max_batch=self.config.max_batch,
                fsync=self.config.journal_fsync,
                stop_wait_s=self.config.stop_wait_s,
            )
            self._writers.append(writer)
            return writer
        backup = self.config.backup_directory if self.config.backup else None
        return make_writer(self._client, batch_size=self.config.batch_size, backup_directory=backup)

    def subscribe(self, RE: RunEngine) -> int:  # noqa: N803 - bluesky's name for it
        """Send every document of ``RE`` here; returns the token for ``RE.unsubscribe``."""
        return int(RE.subscribe(self.writer()))  # type: ignore[no-untyped-call]

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until Tiled holds every document this store's writers have journaled
        (reads through this store do this first); False if that took over ``timeout``."""
        results = [w.flush(timeout) for w in self._writers]  # every writer, not the first False
        return all(results)

    def recover(self) -> list[RecoveredRun]:
        """Write into Tiled the runs that killed (or Tiled-less) writers left in the journal."""
        done = recover(self._client, self.config.journal_directory)
        self.recovered.extend(done)
        return done

    # Reading

    def runs(
        self,
        *,
        campaign: str | None = None,
        sample: str | None = None,
        plan: str | None = None,
        limit: int | None = None,
        **start_keys: Any,
    ) -> list[RunSummary]:
        """Runs, newest first, whose start document matches every given value.

        ``campaign``, ``sample`` and ``plan`` match ``campaign_id``, ``sample_id`` and
        ``plan_name``; other keywords match start-document keys of that name.
        """
        from tiled.queries import Key, SpecsQuery

        self.flush()
        wanted = {"campaign_id": campaign, "sample_id": sample, "plan_name": plan, **start_keys}
        node = self._plain.search(SpecsQuery(["BlueskyRun"]))
        for key, value in wanted.items():
            if value is not None:
                node = node.search(Key(f"start.{key}") == value)
        node = node.sort(("start.time", -1))
        if limit is not None and limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit!r}")
        items = itertools.islice(node.items(), limit)
        return [summarize(uid, dict(run.metadata)) for uid, run in items]

    def _node(self, uid: str) -> tuple[str, Any]:
        """The run whose uid is ``uid`` or starts with it (as `runs list` abbreviates)."""
        self.flush()
        if not uid or not all(c.isalnum() or c == "-" for c in uid):
            raise DataError(f"uid: {uid!r} is not a run uid (letters, digits and -)")
        try:
            return uid, self._plain[uid]
        except KeyError:
            pass
        from tiled.queries import Like

        found = list(itertools.islice(self._plain.search(Like("start.uid", f"{uid}%")).items(), 3))
        if not found:
            raise DataError(f"uid: no run {uid!r} in {self.url}")
        if len(found) > 1:
            raise DataError(
                f"uid: {uid!r} is ambiguous ({', '.join(k for k, _ in found)}...): give more of it"
            )
        return str(found[0][0]), found[0][1]

    def run(self, uid: str) -> RunInfo:
        """A run's metadata and streams (with the number of events written to each)."""
        uid, node = self._node(uid)
        metadata = dict(node.metadata)
        streams = {}
        for name in list(node):
            stream = node[name]
            descriptor = dict(stream.metadata)
            data_keys: dict[str, Any] = descriptor.get("data_keys") or {}
            units = {k: str(v["units"]) for k, v in data_keys.items() if v.get("units")}
            tables = [k for k in stream if k == "internal" or k.startswith("internal_")]
            rows = 0
            if tables:
                rows = len(stream[tables[0]].read(columns=["seq_num"]))
            streams[name] = StreamInfo(name, rows, list(data_keys), units)
        return RunInfo(
            summary=summarize(uid, metadata),
            start=dict(metadata.get("start") or {}),
            stop=dict(metadata["stop"]) if metadata.get("stop") else None,
            streams=streams,
        )

    def read(self, uid: str, stream: str) -> pandas.DataFrame:
        """One stream of a run: one row per event (``seq_num``, ``time``, each data key,
        and ``ts_<key>`` timestamps); array-valued keys become columns of lists."""
        import pandas

        uid, node = self._node(uid)
        if stream not in node:
            raise DataError(f"stream: run {uid} has no stream {stream!r} (has {list(node)})")
        base = node[stream]
        keys = list(base)
        tables = [base[k].read() for k in keys if k == "internal" or k.startswith("internal_")]
        frame = pandas.concat(tables, axis=1) if tables else pandas.DataFrame()
        frame = frame.loc[:, ~frame.columns.duplicated()]  # split tables repeat seq_num/time
        for key in keys:
            if key == "internal" or key.startswith("internal_"):
                continue
            values = base[key].read()
            if len(values) == len(frame):
                frame[key] = list(values)
        return frame.reset_index(drop=True)

    def export(self, uid: str, format: ExportFormat, path: Path) -> list[Path]:
        """Write each stream of a run to ``path/<stream>.<format>`` and the start and stop
        documents and per-stream units to ``path/metadata.json``; the files written."""
        if format not in EXPORT_FORMATS:
            raise DataError(f"format: must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
        info = self.run(uid)
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for name in info.streams:
            frame = self.read(info.summary.uid, name)
            out = path / f"{name}.{format}"
            if format == "csv":
                for col in frame.columns:  # arrays as JSON, so the CSV stays one row per event
                    if frame[col].dtype == object and any(
                        hasattr(v, "__len__") and not isinstance(v, str) for v in frame[col]
                    ):
                        frame[col] = [json.dumps(_plain(v)) for v in frame[col]]
                frame.to_csv(out, index=False)
            else:
                frame.to_parquet(out, index=False)
            written.append(out)
        meta = path / "metadata.json"
        meta.write_text(json.dumps(_plain(info.as_dict()), indent=1, sort_keys=True) + "\n")
        written.append(meta)
        return written

    # Lifetime

    def close(self) -> None:
        """Write what the writers hold, end them, close the HTTP connections (the embedded
        server keeps running)."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        self._client.context.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _plain_clients() -> Any:
    """Tiled's default structure clients, loaded lazily, without special (spec) clients."""
    import importlib

    from tiled.utils import OneShotCachedMap

    def lazy(module: str, name: str) -> Any:
        return lambda: getattr(importlib.import_module(module), name)

    table = lazy("tiled.client.dataframe", "DataFrameClient")
    return OneShotCachedMap(
        {
            "container": lazy("tiled.client.container", "Container"),
            "composite": lazy("tiled.client.container", "Container"),  # its parts, as stored
            "array": lazy("tiled.client.array", "ArrayClient"),
            "table": table,
            "dataframe": table,
            "ragged": lazy("tiled.client.ragged", "RaggedClient"),
            "sparse": lazy("tiled.client.sparse", "SparseClient"),
        }
    )


def _plain(value: Any) -> Any:
    """JSON-able copy of ``value`` (numpy arrays and scalars included)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def open_store(config: DataConfig | None = None, *, recover: bool = True) -> Store:
    """Connect to the runs' Tiled server: ``config.url``, else the embedded server for
    ``config.directory`` (started in the background when none is running).

    ``config`` defaults to :meth:`DataConfig.from_env`. With ``recover`` (the default),
    runs a killed process left in the journal are written to Tiled first
    (:meth:`Store.recover`), so reads see every event that was journaled.
    """
    from tiled.client import from_uri

    config = config if config is not None else DataConfig.from_env()
    server = None
    if config.url is not None:
        url, api_key, trust_env = config.url, config.api_key, True
    else:
        server = ensure_server(config)
        url, api_key, trust_env = server.url, server.api_key, False  # local: no proxies
    try:
        client = from_uri(url, api_key=api_key, trust_env=trust_env, show_progress=False)
    except Exception as exc:  # tiled raises httpx and its own errors; say which server
        raise DataError(f"cannot connect to Tiled at {url}: {exc}") from exc
    store = Store(client, config, server)
    if recover:
        store.recover()
    return store
