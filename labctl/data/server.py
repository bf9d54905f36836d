"""The embedded Tiled server: started by labctl in the background, found again by its record.

``ensure_server(config)`` returns a running server for ``config.directory``: the one
recorded in ``<directory>/server.json`` if it answers with the recorded API key, else a
new one. A new server is a detached process (``python -m labctl.data.tiled_server``, its own
session, so it outlives the command that started it and a SIGKILL of a plan's process
does not touch it) serving on ``127.0.0.1`` with a random port and a random single-user
API key. It writes the record (mode 0600) once it answers, and removes it on SIGTERM.
A lock file serialises concurrent starters. Its log is ``<directory>/server.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from labctl.data.config import DataConfig, DataError, redact

RECORD = "server.json"
LOCK = "server.lock"
LOG = "server.log"
KEY_ENV = "LABCTL_TILED_SERVER_API_KEY"  # hands the key to the child without argv (ps)


@dataclass(frozen=True)
class ServerRecord:
    """What a running embedded server wrote about itself."""

    url: str
    api_key: str
    pid: int
    catalog: str
    tabular: str
    files: str
    started: float
    tiled_version: str

    def describe(self) -> dict[str, Any]:
        """The record without secrets (for printing)."""
        out = asdict(self)
        out.pop("api_key")
        out["catalog"], out["tabular"] = redact(self.catalog), redact(self.tabular)
        return out


def read_record(directory: Path) -> ServerRecord | None:
    """The record in ``directory``, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads((directory / RECORD).read_text())
        return ServerRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None


def write_record(directory: Path, record: ServerRecord) -> None:
    """Write ``record`` atomically, readable by its owner only (it holds the API key)."""
    tmp = directory / f".{RECORD}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(record), fh, indent=1)
    os.replace(tmp, directory / RECORD)


def is_alive(url: str, api_key: str | None, timeout: float = 3.0) -> bool:
    """True when a Tiled server at ``url`` answers an authenticated request."""
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    try:
        reply = httpx.get(f"{url}/api/v1/", headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@contextlib.contextmanager
def _locked(directory: Path, timeout: float) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DataError(
                        f"another process holds {directory / LOCK} (starting a Tiled server?) "
                        f"for more than {timeout:g} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _same_place(record: ServerRecord, config: DataConfig) -> bool:
    """Whether ``record`` serves what ``config`` asks for (anything, when it names no
    catalog or tables: ``labctl runs list`` then reads whichever server runs there)."""
    if config.catalog is None and config.tabular is None:
        return True
    return record.catalog == config.catalog_uri and record.tabular == config.tabular_uri


def ensure_server(config: DataConfig) -> ServerRecord:
    """A running embedded server for ``config`` (reused if recorded and answering)."""
    if config.url is not None:
        raise DataError(f"url={config.url!r} is configured: labctl starts no server for it")
    directory = config.directory.resolve()
    record = read_record(directory)
    if record and is_alive(record.url, record.api_key) and _same_place(record, config):
        return record  # the common case, without taking the lock
    with _locked(directory, config.start_timeout_s):
        record = read_record(directory)
        if record and is_alive(record.url, record.api_key):
            if not _same_place(record, config):
                raise DataError(
                    f"the Tiled server running for {directory} (pid {record.pid}) serves "
                    f"catalog {redact(record.catalog)}, not {redact(config.catalog_uri)}; stop "
                    f"it first (labctl runs server --stop --data {directory})"
                )
            return record
        if record:  # stale: the process died without removing its record
            (directory / RECORD).unlink(missing_ok=True)
        return _start(config, directory)


# Runs in a short-lived intermediate process: it starts the server in a session of its
# own and exits, so the server is nobody's child here (no zombie, no Popen to keep).
_LAUNCHER = (
    "import subprocess, sys\n"
    "with open(sys.argv[1], 'ab') as log:\n"
    "    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,"
    " start_new_session=True, close_fds=True)\n"
    "print(p.pid, flush=True)\n"
)


def _start(config: DataConfig, directory: Path) -> ServerRecord:
    api_key = secrets.token_hex(24)
    env = {**os.environ, KEY_ENV: api_key}
    args = [
        sys.executable, "-m", "labctl.data.tiled_server",
        "--directory", str(directory), "--catalog", config.catalog_uri,
        "--tabular", config.tabular_uri, "--host", config.host,
    ]  # fmt: skip
    log_path = directory / LOG
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
    try:
        launched = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(log_path), *args],
            env=env, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        pid = int(launched.stdout.strip())
    except (subprocess.SubprocessError, ValueError) as exc:
        raise DataError(f"could not launch the Tiled server: {exc}") from exc
    deadline = time.monotonic() + config.start_timeout_s
    while time.monotonic() < deadline:
        record = read_record(directory)
        if record and record.pid == pid and is_alive(record.url, api_key):
            return record
        if not _pid_running(pid):
            raise DataError(
                f"the Tiled server (pid {pid}) exited while starting; its log ({log_path}) "
                f"ends:\n{_tail(log_path)}"
            )
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    raise DataError(
        f"the Tiled server did not answer within {config.start_timeout_s:g} s; its log "
        f"({log_path}) ends:\n{_tail(log_path)}"
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_server(directory: Path, timeout: float = 15.0) -> ServerRecord | None:
    """Stop the server recorded in ``directory`` (SIGTERM, then SIGKILL); its record, or None."""
    directory = directory.resolve()
    record = read_record(directory)
    if record is None:
        return None
    if _pid_running(record.pid) and is_alive(record.url, record.api_key):
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_running(record.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_running(record.pid):
            os.kill(record.pid, signal.SIGKILL)
    (directory / RECORD).unlink(missing_ok=True)
    return record


def ensure_postgres_database(uri: str) -> bool:
    """Create the database named in ``uri`` when missing; True if it was created.

    Connects to the server's ``postgres`` database as the URI's user (who must be
    allowed to create databases).
    """
    import asyncpg  # only at scale

    parts = urlsplit(uri.replace("+asyncpg", ""))
    name = parts.path.lstrip("/")
    if not name.replace("_", "").isalnum():
        raise DataError(f"catalog: database name {name!r} must be letters, digits and _")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))

    async def create() -> bool:
        conn = await asyncpg.connect(admin)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                return False
            await conn.execute(f'CREATE DATABASE "{name}"')
            return True
        finally:
            await conn.close()

    try:
        return asyncio.run(create())
    except (OSError, asyncpg.PostgresError) as exc:
        raise DataError(f"catalog: cannot reach or create {redact(uri)}: {exc}") from exc
