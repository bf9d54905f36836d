"""`labctl mocks serve`: run a whole simulated lab until SIGINT/SIGTERM (contract 1).

Once every instrument listens, one JSON object per line goes to stdout:
``{"name", "kind", "protocol", "url", "control", "index", "total"}`` where ``url`` is
what ``serial.serial_for_url`` opens and ``control`` is a JSON-lines TCP port for
fault injection and ground truth (``{"op": "inject", "instrument": "balance",
"fault": "garbage", "count": 1}``, ``{"op": "state"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from hardware_mocks.config import load_lab_config
from hardware_mocks.lab import SimulatedLab, Transport


async def start_control_server(lab: SimulatedLab, host: str = "127.0.0.1") -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(lab.control_line(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, 0, limit=1 << 20)


async def serve(
    config_path: str | Path | None = None,
    transport: Transport | None = None,
    *,
    speed: float | None = None,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    exit_on_stdin_eof: bool = False,
) -> None:
    config = load_lab_config(config_path)
    lab = SimulatedLab(config, speed=speed)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before anything is printed: a SIGTERM right after the last record must still
    # shut down cleanly (links removed), not kill the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if exit_on_stdin_eof:
        # The parent holds our stdin open; when it dies, however it dies (SIGKILL
        # too), the pipe closes and we shut down instead of running on as an orphan.
        def watch() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    await lab.start(transport)
    control = await start_control_server(lab)
    host, port = control.sockets[0].getsockname()[:2]
    records = lab.describe()
    for i, rec in enumerate(records):
        rec.update(control=f"tcp://{host}:{port}", index=i, total=len(records))
        out.write(json.dumps(rec) + "\n")
    out.flush()
    try:
        await stop.wait()
    finally:
        control.close()
        await lab.stop()


def main(
    config_path: str | None = None,
    transport: Transport | None = None,
    speed: float | None = None,
    exit_on_stdin_eof: bool = False,
) -> None:
    asyncio.run(serve(config_path, transport, speed=speed, exit_on_stdin_eof=exit_on_stdin_eof))
