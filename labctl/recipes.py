"""Electrolyte recipes and the reagents a lab has loaded.

A recipe is what a scientist asks for (solvent mass fractions + LiPF6 molality +
batch size); :func:`plan_doses` turns it into target masses of the reagents on the
pumps. With a LiPF6 stock in each solvent, the salt of solvent ``j``'s share comes
from stock ``j``, so every blend is reachable up to the stock molality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOLVENTS: tuple[str, ...] = ("EC", "PC", "EMC", "DMC", "DEC")
# Structures of the components (run metadata, rdkit descriptors in labctl.models).
SMILES: dict[str, str] = {
    "EC": "C1COC(=O)O1",
    "PC": "CC1COC(=O)O1",
    "EMC": "CCOC(=O)OC",
    "DMC": "COC(=O)OC",
    "DEC": "CCOC(=O)OCC",
    "LiPF6": "[Li+].F[P-](F)(F)(F)(F)F",
}
LIPF6_MOLAR_MASS = 151.905  # g/mol
# Below this a "salt" dose is a few micrograms: not an electrolyte anyone makes.
MIN_MOLALITY = 0.01


class Reagent(BaseModel):
    """A liquid loaded on a pump: solvent mass fractions, salt molality, nominal density."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    solvent_fractions: dict[str, float]
    salt_molality: float = Field(default=0.0, ge=0.0)
    density_g_ml: float = Field(gt=0.3, lt=3.0)

    def salt_mass_fraction(self) -> float:
        per_g_solvent = self.salt_molality * LIPF6_MOLAR_MASS / 1000.0
        return per_g_solvent / (1.0 + per_g_solvent)


def default_reagents() -> dict[str, Reagent]:
    """The reagents of the default lab: five solvents and a 2.5 mol/kg LiPF6 stock in each.

    The order is the pumps' network address order (0..9) on the default lab.
    """
    density = {"EC": 1.321, "PC": 1.200, "EMC": 1.006, "DMC": 1.063, "DEC": 0.969}
    out: dict[str, Reagent] = {}
    for s in SOLVENTS:
        out[s] = Reagent(name=s, solvent_fractions={s: 1.0}, density_g_ml=density[s])
    for s in SOLVENTS:
        out[f"LiPF6-{s}"] = Reagent(
            name=f"LiPF6-{s}",
            solvent_fractions={s: 1.0},
            salt_molality=2.5,
            density_g_ml=density[s] + 0.12 * 2.5,
        )
    return out


class Recipe(BaseModel):
    """An electrolyte to make: solvent mass fractions (sum 1), LiPF6 molality, batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fractions: dict[str, float]
    salt_molality: float = Field(ge=0.0, le=2.5)
    solvent_g: float = Field(default=4.0, gt=0.2, le=15.0)
    name: str = ""

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SOLVENTS))
        if unknown:
            raise ValueError(f"unknown solvent(s) {unknown}; allowed {list(SOLVENTS)}")
        bad = {k: x for k, x in v.items() if not (math.isfinite(x) and x >= 0)}
        if bad:
            raise ValueError(f"fractions must be finite and >= 0, got {bad}")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {total:.6f} from {v}")
        return {k: x for k, x in v.items() if x > 0}

    @field_validator("salt_molality")
    @classmethod
    def _molality(cls, v: float) -> float:
        if 0.0 < v < MIN_MOLALITY:
            raise ValueError(f"must be 0 or at least {MIN_MOLALITY} mol/kg, got {v!r}")
        return v

    @model_validator(mode="after")
    def _label(self) -> Recipe:
        if not self.name:
            blend = ":".join(f"{k}{self.fractions[k]:.2f}" for k in self.fractions)
            object.__setattr__(self, "name", f"{blend}+LiPF6 {self.salt_molality:.2f}m")
        return self


@dataclass(frozen=True)
class Dose:
    reagent: str
    target_g: float


def plan_doses(recipe: Recipe, reagents: dict[str, Reagent]) -> list[Dose]:
    """Target reagent masses for ``recipe``: pure solvent plus that solvent's LiPF6 stock."""
    doses: list[Dose] = []
    for solvent, w in recipe.fractions.items():
        solvent_g = w * recipe.solvent_g
        stock_name = f"LiPF6-{solvent}"
        if recipe.salt_molality > 0:
            stock = reagents.get(stock_name)
            if stock is None:
                raise ValueError(f"reagents: no LiPF6 stock in {solvent} ({stock_name!r}) loaded")
            if recipe.salt_molality > stock.salt_molality:
                raise ValueError(
                    f"salt_molality {recipe.salt_molality} exceeds the {stock_name} stock's "
                    f"{stock.salt_molality} mol/kg"
                )
            share = recipe.salt_molality / stock.salt_molality  # of this solvent via the stock
            stock_g = solvent_g * share / (1.0 - stock.salt_mass_fraction())
            doses.append(Dose(stock_name, stock_g))
            solvent_g *= 1.0 - share
        if solvent not in reagents:
            raise ValueError(f"reagents: solvent {solvent!r} is not loaded on any pump")
        if solvent_g > 1e-6:
            doses.append(Dose(solvent, solvent_g))
    return doses


def composition(
    masses_g: dict[str, float], reagents: dict[str, Reagent]
) -> tuple[dict[str, float], float]:
    """(solvent mass fractions, LiPF6 molality) of a mix of reagent masses."""
    solvent = dict.fromkeys(SOLVENTS, 0.0)
    salt_g = 0.0
    for name, g in masses_g.items():
        r = reagents[name]
        s = r.salt_mass_fraction()
        salt_g += g * s
        for k, w in r.solvent_fractions.items():
            solvent[k] += g * (1.0 - s) * w
    total = sum(solvent.values())
    if total <= 0:
        return {}, 0.0
    return {k: v / total for k, v in solvent.items() if v > 0}, salt_g / LIPF6_MOLAR_MASS / (
        total / 1000.0
    )
