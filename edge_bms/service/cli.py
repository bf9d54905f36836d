"""``edge-bms run`` and ``edge-bms demo``: the MQTT service from the command line.

    edge-bms run --config pack.toml [--instance ID]
    edge-bms demo [--port P] [--packs N] [--cells M] [--rate HZ] [--speed X]

``run`` serves the packs of a config file (see docs/edge_bms_service.md) until SIGINT or
SIGTERM, then checkpoints, sets its retained status offline and exits 0. A config that
does not validate exits 2 with ``file:line: field: reason``.

``demo`` (DESIGN.md contract 5) needs nothing outside this machine: an in-process amqtt
broker on 127.0.0.1:P, the pack simulator as a subprocess (``python -m
hardware_mocks.packs``: edge_bms never imports the simulators), the service in-process, and
a table of every pack's SOC, SOP and alarms refreshed once a second.

Registered into ``edge-bms`` through ``edge_bms.cli.OPTIONAL_COMMANDS``; ``python -m
edge_bms.service.cli ...`` is the same command line without the other subcommands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from edge_bms.errors import BmsError
from edge_bms.service.config import (
    BrokerConfig,
    CheckpointConfig,
    LimitsConfig,
    PackConfig,
    ServiceConfig,
    load_config,
)

log = logging.getLogger("edge_bms.service")


def register(subparsers: Any) -> None:
    """Add ``run`` and ``demo`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "run",
        help="serve packs over MQTT (contract 5)",
        description="Estimate the packs of --config from their MQTT telemetry until "
        "SIGINT/SIGTERM.",
    )
    p.add_argument("--config", required=True, help="service config (TOML)")
    p.add_argument("--instance", help="instance name (status topic, client id); overrides config")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run_command)

    d = subparsers.add_parser(
        "demo",
        help="in-process broker + pack simulator + service, with a live table",
        description="Start an amqtt broker on 127.0.0.1:PORT, the pack simulator and the "
        "service, and show every pack's SOC, SOP and alarms until SIGINT/SIGTERM.",
    )
    d.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    d.add_argument("--packs", type=int, default=4, help="simulated packs (default 4)")
    d.add_argument("--cells", type=int, default=16, help="series cells per pack (default 16)")
    d.add_argument("--rate", type=float, default=1.0, help="telemetry per pack per second")
    d.add_argument("--speed", type=float, default=10.0, help="simulated s per wall s (default 10)")
    d.add_argument("--duration", type=float, default=0.0, help="wall seconds; 0: until Ctrl-C")
    d.set_defaults(func=demo_command)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


# -------------------------------------------------------------------------------- run
def run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        overrides = {"instance": args.instance} if args.instance else None
        config = load_config(args.config, overrides=overrides)
    except (BmsError, OSError) as exc:
        print(f"edge-bms run: {exc}", file=sys.stderr)
        return 2

    from edge_bms.service.mqtt import run_service  # aiomqtt: only when a service runs

    async def serve() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_service(config, stop=stop)

    asyncio.run(serve())
    return 0


# ------------------------------------------------------------------------------- demo
# The pack simulator's layout: one temperature sensor per 8 cells (PackSimConfig default).
SIM_CELLS_PER_TEMP_SENSOR = 8


def demo_config(port: int, packs: int, cells: int) -> ServiceConfig:
    """The service half of the demo: the simulator's pack ids and sensor layout, no
    checkpoint, and no future-``ts`` check (the simulated clock runs ``speed`` times
    faster than the wall)."""
    return ServiceConfig(
        instance="demo",
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}", qos=0),
        packs=[
            PackConfig(
                id=f"pack-{i:03d}", n_cells=cells, cells_per_temp_sensor=SIM_CELLS_PER_TEMP_SENSOR
            )
            for i in range(packs)
        ],
        checkpoint=CheckpointConfig(path=None),
        limits=LimitsConfig(max_future_s=None),
    )


async def start_broker(port: int) -> Any:
    """An amqtt broker on 127.0.0.1:``port``, anonymous, started (the caller shuts it
    down); for demos and tests, not a production broker."""
    from amqtt.broker import Broker  # only the demo needs a broker of its own

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    return broker


class PackTable:
    """The latest state and alarms of every pack, rendered as a fixed-width table."""

    def __init__(self, pack_ids: Sequence[str]) -> None:
        self.states: dict[str, dict[str, Any]] = {p: {} for p in pack_ids}
        self.alarms: dict[str, list[str]] = {p: [] for p in pack_ids}
        self.errors: dict[str, int] = dict.fromkeys(pack_ids, 0)
        self.last_error: dict[str, str] = {}

    def update(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 2:
            return
        pack, kind = parts[-2], parts[-1]
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if kind == "state":
            self.states[pack] = doc
        elif kind == "alarms":
            active = doc.get("active", [])
            self.alarms[pack] = [_alarm_name(a) for a in active] if isinstance(active, list) else []
        elif kind == "errors":
            self.errors[pack] = self.errors.get(pack, 0) + 1
            self.last_error[pack] = str(doc.get("code", "?"))

    def render(self) -> str:
        head = f"{'pack':<10} {'seq':>6} {'SOC %':>6} {'min':>6} {'max':>6} {'±σ':>5} "
        head += f"{'P dis kW':>9} {'P chg kW':>9} {'errors':>6}  alarms"
        lines = [head, "-" * len(head)]
        for pack in sorted(self.states):
            s = self.states[pack]
            soc = [x for x in s.get("soc", []) if isinstance(x, int | float)]
            sig = [x for x in s.get("soc_sigma", []) if isinstance(x, int | float)]
            sop = s.get("sop") or {}
            lines.append(
                f"{pack:<10} {s.get('seq', '-')!s:>6} {_pct(s.get('pack_soc')):>6} "
                f"{_pct(min(soc) if soc else None):>6} {_pct(max(soc) if soc else None):>6} "
                f"{_pct(max(sig) if sig else None):>5} "
                f"{_kw(_first(sop, 'p_discharge_w', 'discharge_w')):>9} "
                f"{_kw(_first(sop, 'p_charge_w', 'charge_w')):>9} "
                f"{self.errors.get(pack, 0):>6}  {', '.join(self.alarms.get(pack, [])) or '-'}"
                + (f"  (last error: {self.last_error[pack]})" if pack in self.last_error else "")
            )
        return "\n".join(lines)


def _alarm_name(a: Any) -> str:
    """``over_voltage@3`` for an alarm record ``{"kind", "cell", ...}`` (cell None: pack)."""
    if not isinstance(a, dict):
        return str(a)
    cell = a.get("cell")
    return f"{a.get('kind', '?')}" + ("" if cell is None else f"@{cell}")


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, int | float) and math.isfinite(x) else "-"


def _kw(x: Any) -> str:
    if isinstance(x, list):
        x = min((v for v in x if isinstance(v, int | float)), default=None)
    return f"{x / 1000:.2f}" if isinstance(x, int | float) and math.isfinite(x) else "-"


async def _watch(port: int, table: PackTable, stop: asyncio.Event, out: TextIO) -> None:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", port, identifier="edge-bms-demo-table") as client:
        for kind in ("state", "alarms", "errors"):
            await client.subscribe(f"bms/v1/+/{kind}")

        async def draw() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                clear = "\x1b[H\x1b[2J" if out.isatty() else "\n"
                out.write(clear + table.render() + "\n")
                out.flush()

        drawer = asyncio.create_task(draw())
        try:
            async for m in client.messages:
                p = m.payload
                table.update(m.topic.value, p if isinstance(p, bytes) else str(p).encode())
        finally:
            drawer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawer


async def demo(
    port: int = 1883,
    packs: int = 4,
    cells: int = 16,
    rate: float = 1.0,
    speed: float = 10.0,
    *,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    out: TextIO = sys.stdout,
) -> PackTable:
    """Broker + simulator + service until ``stop`` (or ``duration`` wall seconds)."""
    from edge_bms.service.mqtt import run_service

    stop = stop or asyncio.Event()
    config = demo_config(port, packs, cells)
    table = PackTable([p.id for p in config.packs])
    broker = await start_broker(port)
    sim = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hardware_mocks.packs",
            "--broker", f"mqtt://127.0.0.1:{port}",
            "--packs", str(packs), "--cells", str(cells),
            "--rate", str(rate), "--speed", str(speed), "--duration", "0",
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        tasks = [
            asyncio.create_task(run_service(config, stop=stop)),
            asyncio.create_task(_watch(port, table, stop, out)),
        ]
        if duration:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        else:
            await stop.wait()
        stop.set()
    finally:
        if sim is not None and sim.returncode is None:
            sim.terminate()
            await sim.wait()
        stop.set()
        # The service returns on stop; the table reader ends when the broker closes.
        if tasks:
            await asyncio.wait_for(tasks[0], 10.0)
            tasks[1].cancel()
            await asyncio.gather(tasks[1], return_exceptions=True)
        await broker.shutdown()
    return table


def demo_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name, value in (("packs", args.packs), ("cells", args.cells)):
        if value < 1:
            print(f"edge-bms demo: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    for name, fvalue in (("rate", args.rate), ("speed", args.speed)):
        if not (math.isfinite(fvalue) and fvalue > 0):
            print(f"edge-bms demo: --{name} must be > 0, got {fvalue}", file=sys.stderr)
            return 2

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await demo(
            args.port, args.packs, args.cells, args.rate, args.speed,
            duration=args.duration or None, stop=stop,
        )  # fmt: skip

    asyncio.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_bms.service.cli run|demo ...``"""
    parser = argparse.ArgumentParser(prog="edge-bms", description="edge_bms MQTT service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
