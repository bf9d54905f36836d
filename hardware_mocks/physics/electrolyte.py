"""Ground-truth conductivity of LiPF6 in carbonate blends (contract 2 of DESIGN.md).

The default model, :func:`landesfeind_blend`, reproduces the Landesfeind & Gasteiger
(2019) fit for LiPF6 in EC:EMC 3:7 (w:w) exactly at that composition, and extends it
over solvent ratios with two physically motivated factors:

* **Viscosity (Walden's rule).** Ion mobility scales with 1/eta. The blend viscosity
  follows Grunberg-Nissan / Arrhenius mole-fraction mixing, ``ln eta = sum x_i ln eta_i``
  (no interaction term), with each solvent's Arrhenius temperature dependence.
* **Ion dissociation.** Only dissociated ions carry current; the free-ion fraction
  rises with the blend's dielectric constant (linear in volume fraction) as
  ``f(eps) = 1 / (1 + (eps0 / eps)**n)``, a smooth stand-in for Bjerrum/Fuoss ion
  pairing. ``eps0`` and ``n`` are calibrated so that the model also reproduces the
  Landesfeind & Gasteiger EC:DMC 1:1 fit at 1 mol/kg and 25 C within 10 %
  (PC alone lands at 5.7 mS/cm, close to the ~5.8 reported for 1 M LiPF6 in PC).

High-salt behaviour also depends on the solvent: the concentration of maximum
conductivity moves to lower molality in more viscous, less dissociating blends, which
is modelled by rescaling the concentration axis (``c_eff = c / s``) with the same
viscosity ratio raised to a small power. All parameters are documented below and in
docs/hardware_mocks.md. The result is smooth, bounded, zero without salt, rises with
temperature, peaks near 1 mol/kg, and favours EC/PC + low-viscosity linear carbonates
(DMC > EMC > DEC) as real data do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from hardware_mocks.physics.materials import SOLVENT_DATA, SOLVENTS

# Landesfeind & Gasteiger 2019, LiPF6 in EC:EMC 3:7 (w:w); c in mol/kg, T in K, mS/cm.
LG2019_EC_EMC_3_7 = (5.21e-1, 2.28e2, -1.06, 3.53e-1, -3.59e-3, 1.48e-3)
LG2019_EC_DMC_1_1 = (7.98e-1, 2.28e2, -1.22, 5.09e-1, -4.00e-3, 3.79e-3)
REFERENCE_FRACTIONS: dict[str, float] = {"EC": 0.3, "EMC": 0.7}

R_GAS = 8.314462618e-3  # kJ/(mol K)
DISSOCIATION_EPS0 = 26.0  # f(eps) = 1 / (1 + (eps0/eps)**n): free-ion fraction
DISSOCIATION_N = 1.5
WALDEN_EXPONENT = 0.9  # kappa ~ eta^-alpha (fractional Walden behaviour)
PEAK_SHIFT_EXPONENT = 0.35  # c at peak ~ (eta_ref/eta)^beta


def landesfeind_2019(
    molality: float, temperature_k: float, p: tuple[float, ...] = LG2019_EC_EMC_3_7
) -> float:
    """The published fit: conductivity in mS/cm (molality in mol/kg, T in K)."""
    p1, p2, p3, p4, p5, p6 = p
    c = max(molality, 0.0)
    e = math.exp(1000.0 / temperature_k)
    a = p1 * (1.0 + (temperature_k - p2))
    b = 1.0 + p3 * math.sqrt(c) + p4 * (1.0 + p5 * e) * c
    d = 1.0 + c**4 * (p6 * e)
    return max(a * c * b / d, 0.0)


def _normalise(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SOLVENTS)
    if unknown:
        raise ValueError(f"fractions: unknown solvent(s) {sorted(unknown)}; expected {SOLVENTS}")
    for k, v in fractions.items():
        if not (v >= 0.0 and math.isfinite(v)):
            raise ValueError(f"fractions[{k!r}] must be a finite fraction >= 0, got {v!r}")
    total = sum(fractions.values())
    if not total > 0:
        raise ValueError(f"fractions must sum to a positive number, got {dict(fractions)!r}")
    return {k: v / total for k, v in fractions.items() if v > 0}


def blend_viscosity(fractions: Mapping[str, float], temperature_c: float) -> float:
    """Blend viscosity in mPa s: Arrhenius per solvent, Grunberg-Nissan mixing by mole fraction."""
    w = _normalise(fractions)
    moles = {k: v / SOLVENT_DATA[k].molar_mass for k, v in w.items()}
    n = sum(moles.values())
    t = temperature_c + 273.15
    ln_eta = 0.0
    for k, mol in moles.items():
        s = SOLVENT_DATA[k]
        eta_t = s.viscosity * math.exp(s.viscosity_ea / R_GAS * (1.0 / t - 1.0 / 298.15))
        ln_eta += (mol / n) * math.log(eta_t)
    return math.exp(ln_eta)


def blend_dielectric(fractions: Mapping[str, float]) -> float:
    """Blend dielectric constant, linear in volume fraction."""
    w = _normalise(fractions)
    vol = {k: v / SOLVENT_DATA[k].density for k, v in w.items()}
    total = sum(vol.values())
    return sum(vol[k] / total * SOLVENT_DATA[k].dielectric for k in vol)


def free_ion_fraction(dielectric: float) -> float:
    """Fraction of dissociated salt at a given dielectric constant (0..1)."""
    return 1.0 / (1.0 + float((DISSOCIATION_EPS0 / dielectric) ** DISSOCIATION_N))


def landesfeind_blend(
    fractions: dict[str, float], salt_molality: float, temperature_c: float
) -> float:
    """Default ground truth: conductivity in mS/cm of LiPF6 in a carbonate blend."""
    if not (math.isfinite(salt_molality) and salt_molality >= 0):
        raise ValueError(f"salt_molality must be finite and >= 0, got {salt_molality!r}")
    # The fits cover about -30..60 C; beyond that the model extrapolates smoothly
    # (the chamber reaches 150 C and the hotplate more: the lab must not go silent).
    if not (math.isfinite(temperature_c) and -80.0 <= temperature_c <= 350.0):
        raise ValueError(f"temperature_c must be within -80..350 C, got {temperature_c!r}")
    eta = blend_viscosity(fractions, temperature_c)
    eta_ref = blend_viscosity(REFERENCE_FRACTIONS, temperature_c)
    eps = blend_dielectric(fractions)
    eps_ref = blend_dielectric(REFERENCE_FRACTIONS)
    viscosity_factor = float((eta_ref / eta) ** WALDEN_EXPONENT)
    dissociation_factor = free_ion_fraction(eps) / free_ion_fraction(eps_ref)
    # Shift where the curve peaks; scale so the low-concentration slope stays physical.
    s = float((eta_ref / eta) ** PEAK_SHIFT_EXPONENT) * math.sqrt(dissociation_factor)
    kappa_ref = landesfeind_2019(salt_molality / s, temperature_c + 273.15) * s
    return kappa_ref * viscosity_factor * dissociation_factor


def linear_only_blend(
    fractions: dict[str, float], salt_molality: float, temperature_c: float
) -> float:
    """An alternative landscape for tests/benchmarks: ignores dissociation, so the
    optimum moves toward pure low-viscosity linear carbonates (a different optimum)."""
    eta = blend_viscosity(fractions, temperature_c)
    eta_ref = blend_viscosity(REFERENCE_FRACTIONS, temperature_c)
    return landesfeind_2019(salt_molality, temperature_c + 273.15) * (eta_ref / eta)
