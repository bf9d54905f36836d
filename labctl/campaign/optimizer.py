"""Batch Bayesian optimization (BoTorch) and random search over the design space.

Both optimizers share one call::

    opt.suggest(x, y, pending=None, batch_size=4, seed=0, prior=None) -> list[Candidate]

``x`` are encoded observed points ``(n, 6)`` (see :mod:`labctl.campaign.space`), ``y``
their measured conductivities in mS/cm, ``pending`` encoded points already suggested
but not yet measured (the next batch must not repeat them, and the acquisition
function treats them as fantasised observations: qLogNEI's ``X_pending``).

**The prior.** ``prior`` is any callable ``(fractions (n, 5), molality (n,),
temperature_c (n,)) -> (mean (n,), std (n,))`` in mS/cm, such as
``labctl.models.property.PropertyPredictor.predict``. It enters the GP as its prior
mean: ``m(x) = offset + scale * standardised prior(x)``, with ``scale ~ N(1, 0.5^2)``
and ``offset ~ N(0, 1)`` fitted by marginal likelihood with the kernel, so a prior that
turns out wrong on this lab's data is scaled down instead of trusted. The prior is
numpy (onnxruntime), so the mean is constant with respect to gradients; the
acquisition function is therefore optimised without gradients, over a large random
feasible candidate set in every subspace plus local refinement of the best
candidates (:meth:`DesignSpace.perturb`). With no data yet, half the first batch is
the prior's best predictions (kept apart from each other) and half random. Every
later batch ends with ``hedge`` (1) point chosen by the GP *without* the prior, so a
prior that is confidently wrong somewhere still gets checked there.

**Without a prior** the model is BoTorch's default ``SingleTaskGP`` (its default
kernel, likelihood and ``Standardize`` outcome transform), after ``n_init`` random
points; the same acquisition function and candidate search are used, so a benchmark
compares the models, not the search.

torch and BoTorch are imported inside the functions that need them, so that
``RandomSearch`` and this module's import stay light.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labctl.campaign.space import DesignSpace, FloatArray, Formulation

if TYPE_CHECKING:
    import torch

__all__ = [
    "BayesianOptimizer",
    "Candidate",
    "Optimizer",
    "OptimizerSettings",
    "Prior",
    "RandomSearch",
    "suggest",
]

Prior = Callable[[FloatArray, FloatArray, FloatArray], tuple[FloatArray, FloatArray]]


class Candidate(Formulation):
    """A suggested formulation, with its encoded point and where it came from."""

    x: tuple[float, ...]
    source: str  # "random", "prior" (the prior's best, before any data) or "bo"


class OptimizerSettings(BaseModel):
    """Knobs of :class:`BayesianOptimizer`.

    With the defaults one batch of 4 takes ~1.5 s without a prior and ~5 s with one
    (two GP fits) on one loaded core, with ~40 points.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    n_init: int = Field(default=8, ge=1, le=1000)  # random points before a GP (no prior)
    n_init_prior: int = Field(default=4, ge=1, le=1000)  # points before a GP (with prior)
    prior_init_fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # of that first batch
    n_candidates: int = Field(default=1536, ge=16, le=200_000)
    n_refine: int = Field(default=6, ge=1, le=100)  # best candidates refined locally
    refine_steps: tuple[float, ...] = (0.08, 0.03, 0.01)
    refine_samples: int = Field(default=48, ge=1, le=10_000)
    fit_maxiter: int = Field(default=60, ge=5, le=10_000)  # L-BFGS-B steps per GP fit
    mc_samples: int = Field(default=128, ge=16, le=4096)
    min_distance: float = Field(default=0.01, ge=0.0, le=0.5)  # L-inf, encoded units
    prior_spread: float = Field(default=0.1, ge=0.0, le=1.0)  # L2 apart, prior-only batch
    hedge: int = Field(default=1, ge=0, le=100)  # points per batch from the no-prior GP
    prior_ucb_beta: float = Field(default=0.0, ge=0.0, le=10.0)  # first batch: mean + beta std


class Optimizer(Protocol):
    """What the campaign loop calls."""

    def suggest(
        self,
        x: FloatArray,
        y: FloatArray,
        pending: FloatArray | None = None,
        batch_size: int = 4,
        seed: int = 0,
        prior: Prior | None = None,
    ) -> list[Candidate]: ...


def _check_inputs(
    space: DesignSpace, xo: FloatArray, y: FloatArray, pending: FloatArray | None, batch_size: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    # Measured formulations can sit a little outside the design bounds (dosing error,
    # e.g. 2.01 mol/kg); the GP expects the unit cube, and a 0.5 % clip changes nothing.
    xo = np.clip(np.asarray(xo, dtype=np.float64).reshape(-1, space.dim), 0.0, 1.0)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if xo.shape[0] != y.shape[0]:
        raise ValueError(f"x has {xo.shape[0]} rows but y has {y.shape[0]} values")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"y must be finite, got {y[~np.isfinite(y)][:5]}")
    xp = np.zeros((0, space.dim)) if pending is None else np.asarray(pending, dtype=np.float64)
    xp = xp.reshape(-1, space.dim)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return xo, y, xp


def _candidates(space: DesignSpace, xo: FloatArray, source: str) -> list[Candidate]:
    out = []
    for row in xo:
        f = space.decode(row)
        out.append(
            Candidate(
                fractions=f.fractions,
                salt_molality=f.salt_molality,
                x=tuple(float(v) for v in space.encode(f.fractions, f.salt_molality)),
                source=source,
            )
        )
    return out


def _far_from(cands: FloatArray, others: FloatArray, distance: float) -> FloatArray:
    """Mask of rows of ``cands`` at least ``distance`` (L-inf) from every row of ``others``."""
    if others.shape[0] == 0 or distance <= 0:
        return np.ones(cands.shape[0], dtype=bool)
    d = np.abs(cands[:, None, :] - others[None, :, :]).max(axis=2).min(axis=1)
    return np.asarray(d >= distance)


class RandomSearch:
    """Uniform random feasible formulations (same interface as the BO optimizer)."""

    def __init__(self, space: DesignSpace | None = None) -> None:
        self.space = space or DesignSpace()

    def suggest(
        self,
        x: FloatArray,
        y: FloatArray,
        pending: FloatArray | None = None,
        batch_size: int = 4,
        seed: int = 0,
        prior: Prior | None = None,
    ) -> list[Candidate]:
        """``batch_size`` random feasible points; the data and the prior are ignored."""
        _check_inputs(self.space, x, y, pending, batch_size)
        rng = np.random.default_rng(seed)
        return _candidates(self.space, self.space.sample(batch_size, rng), "random")


class BayesianOptimizer:
    """Batch BO with BoTorch: a GP (optionally with a prior mean) and qLogNEI."""

    def __init__(
        self, space: DesignSpace | None = None, settings: OptimizerSettings | None = None
    ) -> None:
        self.space = space or DesignSpace()
        self.settings = settings or OptimizerSettings()

    # -- public ---------------------------------------------------------------------

    def suggest(
        self,
        x: FloatArray,
        y: FloatArray,
        pending: FloatArray | None = None,
        batch_size: int = 4,
        seed: int = 0,
        prior: Prior | None = None,
    ) -> list[Candidate]:
        """The next ``batch_size`` feasible, distinct formulations to measure."""
        xo, y, xp = _check_inputs(self.space, x, y, pending, batch_size)
        rng = np.random.default_rng(seed)
        s = self.settings
        if prior is None and xo.shape[0] < s.n_init:
            # Too few points to fit a GP: the whole batch belongs to the initial design.
            return _candidates(self.space, self._random(batch_size, rng, xo, xp), "random")
        prior_fn = None if prior is None else self._prior_on_x(prior)
        if prior_fn is not None and xo.shape[0] < s.n_init_prior:
            # Half the first batch where the prior is best, half random: the random half
            # lets the GP judge the prior away from its own optimum (a wrong prior would
            # otherwise only ever be checked where it is confident).
            n_prior = max(1, round(s.prior_init_fraction * batch_size))
            top = self._from_prior(prior_fn, n_prior, rng, xo, xp)
            rest = self._random(batch_size - n_prior, rng, np.concatenate([xo, xp]), top)
            return _candidates(self.space, top, "prior") + _candidates(self.space, rest, "random")
        with _quiet_botorch():
            xs = self._bo(xo, y, xp, batch_size, seed, rng, prior_fn)
        return _candidates(self.space, xs, "bo")

    # -- pieces ---------------------------------------------------------------------

    def _prior_on_x(self, prior: Prior) -> Callable[[FloatArray], tuple[FloatArray, FloatArray]]:
        space = self.space

        def on_x(xq: FloatArray) -> tuple[FloatArray, FloatArray]:
            w, m = space.to_arrays(xq)
            t = np.full(m.shape, space.temperature_c)
            mean, std = prior(w, m, t)
            return np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)

        return on_x

    def _random(
        self, n: int, rng: np.random.Generator, xo: FloatArray, xp: FloatArray
    ) -> FloatArray:
        taken = np.concatenate([xo, xp])
        out = np.zeros((0, self.space.dim))
        while out.shape[0] < n:
            cands = self.space.sample(4 * n, rng)
            cands = cands[
                _far_from(cands, np.concatenate([taken, out]), self.settings.min_distance)
            ]
            for c in cands:  # keep the new ones apart from each other too
                if out.shape[0] < n and _far_from(c[None], out, self.settings.min_distance)[0]:
                    out = np.concatenate([out, c[None]])
        return out

    def _from_prior(
        self,
        prior_fn: Callable[[FloatArray], tuple[FloatArray, FloatArray]],
        n: int,
        rng: np.random.Generator,
        xo: FloatArray,
        xp: FloatArray,
    ) -> FloatArray:
        """The prior's best points (mean + beta std), greedily kept ``prior_spread`` apart."""
        s = self.settings

        def score(cands: FloatArray) -> FloatArray:
            mean, std = prior_fn(cands)
            return mean + s.prior_ucb_beta * std

        cands = self.space.sample(4 * s.n_candidates, rng)
        cands, v = self._refine(cands, score(cands), score, rng)
        taken = np.concatenate([xo, xp])
        out = np.zeros((0, self.space.dim))
        for i in np.argsort(-v):
            c = cands[i : i + 1]
            if not _far_from(c, taken, s.min_distance)[0]:
                continue
            if out.shape[0] and np.min(np.linalg.norm(out - c, axis=1)) < s.prior_spread:
                continue
            out = np.concatenate([out, c])
            if out.shape[0] == n:
                break
        if out.shape[0] < n:  # a tiny space: fill up at random
            out = np.concatenate([out, self._random(n - out.shape[0], rng, taken, out)])
        return out

    def _refine(
        self,
        cands: FloatArray,
        values: FloatArray,
        score: Callable[[FloatArray], FloatArray],
        rng: np.random.Generator,
    ) -> tuple[FloatArray, FloatArray]:
        """Add local perturbations of the best candidates, shrinking the step each round."""
        s = self.settings
        pool, pool_v = cands, values
        best = np.argsort(-values)[: s.n_refine]
        starts, starts_v = cands[best], values[best]
        for step in s.refine_steps:
            new = np.concatenate(
                [self.space.perturb(p, s.refine_samples, step, rng) for p in starts]
            )
            v = score(new)
            pool, pool_v = np.concatenate([pool, new]), np.concatenate([pool_v, v])
            # Each start moves to the best point found around it so far.
            per = v.reshape(len(starts), s.refine_samples)
            arg = per.argmax(axis=1)
            better = per[np.arange(len(starts)), arg] > starts_v
            idx = np.arange(len(starts)) * s.refine_samples + arg
            starts = np.where(better[:, None], new[idx], starts)
            starts_v = np.where(better, per[np.arange(len(starts)), arg], starts_v)
        return pool, pool_v

    def _bo(
        self,
        xo: FloatArray,
        y: FloatArray,
        xp: FloatArray,
        n: int,
        seed: int,
        rng: np.random.Generator,
        prior_fn: Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None,
    ) -> FloatArray:
        import torch
        from botorch.acquisition.logei import qLogNoisyExpectedImprovement
        from botorch.sampling.normal import SobolQMCNormalSampler

        s = self.settings
        torch.manual_seed(seed)
        spread = 0.0
        if prior_fn is not None:
            spread = float(np.std(prior_fn(self.space.sample(1024, rng))[0]))
        model = _fit_gp(xo, y, prior_fn, spread, s.fit_maxiter)
        # Hedge: the last `hedge` points of a batch come from the GP without the prior,
        # so that a confidently wrong prior (it happens: a 60-point model can swap DMC
        # and DEC) still gets checked where it says "no".
        hedge = min(s.hedge, n - 1) if prior_fn is not None else 0
        plain = _fit_gp(xo, y, None, maxiter=s.fit_maxiter) if hedge > 0 else model
        xt = torch.as_tensor(xo, dtype=torch.float64)
        # Candidates: random feasible points in every subspace, plus points around the
        # best measured ones (the optimum is often close to an incumbent).
        cands = self.space.sample(s.n_candidates, rng)
        top = xo[np.argsort(-y)[:3]]
        cands = np.concatenate(
            [cands] + [self.space.perturb(p, s.refine_samples, 0.05, rng) for p in top]
        )
        chosen = np.zeros((0, self.space.dim))
        for j in range(n):
            pend = np.concatenate([xp, chosen])
            acq = qLogNoisyExpectedImprovement(
                model if j < n - hedge else plain,
                X_baseline=xt,
                sampler=SobolQMCNormalSampler(torch.Size([s.mc_samples]), seed=seed),
                X_pending=torch.as_tensor(pend, dtype=torch.float64) if pend.size else None,
                prune_baseline=True,
            )

            def score(cq: FloatArray, acq: Any = acq) -> FloatArray:
                return _evaluate(acq, cq)

            taken = np.concatenate([xo, pend])
            cj = cands[_far_from(cands, taken, s.min_distance)]
            cj, v = self._refine(cj, score(cj), score, rng)
            keep = _far_from(cj, taken, s.min_distance)
            cj, v = cj[keep], v[keep]
            chosen = np.concatenate([chosen, cj[int(np.argmax(v))][None]])
        return chosen


@contextlib.contextmanager
def _quiet_botorch() -> Iterator[None]:
    """Silence three known, harmless warnings of the BoTorch stack (nothing else)."""
    with warnings.catch_warnings():
        # linear_operator (under gpytorch) still uses torch.jit.script, deprecated by
        # torch 2.13; it fires once, on import, and is not ours to fix.
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning
        )
        # Near-duplicate points make a covariance barely positive definite; adding
        # jitter is linear_operator's intended recovery, and it says so each time.
        warnings.filterwarnings(
            "ignore", message=r"A not p\.d\., added jitter", category=RuntimeWarning
        )
        # Same cause inside qLogNEI: its cached low-rank update falls back to plain
        # sampling, which is correct, only slower.
        warnings.filterwarnings("ignore", message=r"Low-rank cholesky updates failed")
        yield


def _evaluate(acq: Any, cands: FloatArray, chunk: int = 512) -> FloatArray:
    """Acquisition values of single points ``(n, d)`` (no gradients, in chunks)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, cands.shape[0], chunk):
            xc = torch.as_tensor(cands[i : i + chunk], dtype=torch.float64)[:, None, :]
            out.append(acq(xc).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _fit_gp(
    xo: FloatArray,
    y: FloatArray,
    prior_fn: Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None,
    prior_spread: float = 0.0,
    maxiter: int = 60,
) -> Any:
    """A fitted SingleTaskGP: BoTorch's default, or with the prior as its mean.

    With a prior, y is standardised by ``max(std(y), prior_spread)``: early data sit
    where the prior is high and vary little, and dividing by their small spread would
    blow the prior's (maybe wrong) shape up against a residual GP of unit variance.
    """
    import torch
    from botorch.exceptions.errors import ModelFittingError
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.settings import validate_input_scaling
    from gpytorch.mlls import ExactMarginalLogLikelihood  # type: ignore[import-untyped]

    xt = torch.as_tensor(xo, dtype=torch.float64)
    if prior_fn is None:
        model = SingleTaskGP(xt, torch.as_tensor(y, dtype=torch.float64)[:, None])
    else:
        # Standardise y ourselves so the prior can be put on the same scale.
        mu = float(y.mean())
        sd = max(float(y.std(ddof=1)) if y.shape[0] > 1 else 0.0, prior_spread)
        sd = sd if sd > 1e-9 else 1.0
        ys = torch.as_tensor((y - mu) / sd, dtype=torch.float64)[:, None]

        def standardised(xq: FloatArray) -> FloatArray:
            # The acquisition function asks for the training points again with every
            # candidate; evaluate the (numpy, maybe ONNX) prior once per distinct row.
            uniq, inverse = np.unique(xq, axis=0, return_inverse=True)
            return np.asarray((prior_fn(uniq)[0] - mu) / sd)[inverse.reshape(-1)]

        # y is deliberately not unit-variance (see above): skip BoTorch's check.
        with validate_input_scaling(False):
            model = SingleTaskGP(
                xt, ys, mean_module=_prior_mean(standardised), outcome_transform=None
            )
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    # If every restart fails (rare, with a handful of points) the priors' modes remain:
    # a vague but usable model.
    with contextlib.suppress(ModelFittingError):
        # Capped L-BFGS-B: on a loaded 2-core machine a full fit costs seconds, and
        # hyperparameters that are 1 % off change the next batch very little.
        fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": maxiter}})
    model.eval()
    return model


def _prior_mean(fn: Callable[[FloatArray], FloatArray]) -> Any:
    """A gpytorch Mean: ``offset + scale * fn(x)``, fn numpy and constant for autograd."""
    import torch
    from gpytorch.means import Mean  # type: ignore[import-untyped]
    from gpytorch.priors import NormalPrior  # type: ignore[import-untyped]

    class PriorMean(Mean):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))
            self.register_parameter("offset", torch.nn.Parameter(torch.tensor(0.0)))
            # Trust the prior's shape unless the data argue otherwise.
            self.register_prior("scale_prior", NormalPrior(1.0, 0.5), "scale")
            self.register_prior("offset_prior", NormalPrior(0.0, 1.0), "offset")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().reshape(-1, x.shape[-1]).cpu().numpy()
            v = torch.as_tensor(fn(flat), dtype=x.dtype, device=x.device)
            out: torch.Tensor = self.offset + self.scale * v.reshape(x.shape[:-1])
            return out

    return PriorMean().to(torch.float64)


def suggest(
    x: FloatArray,
    y: FloatArray,
    pending: FloatArray | None = None,
    batch_size: int = 4,
    seed: int = 0,
    prior: Prior | None = None,
    *,
    space: DesignSpace | None = None,
    settings: OptimizerSettings | None = None,
) -> list[Candidate]:
    """Shortcut for ``BayesianOptimizer(space, settings).suggest(...)``."""
    return BayesianOptimizer(space, settings).suggest(x, y, pending, batch_size, seed, prior)
