"""Run data in Tiled: every RunEngine document stored, found by metadata, exported.

``open_store(config) -> Store``; ``Store.subscribe(RE)``, ``.runs(campaign=...)``,
``.run(uid)``, ``.read(uid, stream)``, ``.export(uid, format, path)``. The embedded
default is a Tiled server labctl starts in the background (SQLite under
``$LABCTL_DATA`` or ``./data/tiled``); PostgreSQL or an existing server at scale.
See docs/data.md. This package never imports labctl.devices or labctl.plans.
"""

from __future__ import annotations

from labctl.data.config import DataConfig, DataConfigError, DataError
from labctl.data.server import ServerRecord, ensure_server, stop_server
from labctl.data.store import RunInfo, RunSummary, Store, StreamInfo, open_store

__all__ = [
    "DataConfig",
    "DataConfigError",
    "DataError",
    "RunInfo",
    "RunSummary",
    "ServerRecord",
    "Store",
    "StreamInfo",
    "ensure_server",
    "open_store",
    "stop_server",
]
