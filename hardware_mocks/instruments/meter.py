"""Conductivity meter speaking the Thermo Scientific Orion Star A-series remote protocol.

Protocol (Star A200-A300 remote control rules; 9600 8N1): a command is
``OPCODE [OPERANDS]`` + CR, LF ignored, not case sensitive. The meter echoes the
command line, prints its output lines (each ended with CR), then the prompt
``"> "``; an empty command gets just the prompt. Commands implemented:

* ``GETMEAS`` / ``GETMEAS <n>``: the current measurement as one CSV record, or ``n``
  records one measuring interval (1 s) apart.
* ``SYSTEM``: ``<model>, <serial>, <software>, <MM/DD/YY HH:MM:SS>``.
* ``GETMODE``: ``COND``. ``SETMODE COND``: accepted (no output). This is a
  conductivity-only channel: other modes fail to execute.
* ``SETCSV``: accepted (output is always CSV here).

The manual documents no error message: "incorrect commands will fail to execute".
Unknown or refused commands therefore print nothing between the echo and the
prompt; so does the ``busy`` fault (a meter whose keypad menu or calibration screen
is open does not execute remote commands). Record layout, including the one field
this simulator adds (the stability status): see ``labctl.devices.protocols.orion``.
Date and time run from 2024-01-01 00:00:00 on the lab's simulated clock.

Physics: the probe measures what is in the vial at the ``meter`` station, at its
actual temperature: ``world.conductivity(vial)`` (the lab's pluggable electrolyte
model at the vial's composition, temperature and mixing state). On top:

* Cell constant: the cell measures conductance ``G = kappa / K_true``; the meter
  multiplies by its calibrated ``cell_constant``. ``K_true = cell_constant * (1 +
  cell_constant_error)``, so a mis-calibrated cell shows as a proportional error.
* Noise: Gaussian, ``noise_rel`` (0.5 %) of the reading plus a 0.005 uS/cm floor
  (the A212 specifies +-0.5 % of reading +-1 digit).
* Temperature compensation: ``"off"`` by default: the raw conductivity at the
  sample temperature is reported (the electrolyte's temperature dependence is
  the quantity of interest, and a linear coefficient made for aqueous KCl would
  distort it). ``"linear"`` divides by ``1 + tc_coefficient/100 * (T - ref)``.
* Temperature: the ATC thermistor follows the liquid with ``probe_tau_s`` after
  immersion (it starts from room air); 0.1 C resolution.
* Immersion: the electrodes need ``immersion_ml`` of liquid; less wets them only
  partly and reads proportionally low (and is never stable). No vial, or an empty
  one: the probe is in air and reads ~0 uS/cm at room temperature.
* Stability ("successive values agree"): the meter compares its averaged signal
  now with the signal ``stability_window_s`` earlier. The earlier values follow
  from the vial's first-order approach to its surroundings (exact for a constant
  environment) and the electrolyte model's temperature dependence. Stable when the
  conductivity moved less than ``stability_rel`` and the temperature less than
  ``stability_temp_c`` over the window, and the probe has been immersed for
  ``settle_s``. A vial still warming or cooling is therefore "Stabilizing".
* Range: above ``max_conductivity_ms_cm`` (3000 mS/cm for the A212; lower to model
  a cell with a small range) the record reads ``Overrange``.
"""

from __future__ import annotations

import datetime as dt
import math
import random

from hardware_mocks.server import MAX_FRAME, Simulator
from hardware_mocks.world import LabWorld

STATION = "meter"
_EPOCH = dt.datetime(2024, 1, 1)
_PROMPT = b"> "


def _display(ms_cm: float) -> tuple[str, str]:
    """Autoranged value and unit with ~4 significant digits, as the meter displays."""
    us = ms_cm * 1000.0
    for limit, decimals in ((19.995, 2), (199.95, 1), (1999.5, 0)):
        if us < limit:
            return f"{us:.{decimals}f}", "uS/cm"
    for limit, decimals in ((19.995, 2), (199.95, 1)):
        if ms_cm < limit:
            return f"{ms_cm:.{decimals}f}", "mS/cm"
    return f"{ms_cm:.0f}", "mS/cm"


class ConductivityMeterSimulator(Simulator):
    kind = "meter"
    protocol = "orion-star"
    reply_terminator = b"\r" + _PROMPT

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        model: str = "A212",
        serial_number: str = "X51234",
        software: str = "3.04",
        user_id: str = "ADMIN",
        method: str = "M100",
        cell_constant: float = 0.475,
        cell_constant_error: float = 0.0,
        noise_rel: float = 0.005,
        temperature_compensation: str = "off",
        tc_coefficient: float = 2.1,
        reference_temp_c: float = 25.0,
        max_conductivity_ms_cm: float = 3000.0,
        immersion_ml: float = 3.0,
        probe_tau_s: float = 5.0,
        settle_s: float = 20.0,
        stability_window_s: float = 10.0,
        stability_rel: float = 0.003,
        stability_temp_c: float = 0.2,
        measure_interval_s: float = 1.0,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        if temperature_compensation not in ("off", "linear"):
            raise ValueError(
                "temperature_compensation must be 'off' or 'linear', "
                f"got {temperature_compensation!r}"
            )
        for label, v in (
            ("cell_constant", cell_constant),
            ("max_conductivity_ms_cm", max_conductivity_ms_cm),
            ("immersion_ml", immersion_ml),
            ("probe_tau_s", probe_tau_s),
            ("stability_window_s", stability_window_s),
            ("measure_interval_s", measure_interval_s),
        ):
            if not v > 0:
                raise ValueError(f"{label} must be > 0, got {v!r}")
        if not -0.5 < cell_constant_error < 0.5:
            raise ValueError(
                f"cell_constant_error must be in (-0.5, 0.5), got {cell_constant_error!r}"
            )
        self.model = model
        self.serial_number = serial_number
        self.software = software
        self.user_id = user_id
        self.method = method
        self.cell_constant = cell_constant
        self.cell_constant_error = cell_constant_error
        self.noise_rel = noise_rel
        self.temperature_compensation = temperature_compensation
        self.tc_coefficient = tc_coefficient
        self.reference_temp_c = reference_temp_c
        self.max_conductivity_ms_cm = max_conductivity_ms_cm
        self.immersion_ml = immersion_ml
        self.probe_tau_s = probe_tau_s
        self.settle_s = settle_s
        self.stability_window_s = stability_window_s
        self.stability_rel = stability_rel
        self.stability_temp_c = stability_temp_c
        self.measure_interval_s = measure_interval_s
        self.log_number = 0
        self._rng = random.Random(seed)

    # -- framing: CR ends a command, LF is ignored, an empty command gets a prompt ----
    def split_frames(self, buffer: bytearray) -> list[bytes]:
        frames: list[bytes] = []
        while True:
            idx = buffer.find(b"\r")
            if idx < 0:
                if len(buffer) > MAX_FRAME:
                    buffer.clear()
                return frames
            frames.append(bytes(buffer[:idx]).replace(b"\n", b""))
            del buffer[: idx + 1]

    # -- physics ----------------------------------------------------------------
    def _stable(
        self, kappa: float, temp: float, fractions: dict[str, float], molality: float
    ) -> bool:
        """Would the meter's averaged signal now agree with the one a window ago?"""
        env = self.world.environment_c(STATION)
        back = math.exp(self.stability_window_s / self.world.vial_thermal_tau_s)
        temp_before = env + (temp - env) * back
        if abs(temp - temp_before) > self.stability_temp_c:
            return False
        if kappa <= 0.0 or not fractions or molality <= 0.0:
            return True
        model = self.world.electrolyte_model
        try:
            ratio = model(fractions, molality, temp_before) / model(fractions, molality, temp)
        except (ValueError, ZeroDivisionError, OverflowError):
            return False
        return abs(1.0 - ratio) <= self.stability_rel

    def measure(self) -> dict[str, float | bool]:
        """One reading: displayed conductivity (mS/cm), conductance (mS), temperature, stability."""
        now = self.clock.now()
        immersed_for = now - self.world.changed_at.get(STATION, -math.inf)
        air = self.world.environment_c(STATION)
        vial = self.world.vial_at(STATION)
        kappa, temp, stable = 0.0, air, immersed_for >= self.settle_s
        if vial is not None and vial.liquid_g > 0:
            kappa = self.world.conductivity(vial)  # also brings the vial's temperature up to now
            temp = vial.temperature_c
            wetted = min(1.0, vial.liquid_g / 1.2 / self.immersion_ml)  # ~1.2 g/mL, as the world
            kappa *= wetted
            fractions, molality = vial.composition()
            stable = stable and wetted >= 1.0 and self._stable(kappa, temp, fractions, molality)
            # The thermistor started from room air when the probe went in.
            temp += (air - temp) * math.exp(-max(0.0, immersed_for) / self.probe_tau_s)
        noisy = kappa * (1.0 + self._rng.gauss(0.0, self.noise_rel)) + self._rng.gauss(0.0, 5e-6)
        conductance = max(0.0, noisy) / (self.cell_constant * (1.0 + self.cell_constant_error))
        shown = conductance * self.cell_constant
        if self.temperature_compensation == "linear":
            shown /= 1.0 + self.tc_coefficient / 100.0 * (temp - self.reference_temp_c)
        return {
            "conductivity": shown,
            "conductance": conductance,
            "temperature": temp + self._rng.gauss(0.0, 0.02),
            "stable": stable,
        }

    # -- protocol ---------------------------------------------------------------
    def _timestamp(self) -> str:
        return (_EPOCH + dt.timedelta(seconds=self.clock.now())).strftime("%m/%d/%y %H:%M:%S")

    def _record(self) -> str:
        m = self.measure()
        kappa = float(m["conductivity"])
        self.log_number += 1
        if kappa > self.max_conductivity_ms_cm:
            value, unit, g_value, g_unit, status = "----", "mS/cm", "----", "mS", "Overrange"
        else:
            value, unit = _display(kappa)
            g_value, g_unit = _display(float(m["conductance"]))
            g_unit = g_unit.removesuffix("/cm")
            status = "Ready" if m["stable"] else "Stabilizing"
        comp = "Lin" if self.temperature_compensation == "linear" else "Off"
        fields = [
            self.model, self.serial_number, self.software, self.user_id, self._timestamp(), "",
            "CH-1", "Cond", value, unit, g_value, g_unit, f"{float(m['temperature']):.1f}", "C",
            comp, f"{self.tc_coefficient:.1f}", f"{self.reference_temp_c:.1f}",
            f"{self.cell_constant:.3f}", status, self.method, str(self.log_number),
        ]  # fmt: skip
        return ", ".join(fields)

    def _reply(self, echo: bytes, lines: list[str]) -> bytes:
        body = b"".join(line.encode("ascii") + b"\r" for line in lines)
        return echo + b"\r" + body + _PROMPT

    def busy_reply(self, request: bytes) -> bytes | None:
        return self._reply(request, [])  # echoed, not executed

    async def handle(self, request: bytes) -> bytes | None:
        try:
            text = request.decode("ascii").strip().upper()
        except UnicodeDecodeError:
            return self._reply(b"", [])
        if not text:
            return _PROMPT
        words = text.split()
        opcode, operands = words[0], words[1:]
        lines: list[str] = []
        if opcode == "GETMEAS" and len(operands) <= 1:
            count = 1
            if operands:
                count = int(operands[0]) if operands[0].isdigit() else 0
            if 1 <= count <= 999:
                for i in range(count):
                    if i:
                        await self.clock.sleep(self.measure_interval_s)
                    lines.append(self._record())
        elif opcode == "SYSTEM" and not operands:
            lines.append(
                f"{self.model}, {self.serial_number}, {self.software}, {self._timestamp()}"
            )
        elif opcode == "GETMODE" and len(operands) <= 1:
            lines.append("COND")
        # SETMODE COND and SETCSV execute without output; anything else fails silently.
        return self._reply(request, lines)
