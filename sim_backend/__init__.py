"""sim_backend: learned interatomic potentials and batched MD for electrolytes.

``import sim_backend`` stays light: torch, ASE and friends load only when a name
that needs them is first used (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim_backend.nn.calculator import load_calculator

__all__ = ["load_calculator"]


def __getattr__(name: str) -> Any:
    if name == "load_calculator":
        from sim_backend.nn.calculator import load_calculator

        return load_calculator
    raise AttributeError(f"module 'sim_backend' has no attribute {name!r}")
