"""Round-trip latency per command through pty and TCP, and RunEngine overhead per step.

Prints measured figures; asserts nothing. Run: `make bench` or
`.venv/bin/python scripts/bench_latency.py [--n 300]`.

For each transport it measures, in the same run:
  raw      - pyserial write + read of one command, no labctl code (the floor)
  device   - the same command through labctl's transport + codec (device.measure)
  RE step  - one bluesky `count` step (trigger + read + event document) per reading
and prints the RE-step/raw ratio (RunEngine overhead over the bare serial round trip).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import bluesky.plans as bp
import serial
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import init_devices

from hardware_mocks.config import load_lab_config
from hardware_mocks.lab import LabThread
from labctl.devices.balance import Balance


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _fmt(samples: list[float]) -> str:
    s = sorted(samples)
    return (
        f"mean {statistics.fmean(s) * 1e3:7.3f} ms  p50 {s[len(s) // 2] * 1e3:7.3f}"
        f"  p99 {s[int(len(s) * 0.99) - 1] * 1e3:7.3f}"
    )


# One cheap read-only command per instrument, and how its reply ends (raw pyserial).
RAW_COMMANDS: dict[str, tuple[bytes, bytes]] = {
    "balance": (b"SI\r\n", b"\r\n"),
    "pumps": (b"0\r", b"\x03"),
    "robot": (b"M114\n", b"\nok"),  # position line, then "ok[ P.. B..]"
    "stirrer": (b"IN_PV_4\r\n", b"\r\n"),
    "chamber": (b"MEAS:TEMP?\n", b"\n"),
    "meter": (b"GETMEAS\r", b"> "),
    "cycler": (b"MEAS:CELL:VOLT? (@1001)\n", b"\n"),
}


def _exchange(port: Any, name: str, cmd: bytes, end: bytes) -> None:
    port.write(cmd)
    reply = port.read_until(end)
    if end == b"\nok":
        reply += port.read_until(b"\n")
    if not reply.endswith((end[-1:], b"\n")):
        raise RuntimeError(f"{name}: no reply to {cmd!r}: {reply!r}")


def bench_raw(transport: str, n: int, latency_s: float) -> None:
    """Raw round trip per instrument command (pyserial only, no labctl code)."""
    with LabThread(load_lab_config(), transport=transport, speed=1.0) as lab:  # type: ignore[arg-type]
        for sim in lab.lab.simulators.values():
            sim.latency_s = latency_s
        for name, (cmd, end) in RAW_COMMANDS.items():
            port = serial.serial_for_url(lab.urls[name], timeout=2)
            if name == "cycler":
                port.write(b"CELL:DEF:QUIC 1\n")  # map cells to channels first (no reply)
            port.write(cmd)  # warm-up (the pumps answer their power-on alarm first)
            port.read_until(end)
            port.reset_input_buffer()

            samples = _time(lambda: _exchange(port, name, cmd, end), n)  # noqa: B023
            port.close()
            label = cmd.strip().decode(errors="replace")
            print(f"[{transport}] {name:8s} {label:24s} {_fmt(samples)}")


def bench(transport: str, n: int) -> dict[str, float]:
    cfg = load_lab_config()
    cfg.instruments = [i for i in cfg.instruments if i.kind == "balance"]
    with LabThread(cfg, transport=transport, speed=1.0) as lab:  # type: ignore[arg-type]
        lab.lab.simulators["balance"].latency_s = 0.0  # measure our stack, not a modelled delay
        url = lab.urls["balance"]
        port = serial.serial_for_url(url, timeout=2)
        raw = _time(lambda: (port.write(b"SI\r\n"), port.read_until(b"\r\n")), n)
        port.close()

        RE = RunEngine(call_returns_result=True)
        with init_devices():
            balance = Balance(url, immediate=True)
        dev = _time(lambda: call_in_bluesky_event_loop(balance.measure()), n)
        t = time.perf_counter()
        RE(bp.count([balance], num=n))
        step = (time.perf_counter() - t) / n
        call_in_bluesky_event_loop(balance.disconnect())
    print(f"[{transport}] raw pyserial SI : {_fmt(raw)}")
    print(f"[{transport}] labctl device   : {_fmt(dev)}")
    print(f"[{transport}] RunEngine step  : mean {step * 1e3:7.3f} ms (count, {n} events)")
    ratio = step / statistics.fmean(raw)
    print(f"[{transport}] RE step / raw round trip = {ratio:.2f}x")
    return {"raw": statistics.fmean(raw), "device": statistics.fmean(dev), "step": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    print("Raw round trip per command, simulator reply latency 0 (our serving + pyserial):")
    for transport in ("pty", "tcp"):
        bench_raw(transport, args.n, 0.0)
    print("\nBalance: raw vs labctl device vs RunEngine step (same run):")
    for transport in ("pty", "tcp"):
        bench(transport, args.n)


if __name__ == "__main__":
    main()
