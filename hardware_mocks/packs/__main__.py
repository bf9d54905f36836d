"""``python -m hardware_mocks.packs``: publish simulated pack telemetry to an MQTT broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from hardware_mocks.packs.config import LOAD_KINDS, PackConfigError, load_pack_config
from hardware_mocks.packs.config import PackSimConfig as _Config
from hardware_mocks.packs.publisher import PublishStats, run_publisher
from hardware_mocks.packs.sim import RECHARGE, PackSimulator


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hardware_mocks.packs",
        description="Simulated battery packs publishing contract-5 telemetry "
        "(bms/v1/<pack>/telemetry) over MQTT, with ground truth for comparison.",
    )
    ap.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="mqtt[s]://[user:pw@]host:port"
    )
    ap.add_argument("--config", help="TOML file of PackSimConfig fields (flags below override)")
    ap.add_argument("--packs", type=int, help="number of packs (default 4)")
    ap.add_argument("--cells", type=int, help="series cells per pack (default 96)")
    ap.add_argument("--rate", type=float, default=1.0, help="messages per pack per wall second")
    ap.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    ap.add_argument("--duration", type=float, default=60.0, help="wall seconds; 0: until Ctrl-C")
    ap.add_argument("--qos", type=int, default=0, choices=(0, 1, 2))
    ap.add_argument(
        "--phase",
        default="spread",
        choices=("spread", "synced"),
        help="spread: packs publish at their own phase of the period (default); "
        "synced: every pack on the same tick",
    )
    ap.add_argument("--seed", type=int)
    ap.add_argument("--prefix", help="topic prefix (default bms/v1)")
    ap.add_argument("--load", action="append", choices=LOAD_KINDS, help="load kind; repeat to mix")
    ap.add_argument("--ambient", type=float, help="ambient temperature, C")
    ap.add_argument("--truth", help="write ground truth here at the end (.npz or .csv)")
    return ap


def _progress(stats: PublishStats, sim: PackSimulator) -> None:
    soc = sim.soc.mean(axis=1)
    print(
        f"[packs] wall {stats.wall_s:7.1f} s  sim {sim.t_s:9.1f} s  msgs {stats.messages:8d}"
        f"  late {stats.late_ticks:4d}  SOC {soc.min():.3f}..{soc.max():.3f}"
        f"  I {sim.current_a.min():+.1f}..{sim.current_a.max():+.1f} A"
        f"  Tmax {sim.temp_c.max():.1f} C  recharging {int(np.sum(sim.mode == RECHARGE))}",
        file=sys.stderr,
        flush=True,
    )


async def _amain(args: argparse.Namespace, sim: PackSimulator) -> PublishStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return await run_publisher(
        sim,
        args.broker,
        rate_hz=args.rate,
        duration=args.duration or None,
        speed=args.speed,
        qos=args.qos,
        progress=_progress,
        stop=stop,
        phase=args.phase,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "n_packs": args.packs,
            "n_cells": args.cells,
            "seed": args.seed,
            "topic_prefix": args.prefix,
            "loads": args.load,
            "ambient_c": args.ambient,
            "record_every": None if args.truth else 0,
        }.items()
        if v is not None
    }
    try:
        if args.config:
            config = load_pack_config(args.config, **overrides)
        else:
            config = _Config.from_mapping(overrides, "command line")
    except PackConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    sim = PackSimulator(config)
    print(
        f"[packs] {config.n_packs} packs x {config.n_cells} cells -> {args.broker} "
        f"{config.topic_prefix}/<pack>/telemetry at {args.rate} Hz, speed {args.speed}x",
        file=sys.stderr,
        flush=True,
    )
    import aiomqtt

    try:
        stats = asyncio.run(_amain(args, sim))
    except (OSError, aiomqtt.MqttError) as exc:  # broker unreachable or gone: keep the truth
        print(f"[packs] stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        stats = None
    if stats is not None:
        _progress(stats, sim)
        print(
            f"[packs] published {stats.messages} messages ({stats.bytes / 1e6:.2f} MB) in "
            f"{stats.wall_s:.1f} s; {stats.late_ticks} late ticks",
            file=sys.stderr,
        )
    if args.truth:
        truth = sim.truth()
        path = truth.save(args.truth)
        print(f"[packs] ground truth: {path} ({truth.n_steps} steps)", file=sys.stderr)
    return 0 if stats is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
