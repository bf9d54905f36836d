"""Analytical balance speaking MT-SICS level 0/1 (Mettler Toledo Standard Interface).

Commands: ``S`` (stable weight; waits for stability), ``SI`` (immediate), ``Z`` (zero),
``ZI`` (zero immediately), ``T`` (tare), ``TA`` (tare value query / preset), ``TAC``
(clear tare), ``I1`` (MT-SICS level and versions), ``I2`` (balance data), ``I3``
(software version), ``I4`` (serial number), ``I5`` (software id), ``@`` (reset).
Replies follow the reference manual's layout ``<ID> <Status> <Value> <Unit>`` with
CRLF; errors ``ES`` (syntax), ``ET`` (transmission), ``EL`` (logical), and
per-command ``I``/``+``/``-`` statuses.

Physics: the pan carries whatever vial sits at the ``balance`` station (glass +
liquid) plus anything spilled. The display approaches the true load with a
first-order settling time, has white noise at the readability and a slow drift,
and volatile solvents evaporate from open vials. Stability is judged like the
instrument does: the last readings within a band over an observation window.
"""

from __future__ import annotations

import math
import re

from hardware_mocks.server import Simulator
from hardware_mocks.world import LabWorld

_TA_SET = re.compile(rb"^TA\s+(-?\d+(?:\.\d+)?)\s+g$")


class BalanceSimulator(Simulator):
    kind = "balance"
    protocol = "mt-sics"
    reply_terminator = b"\r\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        serial_number: str = "B948372615",
        model: str = "XS205DU",
        capacity_g: float = 220.0,
        readability_g: float = 0.0001,
        settle_tau_s: float = 1.2,
        stability_timeout_s: float = 20.0,
        drift_g_per_h: float = 0.0002,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        self.serial_number = serial_number
        self.model = model
        self.capacity_g = capacity_g
        self.readability_g = readability_g
        self.settle_tau_s = settle_tau_s
        self.stability_timeout_s = stability_timeout_s
        self.drift_g_per_h = drift_g_per_h
        self.zero_offset_g = self._true_load()  # powered on and zeroed with an empty pan
        self.tare_g = 0.0
        self._shown = 0.0
        self._target = 0.0
        self._shown_at = self.clock.now()
        self._rng = world.rng

    # -- physics ----------------------------------------------------------------
    def _true_load(self) -> float:
        vial = self.world.vial_at("balance")
        load = self.world.spilled_g.get("balance", 0.0)
        if vial is not None:
            self.world.advance_temperature(vial)  # also evaporates
            load += vial.tare_g + vial.liquid_g
        return load

    def _gross(self) -> tuple[float, bool]:
        """(displayed gross weight above zero, settled?) at the current sim time."""
        now = self.clock.now()
        target = self._true_load() - self.zero_offset_g + self.drift_g_per_h * now / 3600.0
        changed = self.world.changed_at.get("balance", 0.0)
        if changed > self._shown_at:
            # Settle toward the old load until the step, then toward the new one.
            dt_old = changed - self._shown_at
            old = self._target
            self._shown = old + (self._shown - old) * math.exp(-dt_old / self.settle_tau_s)
            self._shown_at = changed
        dt = max(0.0, now - self._shown_at)
        self._shown = target + (self._shown - target) * math.exp(-dt / self.settle_tau_s)
        self._shown_at = now
        self._target = target
        settled = abs(self._shown - target) < 0.5 * self.readability_g
        noise = self._rng.gauss(0.0, 0.3 * self.readability_g)
        return self._shown + noise, settled

    def _format(self, value: float) -> bytes:
        decimals = max(0, round(-math.log10(self.readability_g)))
        return f"{value:>10.{decimals}f} g".encode()

    def _range(self, gross: float) -> bytes | None:
        if gross > self.capacity_g:
            return b"+"
        if gross < -self.capacity_g * 0.05:
            return b"-"
        return None

    async def _wait_stable(self) -> float | None:
        """Gross weight once stable, or None after the stability timeout."""
        deadline = self.clock.now() + self.stability_timeout_s
        while True:
            gross, settled = self._gross()
            if settled:
                return gross
            if self.clock.now() >= deadline:
                return None
            await self.clock.sleep(0.1)

    # -- protocol ---------------------------------------------------------------
    def busy_reply(self, request: bytes) -> bytes | None:
        cmd = request.split()[0] if request.split() else b"S"
        ident = {b"SI": b"S", b"@": b"I4"}.get(cmd, cmd)  # replies carry the reply ID
        return ident + b" I\r\n"

    async def handle(self, request: bytes) -> bytes | None:
        try:
            text = request.decode("ascii").strip()
        except UnicodeDecodeError:
            return b"ET\r\n"
        if text == "@":
            self.tare_g = 0.0
            return f'I4 A "{self.serial_number}"\r\n'.encode()
        if text == "I4":
            return f'I4 A "{self.serial_number}"\r\n'.encode()
        if text == "I1":
            return b'I1 A "01" "2.20" "2.20" "1.00" "1.00"\r\n'
        if text == "I2":
            return f'I2 A "{self.model} {self.capacity_g:.4f} g"\r\n'.encode()
        if text == "I3":
            return b'I3 A "5.20 1.21.3.7"\r\n'
        if text == "I5":
            return b'I5 A "11671158C"\r\n'
        if text == "ZI":
            now_g, settled = self._gross()
            over = self._range(now_g)
            if over:
                return b"ZI " + over + b"\r\n"
            self.zero_offset_g += now_g
            self._shown -= now_g
            self.tare_g = 0.0
            return b"ZI S\r\n" if settled else b"ZI D\r\n"
        if text in ("S", "SI"):
            if text == "S":
                gross = await self._wait_stable()
                if gross is None:
                    return b"S I\r\n"
                stable = True
            else:
                gross, stable = self._gross()
            over = self._range(gross)
            if over:
                return b"S " + over + b"\r\n"
            status = b"S" if stable else b"D"
            return b"S " + status + b" " + self._format(gross - self.tare_g) + b"\r\n"
        if text == "Z":
            gross = await self._wait_stable()
            if gross is None:
                return b"Z I\r\n"
            over = self._range(gross)
            if over:
                return b"Z " + over + b"\r\n"
            self.zero_offset_g += gross
            self._shown -= gross
            self.tare_g = 0.0
            return b"Z A\r\n"
        if text == "T":
            gross = await self._wait_stable()
            if gross is None:
                return b"T I\r\n"
            over = self._range(gross)
            if over:
                return b"T " + over + b"\r\n"
            if gross <= 0:
                return b"T -\r\n"  # cannot tare a negative/empty load
            self.tare_g = gross
            return b"T S " + self._format(self.tare_g) + b"\r\n"
        if text == "TA":
            return b"TA A " + self._format(self.tare_g) + b"\r\n"
        if text == "TAC":
            self.tare_g = 0.0
            return b"TAC A\r\n"
        m = _TA_SET.match(request.strip())
        if m:
            value = float(m.group(1))
            if not 0 <= value <= self.capacity_g:
                return b"TA L\r\n"
            self.tare_g = value
            return b"TA A " + self._format(self.tare_g) + b"\r\n"
        if text.split(" ")[0] in {"S", "SI", "Z", "ZI", "T", "TA", "TAC", "I1", "I2", "I4", "@"}:
            return b"EL\r\n"  # known command, wrong parameters
        return b"ES\r\n"
