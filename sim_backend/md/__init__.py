"""Batched molecular dynamics: state, integrators, MC barostat, stability, properties, runner.

Submodules import torch and ase; this package's ``__init__`` stays light by resolving the
public names lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim_backend.md.barostat import (
        BarostatStats,
        barostat_stats,
        mc_barostat_step,
        record_attempt,
        scale_molecules,
    )
    from sim_backend.md.integrators import (
        conserved_energy,
        csvr_init,
        csvr_step,
        langevin_init,
        langevin_step,
        nve_init,
        nve_step,
    )
    from sim_backend.md.runner import Trajectory, dry_test, run_md, simulate
    from sim_backend.md.stability import StabilityMonitor, check_stability, make_monitor
    from sim_backend.md.state import MDState, state_from_atoms, state_to_atoms, temperature

_EXPORTS: dict[str, str] = {
    "MDState": "state",
    "state_from_atoms": "state",
    "state_to_atoms": "state",
    "temperature": "state",
    "nve_init": "integrators",
    "nve_step": "integrators",
    "csvr_init": "integrators",
    "csvr_step": "integrators",
    "langevin_init": "integrators",
    "langevin_step": "integrators",
    "conserved_energy": "integrators",
    "BarostatStats": "barostat",
    "barostat_stats": "barostat",
    "mc_barostat_step": "barostat",
    "record_attempt": "barostat",
    "scale_molecules": "barostat",
    "StabilityMonitor": "stability",
    "make_monitor": "stability",
    "check_stability": "stability",
    "Trajectory": "runner",
    "run_md": "runner",
    "simulate": "runner",
    "dry_test": "runner",
}

__all__ = [
    "BarostatStats",
    "MDState",
    "StabilityMonitor",
    "Trajectory",
    "barostat_stats",
    "check_stability",
    "conserved_energy",
    "csvr_init",
    "csvr_step",
    "dry_test",
    "langevin_init",
    "langevin_step",
    "make_monitor",
    "mc_barostat_step",
    "nve_init",
    "nve_step",
    "record_attempt",
    "run_md",
    "scale_molecules",
    "simulate",
    "state_from_atoms",
    "state_to_atoms",
    "temperature",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"sim_backend.md.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'sim_backend.md' has no attribute {name!r}")
