"""The campaign's design space: solvent mass fractions and LiPF6 molality.

A point is encoded as a vector ``x`` of length 6 in the unit cube: the five solvent
mass fractions in :data:`SOLVENTS` order (they sum to 1) and the molality mapped
linearly from ``[molality_min, molality_max]`` to ``[0, 1]``. The constraints are

* the fractions sum to 1 (an equality constraint on ``x[:5]``),
* the cyclic carbonates carry at least ``min_cyclic`` (EC + PC >= 0.1 by default),
* at most ``max_components`` solvents are nonzero (4 of 5 by default).

The last rule is not convex, so the space is handled as the union of *subspaces*: one
per set of ``max_components`` solvents that may be nonzero, the others fixed at exactly
zero. :meth:`DesignSpace.sample` draws uniformly from a uniformly chosen subspace, and
the optimizer searches every subspace (see labctl/campaign/optimizer.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOLVENTS: tuple[str, ...] = ("EC", "PC", "EMC", "DMC", "DEC")
FloatArray = npt.NDArray[np.float64]

# Sums of fractions are compared with this slack: candidates come from float64 linear
# algebra and from JSON round trips, both exact to ~1e-12.
_TOL = 1e-6


class InfeasibleError(ValueError):
    """A formulation outside the design space; the message names the field and value."""


class Formulation(BaseModel):
    """One point of the space in lab units: mass fractions and molality (mol/kg)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fractions: dict[str, float]
    salt_molality: float


class DesignSpace(BaseModel):
    """Bounds and constraints of the electrolyte design space (validated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    molality_min: float = Field(default=0.2, ge=0.0, le=10.0)
    molality_max: float = Field(default=2.0, gt=0.0, le=10.0)
    cyclic: tuple[str, ...] = ("EC", "PC")
    min_cyclic: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_components: int = Field(default=4, ge=1, le=len(SOLVENTS))
    temperature_c: float = Field(default=25.0, ge=-40.0, le=150.0)

    @field_validator("cyclic")
    @classmethod
    def _cyclic_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SOLVENTS))
        if unknown:
            raise ValueError(f"unknown solvent(s) {unknown}; allowed {list(SOLVENTS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated solvent in {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DesignSpace:
        if not self.molality_min < self.molality_max:
            raise ValueError(
                f"molality_min ({self.molality_min}) must be below molality_max "
                f"({self.molality_max})"
            )
        if self.min_cyclic > 0 and not self.cyclic:
            raise ValueError(f"min_cyclic = {self.min_cyclic} needs at least one cyclic solvent")
        # Each subspace kept by subspaces() holds a cyclic solvent, so it has feasible
        # points (that solvent alone): nothing else to check.
        return self

    # -- geometry -------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Length of an encoded point: five fractions and the scaled molality."""
        return len(SOLVENTS) + 1

    @property
    def cyclic_index(self) -> list[int]:
        """Indices of the cyclic solvents in :data:`SOLVENTS`."""
        return [SOLVENTS.index(s) for s in self.cyclic]

    def subspaces(self) -> list[tuple[int, ...]]:
        """Index sets of solvents that may be nonzero together (``max_components`` each).

        Subspaces that cannot satisfy ``min_cyclic`` (no cyclic solvent) are left out.
        """
        out = []
        for active in itertools.combinations(range(len(SOLVENTS)), self.max_components):
            if self.min_cyclic > 0 and not set(active) & set(self.cyclic_index):
                continue
            out.append(active)
        return out

    # -- encode / decode ------------------------------------------------------------

    def encode(self, fractions: Mapping[str, float], salt_molality: float) -> FloatArray:
        """Encode one formulation as ``x`` (length :attr:`dim`); validates it first."""
        self.check(fractions, salt_molality)
        x = np.zeros(self.dim)
        for k, v in fractions.items():
            x[SOLVENTS.index(k)] = v
        x[:5] /= x[:5].sum()
        x[5] = (salt_molality - self.molality_min) / (self.molality_max - self.molality_min)
        return x

    def encode_measured(self, fractions: Mapping[str, float], salt_molality: float) -> FloatArray:
        """Encode a *measured* composition, without the feasibility check: what the balance
        achieved can sit a hair outside the space (2.00001 mol/kg when 2.0 was asked for,
        EC+PC 0.0999 at the 0.1 bound), and it is data all the same. Fractions are
        renormalised, the scaled molality clipped to 0..1."""
        x = np.zeros(self.dim)
        for k, v in fractions.items():
            x[SOLVENTS.index(k)] = max(0.0, float(v))
        x[:5] /= x[:5].sum()
        scaled = (salt_molality - self.molality_min) / (self.molality_max - self.molality_min)
        x[5] = min(1.0, max(0.0, scaled))
        return x

    def encode_many(self, formulations: list[Formulation]) -> FloatArray:
        """Encode a list of formulations as an array ``(n, dim)``."""
        if not formulations:
            return np.zeros((0, self.dim))
        return np.stack([self.encode(f.fractions, f.salt_molality) for f in formulations])

    def to_arrays(self, pts: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Encoded points ``(n, dim)`` -> fractions ``(n, 5)`` and molality ``(n,)``.

        Tiny negative fractions (numerical round-off) are clipped and rows renormalised.
        """
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        w = np.clip(pts[:, :5], 0.0, None)
        w = w / np.clip(w.sum(axis=1, keepdims=True), 1e-12, None)
        m = self.molality_min + np.clip(pts[:, 5], 0.0, 1.0) * (
            self.molality_max - self.molality_min
        )
        return w, m

    def decode(self, x: FloatArray) -> Formulation:
        """Decode one encoded point (solvents at exactly zero are left out of the dict)."""
        w, m = self.to_arrays(np.asarray(x)[None, :])
        fractions = {s: float(v) for s, v in zip(SOLVENTS, w[0], strict=True) if v > 0}
        return Formulation(fractions=fractions, salt_molality=float(m[0]))

    # -- feasibility ----------------------------------------------------------------

    def check(self, fractions: Mapping[str, float], salt_molality: float) -> None:
        """Raise :class:`InfeasibleError` naming the field and value if not feasible."""
        unknown = sorted(set(fractions) - set(SOLVENTS))
        if unknown:
            raise InfeasibleError(
                f"fractions: unknown solvent(s) {unknown}; allowed {list(SOLVENTS)}"
            )
        for k, v in fractions.items():
            if not (math.isfinite(v) and 0.0 <= v <= 1.0 + _TOL):
                raise InfeasibleError(f"fractions[{k!r}] must be within 0..1, got {v!r}")
        total = sum(fractions.values())
        if abs(total - 1.0) > _TOL:
            raise InfeasibleError(f"fractions must sum to 1, got {total!r} ({dict(fractions)})")
        cyc = sum(fractions.get(s, 0.0) for s in self.cyclic)
        if cyc < self.min_cyclic - _TOL:
            raise InfeasibleError(
                f"fractions: {' + '.join(self.cyclic)} must be >= {self.min_cyclic}, got {cyc!r}"
            )
        nonzero = sorted(k for k, v in fractions.items() if v > 0)
        if len(nonzero) > self.max_components:
            raise InfeasibleError(
                f"fractions: at most {self.max_components} solvents may be nonzero, "
                f"got {len(nonzero)} ({nonzero})"
            )
        if not (
            math.isfinite(salt_molality)
            and self.molality_min - _TOL <= salt_molality <= self.molality_max + _TOL
        ):
            raise InfeasibleError(
                f"salt_molality must be within {self.molality_min}..{self.molality_max} "
                f"mol/kg, got {salt_molality!r}"
            )

    def is_feasible(self, pts: FloatArray) -> npt.NDArray[np.bool_]:
        """Vectorised feasibility of encoded points ``(n, dim)`` (no renormalisation)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        w = pts[:, :5]
        ok = np.all(np.isfinite(pts), axis=1)
        ok &= np.all(w >= -_TOL, axis=1) & np.all(w <= 1 + _TOL, axis=1)
        ok &= np.abs(w.sum(axis=1) - 1.0) <= _TOL
        ok &= w[:, self.cyclic_index].sum(axis=1) >= self.min_cyclic - _TOL
        ok &= (w > 0).sum(axis=1) <= self.max_components
        ok &= (pts[:, 5] >= -_TOL) & (pts[:, 5] <= 1 + _TOL)
        return np.asarray(ok, dtype=np.bool_)

    # -- sampling -------------------------------------------------------------------

    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        subspace: tuple[int, ...] | None = None,
    ) -> FloatArray:
        """``n`` random feasible encoded points.

        Each point picks a subspace uniformly (or the one given), draws its fractions
        uniformly on that simplex (Dirichlet(1, ...)) and rejects draws that violate
        ``min_cyclic``; the molality is uniform.
        """
        subs = [subspace] if subspace is not None else self.subspaces()
        out = np.zeros((0, self.dim))
        while out.shape[0] < n:
            k = max(2 * (n - out.shape[0]), 16)
            pts = np.zeros((k, self.dim))
            pick = rng.integers(len(subs), size=k)
            for i, active in enumerate(subs):
                rows = np.flatnonzero(pick == i)
                pts[np.ix_(rows, np.asarray(active))] = rng.dirichlet(
                    np.ones(len(active)), size=len(rows)
                )
            pts[:, 5] = rng.uniform(0.0, 1.0, size=k)
            out = np.concatenate([out, pts[self.is_feasible(pts)]])
        return out[:n]

    def perturb(self, x: FloatArray, n: int, step: float, rng: np.random.Generator) -> FloatArray:
        """``n`` feasible points near ``x`` within the same solvent support.

        Gaussian steps of size ``step`` on the nonzero fractions (projected back to the
        simplex) and on the scaled molality; infeasible draws are replaced by ``x``.
        """
        active = np.flatnonzero(x[:5] > 0)
        pts = np.repeat(x[None, :], n, axis=0)
        w = pts[:, active] + rng.normal(0.0, step, size=(n, len(active)))
        w = np.clip(w, 0.0, None)
        s = w.sum(axis=1, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1.0), pts[:, active])
        pts[:, active] = w
        pts[:, 5] = np.clip(pts[:, 5] + rng.normal(0.0, step, size=n), 0.0, 1.0)
        bad = ~self.is_feasible(pts)
        pts[bad] = x
        return pts
