"""Start a bluesky-queueserver RE Manager for a lab, and queue validated plans on it.

:class:`QueueConfig` says where the manager listens (0MQ control and info addresses) and
where it keeps its queue (Redis address and a key prefix unique to the lab);
:class:`QueueManager` runs ``start-re-manager`` with the labctl profile as a subprocess;
:func:`add_plan` validates a plan's parameters with the registry's pydantic model and
only then queues it (an invalid item is never queued).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labctl.plans.registry import get_plan
from labctl.queue.profile_env import ENV_LAB, ENV_SPEED

__all__ = [
    "QueueConfig",
    "QueueError",
    "QueueManager",
    "add_plan",
    "clear_queue_keys",
    "close_api",
    "free_port",
]

PROFILE_MODULE = "labctl.queue.profile"

# Every labctl plan and device for the default user group ("primary"), names starting
# with "_" hidden, as queueserver's own example file does.
PERMISSIONS = """\
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions: [null]
    forbidden_functions: [":^_"]
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions: [null]
    forbidden_functions: [null]
"""


class QueueError(RuntimeError):
    """The RE Manager did not start, or refused a request; the message says why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QueueConfig(BaseModel):
    """Where an RE Manager listens and keeps its queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_addr: str = Field(default="127.0.0.1:6379", description="Redis HOST:PORT")
    name_prefix: str = Field(
        default="labctl_sim",
        description="Redis key prefix; one per lab, so two managers never share a queue",
    )
    control_port: int = Field(default=60615, ge=1, le=65535, description="0MQ control port")
    info_port: int = Field(default=60625, ge=1, le=65535, description="0MQ console port")
    host: str = "127.0.0.1"

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", v):
            raise ValueError(f"must be 1-64 letters, digits, _ or -, got {v!r}")
        return v

    @property
    def control_addr(self) -> str:
        return f"tcp://{self.host}:{self.control_port}"

    @property
    def info_addr(self) -> str:
        return f"tcp://{self.host}:{self.info_port}"

    @classmethod
    def unique(cls, name: str = "labctl", **overrides: Any) -> QueueConfig:
        """Free ports and a prefix nobody else uses (tests, several labs on one host)."""
        values: dict[str, Any] = {
            "name_prefix": f"{name}_{os.getpid()}_{time.monotonic_ns() % 10**9}",
            "control_port": free_port(),
            "info_port": free_port(),
        }
        values.update(overrides)
        return cls(**values)

    def api(self, **options: Any) -> Any:
        """A ``bluesky_queueserver_api.zmq.REManagerAPI`` for this manager (``options``:
        its keywords, e.g. ``status_polling_period`` for faster waits)."""
        from bluesky_queueserver_api.zmq import REManagerAPI  # type: ignore[import-untyped]

        return REManagerAPI(
            zmq_control_addr=self.control_addr, zmq_info_addr=self.info_addr, **options
        )

    @contextmanager
    def connect(self, **options: Any) -> Iterator[Any]:
        """:meth:`api`, closed (with its 0MQ context) on exit."""
        api = self.api(**options)
        try:
            yield api
        finally:
            close_api(api)


def close_api(api: Any) -> None:
    """Close an ``REManagerAPI`` and its 0MQ contexts: ``api.close()`` (0.0.13) closes the
    sockets but leaves the contexts of the control client and of the console and system
    info monitors to the garbage collector (a ResourceWarning each)."""
    api.close()
    contexts = [getattr(getattr(api, "_client", None), "_ctx", None)]
    for monitor in ("_console_monitor", "_system_info_monitor"):
        receiver = getattr(getattr(api, monitor, None), "_rco", None)
        sock = getattr(receiver, "_socket", None)
        contexts.append(getattr(sock, "context", None))
    for ctx in contexts:
        if ctx is not None and not ctx.closed:
            ctx.destroy(linger=0)


class QueueManager:
    """``start-re-manager`` with the labctl profile, as a subprocess.

    ``lab`` is what the profile passes to ``open_lab`` (``tcp://HOST:PORT`` of a running
    simulated lab, a lab TOML or records JSON; None: the worker starts its own simulated
    lab). ``env`` adds environment variables (``LABCTL_DATA``: where runs go).
    """

    def __init__(
        self,
        config: QueueConfig,
        *,
        lab: str | None = None,
        speed: float | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        keep_log: bool = True,
    ) -> None:
        self.config = config
        self.lab = lab
        self.speed = speed
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.keep_log = keep_log
        self.proc: subprocess.Popen[bytes] | None = None
        fd, log = tempfile.mkstemp(prefix="labctl-re-manager-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        """The manager's output (and its worker's); ``tail()`` reads its end."""

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable,
            "-c",
            # start-re-manager's entry point, run by this interpreter (no PATH lookup).
            "import sys; from bluesky_queueserver.manager.start_manager import start_manager;"
            " sys.argv[0] = 'start-re-manager'; sys.exit(start_manager())",
            "--startup-module",
            PROFILE_MODULE,
            "--redis-addr",
            c.redis_addr,
            "--redis-name-prefix",
            c.name_prefix,
            "--zmq-control-addr",
            f"tcp://*:{c.control_port}",
            "--zmq-info-addr",
            f"tcp://*:{c.info_port}",
            "--zmq-publish-console",
            "ON",
            "--update-existing-plans-devices",
            "NEVER",
            # The default existing-plans file lives next to the startup code, inside
            # the package: a per-manager file keeps concurrent managers apart.
            "--existing-plans-devices",
            str(self.log.with_suffix(".plans.yaml")),
            "--user-group-permissions",
            str(self.log.with_suffix(".permissions.yaml")),
        ]

    def start(self) -> QueueManager:
        try:
            check_redis(self.config.redis_addr)
        except QueueError:
            self.stop()
            raise
        self.log.with_suffix(".permissions.yaml").write_text(PERMISSIONS)
        env = {**os.environ, **self.env}
        if self.lab is not None:
            env[ENV_LAB] = self.lab
        if self.speed is not None:
            env[ENV_SPEED] = str(self.speed)
        with self.log.open("wb") as log:
            # its own process group: start-re-manager forks its manager and worker
            # processes, which a kill of the parent alone would leave running (orphans
            # that ignore SIGTERM); stop() ends the whole group
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        api = self.config.api()
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise QueueError(f"RE Manager exited: {self.tail()}")
                try:
                    api.status()
                    return self
                except Exception:  # not listening yet: the API raises its own timeouts
                    if time.monotonic() > deadline:
                        self.stop()
                        raise QueueError(
                            f"RE Manager not answering within {self.start_timeout:g} s: "
                            f"{self.tail()}"
                        ) from None
                    time.sleep(0.2)
        finally:
            close_api(api)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (the manager closes its worker), then SIGKILL to its process group if
        it lingers; whatever of the group is left after that (forked children) goes too."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _kill_group(self.proc.pid)
                    self.proc.wait(5)
            _kill_group(self.proc.pid)
        for suffix in (".plans.yaml", ".permissions.yaml"):
            self.log.with_suffix(suffix).unlink(missing_ok=True)
        if not self.keep_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> QueueManager:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in group ``pgid`` (none left: nothing to do)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def check_redis(addr: str, timeout: float = 3.0) -> None:
    """Raise :class:`QueueError` unless Redis answers at ``addr`` (HOST:PORT): the manager
    itself would only log the failure and keep retrying."""
    import redis

    host, _, port = addr.rpartition(":")
    client = redis.Redis(host=host or "127.0.0.1", port=int(port), socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise QueueError(f"no Redis at {addr} for the queue: {exc}") from None
    finally:
        client.close()


def clear_queue_keys(config: QueueConfig) -> int:
    """Delete the Redis keys of ``config.name_prefix`` (queue, history, settings); returns
    how many. For managers whose queue should not outlive them (tests, one-off labs)."""
    import redis

    host, _, port = config.redis_addr.rpartition(":")
    client = redis.Redis(host=host or "127.0.0.1", port=int(port))
    try:
        # The manager names its keys "<prefix>_<what>".
        keys = list(client.scan_iter(match=f"{config.name_prefix}_*"))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def add_plan(api: Any, name: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``values`` with plan ``name``'s model, then queue it; returns the item.

    Raises ``KeyError`` for an unknown plan, :class:`~labctl.plans.common.PlanParameterError`
    (naming each bad field and value) before anything is queued, and :class:`QueueError`
    when the manager refuses the item (its reason).
    """
    from bluesky_queueserver_api import BPlan  # type: ignore[import-untyped]
    from bluesky_queueserver_api.comm_base import (  # type: ignore[import-untyped]
        RequestFailedError,
    )

    kwargs = dict(values or {})
    if name != "noop":
        get_plan(name).validate(kwargs)
    try:
        reply: dict[str, Any] = api.item_add(BPlan(name, **kwargs))
    except RequestFailedError as exc:
        raise QueueError(f"queue refused {name}: {exc.response.get('msg')}") from exc
    item: dict[str, Any] = reply["item"]
    return item
