"""The embedded Tiled server's process: ``python -m labctl.data.tiled_server``.

Started (detached) by :func:`labctl.data.server.ensure_server`; the API key arrives in
``$LABCTL_TILED_SERVER_API_KEY`` (not argv, which ``ps`` shows). Serves until
SIGINT/SIGTERM; writes ``server.json`` once it answers and removes it on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from labctl.data.server import (
    KEY_ENV,
    RECORD,
    ServerRecord,
    ensure_postgres_database,
    read_record,
    write_record,
)


def init_catalog(catalog: str) -> None:
    """Create and stamp the catalog's tables if the database has none (in this process:
    Tiled's own ``init_if_not_exists`` runs a second Python for it, seconds slower)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database

    async def setup() -> bool:
        engine = create_async_engine(catalog)
        try:
            await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
        except UninitializedDatabase:
            await initialize_database(engine)
            return True
        finally:
            await engine.dispose()
        return False

    if asyncio.run(setup()):
        stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, catalog)


def serve(directory: Path, catalog: str, tabular: str, host: str, port: int, api_key: str) -> None:
    """Serve the catalog until SIGINT/SIGTERM, recording the server once it answers."""
    import uvicorn
    from tiled import __version__ as tiled_version
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    t0 = time.monotonic()
    files = directory / "files"
    files.mkdir(parents=True, exist_ok=True)
    if catalog.startswith("postgresql"):
        ensure_postgres_database(catalog)
    elif tabular.startswith("sqlite"):
        Path(urlsplit(tabular).path).parent.mkdir(parents=True, exist_ok=True)
    init_catalog(catalog)
    tree = from_uri(catalog, writable_storage=[files, tabular])
    app = build_app(tree, authentication=Authentication(single_user_api_key=api_key))
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, loop="asyncio", log_level="warning", access_log=False
        )
    )

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()
        url = f"http://{bound[0]}:{bound[1]}"
        async with httpx.AsyncClient(trust_env=False) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/healthz", timeout=1.0)).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        record = ServerRecord(
            url=url, api_key=api_key, pid=os.getpid(), catalog=catalog, tabular=tabular,
            files=str(files), started=time.time(), tiled_version=str(tiled_version),
        )  # fmt: skip
        write_record(directory, record)
        print(
            f"labctl: Tiled {tiled_version} serving {url} (pid {os.getpid()}), "
            f"ready in {time.monotonic() - t0:.1f} s",
            flush=True,
        )

    async def run() -> None:
        task = asyncio.create_task(announce())
        try:
            await server.serve()
        finally:
            task.cancel()

    try:
        asyncio.run(run())
    finally:
        mine = read_record(directory)
        if mine is not None and mine.pid == os.getpid():
            (directory / RECORD).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labctl.data.tiled_server", description=__doc__)
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--tabular", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    api_key = os.environ.pop(KEY_ENV, "") or secrets.token_hex(24)
    serve(args.directory.resolve(), args.catalog, args.tabular, args.host, args.port, api_key)


if __name__ == "__main__":
    main()
