"""Gravimetric dosing: dispense, weigh, correct.

A syringe pump's volume is only as good as its calibration and the reagent's
density; the balance is the truth. Each dose dispenses most of the target by volume,
weighs, re-estimates the effective density from what really landed, and corrects
with the remainder until within tolerance. Every weighing is an event in the
``dosing`` stream, so the record shows how each dose converged.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg

from labctl.devices.balance import Balance
from labctl.devices.pump import SyringePump

Plan = Generator[Msg, Any, Any]


@dataclass(frozen=True)
class DoseResult:
    reagent: str
    target_g: float
    actual_g: float
    volume_ml: float
    steps: int
    within_tolerance: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def weigh(balance: Balance, stream: str = "dosing") -> Generator[Msg, Any, float]:
    """Take a stable weighing as an event in ``stream``; return grams."""
    reading = yield from bps.trigger_and_read([balance], name=stream)
    return float(reading[balance.weight.name]["value"])


def dose_gravimetric(
    pump: SyringePump,
    balance: Balance,
    target_g: float,
    density_g_ml: float,
    *,
    tolerance_g: float = 0.003,
    first_fraction: float = 0.97,
    max_corrections: int = 4,
) -> Generator[Msg, Any, DoseResult]:
    """Dose ``target_g`` of the pump's reagent into the vial on the balance (inside a run)."""
    if not (math.isfinite(target_g) and target_g > 0):
        raise ValueError(f"target_g: must be > 0, got {target_g!r}")
    if not density_g_ml > 0:
        raise ValueError(f"density_g_ml: must be > 0, got {density_g_ml!r}")
    reagent = str((yield from bps.rd(pump.reagent)))
    start = yield from weigh(balance)
    delivered = 0.0
    volume = 0.0
    density = density_g_ml
    steps = 0
    while steps <= max_corrections:
        remaining = target_g - delivered
        if remaining <= tolerance_g:
            break  # within tolerance, or overshot: a balance cannot take liquid back
        fraction = first_fraction if steps == 0 else 1.0
        step_ml = round(remaining / density * fraction, 4)
        if step_ml <= 0:
            break
        contents = yield from bps.rd(pump.contents)
        if not math.isnan(contents) and contents < step_ml:
            yield from bps.trigger(pump.refill, wait=True)
        yield from bps.mv(pump, step_ml)
        volume += step_ml
        steps += 1
        delivered = (yield from weigh(balance)) - start
        if delivered > 0:
            density = delivered / volume  # effective density incl. the pump's bias
    ok = abs(target_g - delivered) <= tolerance_g
    return DoseResult(reagent, target_g, delivered, volume, steps, ok)
