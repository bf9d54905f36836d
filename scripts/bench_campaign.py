"""How many experiments the campaign's optimizers need to reach 98 % of the true optimum.

For each ground-truth landscape (DESIGN contract 2: the default
``landesfeind_blend`` and the alternatives in ``hardware_mocks.physics.landscapes``),
and each seed, three optimizers run a closed loop in batches of ``--batch`` (4) on
the design space of ``labctl.campaign.space.DesignSpace`` (objective: conductivity
at 25 C), each measurement with 1 % relative Gaussian noise, like the lab's meter:

* ``bo+prior``: ``BayesianOptimizer`` with the property model as the GP's prior mean;
* ``bo``: the same, without a prior (BoTorch's default ``SingleTaskGP``, 8 random
  points first);
* ``random``: uniform random feasible formulations (run far past ``--budget``,
  it is free here, so that its median is measured rather than censored).

A run "reaches 98 %" at the first experiment whose *true* (noise-free) conductivity
is >= 0.98 x the landscape's true optimum, which is found first by many starts of
scipy SLSQP in every 4-solvent subspace. The prior is the property model
(``labctl.models.property``) trained on the lab's past data: 60 noisy random
measurements of the DEFAULT landscape at 15/25/40 C. On the other landscapes that
prior is therefore wrong, which is the point: it shows what a misleading prior costs.

    .venv/bin/python scripts/bench_campaign.py [--seeds 10] [--budget 40] [--batch 4]
        [--jobs 2] [--quick] [--plot curves.png] [--pipelined] [--first-seed 0]
        [--landscapes NAME,...] [--bo-settings '{"n_init": 8}']

``--pipelined`` suggests each batch while the previous one is still being measured
(it is passed as pending), as a lab that never waits for the optimizer would.
``--first-seed`` shifts the seeds (the optimizer's settings were chosen on seeds
100-179, so that the reported seeds 0-9 are held out); ``--bo-settings`` overrides
``OptimizerSettings`` fields for both BO methods (ablations: ``{"n_init": 8}`` is the
previous default). The table also gives the median and the largest time of one
``suggest()`` call per method.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labctl.campaign.space import SOLVENTS, DesignSpace  # noqa: E402

LANDSCAPES = {
    "default (landesfeind_blend)": "hardware_mocks.physics.electrolyte:landesfeind_blend",
    "pc_rich_high_salt": "hardware_mocks.physics.landscapes:pc_rich_high_salt",
    "narrow_low_ec": "hardware_mocks.physics.landscapes:narrow_low_ec",
    # dissociation ignored: viscosity alone, so the optimum sits on the EC+PC >= 0.1 bound
    "linear_only_blend": "hardware_mocks.physics.electrolyte:linear_only_blend",
}
DEFAULT = LANDSCAPES["default (landesfeind_blend)"]  # the lab's past data come from it
METHODS = ("bo+prior", "bo", "random")
TARGET = 0.98
NOISE = 0.01
SPACE = DesignSpace()


def load(path: str) -> Callable[[dict[str, float], float, float], float]:
    module, _, func = path.partition(":")
    fn: Callable[[dict[str, float], float, float], float] = getattr(
        importlib.import_module(module), func
    )
    return fn


def truth(fn: Callable[..., float], xs: np.ndarray, temperature_c: float = 25.0) -> np.ndarray:
    w, m = SPACE.to_arrays(xs)
    return np.array(
        [
            fn(dict(zip(SOLVENTS, wi, strict=True)), float(mi), temperature_c)
            for wi, mi in zip(w, m, strict=True)
        ]
    )


def true_optimum(
    fn: Callable[..., float], starts: int = 12, seed: int = 0
) -> tuple[float, np.ndarray]:
    """Best value and encoded point: SLSQP from many starts in every subspace."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    best_v, best_x = -np.inf, np.zeros(SPACE.dim)
    cyc = SPACE.cyclic_index
    for active in SPACE.subspaces():
        x0s = SPACE.sample(starts, rng, subspace=active)
        bounds = [(0.0, 1.0) if i in active else (0.0, 0.0) for i in range(5)] + [(0.0, 1.0)]
        cons = [
            {"type": "eq", "fun": lambda x: x[:5].sum() - 1.0},
            {"type": "ineq", "fun": lambda x: x[cyc].sum() - SPACE.min_cyclic},
        ]

        def neg(x: np.ndarray) -> float:
            return -float(truth(fn, x[None])[0])

        for x0 in x0s:
            r = minimize(neg, x0, method="SLSQP", bounds=bounds, constraints=cons)
            x = np.clip(r.x, 0.0, 1.0)
            x[:5] /= x[:5].sum()
            v = float(truth(fn, x[None])[0])
            if v > best_v and SPACE.is_feasible(x[None])[0]:
                best_v, best_x = v, x
    return best_v, best_x


# -- the prior ----------------------------------------------------------------------


def past_data(n: int = 60, seed: int = 2024) -> Any:
    """The lab's past data: n noisy random measurements of the default landscape."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    fn = load(DEFAULT)
    xs = SPACE.sample(n, rng)
    w, m = SPACE.to_arrays(xs)
    temps = np.array([15.0, 25.0, 40.0])[np.arange(n) % 3]
    y = np.array(
        [
            fn(dict(zip(SOLVENTS, wi, strict=True)), mi, ti)
            for wi, mi, ti in zip(w, m, temps, strict=True)
        ]
    )
    y = y * (1.0 + NOISE * rng.normal(size=n))
    df = pd.DataFrame(w, columns=list(SOLVENTS))
    df["salt_molality"], df["temperature_c"], df["conductivity_mS_cm"] = m, temps, y
    return df


class StandInPrior:
    """Used only when labctl.models.property is missing: a quadratic least-squares fit
    (fractions, molality, temperature and their products) to the same past data."""

    def __init__(self, df: Any) -> None:
        self.coef, *_ = np.linalg.lstsq(
            self._features(
                df[list(SOLVENTS)].to_numpy(),
                df["salt_molality"].to_numpy(),
                df["temperature_c"].to_numpy(),
            ),
            df["conductivity_mS_cm"].to_numpy(),
            rcond=None,
        )

    @staticmethod
    def _features(w: np.ndarray, m: np.ndarray, t: np.ndarray) -> np.ndarray:
        z = np.column_stack([w, m, m**2, t / 25.0])
        quad = np.einsum("ni,nj->nij", z, z).reshape(len(z), -1)
        return np.column_stack([z, quad])

    def __call__(
        self, w: np.ndarray, m: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._features(w, m, t) @ self.coef, np.full(len(m), 0.5)


def build_prior(workdir: Path, n_past: int = 60) -> tuple[str, Any]:
    """(description, spec) where spec is a registry path (str) or a StandInPrior."""
    df = past_data(n_past)
    try:
        from labctl.models.property import (
            PropertyConfig,
            register_property_model,
            train_property_model,
        )
    except ImportError as exc:
        return (
            f"stand-in quadratic fit (labctl.models.property unavailable: {exc})",
            StandInPrior(df),
        )
    trained = train_property_model(
        df,
        PropertyConfig(
            molality_range=(SPACE.molality_min, SPACE.molality_max), temperature_range=(15.0, 40.0)
        ),
    )
    record = register_property_model(workdir, trained, promote=True)
    m = trained.metrics
    desc = (
        f"labctl.models.property.PropertyPredictor (ONNX ensemble, version {record.version[:12]}), "
        f"trained on {n_past} noisy random measurements of the default landscape at 15/25/40 C; "
        f"holdout RMSE {m['rmse']:.2f} mS/cm, R^2 {m['r2']:.2f}"
    )
    return desc, str(workdir)


_PRIOR_CACHE: dict[str, Any] = {}


def resolve_prior(spec: Any) -> Any:
    if not isinstance(spec, str):
        return spec
    if spec not in _PRIOR_CACHE:
        from labctl.models.property import PropertyPredictor

        _PRIOR_CACHE[spec] = PropertyPredictor.load(spec).predict
    return _PRIOR_CACHE[spec]


# -- one run ------------------------------------------------------------------------


@dataclass
class Task:
    landscape: str
    method: str
    seed: int
    budget: int
    batch: int
    optimum: float
    prior_spec: Any
    pipelined: bool
    random_budget: int
    settings: dict[str, Any]


def run_task(task: Task) -> tuple[Task, list[float], list[float]]:
    """Best-so-far true value (fraction of the optimum) after each experiment, and the
    seconds of each ``suggest()`` call (random search: one entry, the whole run)."""
    import torch

    torch.set_num_threads(1)
    from labctl.campaign.optimizer import BayesianOptimizer, OptimizerSettings, RandomSearch

    t0 = time.perf_counter()
    fn = load(LANDSCAPES[task.landscape])
    rng = np.random.default_rng(10_000 + task.seed)
    if task.method == "random":
        # Cheap: draw in chunks far past the budget, until the target is reached.
        best: list[float] = []
        run_best = 0.0
        k = 0
        while len(best) < task.random_budget:
            xs = SPACE.sample(500, np.random.default_rng([task.seed, k]))
            k += 1
            for v in truth(fn, xs) / task.optimum:
                run_best = max(run_best, float(v))
                best.append(run_best)
            if run_best >= TARGET and len(best) >= task.budget:
                break
        return task, best, [time.perf_counter() - t0]
    opt = (
        BayesianOptimizer(SPACE, OptimizerSettings(**task.settings))
        if task.method.startswith("bo")
        else RandomSearch(SPACE)
    )
    prior = resolve_prior(task.prior_spec) if task.method == "bo+prior" else None
    xs = np.zeros((0, SPACE.dim))
    ys = np.zeros(0)
    true_vals: list[float] = []
    in_flight = np.zeros((0, SPACE.dim))  # suggested, being measured (pipelined mode)
    step = 0
    times: list[float] = []
    while len(true_vals) < task.budget:
        t1 = time.perf_counter()
        cands = opt.suggest(
            xs,
            ys,
            pending=in_flight if task.pipelined else None,
            batch_size=task.batch,
            seed=task.seed * 1000 + step,
            prior=prior,
        )
        times.append(time.perf_counter() - t1)
        step += 1
        new = np.array([c.x for c in cands])
        if task.pipelined:
            # The previous batch's results arrive now; the new one goes on the robot.
            done, in_flight = in_flight, new
        else:
            done = new
        if done.shape[0] == 0:
            continue
        tv = truth(fn, done)
        xs = np.concatenate([xs, done])
        ys = np.concatenate([ys, tv * (1.0 + NOISE * rng.normal(size=len(tv)))])
        true_vals.extend(float(v) for v in tv)
    best_curve = list(np.maximum.accumulate(np.array(true_vals[: task.budget]) / task.optimum))
    return task, best_curve, times


def hits(curve: list[float]) -> float:
    """Experiments until the best true value reaches TARGET (inf if never)."""
    for i, v in enumerate(curve):
        if v >= TARGET:
            return float(i + 1)
    return float("inf")


def fmt(v: float, budget: int) -> str:
    return f">{budget}" if not np.isfinite(v) else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. +seeds-1")
    ap.add_argument(
        "--bo-settings",
        default="{}",
        help="JSON object: OptimizerSettings overrides for both BO methods (e.g. n_init)",
    )
    ap.add_argument("--budget", type=int, default=40, help="experiments per BO run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--random-budget", type=int, default=50_000, help="cap for random search")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true", help="3 seeds, budget 24: a smoke run")
    ap.add_argument(
        "--past-data", type=int, default=60, help="measurements the prior is trained on"
    )
    ap.add_argument("--pipelined", action="store_true", help="suggest while the last batch runs")
    ap.add_argument("--plot", type=Path, default=None, help="write best-so-far curves (PNG)")
    ap.add_argument(
        "--landscapes",
        default=",".join(LANDSCAPES),
        help=f"comma-separated subset of: {', '.join(LANDSCAPES)}",
    )
    args = ap.parse_args()
    chosen = [n.strip() for n in args.landscapes.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(LANDSCAPES))
    if unknown:
        ap.error(f"--landscapes: unknown {unknown}; known: {list(LANDSCAPES)}")
    for name in list(LANDSCAPES):
        if name not in chosen:
            del LANDSCAPES[name]
    if args.quick:
        args.seeds, args.budget = 3, 24
    try:
        from labctl.campaign.optimizer import OptimizerSettings

        bo_settings: dict[str, Any] = json.loads(args.bo_settings)
        OptimizerSettings(**bo_settings)  # validate here, not in every worker
    except (ValueError, TypeError) as exc:
        ap.error(f"--bo-settings {args.bo_settings!r}: {exc}")
    t_start = time.perf_counter()

    print(
        f"# bench_campaign: {args.seeds} seeds, budget {args.budget}, batches of {args.batch}, "
        f"noise {NOISE:.0%} relative, target {TARGET:.0%} of the true optimum, 25 C"
        f"{', pipelined (previous batch pending)' if args.pipelined else ''}; "
        f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}"
        f"{'; BO settings ' + json.dumps(bo_settings) if bo_settings else ''}"
    )
    optima: dict[str, float] = {}
    for name, path in LANDSCAPES.items():
        v, x = true_optimum(load(path))
        f = SPACE.decode(x)
        comp = " ".join(f"{k}{v_:.3f}" for k, v_ in f.fractions.items() if v_ > 5e-4)
        optima[name] = v
        print(
            f"true optimum  {name:28s} {v:6.3f} mS/cm at {comp} "
            f"+ LiPF6 {f.salt_molality:.3f} mol/kg"
        )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prior_desc, prior_spec = build_prior(Path(tmp) / "registry", args.past_data)
        print(f"prior: {prior_desc} ({time.perf_counter() - t0:.0f} s to build)")
        prior = resolve_prior(prior_spec)
        probe = SPACE.sample(4000, np.random.default_rng(7))
        w, m = SPACE.to_arrays(probe)
        p_mean = prior(w, m, np.full(len(m), 25.0))[0]
        for name, path in LANDSCAPES.items():
            tv = truth(load(path), probe)
            print(
                f"prior vs {name}: correlation {np.corrcoef(p_mean, tv)[0, 1]:.2f} at 25 C; "
                "the prior's best of 4000 random points is "
                f"{tv[np.argmax(p_mean)] / optima[name]:.3f}"
                " of the optimum"
            )
        tasks = [
            Task(
                name,
                method,
                seed,
                args.budget,
                args.batch,
                optima[name],
                prior_spec,
                args.pipelined,
                args.random_budget,
                bo_settings,
            )
            for name in LANDSCAPES
            for seed in range(args.first_seed, args.first_seed + args.seeds)
            for method in METHODS
        ]
        results: dict[tuple[str, str], list[list[float]]] = {}
        suggest_s: dict[str, list[float]] = {}
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            for i, (task, curve, times) in enumerate(pool.imap_unordered(run_task, tasks), 1):
                results.setdefault((task.landscape, task.method), []).append(curve)
                if task.method != "random":
                    suggest_s.setdefault(task.method, []).extend(times)
                secs = sum(times)
                h = hits(curve)
                print(
                    f"[{i:3d}/{len(tasks)}] {task.landscape:28s} {task.method:8s} "
                    f"seed {task.seed:2d}: 98% at {fmt(h, len(curve))}, "
                    f"best {curve[min(len(curve), args.budget) - 1]:.3f} "
                    f"after {min(len(curve), args.budget)} ({secs:.1f} s)",
                    flush=True,
                )

    print()
    print(f"prior: {prior_desc}")
    print(
        f"Experiments to reach {TARGET:.0%} of the true optimum "
        f"(median [IQR] over {args.seeds} seeds; "
        f"BO budget {args.budget}, random search up to {args.random_budget})"
    )
    for name in LANDSCAPES:
        print()
        print(f"## {name}: optimum {optima[name]:.3f} mS/cm")
        print(
            "| method   | median | IQR         | reached "
            f"| best after {args.budget:<3d}| random/method |"
        )
        print("|----------|--------|-------------|---------|----------------|---------------|")
        h_rand = np.array([hits(c) for c in results[(name, "random")]])
        med_rand = float(np.median(h_rand))
        for method in METHODS:
            curves = results[(name, method)]
            h = np.array([hits(c) for c in curves])
            # Censored runs count as +inf; "nearest" keeps quartiles from interpolating
            # between two infinities.
            med = float(np.median(h))
            q1, q3 = (float(np.percentile(h, q, method="nearest")) for q in (25, 75))
            budget = args.random_budget if method == "random" else args.budget
            reached = int(np.isfinite(h).sum())
            after = float(np.median([c[args.budget - 1] for c in curves]))
            if method == "random":
                ratio = "n/a"
            elif not np.isfinite(med):
                ratio = "not reached"  # median BO run censored: no ratio to give
            elif np.isfinite(med_rand):
                ratio = f"{med_rand / med:.0f}x"
            else:  # random search censored at --random-budget: a lower bound
                ratio = f">{args.random_budget / med:.0f}x"
            print(
                f"| {method:8s} | {fmt(med, budget):>6s} "
                f"| {fmt(q1, budget):>5s}-{fmt(q3, budget):<5s} | "
                f"{reached:3d}/{len(h):<3d} | {after:14.3f} | {ratio:>13s} |"
            )
    print()
    for method, ts in suggest_s.items():
        print(
            f"suggest() of {method}: median {np.median(ts):.2f} s, max {np.max(ts):.2f} s "
            f"per batch of {args.batch} ({len(ts)} calls, one thread)"
        )
    print(f"total {time.perf_counter() - t_start:.0f} s, {args.jobs} worker process(es)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(LANDSCAPES), figsize=(5 * len(LANDSCAPES), 4), sharey=True)
        for ax, name in zip(np.atleast_1d(axes), LANDSCAPES, strict=True):
            for method in METHODS:
                curves = np.array([c[: args.budget] for c in results[(name, method)]])
                n = np.arange(1, args.budget + 1)
                ax.plot(n, np.median(curves, axis=0), label=method)
                ax.fill_between(n, *np.percentile(curves, [25, 75], axis=0), alpha=0.2)
            ax.axhline(TARGET, color="k", lw=0.8, ls="--")
            ax.set_title(name)
            ax.set_xlabel("experiments")
        np.atleast_1d(axes)[0].set_ylabel("best true conductivity / optimum")
        np.atleast_1d(axes)[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
