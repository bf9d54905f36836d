"""Simulated time: one clock per lab, optionally faster than the wall clock.

Physics is evaluated lazily against this clock, so a 30-minute equilibration takes
30 minutes at ``speed=1`` and 1.8 s at ``speed=1000`` without changing any model code.
"""

from __future__ import annotations

import asyncio
import time


class SimClock:
    """Monotonic simulated seconds, ``speed`` times faster than the wall clock."""

    def __init__(self, speed: float = 1.0, start: float = 0.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.speed = float(speed)
        self._t0 = start
        self._m0 = time.monotonic()

    def now(self) -> float:
        """Simulated seconds since the lab started."""
        return self._t0 + (time.monotonic() - self._m0) * self.speed

    def set_speed(self, speed: float) -> None:
        """Change the acceleration from now on; simulated time stays continuous."""
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self._t0 = self.now()
        self._m0 = time.monotonic()
        self.speed = float(speed)

    def wall(self, sim_seconds: float) -> float:
        """Wall-clock seconds that ``sim_seconds`` take at this speed."""
        return max(0.0, sim_seconds) / self.speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.wall(sim_seconds))
