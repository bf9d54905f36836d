"""Remote operation: labctl's plans queued through bluesky-queueserver.

:class:`QueueManager` starts an RE Manager whose startup module is
:mod:`labctl.queue.profile` (the lab's devices, the registry's plans with JSON-able
parameters, the Tiled store subscribed); :func:`add_plan` validates parameters with the
registry's models before queueing. See docs/queue.md.
"""

from __future__ import annotations

from labctl.queue.manager import (
    QueueConfig,
    QueueError,
    QueueManager,
    add_plan,
    clear_queue_keys,
    close_api,
    free_port,
)

__all__ = [
    "QueueConfig",
    "QueueError",
    "QueueManager",
    "add_plan",
    "clear_queue_keys",
    "close_api",
    "free_port",
]
