"""Start the simulated lab as a separate process and read its instrument list.

This is how labctl meets `hardware_mocks`: through the `labctl mocks serve`
process and its contract-1 output (one JSON object per instrument), never by
import. A real lab gives the same records from its own config.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any


class SimulatedLabError(RuntimeError):
    """The simulated lab did not start (bad config, crash); carries its stderr."""


def control_request(url: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One JSON-lines request to a simulated lab's control port ``tcp://HOST:PORT``."""
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        reply: dict[str, Any] = json.loads(data)
    except (OSError, ValueError) as exc:
        raise SimulatedLabError(f"control port {url}: {exc}") from None
    return reply


class SimulatedLabProcess:
    """``with SimulatedLabProcess(speed=200) as lab: lab.records, lab.url("balance")``."""

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        transport: str = "pty",
        speed: float | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.args = [sys.executable, "-m", "labctl.cli", "mocks", "serve", "--transport", transport,
                     "--exit-with-parent"]  # fmt: skip
        if config is not None:
            self.args += ["--config", str(config)]
        if speed is not None:
            self.args += ["--speed", str(speed)]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: list[dict[str, Any]] = []

    def start(self) -> SimulatedLabProcess:
        # stderr to a file: a pipe nobody reads would block the lab once it fills.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives with the process
        # stdin: a pipe only we hold; if this process dies the lab sees EOF and exits.
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.start_timeout
        problem = "it exited"
        pending = b""
        # Unbuffered reads against a deadline: a buffered readline would pull several
        # records into Python's buffer and leave select() waiting on an empty pipe.
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    problem = f"no instrument list within {self.start_timeout:g} s"
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        problem = f"unexpected output {line.strip()!r}"
                        break
                    self.records.append(rec)
                    if rec.get("index", 0) == rec.get("total", 1) - 1:
                        return self
                else:
                    continue
                break
        self.stop()
        self._stderr.seek(0)
        err = self._stderr.read().strip()
        raise SimulatedLabError(f"simulated lab did not start ({problem}): {err}")

    def url(self, name: str) -> str:
        for rec in self.records:
            if rec["name"] == name:
                return str(rec["url"])
        raise KeyError(f"instrument {name!r} not in the lab: {[r['name'] for r in self.records]}")

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request to the lab's control port (faults, ground truth)."""
        return control_request(str(self.records[0]["control"]), request)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> SimulatedLabProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._stderr.close()
