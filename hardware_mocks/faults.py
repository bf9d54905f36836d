"""Fault injection at the wire, on demand.

A fault is armed for the next ``count`` requests (or until cleared) and applies to
whatever the simulator would have answered. Faults model what goes wrong with real
serial instruments: silence, slow replies, line noise, unplugged cables, busy firmware.
"""

from __future__ import annotations

import enum
import random
import threading
from dataclasses import dataclass


class Fault(enum.StrEnum):
    NO_REPLY = "no_reply"  # request swallowed, nothing comes back
    LATE_REPLY = "late_reply"  # correct reply, but after `delay_s` wall seconds
    GARBAGE = "garbage"  # random bytes (with the protocol's terminator) instead of the reply
    DROP = "drop"  # the connection is closed (TCP) or the pty hangs up for this request
    BUSY = "busy"  # the instrument's own busy/overload reply


@dataclass
class ArmedFault:
    fault: Fault
    remaining: int | None  # None = until cleared
    delay_s: float = 2.0


class FaultInjector:
    """Holds the faults armed on one instrument; consulted once per request."""

    def __init__(self, seed: int = 0) -> None:
        # Armed from a test or control thread while the lab's loop consumes them.
        self._lock = threading.Lock()
        self._armed: list[ArmedFault] = []
        self.rng = random.Random(seed)
        self.fired: dict[Fault, int] = dict.fromkeys(Fault, 0)

    def inject(self, fault: Fault | str, count: int | None = 1, delay_s: float = 2.0) -> None:
        """Arm ``fault`` for the next ``count`` requests (``None``: until :meth:`clear`)."""
        fault = Fault(fault)
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 or None, got {count!r}")
        with self._lock:
            self._armed.append(ArmedFault(fault, count, delay_s))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    @property
    def armed(self) -> list[ArmedFault]:
        with self._lock:
            return list(self._armed)

    def next(self) -> ArmedFault | None:
        """The fault to apply to the current request, consuming one shot of it."""
        with self._lock:
            if not self._armed:
                return None
            armed = self._armed[0]
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._armed.pop(0)
            self.fired[armed.fault] += 1
            return armed

    def garbage(self, terminator: bytes) -> bytes:
        """Line noise: random non-empty bytes that end like a reply would."""
        n = self.rng.randint(1, 24)
        body = bytes(self.rng.randrange(0, 256) for _ in range(n))
        for t in (b"\r", b"\n", b"\x03"):
            body = body.replace(t, b"?")
        return body + terminator
