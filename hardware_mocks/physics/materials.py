"""Pure-component data for the carbonate solvents and LiPF6 (25 C unless noted).

Sources: Xu, Chem. Rev. 104 (2004) 4303, table 2 (density, viscosity, dielectric
constant); EC is a solid at 25 C (mp 36.4 C): its liquid values are those of the
supercooled liquid / 40 C extrapolation used throughout the electrolyte literature.
"""

from __future__ import annotations

from dataclasses import dataclass

SOLVENTS: tuple[str, ...] = ("EC", "PC", "EMC", "DMC", "DEC")
SALT = "LiPF6"
LIPF6_MOLAR_MASS = 151.905  # g/mol


@dataclass(frozen=True)
class Solvent:
    name: str
    smiles: str
    molar_mass: float  # g/mol
    density: float  # g/mL at 25 C
    viscosity: float  # mPa s at 25 C
    viscosity_ea: float  # activation energy of viscous flow, kJ/mol (Arrhenius)
    dielectric: float  # relative permittivity at 25 C
    vapor_pressure_kpa: float  # at 25 C; drives evaporation from open vials


SOLVENT_DATA: dict[str, Solvent] = {
    "EC": Solvent("EC", "C1COC(=O)O1", 88.06, 1.321, 1.90, 16.0, 89.78, 0.003),
    "PC": Solvent("PC", "CC1COC(=O)O1", 102.09, 1.200, 2.53, 15.0, 64.92, 0.017),
    "EMC": Solvent("EMC", "CCOC(=O)OC", 104.10, 1.006, 0.65, 9.5, 2.958, 3.6),
    "DMC": Solvent("DMC", "COC(=O)OC", 90.08, 1.063, 0.59, 9.0, 3.107, 7.4),
    "DEC": Solvent("DEC", "CCOC(=O)OCC", 118.13, 0.969, 0.75, 10.0, 2.805, 1.4),
}
