"""Alternative ground-truth conductivity landscapes (contract 2 of DESIGN.md).

The default :func:`hardware_mocks.physics.electrolyte.landesfeind_blend` peaks at
EC:DMC ~1:1 (w:w) and ~1.1 mol/kg LiPF6 (12.96 mS/cm at 25 C). A campaign optimizer
tuned, or a prior learned, on that landscape alone could look good for the wrong
reason, so these landscapes put the optimum somewhere else while staying physically
plausible (1-20 mS/cm over the design space, zero without salt, smooth, rising with
temperature). Both reuse the default model's viscosity and permittivity mixing rules
(:func:`~hardware_mocks.physics.electrolyte.blend_viscosity`,
:func:`~hardware_mocks.physics.electrolyte.blend_dielectric`) and the Landesfeind &
Gasteiger (2019) concentration/temperature shape; they are hypothetical systems, not
fits to data:

* :func:`pc_rich_high_salt`: strong ion pairing (dissociation needs a high blend
  permittivity), weak viscosity dependence, and EC that drops out of solution above
  ~15 wt% (as a salt-EC solvate). The optimum moves to a PC-rich blend with a linear
  carbonate at high salt (~1.75 mol/kg).
* :func:`narrow_low_ec`: the default physics scaled down, times a narrow synergy
  window at low EC in an EC/DEC/DMC blend at ~0.8 mol/kg (a stand-in for a favourable
  mixed Li+ solvation shell). The optimum is a small region that a smooth prior
  trained on the default landscape points away from.

Select one in a lab config with, e.g.
``electrolyte_model = "hardware_mocks.physics.landscapes:pc_rich_high_salt"``.
"""

from __future__ import annotations

import math

from hardware_mocks.physics.electrolyte import (
    REFERENCE_FRACTIONS,
    blend_dielectric,
    blend_viscosity,
    landesfeind_2019,
    landesfeind_blend,
)

__all__ = ["narrow_low_ec", "pc_rich_high_salt"]

# pc_rich_high_salt: f(eps) = 1 / (1 + (eps0/eps)**n), steeper and later than the default.
PAIRING_EPS0 = 40.0
PAIRING_N = 2.0
PAIRING_WALDEN = 0.8  # mobility depends less on viscosity than in the default model
PAIRING_PEAK_SCALE = 1.75  # stretches the molality axis: the peak moves from ~1.0 to ~1.75
EC_SOLUBILITY = 0.15  # EC mass fraction above which EC leaves solution (sigmoid)
EC_SOLUBILITY_WIDTH = 0.03

# narrow_low_ec: a Gaussian window in (w_EC, w_DEC, molality) on a damped default landscape.
SYNERGY_CENTER = {"EC": 0.12, "DEC": 0.45, "molality": 0.8}
SYNERGY_WIDTH = {"EC": 0.08, "DEC": 0.2, "molality": 0.5}
SYNERGY_BASE = 0.7  # the default physics, damped to 70 %
SYNERGY_GAIN = 0.9  # the window multiplies by up to 0.7 + 0.9 = 1.6


def _check(fractions: dict[str, float], salt_molality: float, temperature_c: float) -> None:
    if not (math.isfinite(salt_molality) and salt_molality >= 0):
        raise ValueError(f"salt_molality must be finite and >= 0, got {salt_molality!r}")
    if not (math.isfinite(temperature_c) and -80.0 <= temperature_c <= 350.0):
        raise ValueError(f"temperature_c must be within -80..350 C, got {temperature_c!r}")
    # blend_viscosity validates the fractions (names, signs, positive sum).
    blend_viscosity(fractions, temperature_c)


def _pairing(eps: float) -> float:
    return 1.0 / (1.0 + float((PAIRING_EPS0 / eps) ** PAIRING_N))


def pc_rich_high_salt(
    fractions: dict[str, float], salt_molality: float, temperature_c: float
) -> float:
    """Conductivity (mS/cm) of a strongly ion-pairing system: optimum PC-rich, high salt.

    At 25 C the optimum is near EC 0.04 / PC 0.67 / DMC 0.29 (w/w) at ~1.76 mol/kg,
    8.11 mS/cm; the default landscape's optimum (EC:DMC 1:1, 1.14 mol/kg) gives
    2.4 mS/cm here.
    """
    _check(fractions, salt_molality, temperature_c)
    total = sum(fractions.values())
    w_ec = fractions.get("EC", 0.0) / total
    eta = blend_viscosity(fractions, temperature_c)
    eta_ref = blend_viscosity(REFERENCE_FRACTIONS, temperature_c)
    eps = blend_dielectric(fractions)
    viscosity_factor = float((eta_ref / eta) ** PAIRING_WALDEN)
    # Normalised to the free-ion fraction of PC alone, so factors stay O(1).
    dissociation = _pairing(eps) / _pairing(64.92)
    ec_in_solution = 1.0 / (1.0 + math.exp((w_ec - EC_SOLUBILITY) / EC_SOLUBILITY_WIDTH))
    s = PAIRING_PEAK_SCALE
    kappa = landesfeind_2019(salt_molality / s, temperature_c + 273.15) * s
    return kappa * viscosity_factor * dissociation * (0.25 + 0.75 * ec_in_solution)


def narrow_low_ec(fractions: dict[str, float], salt_molality: float, temperature_c: float) -> float:
    """Conductivity (mS/cm) with a narrow synergy window at low EC, DEC-rich, ~0.8 mol/kg.

    At 25 C the optimum is near EC 0.13 / PC 0.32 / DMC 0.15 / DEC 0.41 (w/w) at
    ~0.87 mol/kg, 12.62 mS/cm; away from the window the default physics at 70 %
    (<= 9.1 mS/cm) remains, so the default optimum gives 9.07 mS/cm here.
    """
    _check(fractions, salt_molality, temperature_c)
    total = sum(fractions.values())
    d2 = (
        ((fractions.get("EC", 0.0) / total - SYNERGY_CENTER["EC"]) / SYNERGY_WIDTH["EC"]) ** 2
        + ((fractions.get("DEC", 0.0) / total - SYNERGY_CENTER["DEC"]) / SYNERGY_WIDTH["DEC"]) ** 2
        + ((salt_molality - SYNERGY_CENTER["molality"]) / SYNERGY_WIDTH["molality"]) ** 2
    )
    window = SYNERGY_BASE + SYNERGY_GAIN * math.exp(-0.5 * d2)
    return landesfeind_blend(fractions, salt_molality, temperature_c) * window
