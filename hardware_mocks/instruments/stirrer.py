"""Magnetic hotplate stirrer speaking IKA NAMUR (RCT digital / C-MAG HS 7 / RET control-visc).

Protocol (9600 baud 7E1 on the real RS-232 port; commands and replies end with CR LF):

* ``IN_NAME`` -> ``RCT digital``
* ``IN_PV_1`` -> medium temperature from the external PT 1000 probe, e.g. ``24.9 1``
* ``IN_PV_2`` -> hotplate temperature, ``IN_PV_3`` -> safety-circuit temperature
* ``IN_PV_4`` -> actual speed in rpm, e.g. ``299.8 4``
* ``IN_SP_1`` / ``IN_SP_3`` / ``IN_SP_4`` -> temperature setpoint / safety limit / speed setpoint
* ``OUT_SP_1 <t>``, ``OUT_SP_4 <n>`` (also ``OUT_SP_4@<n>``, the newer IKA spelling):
  setpoints; ``START_1``/``STOP_1`` heater, ``START_4``/``STOP_4`` motor; ``RESET``
  switches every function off (setpoints are kept).

Replies are ``<value> <channel>``. As on the real firmware, setters and START/STOP
answer nothing, unknown commands are ignored, and an out-of-range setpoint
(temperature outside 0..``max_temperature_c`` or above the safety limit; speed
outside 0 and ``min_speed_rpm``..``max_speed_rpm``) is ignored: the setpoint stays
where it was, which a driver sees only when it reads the setpoint back. NAMUR has
no busy reply either: under the ``busy`` fault the stirrer answers nothing (firmware
that is busy, e.g. in its self-test after power-up, drops requests).

Regulation: without a probe (``probe_connected=False``, the default) the controller
regulates the *plate* to ``OUT_SP_1`` and the probe channel ``IN_PV_1``, which sits in
the vial, is only a thermometer. With ``probe_connected=True`` it regulates the
*medium*, as an RCT digital does with a PT 1000 plugged in: the plate is driven to
``ambient + (setpoint - ambient) / vial_coupling + probe_gain * (setpoint - medium)``
(the feed-forward that puts the vial on the setpoint in steady state, plus a
proportional correction), capped at ``max_temperature_c``; the medium settles on the
setpoint without offset. A probe hanging in the air (no vial) reads ambient, so the
plate then heats to its cap, as on the real instrument (which is why it has a
safety circuit). The medium the controller sees is the shadowed vial temperature below.

Physics (evaluated lazily against the lab clock, sub-stepped at <= 0.5 s):

* Plate: with the heater on it approaches the setpoint with a first-order lag
  (``plate_tau_s``, the controller) limited to ``max_heating_rate_k_s`` (600 W into
  an aluminium plate: about 1 K/s, i.e. RT to 300 C in ~5 min). It cannot cool
  actively: above the setpoint or with the heater off it loses heat to the room
  with ``plate_cooling_tau_s``.
* Motor: ramps to the setpoint at ``speed_ramp_rpm_s`` (300 rpm/s); off ramps to 0.
* Thermal zone: ``world.zones["stirrer"]`` is this instrument. A vial on the plate
  sees ``ambient + vial_coupling * (plate - ambient)`` (glass on a hot plate never
  reaches the plate temperature; 0.85 is an estimate for a 20 mL vial). The world
  relaxes a vial toward its environment assuming the environment was constant
  over the step; the zone therefore integrates the vial along the plate's real
  trajectory and hands the world the *effective* environment that makes its single
  first-order step exact.
* Mixing: a vial at the station homogenises as ``mixed -> 1`` with rate
  ``1/diffusion_tau_s + (rpm/mix_reference_rpm)/mix_tau_s`` (30 s at 300 rpm; hours
  by diffusion alone), integrated over the actual speed history.
* Readings carry a little noise (0.05 K, 0.3 rpm) and are printed with one decimal.
"""

from __future__ import annotations

import math
import random
import re

from hardware_mocks.server import Simulator
from hardware_mocks.world import LabWorld, Vial

STATION = "stirrer"
_SET = re.compile(r"^OUT_SP_([14])(?: +|@)(\S+)$")
_MAX_STEPS = 20000  # cap on sub-steps per lazy update (a lab idle for days)


class StirrerSimulator(Simulator):
    kind = "stirrer"
    protocol = "ika-namur"
    reply_terminator = b"\r\n"

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        model_name: str = "RCT digital",
        max_temperature_c: float = 310.0,
        safety_limit_c: float = 350.0,
        min_speed_rpm: float = 50.0,
        max_speed_rpm: float = 1500.0,
        plate_tau_s: float = 20.0,
        max_heating_rate_k_s: float = 1.0,
        plate_cooling_tau_s: float = 600.0,
        speed_ramp_rpm_s: float = 300.0,
        vial_coupling: float = 0.85,
        mix_tau_s: float = 30.0,
        mix_reference_rpm: float = 300.0,
        diffusion_tau_s: float = 4.0 * 3600.0,
        max_step_s: float = 0.5,
        probe_connected: bool = False,
        probe_gain: float = 1.0,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        if not 0.0 < vial_coupling <= 1.0:
            raise ValueError(f"vial_coupling must be in (0, 1], got {vial_coupling!r}")
        for label, v in (
            ("plate_tau_s", plate_tau_s),
            ("max_heating_rate_k_s", max_heating_rate_k_s),
            ("plate_cooling_tau_s", plate_cooling_tau_s),
            ("speed_ramp_rpm_s", speed_ramp_rpm_s),
            ("mix_tau_s", mix_tau_s),
            ("mix_reference_rpm", mix_reference_rpm),
            ("diffusion_tau_s", diffusion_tau_s),
            ("max_step_s", max_step_s),
            ("probe_gain", probe_gain),
        ):
            if not v > 0:
                raise ValueError(f"{label} must be > 0, got {v!r}")
        self.model_name = model_name
        self.max_temperature_c = max_temperature_c
        self.safety_limit_c = safety_limit_c
        self.min_speed_rpm = min_speed_rpm
        self.max_speed_rpm = max_speed_rpm
        self.plate_tau_s = plate_tau_s
        self.max_heating_rate_k_s = max_heating_rate_k_s
        self.plate_cooling_tau_s = plate_cooling_tau_s
        self.speed_ramp_rpm_s = speed_ramp_rpm_s
        self.vial_coupling = vial_coupling
        self.mix_tau_s = mix_tau_s
        self.mix_reference_rpm = mix_reference_rpm
        self.diffusion_tau_s = diffusion_tau_s
        self.max_step_s = max_step_s
        self.probe_connected = bool(probe_connected)
        self.probe_gain = probe_gain
        self._rng = random.Random(seed)
        # Instrument state.
        self.temperature_setpoint = 0.0
        self.speed_setpoint = 0.0
        self.heater_on = False
        self.motor_on = False
        self.plate_c = world.ambient_c
        self.rpm = 0.0
        self._t = self.clock.now()
        # Shadow of the vial on the plate, integrated along the plate's trajectory.
        self._vial_id: str | None = None
        self._placed_at = -1.0
        self._vial_c = world.ambient_c
        self._vial_t = self._t
        world.zones[STATION] = self

    # -- physics ----------------------------------------------------------------
    def _environment(self, plate_c: float) -> float:
        amb = self.world.ambient_c
        return amb + self.vial_coupling * (plate_c - amb)

    def _plate_target(self, medium_c: float) -> float:
        """Where the controller wants the plate: the setpoint, or (probe) what heats the medium."""
        if not self.probe_connected:
            return self.temperature_setpoint
        amb = self.world.ambient_c
        sp = self.temperature_setpoint
        target = amb + (sp - amb) / self.vial_coupling + self.probe_gain * (sp - medium_c)
        return min(self.max_temperature_c, max(0.0, target))

    def _step_plate(self, h: float, medium_c: float) -> None:
        amb = self.world.ambient_c
        target = self._plate_target(medium_c)
        if self.heater_on and target > self.plate_c:
            gap = target - self.plate_c
            self.plate_c += min(
                gap * -math.expm1(-h / self.plate_tau_s), self.max_heating_rate_k_s * h
            )
        else:
            cooled = amb + (self.plate_c - amb) * math.exp(-h / self.plate_cooling_tau_s)
            # With the heater on, the controller holds its target on the way down.
            floor = target if self.heater_on else -math.inf
            self.plate_c = max(cooled, min(floor, self.plate_c))
        target = self.speed_setpoint if self.motor_on else 0.0
        step = self.speed_ramp_rpm_s * h
        self.rpm = (
            min(self.rpm + step, target) if self.rpm < target else max(self.rpm - step, target)
        )

    def _attach(self, vial: Vial | None) -> Vial | None:
        """Start shadowing a vial newly placed on the plate (from the world's state)."""
        placed = self.world.changed_at.get(STATION, 0.0)
        if vial is None:
            self._vial_id = None
        elif vial.id != self._vial_id or placed != self._placed_at:
            self._vial_id = vial.id
            self._placed_at = placed
            self._vial_c = vial.temperature_c
            self._vial_t = vial.updated_at
        return vial

    def _advance(self) -> None:
        """Bring plate, motor, the shadowed vial temperature and its mixing up to now."""
        now = self.clock.now()
        vial = self._attach(self.world.vial_at(STATION))
        dt = now - self._t
        if dt <= 0:
            return
        n = min(_MAX_STEPS, max(1, math.ceil(dt / self.max_step_s)))
        h = dt / n
        tau_vial = self.world.vial_thermal_tau_s
        for i in range(n):
            t0 = self._t + i * h
            t1 = t0 + h
            # The probe sits in the vial (or hangs in the room air without one).
            self._step_plate(h, self._vial_c if vial is not None else self.world.ambient_c)
            if vial is None or t1 <= self._vial_t:
                continue
            span = t1 - max(t0, self._vial_t)
            env = self._environment(self.plate_c)
            self._vial_c = env + (self._vial_c - env) * math.exp(-span / tau_vial)
            self._vial_t = t1
            rate = 1.0 / self.diffusion_tau_s + (self.rpm / self.mix_reference_rpm) / self.mix_tau_s
            vial.mixed = 1.0 - (1.0 - vial.mixed) * math.exp(-span * rate)
        self._t = now

    def temperature_c(self) -> float:
        """The environment of the vial at the station (the ThermalZone protocol).

        Called by ``world.advance_temperature(vial)`` with the vial last updated at
        ``vial.updated_at``: returns the constant environment that carries the vial
        from its stored temperature to the exactly integrated one over that interval.
        """
        self._advance()
        vial = self.world.vial_at(STATION)
        instantaneous = self._environment(self.plate_c)
        if vial is None or vial.id != self._vial_id:
            return instantaneous
        dt = self._t - vial.updated_at
        if dt < 1e-6:
            return instantaneous
        a = math.exp(-dt / self.world.vial_thermal_tau_s)
        return (self._vial_c - a * vial.temperature_c) / (1.0 - a)

    # -- protocol ---------------------------------------------------------------
    def busy_reply(self, request: bytes) -> bytes | None:
        return None  # NAMUR has no busy reply: busy firmware drops the request

    def _value(self, value: float, channel: int) -> bytes:
        return f"{value:.1f} {channel}\r\n".encode()

    def _medium_c(self) -> float:
        vial = self.world.vial_at(STATION)
        if vial is None:
            return self.world.ambient_c  # probe hangs in the room air
        return self.world.advance_temperature(vial)

    def _set(self, channel: str, text: str) -> None:
        try:
            value = float(text)
        except ValueError:
            return  # unparseable: ignored, as the firmware does
        if not math.isfinite(value):
            return
        if channel == "1":
            if 0.0 <= value <= min(self.max_temperature_c, self.safety_limit_c):
                self.temperature_setpoint = value
        elif value == 0.0 or self.min_speed_rpm <= value <= self.max_speed_rpm:
            self.speed_setpoint = value

    async def handle(self, request: bytes) -> bytes | None:
        try:
            text = request.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        self._advance()
        noise = self._rng.gauss
        if text == "IN_NAME":
            return f"{self.model_name}\r\n".encode()
        if text == "IN_PV_1":
            return self._value(self._medium_c() + noise(0.0, 0.05), 1)
        if text == "IN_PV_2":
            return self._value(self.plate_c + noise(0.0, 0.05), 2)
        if text == "IN_PV_3":
            return self._value(self.plate_c + 0.3 + noise(0.0, 0.1), 3)
        if text == "IN_PV_4":
            shown = self.rpm + noise(0.0, 0.3) if self.rpm >= 1.0 else 0.0
            return self._value(max(0.0, shown), 4)
        if text == "IN_SP_1":
            return self._value(self.temperature_setpoint, 1)
        if text == "IN_SP_3":
            return self._value(self.safety_limit_c, 3)
        if text == "IN_SP_4":
            return self._value(self.speed_setpoint, 4)
        m = _SET.match(text)
        if m:
            self._set(m.group(1), m.group(2))
        elif text == "START_1":
            self.heater_on = True
        elif text == "STOP_1":
            self.heater_on = False
        elif text == "START_4":
            self.motor_on = True
        elif text == "STOP_4":
            self.motor_on = False
        elif text == "RESET":
            self.heater_on = self.motor_on = False
        return None
