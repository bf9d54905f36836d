"""Where run data goes: a validated :class:`DataConfig`.

Three ways to point labctl at Tiled, from least to most setup:

* nothing: the embedded default, a Tiled server that labctl starts in the background
  with an SQLite catalog and SQLite tables under ``$LABCTL_DATA`` (else ``./data/tiled``);
* ``catalog="postgresql+asyncpg://postgres@127.0.0.1:5432/labctl"``: the same embedded
  server, but its catalog and tables live in PostgreSQL (at scale);
* ``url="http://host:8000"`` (and ``api_key``): a Tiled server someone else runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_DIRECTORY = Path("data") / "tiled"
ENV_DIRECTORY = "LABCTL_DATA"
ENV_URL = "LABCTL_TILED_URL"
ENV_API_KEY = "LABCTL_TILED_API_KEY"
ENV_CATALOG = "LABCTL_TILED_CATALOG"


class DataError(RuntimeError):
    """Run data could not be stored or read (no server, unknown run, bad export)."""


class DataConfigError(DataError, ValueError):
    """A data setting is invalid; the message names the field and its value."""


def _default_directory() -> Path:
    return Path(os.environ.get(ENV_DIRECTORY) or DEFAULT_DIRECTORY)


class DataConfig(BaseModel):
    """Where and how runs are stored in Tiled (see docs/data.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path = Field(
        default_factory=_default_directory,
        description="data directory of the embedded server (files, SQLite, server record)",
    )
    url: str | None = Field(
        default=None, description="an existing Tiled server; none: labctl runs its own"
    )
    api_key: str | None = Field(default=None, description="API key for `url`")
    catalog: str | None = Field(
        default=None,
        description="catalog database of the embedded server (default: SQLite in `directory`)",
    )
    tabular: str | None = Field(
        default=None,
        description="database for event tables (default: SQLite in `directory`, or the "
        "PostgreSQL catalog's database)",
    )
    journal: bool = Field(
        default=True,
        description="journal every document to `directory`/journal before the plan goes on "
        "and write to Tiled in background batches (see labctl/data/journal.py); false: "
        "bluesky-tiled-plugins' TiledWriter on the RunEngine's thread, per `batch_size`",
    )
    journal_fsync: bool = Field(
        default=False,
        description="fsync each journal line: survives a power cut, not only a killed process",
    )
    max_batch: int = Field(
        default=1000, ge=1, le=100_000, description="with the journal: most documents per write"
    )
    stop_wait_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="with the journal: at a run's end, wait up to this long for Tiled to hold "
        "all of it before the RunEngine goes on (0: do not wait)",
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description="without the journal: events per write to Tiled; 1 makes each event "
        "durable before the plan goes on, more is faster but a killed process loses up to "
        "batch_size - 1 events",
    )
    backup: bool = Field(
        default=True,
        description="without the journal: if Tiled fails mid-run, keep the run's documents as "
        "JSON lines in `directory`/backup instead of failing the plan",
    )
    host: str = Field(default="127.0.0.1", description="interface the embedded server binds")
    start_timeout_s: float = Field(default=90.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if urlsplit(v).scheme not in ("http", "https"):
            raise ValueError(f"must be an http(s) URL of a Tiled server, got {v!r}")
        return v.rstrip("/")

    @field_validator("catalog")
    @classmethod
    def _catalog(cls, v: str | None) -> str | None:
        if v is None:
            return None
        scheme = urlsplit(v).scheme
        if scheme not in ("sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"):
            raise ValueError(
                f"must be a sqlite:/// or postgresql+asyncpg:// database URI, got {v!r}"
            )
        return v

    @field_validator("tabular")
    @classmethod
    def _tabular(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if urlsplit(v).scheme not in ("sqlite", "duckdb", "postgresql"):
            raise ValueError(f"must be a sqlite:///, duckdb:/// or postgresql:// URI, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.url is not None and (self.catalog is not None or self.tabular is not None):
            raise ValueError(
                f"url={self.url!r} names a running server; catalog/tabular only configure the "
                "embedded one: give one or the other"
            )
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> DataConfig:
        """Settings from ``$LABCTL_DATA``, ``$LABCTL_TILED_URL``, ``$LABCTL_TILED_API_KEY``
        and ``$LABCTL_TILED_CATALOG``; keyword arguments that are not None win."""
        values: dict[str, Any] = {}
        for field, env in (
            ("directory", ENV_DIRECTORY),
            ("url", ENV_URL),
            ("api_key", ENV_API_KEY),
            ("catalog", ENV_CATALOG),
        ):
            if os.environ.get(env):
                values[field] = os.environ[env]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return checked(values)

    # Resolved locations of the embedded server.

    @property
    def catalog_uri(self) -> str:
        """The catalog database, as Tiled's catalog wants it (async driver named)."""
        uri = self.catalog or f"sqlite:///{self.directory.resolve() / 'catalog.db'}"
        if uri.startswith("sqlite:"):
            return uri.replace("sqlite:", "sqlite+aiosqlite:", 1)
        if uri.startswith("postgresql:"):
            return uri.replace("postgresql:", "postgresql+asyncpg:", 1)
        return uri

    @property
    def tabular_uri(self) -> str:
        """Where event tables are written (Tiled's writable tabular storage, via ADBC)."""
        if self.tabular:
            return self.tabular
        if self.catalog and self.catalog.startswith("postgresql"):
            # The same database as the catalog: one thing to create, back up and grant.
            return "postgresql:" + self.catalog.split(":", 1)[1]
        return f"sqlite:///{self.directory.resolve() / 'tables.db'}"

    @property
    def files_directory(self) -> Path:
        """Where array data (zarr) and other files are written."""
        return self.directory.resolve() / "files"

    @property
    def journal_directory(self) -> Path:
        """Where the journal keeps runs not yet (completely) in Tiled."""
        return self.directory.resolve() / "journal"

    @property
    def backup_directory(self) -> Path:
        return self.directory.resolve() / "backup"


def checked(values: dict[str, Any]) -> DataConfig:
    """``DataConfig(**values)``; a failure names each bad field and its value."""
    try:
        return DataConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"]) or "(data config)"
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{field} = {err.get('input')!r}: {msg}")
        raise DataConfigError("invalid data settings:\n  " + "\n  ".join(problems)) from None


def redact(uri: str) -> str:
    """``uri`` without its password or ``api_key`` query parameter (for printing)."""
    parts = urlsplit(uri)
    user, _, host = parts.netloc.rpartition("@")
    has_password = ":" in user
    has_key = "api_key" in parse_qs(parts.query)
    if not (has_password or has_key):
        return uri
    netloc = f"{user.split(':', 1)[0]}:***@{host}" if has_password else parts.netloc
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("api_key="))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
