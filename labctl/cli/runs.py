"""`labctl runs`: runs stored in Tiled (list, show, export) and the embedded server."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from labctl.data import DataConfig, Store

runs = typer.Typer(
    no_args_is_help=True,
    help="Runs stored in Tiled: list, show, export; the embedded Tiled server.",
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Data directory of the embedded server (env LABCTL_DATA; default ./data/tiled).",
    ),
]
Url = Annotated[
    str | None,
    typer.Option(
        help="An existing Tiled server instead of the embedded one (env LABCTL_TILED_URL)."
    ),
]
ApiKey = Annotated[str | None, typer.Option(help="API key for --url (env LABCTL_TILED_API_KEY).")]
Catalog = Annotated[
    str | None,
    typer.Option(
        help="Catalog database of the embedded server, e.g. "
        "postgresql+asyncpg://postgres@127.0.0.1:5432/labctl "
        "(env LABCTL_TILED_CATALOG; default SQLite)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _config(
    data: Path | None, url: str | None, api_key: str | None, catalog: str | None = None
) -> DataConfig:
    from labctl.data import DataConfig, DataConfigError

    try:
        return DataConfig.from_env(directory=data, url=url, api_key=api_key, catalog=catalog)
    except DataConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@contextmanager
def _store(config: DataConfig) -> Iterator[Store]:
    """Open the store, saying so when the embedded server must be started (seconds)."""
    from labctl.data import DataError, open_store
    from labctl.data.server import is_alive, read_record

    if config.url is None:
        record = read_record(config.directory.resolve())
        if record is None or not is_alive(record.url, record.api_key):
            typer.echo(
                f"Starting the embedded Tiled server (data in {config.directory.resolve()})...",
                err=True,
            )
    try:
        with open_store(config) as store:
            for run in store.recovered:
                if run.error:
                    typer.echo(f"journal of run {run.uid} unreadable: {run.error}", err=True)
                else:
                    state = "complete" if run.complete else "incomplete (its process was killed)"
                    typer.echo(
                        f"recovered run {run.uid} from the journal: {run.events} events, {state}",
                        err=True,
                    )
            yield store
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t == t else "?"


@runs.command("list")
def runs_list(
    campaign: Annotated[str | None, typer.Option(help="Only runs of this campaign_id.")] = None,
    sample: Annotated[str | None, typer.Option(help="Only runs of this sample_id.")] = None,
    plan: Annotated[str | None, typer.Option(help="Only runs of this plan_name.")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="At most this many (newest).")] = None,
    as_json: AsJson = False,
    data: DataDir = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Runs, newest first: uid, start time, plan, sample, campaign, exit status, events."""
    with _store(_config(data, url, api_key)) as store:
        found = store.runs(campaign=campaign, sample=sample, plan=plan, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in found], indent=1))
        return
    if not found:
        typer.echo("no runs" + (f" of campaign {campaign!r}" if campaign else ""))
        return
    typer.echo(
        f"{'uid':8}  {'started':19}  {'plan':22}  {'sample':24}  {'campaign':12}  "
        f"{'status':10}  events"
    )
    for r in found:
        events = sum(r.num_events.values()) if r.num_events else "-"
        typer.echo(
            f"{r.uid[:8]:8}  {_when(r.time):19}  {r.plan_name[:22]:22}  {r.sample_id[:24]:24}  "
            f"{r.campaign_id[:12]:12}  {r.exit_status:10}  {events}"
        )


def _short(value: Any, width: int = 90) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


@runs.command("show")
def runs_show(
    uid: Annotated[str, typer.Argument(help="Run uid, or its first characters.")],
    as_json: AsJson = False,
    data: DataDir = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """A run's metadata, streams (rows written, columns, units) and exit status."""
    from labctl.data import DataError

    with _store(_config(data, url, api_key)) as store:
        try:
            info = store.run(uid)
        except DataError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(info.as_dict(), indent=1, default=str))
        return
    s = info.summary
    took = f" after {s.duration_s:.1f} s" if s.duration_s is not None else ""
    typer.echo(f"run {s.uid}")
    typer.echo(f"  status    {s.exit_status}{took}" + (f": {s.reason}" if s.reason else ""))
    for label, value in (
        ("plan", s.plan_name), ("sample", s.sample_id), ("campaign", s.campaign_id),
        ("operator", s.operator), ("started", _when(s.time)),
    ):  # fmt: skip
        typer.echo(f"  {label:9} {value}")
    typer.echo("streams:")
    for st in info.streams.values():
        cols = ", ".join(f"{c} [{st.units[c]}]" if c in st.units else c for c in st.columns)
        typer.echo(f"  {st.name:14} {st.rows:6d} rows   {cols}")
    if not info.streams:
        typer.echo("  (none)")
    typer.echo("start document:")
    skip = {"uid", "time", "plan_name", "sample_id", "campaign_id", "operator", "versions"}
    for key, value in info.start.items():
        if key not in skip:
            typer.echo(f"  {key}: {_short(value)}")


@runs.command("export")
def runs_export(
    uid: Annotated[str, typer.Argument(help="Run uid, or its first characters.")],
    format: Annotated[str, typer.Option("--format", "-f", help="csv or parquet.")] = "csv",
    out: Annotated[
        Path | None, typer.Option(help="Directory to write into (default ./export/<uid>).")
    ] = None,
    data: DataDir = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Write each stream to OUT/<stream>.<format> and the documents to OUT/metadata.json."""
    from labctl.data import DataError
    from labctl.data.store import EXPORT_FORMATS

    if format not in EXPORT_FORMATS:
        raise typer.BadParameter(f"must be csv or parquet, got {format!r}", param_hint="--format")
    with _store(_config(data, url, api_key)) as store:
        try:
            full = store.run(uid).summary.uid
            files = store.export(full, format, out or Path("export") / full)  # type: ignore[arg-type]
        except DataError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    for path in files:
        typer.echo(str(path))


@runs.command("recover")
def runs_recover(
    as_json: AsJson = False, data: DataDir = None, url: Url = None, api_key: ApiKey = None
) -> None:
    """Write into Tiled the runs a killed process left in the journal (any `runs` command
    and every labctl store does this on opening; this one says what it found)."""
    config = _config(data, url, api_key)
    with _store(config) as store:
        found = [
            {"uid": r.uid, "events": r.events, "complete": r.complete, "error": r.error}
            for r in store.recovered
        ]
    if as_json:
        typer.echo(json.dumps(found))
    elif not found:
        typer.echo(f"nothing to recover in {config.journal_directory}")


@runs.command("server")
def runs_server(
    stop: Annotated[bool, typer.Option("--stop", help="Stop the embedded server.")] = False,
    as_json: AsJson = False,
    data: DataDir = None,
    catalog: Catalog = None,
) -> None:
    """Start (or find) the embedded Tiled server and print where it is; --stop stops it."""
    from labctl.data import DataError, ensure_server, stop_server

    config = _config(data, None, None, catalog)
    directory = config.directory.resolve()
    if stop:
        stopped = stop_server(directory)
        typer.echo(
            f"stopped pid {stopped.pid}" if stopped else f"no server recorded in {directory}"
        )
        return
    typer.echo(f"Tiled server for {directory}...", err=True)
    try:
        record = ensure_server(config)
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    info = {**record.describe(), "record": str(directory / "server.json")}
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        typer.echo(f"{key:14} {value}")
    typer.echo(
        "Python: from labctl.data import open_store, DataConfig; "
        f"store = open_store(DataConfig(directory={str(directory)!r}))",
        file=sys.stdout,
    )
