"""Bluesky documents into Tiled: bluesky-tiled-plugins' ``TiledWriter``, configured durable.

``TiledWriter`` (``bluesky_tiled_plugins``; the copy in ``bluesky.callbacks.tiled_writer``
is the older one, see docs/decisions/0006-tiled-writer-and-embedded-server.md) buffers
up to 10 000 events per stream before it writes them, so a killed process would lose
all of a run's events. With ``batch_size=1`` it appends every event to the stream's
table before the RunEngine goes on: an event is in Tiled's database once the plan's
next message runs. The cost is one HTTP request per event (measured in
scripts/bench_tiled.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bluesky_tiled_plugins import TiledWriter


def make_writer(
    client: Any, *, batch_size: int = 1, backup_directory: Path | None = None
) -> TiledWriter:
    """A RunEngine callback writing every run to ``client`` (a writable Tiled container).

    ``batch_size``: events per write (1: each event durable when the callback returns).
    ``backup_directory``: if Tiled fails mid-run, the run's documents (all of them, from
    its start) are written there as JSON lines instead, and the plan goes on; without
    it, a Tiled failure raises in the RunEngine and fails the run.
    """
    from bluesky_tiled_plugins import TiledWriter

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")
    return TiledWriter(
        client,
        batch_size=batch_size,
        backup_directory=str(backup_directory) if backup_directory is not None else None,
    )
