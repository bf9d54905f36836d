"""The RE Manager's startup module: ``start-re-manager --startup-module labctl.queue.profile``.

Importing it (in the RE worker process) connects the lab, makes the RunEngine the
devices live on, subscribes the Tiled store and puts the devices and the queue plans
(:func:`labctl.queue.plans.queue_plans`) in the module namespace, which the worker
takes as its environment. Settings come from the environment:

* ``LABCTL_QUEUE_LAB``: what ``open_lab`` accepts (``tcp://HOST:PORT`` of a running
  simulated lab, a lab TOML, a JSON file of instrument records); unset: a simulated lab
  of its own;
* ``LABCTL_QUEUE_SPEED``: the lab's time acceleration (the plans' time scale);
* the data settings of :meth:`labctl.data.DataConfig.from_env` (``LABCTL_DATA``, ...).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from bluesky import RunEngine

from labctl.data import DataConfig, open_store
from labctl.plans.session import open_lab
from labctl.queue.plans import queue_plans
from labctl.queue.profile_env import ENV_LAB, ENV_SPEED

# No SIGINT handler: the RE is paused and stopped through the manager's requests, and a
# Ctrl-C at the manager's terminal must close the worker, not pause a plan.
RE = RunEngine({}, context_managers=[])

_speed = os.environ.get(ENV_SPEED)
# Lives as long as the worker: the environment is closed by ending the worker process.
_stack = ExitStack()
session = _stack.enter_context(
    open_lab(
        os.environ.get(ENV_LAB) or None,
        RE=RE,
        speed=float(_speed) if _speed else None,
        transport="tcp",
    )
)
store = open_store(DataConfig.from_env())
store.subscribe(RE)

globals().update(session.devices.by_name)
globals().update(queue_plans(session))

del _speed
