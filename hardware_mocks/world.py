"""The shared physical state of a simulated lab.

Every simulator of a lab holds the same :class:`LabWorld`, so what a pump dispenses
really lands in the vial on the balance, the robot really moves that vial, and the
conductivity meter measures what is really in the vial at its real temperature.
State is advanced lazily against the lab's :class:`~hardware_mocks.clock.SimClock`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hardware_mocks.clock import SimClock
from hardware_mocks.physics.materials import LIPF6_MOLAR_MASS, SALT, SOLVENT_DATA, SOLVENTS

ElectrolyteModel = Callable[[dict[str, float], float, float], float]

# Stations a vial can occupy. "balance" is also the dispense station: the pump
# manifold sits over the balance pan so that dosing is gravimetric.
FIXED_STATIONS: tuple[str, ...] = ("balance", "stirrer", "meter", "cell")


class WorldError(Exception):
    """A physically impossible request (occupied station, no vial, overflow)."""


class ThermalZone(Protocol):
    """Anything that sets the temperature around a station (chamber, hotplate)."""

    def temperature_c(self) -> float: ...


@dataclass
class Reagent:
    """A liquid the pumps draw from: solvent mass fractions + salt molality."""

    name: str
    solvent_fractions: dict[str, float]
    salt_molality: float = 0.0  # mol LiPF6 per kg of solvent
    density_g_ml: float | None = None

    def __post_init__(self) -> None:
        unknown = set(self.solvent_fractions) - set(SOLVENTS)
        if unknown:
            raise ValueError(f"reagent {self.name!r}: unknown solvent(s) {sorted(unknown)}")
        total = sum(self.solvent_fractions.values())
        if not all(math.isfinite(x) and x >= 0 for x in self.solvent_fractions.values()):
            raise ValueError(f"reagent {self.name!r}: fractions must be finite and >= 0")
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"reagent {self.name!r}: solvent fractions sum to {total}, not 1")
        if self.density_g_ml is None:
            # Ideal mixing of solvents; LiPF6 adds ~0.12 g/mL per mol/kg (fit to
            # 1 M LiPF6 in EC:EMC at ~1.20 g/mL vs 1.09 for the solvent).
            inv = sum(w / SOLVENT_DATA[k].density for k, w in self.solvent_fractions.items())
            self.density_g_ml = 1.0 / inv + 0.12 * self.salt_molality

    def mass_composition(self) -> dict[str, float]:
        """Mass fraction of each species (solvents and LiPF6) in one gram of reagent."""
        salt_per_g_solvent = self.salt_molality * LIPF6_MOLAR_MASS / 1000.0
        solvent_share = 1.0 / (1.0 + salt_per_g_solvent)
        comp = {k: w * solvent_share for k, w in self.solvent_fractions.items()}
        if self.salt_molality > 0:
            comp[SALT] = 1.0 - solvent_share
        return comp


@dataclass
class Vial:
    id: str
    station: str
    tare_g: float = 12.0  # empty glass vial with cap
    capacity_ml: float = 20.0
    contents_g: dict[str, float] = field(default_factory=dict)
    temperature_c: float = 25.0
    updated_at: float = 0.0  # sim time the temperature was last advanced
    mixed: float = 1.0  # 0 = freshly layered, 1 = homogeneous

    @property
    def liquid_g(self) -> float:
        return sum(self.contents_g.values())

    def composition(self) -> tuple[dict[str, float], float]:
        """(solvent mass fractions, salt molality in mol/kg) of the liquid."""
        solvent = {k: self.contents_g.get(k, 0.0) for k in SOLVENTS}
        total = sum(solvent.values())
        if total <= 0:
            return {}, 0.0
        salt_mol = self.contents_g.get(SALT, 0.0) / LIPF6_MOLAR_MASS
        return {k: v / total for k, v in solvent.items() if v > 0}, salt_mol / (total / 1000.0)


class LabWorld:
    """Vials, stations, reagents and thermal zones of one simulated lab."""

    def __init__(
        self,
        clock: SimClock,
        electrolyte_model: ElectrolyteModel,
        *,
        reagents: dict[str, Reagent] | None = None,
        rack_slots: int = 12,
        ambient_c: float = 25.0,
        seed: int = 0,
        vial_thermal_tau_s: float = 180.0,
    ) -> None:
        self.clock = clock
        self.electrolyte_model = electrolyte_model
        self.reagents = dict(reagents or {})
        self.ambient_c = ambient_c
        self.rng = random.Random(seed)
        self.vial_thermal_tau_s = vial_thermal_tau_s
        self.stations: dict[str, str | None] = {f"rack/{i}": None for i in range(1, rack_slots + 1)}
        self.stations.update(dict.fromkeys(FIXED_STATIONS))
        self.vials: dict[str, Vial] = {}
        # Which thermal zone surrounds a station; unset stations sit at ambient.
        self.zones: dict[str, ThermalZone] = {}
        self.in_gripper: str | None = None
        self.spilled_g: dict[str, float] = {}
        # Sim time of the last step change of load at each station (pick, place,
        # dispense): a balance settles from that moment, not from when it is asked.
        self.changed_at: dict[str, float] = {}
        for i in range(1, rack_slots + 1):
            self.add_vial(f"V{i:02d}", f"rack/{i}")

    # -- vials and stations ---------------------------------------------------
    def add_vial(self, vial_id: str, station: str) -> Vial:
        if self.stations.get(station, "missing") is not None:
            raise WorldError(f"station {station!r} is occupied or does not exist")
        vial = Vial(vial_id, station, temperature_c=self.ambient_c, updated_at=self.clock.now())
        self.vials[vial_id] = vial
        self.stations[station] = vial_id
        return vial

    def fresh_rack(self) -> list[str]:
        """The operator swaps the rack: each rack vial holding liquid is taken away (kept
        in ``vials``, station ``archive``) and an empty one takes its slot. Returns the
        new vials' ids. Rack slots whose vial is elsewhere on the deck stay empty."""
        new = []
        for station, vid in list(self.stations.items()):
            if not station.startswith("rack/") or vid is None or not self.vials[vid].contents_g:
                continue
            self.vials[vid].station = "archive"
            self.stations[station] = None
            fresh = f"V{len(self.vials) + 1:02d}"
            self.add_vial(fresh, station)
            self.changed_at[station] = self.clock.now()
            new.append(fresh)
        return new

    def vial_at(self, station: str) -> Vial | None:
        vid = self.stations.get(station)
        return self.vials[vid] if vid else None

    def pick(self, station: str) -> Vial:
        if station not in self.stations:
            raise WorldError(f"no station {station!r}")
        if self.in_gripper is not None:
            raise WorldError(f"gripper already holds {self.in_gripper}")
        vial = self.vial_at(station)
        if vial is None:
            raise WorldError(f"no vial at {station!r}")
        self.advance_temperature(vial)
        self.stations[station] = None
        self.changed_at[station] = self.clock.now()
        vial.station = "gripper"
        self.in_gripper = vial.id
        return vial

    def place(self, station: str) -> Vial:
        if station not in self.stations:
            raise WorldError(f"no station {station!r}")
        if self.in_gripper is None:
            raise WorldError("gripper is empty")
        if self.stations[station] is not None:
            raise WorldError(f"station {station!r} is occupied by {self.stations[station]}")
        vial = self.vials[self.in_gripper]
        self.advance_temperature(vial)
        vial.station = station
        self.stations[station] = vial.id
        self.changed_at[station] = self.clock.now()
        self.in_gripper = None
        return vial

    # -- liquids --------------------------------------------------------------
    def dispense(self, reagent: str, volume_ml: float, station: str = "balance") -> float:
        """Add ``volume_ml`` of ``reagent`` to the vial at ``station``; returns grams added.

        With no vial there, the liquid is spilled onto the pan (returned as 0 g added
        to a vial, but it still weighs: see :attr:`spilled_g`).
        """
        r = self.reagents.get(reagent)
        if r is None:
            raise WorldError(f"unknown reagent {reagent!r}")
        assert r.density_g_ml is not None
        grams = volume_ml * r.density_g_ml
        self.changed_at[station] = self.clock.now()
        vial = self.vial_at(station)
        if vial is None:
            self.spilled_g[station] = self.spilled_g.get(station, 0.0) + grams
            return 0.0
        if vial.liquid_g / 1.2 + volume_ml > vial.capacity_ml:
            raise WorldError(f"vial {vial.id} would overflow ({vial.capacity_ml} mL)")
        for species, frac in r.mass_composition().items():
            vial.contents_g[species] = vial.contents_g.get(species, 0.0) + grams * frac
        vial.mixed = min(vial.mixed, 0.2)
        return grams

    def evaporate(self, vial: Vial, seconds: float) -> None:
        """Open vials lose volatile solvent (DMC, EMC) slowly; a real balance sees it."""
        if seconds <= 0 or vial.liquid_g <= 0:
            return
        fracs, _ = vial.composition()
        for k, w in fracs.items():
            # ~1 mg/min for pure DMC from a 15 mm neck at 25 C, scaled by vapour pressure.
            rate_g_s = 1.0e-3 / 60.0 * w * SOLVENT_DATA[k].vapor_pressure_kpa / 7.4
            vial.contents_g[k] = max(0.0, vial.contents_g[k] - rate_g_s * seconds)

    # -- temperature ----------------------------------------------------------
    def environment_c(self, station: str) -> float:
        zone = self.zones.get(station)
        return zone.temperature_c() if zone is not None else self.ambient_c

    def advance_temperature(self, vial: Vial) -> float:
        """First-order approach of the vial's liquid to its surroundings."""
        now = self.clock.now()
        dt = max(0.0, now - vial.updated_at)
        env = self.environment_c(vial.station) if vial.station != "gripper" else self.ambient_c
        vial.temperature_c = env + (vial.temperature_c - env) * math.exp(
            -dt / self.vial_thermal_tau_s
        )
        self.evaporate(vial, dt)
        vial.updated_at = now
        return vial.temperature_c

    def conductivity(self, vial: Vial) -> float:
        """True conductivity in mS/cm of the vial's liquid at its current temperature."""
        fractions, molality = vial.composition()
        if not fractions:
            return 0.0
        temperature = self.advance_temperature(vial)
        kappa = self.electrolyte_model(fractions, molality, temperature)
        # An unmixed vial reads as whichever layer wets the cell: bias toward the
        # last-added component by mixing in a fraction of error.
        return kappa * (0.7 + 0.3 * vial.mixed)

    def snapshot(self) -> dict[str, object]:
        """Ground truth for tests and demos (JSON-serialisable)."""
        out: dict[str, object] = {"time_s": self.clock.now(), "stations": dict(self.stations)}
        vials = {}
        for v in self.vials.values():
            fractions, molality = v.composition()
            vials[v.id] = {
                "station": v.station,
                "liquid_g": v.liquid_g,
                "contents_g": dict(v.contents_g),
                "fractions": fractions,
                "salt_molality": molality,
                "temperature_c": self.advance_temperature(v),
                "mixed": v.mixed,
                # What an ideal meter would read now (ground truth for demos/tests).
                "conductivity_mS_cm": self.conductivity(v) if fractions else 0.0,
            }
        out["vials"] = vials
        return out
