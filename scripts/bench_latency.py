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
    for transport in ("pty", "tcp"):
        bench(transport, args.n)


if __name__ == "__main__":
    main()
