"""Gravimetric dosing: dispense, weigh, correct.

A syringe pump's volume is only as good as its calibration and the reagent's density;
the balance is the truth. Each dose dispenses most of the target by volume, weighs,
re-estimates the effective density from what really landed, and corrects with the
remainder until within tolerance. Every weighing is an event in the ``dosing`` stream
(with the dose's reagent, step and target next to the balance's reading), so the record
shows how each dose converged.

Pauses: a pause stops the pumps (the RunEngine stops every moved device); the plan then
continues where it stopped (see docs/decisions/0008-pause-resume-continue-in-place.md):
the next weighing measures what the interrupted dispense really delivered and the
correction doses the rest. Dry runs (``bluesky.simulators``) assume every dispense
delivers its nominal mass, so they show a first dispense and one correction per dose.
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
from labctl.plans.common import PlanError, Record, fresh_read, read_signal

DOSING_FIELDS: dict[str, tuple[Any, str]] = {
    "reagent": ("string", ""),
    "dose_step": ("integer", ""),
    "target_g": ("number", "g"),
    "volume_ml": ("number", "mL"),
}


def dosing_record(name: str = "dose") -> Record:
    """The context written next to every weighing of the ``dosing`` stream."""
    return Record(name, DOSING_FIELDS)


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


def weigh(
    balance: Balance,
    stream: str = "dosing",
    *,
    context: Record | None = None,
    live: bool = True,
) -> Generator[Msg, Any, float | None]:
    """A stable weighing as an event in ``stream`` (with ``context``); grams, or None
    in a dry run."""
    devices: list[Any] = [balance] if context is None else [balance, context]
    reading = yield from fresh_read(devices, stream, balance.weight.name, live=live)
    if reading is None:
        return None
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
    reagent: str | None = None,
    record: Record | None = None,
    stream: str = "dosing",
    live: bool = True,
) -> Generator[Msg, Any, DoseResult]:
    """Dose ``target_g`` of the pump's reagent into the vial on the balance (inside a run).

    Dispenses ``first_fraction`` of the target by volume, then corrects with the
    remainder (at the density measured so far) until within ``tolerance_g`` or after
    ``max_corrections`` corrections. An overshoot cannot be undone: the result then
    says ``within_tolerance=False`` and the actual mass.
    """
    if not (math.isfinite(target_g) and target_g > 0):
        raise ValueError(f"target_g: must be > 0, got {target_g!r}")
    if not density_g_ml > 0:
        raise ValueError(f"density_g_ml: must be > 0, got {density_g_ml!r}")
    name = reagent if reagent is not None else pump.name
    rec = record if record is not None else dosing_record()
    steps = 0
    volume = 0.0

    def context() -> None:
        rec.put(reagent=name, dose_step=steps, target_g=float(target_g), volume_ml=volume)

    capacity = yield from read_signal(pump.syringe_volume, live=live)
    capacity = float(capacity) if capacity else math.inf
    context()
    start = yield from weigh(balance, stream, context=rec, live=live)
    delivered = 0.0
    density = density_g_ml
    approached = False  # the first uncapped dispense (the 97 % one) has been made
    # Dispenses capped by the syringe's capacity are not corrections.
    limit = max_corrections + 1 + int(target_g / density_g_ml / capacity)
    while steps < limit:
        remaining = target_g - delivered
        if remaining <= tolerance_g:
            break  # within tolerance, or overshot: a balance cannot take liquid back
        want = remaining / density * (1.0 if approached else first_fraction)
        capped = want > capacity
        step_ml = round(min(want, capacity), 4)
        if step_ml <= 0:
            break
        yield from _ensure_contents(pump, step_ml, live=live)
        status = yield from bps.abs_set(pump, step_ml, group=f"{pump.name}-dose")
        yield from bps.wait(group=f"{pump.name}-dose")
        # After a pause the plan goes on here at once: let the stopped move finish.
        while live and status is not None and not status.done:
            yield from bps.sleep(0.02)
        dispensed = yield from read_signal(pump.dispensed, live=live)
        moved = float(dispensed) if dispensed is not None else step_ml
        volume += moved
        # Approach from below again after a move a pause cut short: the density
        # measured on a small part of a dispense is the least certain.
        approached = approached or (not capped and moved >= 0.99 * step_ml)
        steps += 1
        yield from bps.checkpoint()  # a deferred pause waits for the dispense to end
        context()
        now = yield from weigh(balance, stream, context=rec, live=live)
        if now is None or start is None:  # dry run: the nominal mass landed
            delivered += step_ml * density
            continue
        delivered = now - start
        if delivered > 0 and volume > 0 and 0.5 < delivered / volume / density_g_ml < 2.0:
            density = delivered / volume  # effective density incl. the pump's bias
    ok = abs(target_g - delivered) <= tolerance_g
    return DoseResult(name, float(target_g), float(delivered), volume, steps, ok)


def _ensure_contents(
    pump: SyringePump, volume_ml: float, *, live: bool
) -> Generator[Msg, Any, None]:
    """Refill the syringe when it holds less than ``volume_ml`` (a paused refill is
    repeated; unknown contents, after a failed move, are left to the pump)."""
    for _ in range(3):
        contents = yield from read_signal(pump.contents, live=live)
        if contents is None or math.isnan(contents) or contents >= volume_ml:
            return
        yield from bps.trigger(pump.refill, wait=True)
    raise PlanError(
        f"{pump.name}: syringe still holds less than {volume_ml:.4g} mL after refilling"
    )


__all__ = ["DoseResult", "dose_gravimetric", "dosing_record", "weigh"]
