"""A network of New Era NE-1000 syringe pumps, one per reagent, on one RS-232 line.

Protocol (NE-1000 Multi-Phaser User Manual, publication #1200-01, section 10)
--------------------------------------------------------------------------------
Every pump of the daisy chain hears every packet; only the addressed pump (0..99)
answers. Basic mode: ``[address][command][data] CR`` in, ``STX address(2 digits)
status [data] ETX`` out; spaces and control characters are stripped and text is
upper-cased before parsing. Safe mode: ``STX length text CRC16 ETX`` both ways (CRC-16
CCITT/XMODEM of the text); a safe packet with a bad CRC is answered ``?COM``.

Commands: status query (no command), ``DIA`` (syringe inside diameter, mm; sets the
volume units: µL at or below 14.00 mm, mL above), ``RAT`` (rate with units ``UM`` ``MM``
``UH`` ``MH``; units cannot change while pumping), ``VOL`` (volume to be dispensed, or
``UL``/``ML`` to choose its units; 0 = pump continuously), ``DIR`` (``INF``, ``WDR``,
``REV``), ``RUN``, ``STP`` (pause; a second ``STP`` stops the program), ``PUR`` (purge at
the maximum rate until stopped), ``DIS`` (``I<inf>W<wdr><units>``), ``CLD INF|WDR``,
``VER`` (``NE1000V3.928``), ``SAF`` (safe-mode timeout 0..255 s; 0 = basic mode).
Status characters ``S I W P X``; alarms ``A?R`` (power-on reset), ``A?S`` (motor stall),
``A?T`` (safe-mode timeout). As on the pump, an alarm is reported once, in reply to the
next packet, and that packet's command is not executed. Errors ``?`` (not recognised),
``?NA`` (not applicable in this state), ``?OOR`` (out of range), ``?COM`` (bad packet),
``?IGN`` (the ``busy`` fault: "ignored, a new phase started at the same moment").
Numbers are formatted as on the display: 4 digits, at most 3 decimals, and replies
always carry the decimal point (``1000.UL``), as the independent client ``nesp_lib``
expects.

Choices where the manual is silent (documented, not invented features): a packet
without an address goes to pump 0; ``*`` sends to every pump and the lowest address's
reply is returned (the real line would carry a collision); a basic-mode packet sent to a
pump in safe mode is answered ``?COM`` in safe framing; the safe-mode timeout runs on
the wall clock (it is about the host, not the chemistry); the safe-mode auto-alarm packet
(sent unprompted) is not modelled, the alarm is reported with the next reply. Not
modelled: multi-phase programs (``RUN`` accepts phase 1 only), keypad, TTL I/O, baud
rate changes, Network Command Burst; such commands answer ``?``.

Physics
-------
Each pump carries a syringe of ``syringe_volume_ml`` and inside diameter
``syringe_diameter_mm`` (default 14.43 mm, a B-D 10 mL syringe in New Era's syringe
table). The plunger position is tracked as the nominal volume in the barrel. Rates are
limited by the lead-screw speed: about 2120 mL/h with a 60 mL syringe (26.59 mm) and
0.73 µL/h with a 1 mL syringe (4.699 mm) per the NE-1000 specification, i.e. 63.6 mm/min
and 7e-4 mm/min of plunger travel. Withdrawing refills the syringe from the reagent
reservoir through the check valve (no liquid reaches the vial). Infusing moves liquid to
the vial at the dispense station (``balance``) *as simulated time passes*: a background
task calls :meth:`LabWorld.dispense` in small increments, so a balance sees the mass rise
during a dispense; with no vial there it spills onto the pan. The delivered volume
differs from the nominal one by a per-pump systematic factor (syringe bore tolerance,
normal with ``volumetric_bias_sd``, default 0.5 %) and a per-run factor
(``volumetric_noise_sd``, default 0.2 %), which is why gravimetric correction matters.
The plunger stalls at either end of its travel: an empty syringe on infuse, or a
withdraw past the barrel's end (5 % beyond the nominal volume), stops the pump with a
stall alarm; :meth:`PumpNetworkSimulator.jam` makes a pump stall after a given volume
(a blocked line). An overflowing vial spills on the pan.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field

from hardware_mocks.server import MAX_FRAME, Simulator
from hardware_mocks.world import LabWorld, WorldError

log = logging.getLogger(__name__)

STX = 0x02
ETX = 0x03
RUNNING = frozenset("IWX")
RATE_UNITS = {"UM": 1e-3, "MM": 1.0, "UH": 1e-3 / 60.0, "MH": 1.0 / 60.0}  # mL/min per unit
VOLUME_UNITS = {"UL": 1e-3, "ML": 1.0}  # mL per unit
# Plunger speed limits (mm/min) from the NE-1000 rate range quoted above.
MAX_SPEED_MM_MIN = 2120e3 / 60.0 / (math.pi * (26.59 / 2) ** 2)
MIN_SPEED_MM_MIN = 0.73 / 60.0 / (math.pi * (4.699 / 2) ** 2)
INTER_BYTE_TIMEOUT_S = 0.5  # an incomplete safe packet is discarded after this pause
OVERTRAVEL = 0.05  # barrel length past the last graduation, as a fraction of the capacity

_COMMAND = re.compile(r"(\*|\d{1,2})?([A-Z]{3})?(.*)", re.DOTALL)
_FLOAT = re.compile(r"(\d+\.?\d*|\.\d+)")
_RATE = re.compile(r"(\d+\.?\d*|\.\d+)(UM|MM|UH|MH)?")


def crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def fmt(value: float) -> str:
    """A display number: 4 digits, at most 3 decimals, always with its decimal point."""
    value = max(0.0, value)
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if sum(c.isdigit() for c in text) <= 4:
            return text if "." in text else text + "."
    return "9999."  # the display saturates


def parse_number(text: str) -> float | None:
    """A ``<float>`` as the pump accepts it (4 digits, 3 decimals at most), or None."""
    if not _FLOAT.fullmatch(text):
        return None
    digits = sum(c.isdigit() for c in text)
    decimals = len(text) - text.index(".") - 1 if "." in text else 0
    if digits > 4 or decimals > 3:
        return None
    return float(text)


@dataclass
class PumpState:
    """One NE-1000 and its syringe (volumes in mL, times in simulated seconds)."""

    address: int
    reagent: str
    diameter_mm: float
    capacity_ml: float
    plunger_ml: float  # nominal volume in the barrel, from the plunger position
    bias: float  # delivered / nominal, fixed for this syringe
    rate_value: float = 1.0
    rate_units: str = "MM"
    target_ml: float = 0.0  # "volume to be dispensed"; 0 = continuous
    volume_units: str = "ML"
    direction: str = "INF"
    state: str = "S"
    phase_ml: float = 0.0  # moved in the current phase (kept while paused)
    infused_ml: float = 0.0
    withdrawn_ml: float = 0.0
    alarm: str | None = None
    run_factor: float = 1.0
    updated: float = 0.0
    safe_timeout_s: int = 0
    last_valid: float = 0.0  # sim time of the last valid packet addressed to this pump
    jam_ml: float | None = None
    delivered_true_ml: float = 0.0  # ground truth: what really left the syringe
    history: list[tuple[float, str]] = field(default_factory=list)

    @property
    def travel_ml(self) -> float:
        """Plunger travel to its stop, as a volume: a little past the nominal capacity."""
        return self.capacity_ml * (1.0 + OVERTRAVEL)

    @property
    def rate_ml_min(self) -> float:
        return self.rate_value * RATE_UNITS[self.rate_units]

    @property
    def area_mm2(self) -> float:
        return math.pi * (self.diameter_mm / 2.0) ** 2

    def rate_limits_ml_min(self) -> tuple[float, float]:
        ml_per_mm = self.area_mm2 / 1000.0
        return MIN_SPEED_MM_MIN * ml_per_mm, MAX_SPEED_MM_MIN * ml_per_mm


class PumpNetworkSimulator(Simulator):
    kind = "pump"
    protocol = "ne-1000"
    reply_terminator = bytes([ETX])

    def __init__(
        self,
        name: str,
        world: LabWorld,
        *,
        seed: int = 0,
        latency_s: float = 0.002,
        reagents: list[str] | None = None,
        syringe_diameter_mm: float = 14.43,
        syringe_volume_ml: float = 10.0,
        initial_fill_ml: float | None = None,
        rate_ml_min: float = 1.0,
        volumetric_bias_sd: float = 0.005,
        volumetric_noise_sd: float = 0.002,
        station: str = "balance",
        firmware: str = "NE1000V3.928",
        power_on_alarm: bool = True,
    ) -> None:
        super().__init__(name, world, seed=seed, latency_s=latency_s)
        names = list(world.reagents) if reagents is None else list(reagents)
        unknown = [r for r in names if r not in world.reagents]
        if unknown:
            raise ValueError(f"reagents: unknown {unknown}; the lab has {list(world.reagents)}")
        if not 1 <= len(names) <= 100:
            raise ValueError(f"reagents: one pump per reagent, 1..100 of them, got {len(names)}")
        if not 0.1 <= syringe_diameter_mm <= 50.0:
            raise ValueError(f"syringe_diameter_mm: must be 0.1..50, got {syringe_diameter_mm!r}")
        if not syringe_volume_ml > 0:
            raise ValueError(f"syringe_volume_ml: must be > 0, got {syringe_volume_ml!r}")
        fill = syringe_volume_ml if initial_fill_ml is None else initial_fill_ml
        if not 0 <= fill <= syringe_volume_ml:
            raise ValueError(f"initial_fill_ml: must be 0..{syringe_volume_ml}, got {fill!r}")
        self.rng = random.Random(seed)
        self.volumetric_noise_sd = volumetric_noise_sd
        self.station = station
        self.firmware = firmware
        now = self.clock.now()
        self.pumps: dict[int, PumpState] = {}
        for address, reagent in enumerate(names):
            p = PumpState(
                address=address,
                reagent=reagent,
                diameter_mm=syringe_diameter_mm,
                capacity_ml=syringe_volume_ml,
                plunger_ml=fill,
                bias=1.0 + self.rng.gauss(0.0, volumetric_bias_sd),
                volume_units="UL" if syringe_diameter_mm <= 14.0 else "ML",
                alarm="R" if power_on_alarm else None,
                updated=now,
                last_valid=now,
            )
            p.rate_value, p.rate_units = _best_rate(rate_ml_min)
            self.pumps[address] = p
        self._ticker: asyncio.Task[None] | None = None
        self._pending: tuple[int, float] | None = None  # (bytes, wall time) of a partial packet

    # -- ground truth and test hooks -------------------------------------------------
    def pump(self, key: int | str) -> PumpState:
        """The pump at an address, or drawing a reagent."""
        if isinstance(key, int):
            return self.pumps[key]
        return next(p for p in self.pumps.values() if p.reagent == key)

    def jam(self, key: int | str, after_ml: float = 0.0) -> None:
        """Block a pump's line: it stalls after moving ``after_ml`` more (once)."""
        self.pump(key).jam_ml = after_ml

    # -- framing -----------------------------------------------------------------------
    def split_frames(self, buffer: bytearray) -> list[bytes]:
        """Basic packets end with CR; safe packets are sized by their length byte."""
        wall = time.monotonic()
        if self._pending is not None:
            held, since = self._pending
            if wall - since > INTER_BYTE_TIMEOUT_S and held <= len(buffer):
                del buffer[:held]  # the pump's inter-byte timeout discarded it
        self._pending = None
        frames: list[bytes] = []
        while buffer:
            if buffer[0] == STX:
                if len(buffer) < 2:
                    self._pending = (len(buffer), wall)
                    break
                if buffer[1] < 4:  # too short for a safe packet: line noise
                    del buffer[:1]
                    continue
                end = 1 + buffer[1]
                if len(buffer) < end:
                    self._pending = (len(buffer), wall)
                    break
                frames.append(bytes(buffer[:end]))
                del buffer[:end]
                continue
            cr = buffer.find(b"\r")
            stx = buffer.find(bytes([STX]))
            if stx >= 0 and (cr < 0 or stx < cr):
                del buffer[:stx]  # noise in front of a safe packet
                continue
            if cr < 0:
                if len(buffer) > MAX_FRAME:
                    buffer.clear()
                break
            frames.append(bytes(buffer[:cr]))
            del buffer[: cr + 1]
        return frames

    def _frame(self, p: PumpState, data: str, *, alarm: str | None = None) -> bytes:
        head = f"A?{alarm}" if alarm else p.state
        text = f"{p.address:02d}{head}{data}".encode("ascii")
        if not p.safe_timeout_s:
            return bytes([STX]) + text + bytes([ETX])
        crc = crc16(text)
        return bytes([STX, len(text) + 4]) + text + bytes([crc >> 8, crc & 0xFF, ETX])

    @staticmethod
    def _text_of(request: bytes) -> tuple[bytes, bool, bool]:
        """(text, is_safe_packet, crc_ok) of one request frame."""
        if request[:1] == bytes([STX]):
            if len(request) < 5 or request[-1] != ETX:
                return request[2:], True, False
            text = request[2:-3]
            return text, True, crc16(text) == (request[-3] << 8 | request[-2])
        return request, False, True

    def _parse(self, text: bytes) -> tuple[str | None, str, str]:
        cleaned = "".join(chr(b) for b in text if 0x20 < b < 0x7F).upper()
        m = _COMMAND.fullmatch(cleaned)
        assert m is not None  # every group is optional
        return m.group(1), m.group(2) or "", m.group(3)

    def _targets(self, addr: str | None) -> list[PumpState]:
        if addr == "*":
            return [self.pumps[a] for a in sorted(self.pumps)]
        p = self.pumps.get(int(addr) if addr else 0)
        return [p] if p is not None else []

    # -- protocol ----------------------------------------------------------------------
    def busy_reply(self, request: bytes) -> bytes | None:
        text, _, _ = self._text_of(request)
        targets = self._targets(self._parse(text)[0])
        return self._frame(targets[0], "?IGN") if targets else None

    async def handle(self, request: bytes) -> bytes | None:
        self._advance_all()
        text, safe_packet, crc_ok = self._text_of(request)
        addr, command, arg = self._parse(text)
        targets = self._targets(addr)
        if not targets:
            return None  # nobody at that address: silence, as on a real line
        if not crc_ok:
            return self._frame(targets[0], "?COM")
        replies = [self._execute(p, command, arg, safe_packet) for p in targets]
        if any(p.state in RUNNING for p in self.pumps.values()):
            self._ensure_ticker()
        return replies[0]

    def _execute(self, p: PumpState, command: str, arg: str, safe_packet: bool) -> bytes:
        if p.safe_timeout_s and not safe_packet:
            return self._frame(p, "?COM")  # not a valid packet in safe mode
        now = self.clock.now()
        if p.safe_timeout_s and now > p.last_valid + p.safe_timeout_s * self.clock.speed:
            p.alarm = p.alarm or "T"  # the timer expired while the pump sat idle
        p.last_valid = now
        if p.alarm is not None:
            alarm, p.alarm = p.alarm, None  # reporting acknowledges; the command is dropped
            return self._frame(p, "", alarm=alarm)
        data = self._command(p, command, arg)
        return self._frame(p, data)

    def _command(self, p: PumpState, command: str, arg: str) -> str:
        running = p.state in RUNNING
        if command == "":
            return "" if arg == "" else "?"
        if command == "DIA":
            if arg == "":
                return fmt(p.diameter_mm)
            value = parse_number(arg)
            if running or p.state == "P":
                return "?NA"
            if value is None or not 0.1 <= value <= 50.0:
                return "?OOR"
            p.diameter_mm = value
            p.volume_units = "UL" if value <= 14.0 else "ML"
            return ""
        if command == "RAT":
            if arg == "":
                return fmt(p.rate_value) + p.rate_units
            m = _RATE.fullmatch(arg)
            value = parse_number(m.group(1)) if m else None
            if m is None or value is None:
                return "?OOR"
            units = m.group(2) or p.rate_units
            if running and units != p.rate_units:
                return "?NA"
            low, high = p.rate_limits_ml_min()
            if not low <= value * RATE_UNITS[units] <= high:
                return "?OOR"
            p.rate_value, p.rate_units = value, units
            return ""
        if command == "VOL":
            if arg == "":
                return fmt(p.target_ml / VOLUME_UNITS[p.volume_units]) + p.volume_units
            if running:
                return "?NA"
            if arg in VOLUME_UNITS:
                p.volume_units = arg
                return ""
            value = parse_number(arg)
            if value is None:
                return "?OOR"
            p.target_ml = value * VOLUME_UNITS[p.volume_units]
            return ""
        if command == "DIR":
            if arg == "":
                return p.direction
            if arg not in ("INF", "WDR", "REV"):
                return "?OOR"
            if running and p.target_ml > 0:
                return "?NA"  # only a continuous (VOL 0) run may change direction
            new = arg if arg != "REV" else ("WDR" if p.direction == "INF" else "INF")
            p.direction = new
            if p.state in ("I", "W"):
                p.state = "I" if new == "INF" else "W"
            return ""
        if command == "RUN":
            if arg not in ("", "1"):
                return "?OOR"  # only a one-phase program is modelled
            if running:
                return ""
            low, high = p.rate_limits_ml_min()
            if not low <= p.rate_ml_min <= high:
                return "?OOR"  # the rate no longer suits the syringe set since
            if p.state == "S":
                p.phase_ml = 0.0
                p.run_factor = 1.0 + self.rng.gauss(0.0, self.volumetric_noise_sd)
            p.state = "I" if p.direction == "INF" else "W"
            p.updated = self.clock.now()
            return ""
        if command == "PUR":
            if arg:
                return "?OOR"
            if not running:
                p.state = "X"
                p.updated = self.clock.now()
            return ""
        if command == "STP":
            if arg:
                return "?OOR"
            if p.state in ("I", "W"):
                p.state = "P"
            elif p.state in ("P", "X"):
                p.state, p.phase_ml = "S", 0.0
            return ""
        if command == "DIS":
            if arg:
                return "?OOR"
            u = VOLUME_UNITS[p.volume_units]
            return f"I{fmt(p.infused_ml / u)}W{fmt(p.withdrawn_ml / u)}{p.volume_units}"
        if command == "CLD":
            if arg == "INF":
                p.infused_ml = 0.0
            elif arg == "WDR":
                p.withdrawn_ml = 0.0
            else:
                return "?OOR"
            return ""
        if command == "VER":
            return "?OOR" if arg else self.firmware
        if command == "SAF":
            if arg == "":
                return str(p.safe_timeout_s)
            if not arg.isdigit() or not 0 <= int(arg) <= 255:
                return "?OOR"
            p.safe_timeout_s = int(arg)
            return ""
        return "?"

    # -- physics -----------------------------------------------------------------------
    def _advance_all(self) -> None:
        now = self.clock.now()
        for p in self.pumps.values():
            self._advance(p, now)

    def _advance(self, p: PumpState, now: float) -> None:
        """Move the plunger from ``p.updated`` to ``now`` at the programmed rate."""
        while p.state in RUNNING and p.updated < now:
            infusing = p.direction == "INF"
            purging = p.state == "X"
            speed = (p.rate_limits_ml_min()[1] if purging else p.rate_ml_min) / 60.0
            events: list[tuple[float, str]] = []
            if p.state != "X" and p.target_ml > 0:
                events.append((p.target_ml - p.phase_ml, "done"))
            if p.jam_ml is not None:
                events.append((p.jam_ml, "jam"))
            # The plunger stops at the barrel's bottom, and past the last graduation when
            # pulled back (barrels are longer than their nominal volume); the 1e-9 lets a
            # phase that ends exactly there finish rather than stall on rounding.
            travel = p.plunger_ml if infusing else p.travel_ml - p.plunger_ml
            events.append((travel + 1e-9, "stall"))
            if p.safe_timeout_s:
                deadline = p.last_valid + p.safe_timeout_s * self.clock.speed
                events.append((speed * (deadline - p.updated), "timeout"))
            events.append((speed * (now - p.updated), ""))
            step, event = min(events, key=lambda e: e[0])
            step = max(0.0, step)
            self._move(p, step, infusing)
            p.updated = p.updated + step / speed if event and speed > 0 else now
            if event == "done":
                p.state, p.phase_ml = "S", 0.0
            elif event in ("jam", "stall", "timeout"):
                p.state, p.jam_ml = "S", None
                p.alarm = "T" if event == "timeout" else "S"
            if event:
                p.history.append((p.updated, event))

    def _move(self, p: PumpState, step: float, infusing: bool) -> None:
        if step <= 0:
            return
        p.phase_ml += step
        if p.jam_ml is not None:
            p.jam_ml = max(0.0, p.jam_ml - step)
        if not infusing:
            p.plunger_ml = min(p.travel_ml, p.plunger_ml + step)
            p.withdrawn_ml += step
            return  # the check valve fills the syringe from the reservoir
        p.plunger_ml = max(0.0, p.plunger_ml - step)
        p.infused_ml += step
        true_ml = step * p.bias * p.run_factor
        p.delivered_true_ml += true_ml
        try:
            self.world.dispense(p.reagent, true_ml, self.station)
        except WorldError:
            # The vial is full: the liquid runs down its side onto the pan.
            density = self.world.reagents[p.reagent].density_g_ml or 1.0
            spilled = self.world.spilled_g
            spilled[self.station] = spilled.get(self.station, 0.0) + true_ml * density
            self.world.changed_at[self.station] = self.clock.now()

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick(), name=f"pump-physics:{self.name}"
            )

    async def _tick(self) -> None:
        """Advance running pumps as time passes, so the vial fills during a dispense."""
        wall_step = min(0.05, max(0.005, 0.5 / self.clock.speed))
        while any(p.state in RUNNING for p in self.pumps.values()):
            await asyncio.sleep(wall_step)
            try:
                self._advance_all()
            except Exception:  # a physics bug must not kill the loop silently
                log.exception("%s: pump physics failed", self.name)
                raise

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
            self._ticker = None


def _best_rate(ml_min: float) -> tuple[float, str]:
    for units in ("UH", "UM", "MH"):
        value = ml_min / RATE_UNITS[units]
        if value < 9999.5:
            return float(fmt(value)), units
    return float(fmt(ml_min)), "MM"
