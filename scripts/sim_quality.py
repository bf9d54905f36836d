"""Quality of a sim_backend potential: held-out errors, MD stability, liquid EC at 313 K.

    .venv/bin/python scripts/sim_quality.py [--model default] [--data DATA.extxyz]
        [--stability-replicas 16] [--stability-ps 5] [--stability-chunk-ps 5]
        [--ec-molecules 32] [--ec-ps 10] [--npt-ps 0] [--npt-equil-ps 10]
        [--timestep 0.5] [--json OUT.json]

1. Energy and force MAE against GFN2-xTB on the data's held-out test split, overall and
   per config type.
2. Stability (Fu et al. 2022): ``--stability-replicas`` replicas of a small liquid EC box
   (8 molecules, 80 atoms) at 300 K under CSVR for ``--stability-ps``; the fraction that
   the monitor did not stop (bonds within 0.5 Å, conserved energy within bound, finite
   forces), with each stop's reason. The issue's figure is 100 ps; on CPU that is hours
   (8 replicas at 1 fs: about 80 minutes on one core), so it runs in chunks of
   ``--stability-chunk-ps``, printing the stable count and writing ``--json`` after each.
3. Liquid EC at 313 K: a box of ``--ec-molecules`` at the experimental density
   (1.32 g/cm3; NVT, so the density is an input, not a prediction), 4 replicas, the
   self-diffusion coefficient of EC (centre-of-mass MSD, error over replicas) next to
   experiment (~1e-9 m2/s order; see docs/sim_backend.md).
4. ``--npt-ps``: the model's own density of liquid EC at 313 K and 1 atm (NPT, Monte
   Carlo barostat), from starts above and below it.

Prints progress and a table; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim_backend.api import solvent_box
from sim_backend.md.integrators import md_init
from sim_backend.md.runner import dry_test, simulate
from sim_backend.md.stability import make_monitor
from sim_backend.md.state import state_from_atoms
from sim_backend.nn.calculator import resolve_model_path
from sim_backend.nn.dataset import prepare, read_frames, split_frames
from sim_backend.nn.model import load_model
from sim_backend.nn.train import evaluate_metrics

EC_DENSITY_EXP = 1.32  # g/cm3 near 313 K (liquid EC melts at 309 K)


def heldout(model: Any, data: Path) -> dict[str, Any]:
    test = split_frames(read_frames(data))["test"]
    by_type: dict[str, list[Any]] = defaultdict(list)
    for at in test:
        by_type[str(at.info.get("config_type", "?"))].append(at)
    dtype = next(model.parameters()).dtype
    out = {"all": evaluate_metrics(model, prepare(test, model.cutoff, dtype))}
    for name, frames in sorted(by_type.items()):
        out[name] = evaluate_metrics(model, prepare(frames, model.cutoff, dtype))
    return out


def progress_printer(label: str) -> Any:
    t0 = time.perf_counter()
    last = [0.0]

    def cb(step: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or step == total:
            last[0] = now
            print(f"  {label}: step {step}/{total} ({now - t0:.0f} s)", flush=True)

    return cb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=Path("/tmp/sim_data/dataset.extxyz"))
    ap.add_argument("--stability-replicas", type=int, default=16)
    ap.add_argument("--stability-ps", type=float, default=5.0)
    ap.add_argument("--stability-chunk-ps", type=float, default=5.0)
    ap.add_argument(
        "--stability-seed", type=int, default=3, help="velocity seed: another seed, new replicas"
    )
    ap.add_argument("--ec-molecules", type=int, default=32)
    ap.add_argument("--ec-ps", type=float, default=10.0)
    ap.add_argument("--npt-ps", type=float, default=0.0, help="NPT production per replica")
    ap.add_argument("--npt-equil-ps", type=float, default=10.0)
    ap.add_argument("--timestep", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = resolve_model_path(args.model)
    report: dict[str, Any] = {"model": str(path)}
    print(f"model {path}")

    if args.data.is_file():
        model = load_model(path).double()
        report["heldout"] = heldout(model, args.data)
        print("held-out (test split) vs GFN2-xTB:")
        for name, m in report["heldout"].items():
            print(
                f"  {name:22s} {int(m['n_frames']):4d} frames  "
                f"E {m['energy_mae_mev_per_atom']:6.2f} meV/atom  "
                f"F {m['force_mae_mev_per_a']:6.1f} meV/A (RMSE "
                f"{m['force_rmse_mev_per_a']:.0f})"
            )
    else:
        print(f"(no data at {args.data}: held-out errors skipped; `labctl sim label` makes it)")

    steps = round(args.stability_ps * 1000 / args.timestep)
    if args.stability_replicas > 0:
        stability(args, path, steps, report)
    if args.ec_ps > 0:
        liquid_ec(args, path, report)
    if args.npt_ps > 0:
        ec_density(args, path, report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")


def _start(
    path: Path, boxes: list[Any], temperature_k: float, *, seed: int
) -> tuple[Any, Any, Any]:
    """The model (float32, CPU), the batched state with forces and neighbours, and the
    stability monitor of a run that ``simulate`` then continues chunk by chunk."""
    model = load_model(path).to(dtype=torch.float32)
    state = state_from_atoms(
        boxes, temperature_k=temperature_k, seed=seed, device=torch.device("cpu"),
        dtype=torch.float32,
    )  # fmt: skip
    state = md_init(state, model, skin=1.0)
    monitor = make_monitor(state, max_bond_deviation=0.5, max_energy_drift_per_atom=0.05)
    return model, state, monitor


def stability(args: Any, path: Path, steps: int, report: dict[str, Any]) -> None:
    """Replicas of an EC8 box under CSVR at 300 K, run in chunks of
    ``--stability-chunk-ps``: after each chunk the stable count is printed and, with
    ``--json``, the report so far is written (a run of hours keeps what it measured)."""
    print(
        f"stability: {args.stability_replicas} x EC8 box, 300 K CSVR, {steps} steps, "
        f"seed {args.stability_seed}"
    )
    box = solvent_box({"EC": 8}, density=EC_DENSITY_EXP, seed=1)
    model, state, monitor = _start(
        path, [box] * args.stability_replicas, 300.0, seed=args.stability_seed
    )
    chunk = max(1, round(args.stability_chunk_ps * 1000 / args.timestep))
    done, wall, temps = 0, 0.0, []
    while done < steps:
        n = min(chunk, steps - done)
        traj = simulate(
            state,
            model,
            monitor,
            ensemble="csvr",
            temperature_k=300.0,
            timestep_fs=args.timestep,
            n_steps=n,
            sample_every=max(1, min(n, 100)),
        )
        state, done, wall = traj.final_state, done + n, wall + traj.wall_s
        temps.append(float(np.nanmean(traj.temperature[1:])))
        st = monitor.report(state.n_systems)
        ps = done * args.timestep / 1000
        report["stability"] = {"ps": ps, **st, "wall_s": wall, "mean_t_per_chunk_k": temps}
        print(
            f"  {ps:.1f} ps: stable {st['n_stable']}/{st['n_replicas']}, "
            f"mean T {temps[-1]:.0f} K, {wall:.0f} s",
            flush=True,
        )
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    st = report["stability"]
    print(
        f"  stable {st['n_stable']}/{st['n_replicas']} ({100 * st['stable_fraction']:.0f} %) "
        f"over {st['ps']:.1f} ps, {wall:.0f} s"
    )
    for ev in st.get("stopped", []):
        print(f"  stopped: {ev}")


def ec_density(args: Any, path: Path, report: dict[str, Any]) -> None:
    """The model's own density of liquid EC at 313 K and 1 atm (NPT, MC barostat): four
    replicas of ``--ec-molecules``, two packed at 1.32 g/cm3 and two at 1.15 (the result
    should not remember the start), 1 ps Langevin at the packed density, then
    ``--npt-equil-ps`` of NPT with the volume step adapting and ``--npt-ps`` with it fixed
    (the averaging stage), in 5 ps chunks with progress. Error: SEM over the replicas'
    means of the averaging stage."""
    dt = args.timestep
    starts = (EC_DENSITY_EXP, EC_DENSITY_EXP, 1.15, 1.15)
    boxes = [
        solvent_box({"EC": args.ec_molecules}, density=rho, seed=10 + k)
        for k, rho in enumerate(starts)
    ]
    print(f"EC density: {len(boxes)} x {args.ec_molecules} EC, 313 K, 1 atm, starts {starts}")
    model, state, monitor = _start(path, boxes, 313.0, seed=5)
    common: dict[str, Any] = {"temperature_k": 313.0, "timestep_fs": dt}
    state = simulate(
        state, model, monitor, ensemble="langevin", n_steps=round(1000 / dt),
        sample_every=100, friction_per_fs=0.01, **common,
    ).final_state  # fmt: skip
    max_dlnv: Any = 0.01
    series: list[np.ndarray] = []
    t0 = time.perf_counter()
    for stage, ps, adapt in (("equil", args.npt_equil_ps, True), ("avg", args.npt_ps, False)):
        done = 0.0
        while done < ps - 1e-9:
            chunk = min(5.0, ps - done)
            tr = simulate(
                state, model, monitor, ensemble="npt", n_steps=round(chunk * 1000 / dt),
                sample_every=50, pressure_bar=1.01325, barostat_every=25,
                max_dlnv=max_dlnv, barostat_adapt=adapt, **common,
            )  # fmt: skip
            state, done = tr.final_state, done + chunk
            assert tr.barostat is not None
            max_dlnv = torch.tensor(tr.barostat["max_dlnv"], dtype=torch.float32)
            rho = tr.densities_g_cm3()[1:]
            if stage == "avg":
                series.append(rho)
            print(
                f"  {stage} {done:.1f}/{ps:.1f} ps: density "
                + " ".join(f"{x:.3f}" for x in rho.mean(0))
                + f" g/cm3, acceptance {np.nanmean(tr.barostat['acceptance']):.2f}, "
                f"T {np.nanmean(tr.temperature[1:]):.0f} K, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    alive = state.alive.cpu().numpy()
    rho_all = np.concatenate(series)[:, alive]
    means = rho_all.mean(0)
    value = float(means.mean())
    error = float(means.std(ddof=1) / np.sqrt(means.size)) if means.size > 1 else float("nan")
    # Converged? Still drifting: each replica's second half minus its first (paired, so
    # the replicas' spread cancels); remembering the start: the 1.32 starts minus the 1.15
    # starts. Either beyond 2 standard errors says run longer.
    half = rho_all.shape[0] // 2
    d = rho_all[half:].mean(0) - rho_all[:half].mean(0)
    drift = float(d.mean())
    drift_err = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
    high = means[np.asarray(starts)[alive] > 1.2]
    low = means[np.asarray(starts)[alive] <= 1.2]
    memory, memory_err = float("nan"), float("nan")
    if high.size > 1 and low.size > 1:
        memory = float(high.mean() - low.mean())
        memory_err = float(np.sqrt(high.var(ddof=1) / high.size + low.var(ddof=1) / low.size))
    converged = abs(drift) <= 2 * drift_err and not abs(memory) > 2 * memory_err
    report["ec_density_313K"] = {
        "value_g_cm3": value,
        "error_g_cm3": error,
        "replica_means": means.tolist(),
        "starts_g_cm3": list(starts),
        "stable": int(alive.sum()),
        "equil_ps": args.npt_equil_ps,
        "avg_ps": args.npt_ps,
        "experiment_g_cm3": EC_DENSITY_EXP,
        "drift_second_minus_first_half_g_cm3": drift,
        "drift_error_g_cm3": drift_err,
        "start_memory_high_minus_low_g_cm3": memory,
        "start_memory_error_g_cm3": memory_err,
        "converged": converged,
    }
    print(
        f"  density(EC, 313 K, 1 atm) = {value:.3f} +- {error:.3f} g/cm3 over {means.size} "
        f"replicas (experiment {EC_DENSITY_EXP}); replica means "
        + " ".join(f"{x:.3f}" for x in means)
    )
    if not converged:
        print(
            f"  warning: not converged: second half minus first {drift:+.3f} +- {drift_err:.3f}, "
            f"high starts minus low {memory:+.3f} +- {memory_err:.3f} g/cm3; run longer "
            "(--npt-equil-ps, --npt-ps)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))


def liquid_ec(args: Any, path: Path, report: dict[str, Any]) -> None:
    ec_steps = round(args.ec_ps * 1000 / args.timestep)
    print(f"liquid EC: {args.ec_molecules} molecules, 313 K, 4 replicas, {ec_steps} steps")
    ec = solvent_box({"EC": args.ec_molecules}, density=EC_DENSITY_EXP, seed=2)
    res = dry_test(
        ec,
        load_model(path),
        temperature_k=313.0,
        n_replicas=4,
        timestep_fs=args.timestep,
        n_equil_steps=max(200, ec_steps // 10),
        n_steps=ec_steps,
        sample_every=20,
        device="cpu",
        progress=progress_printer("EC 313 K"),
    )
    report["ec_313K"] = res
    d = next(iter(res["diffusion_m2_s"].values()), None)
    if d is not None:
        print(
            f"  D(EC) = {d['value_m2_s']:.2e} +- {d['error_m2_s']:.1e} m2/s "
            f"(experiment ~1e-9 order); density {res['density_g_cm3']['value']:.3f} g/cm3 "
            f"(input, NVT; experiment {EC_DENSITY_EXP}); mean T {res['mean_temperature_k']:.0f} K"
        )
        print(f"  MSD log-log slope over the fit window {d['msd_loglog_slope']:.2f}")
    for w in res.get("warnings", []):
        print(f"  warning: {w}")


if __name__ == "__main__":
    main()
