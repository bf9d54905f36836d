"""The design-make-test-analyze campaign: design space and optimizers.

Light on import: torch and BoTorch load only when an optimizer suggests (see
:mod:`labctl.campaign.optimizer`).
"""

from __future__ import annotations

from labctl.campaign.space import SOLVENTS, DesignSpace, Formulation, InfeasibleError

__all__ = ["SOLVENTS", "DesignSpace", "Formulation", "InfeasibleError"]
