"""Benchmark sim_backend's batched MD against ASE and TorchSim with the same model and system.

System: a liquid EC box (32 molecules, 320 atoms) packed at 1.32 g/cm3. Model: the shipped
learned model (``sim_backend/models/default.pt``) when present, otherwise an untrained
``MomentPotential`` (same architecture and cost, random weights; seeded). ``--model lj``
uses the Lennard-Jones reference instead. Engines, all NVE velocity Verlet:

* ``ase``: ASE's ``VelocityVerlet`` with an ASE calculator around the model (one system);
* ``ours`` at 1, 8, 32, 64 replicas (``sim_backend.md``, skin-reused neighbour lists);
* ``torchsim``: TorchSim 0.3.0's ``nve`` with the same model wrapped in its ModelInterface
  (it builds a neighbour list every step, as TorchSim's own models do).

``--mace PATH`` adds the MACE peer (a ``kind="mace"`` model file, e.g. from ``labctl sim
train DATA --out M.pt --kind mace``) as extra rows ``mace-ase`` and ``mace-ours`` (1 and 8
replicas), compared with its own ASE row.

Each configuration runs in its own subprocess so peak memory (ru_maxrss on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is per configuration. Correctness: forces vs
central finite differences, NVE drift of our engine (eV/atom/ps), step-0 forces of the
three engines against each other.

    python scripts/bench_md.py --quick          # < 2 minutes on CPU
    python scripts/bench_md.py --device cuda --replicas 1,8,32,64,256
    python scripts/bench_md.py --quick --engines ase,ours --mace /tmp/mace.pt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def ec_box(seed: int = 0) -> Any:
    """32 EC molecules at 1.32 g/cm3 (sim_backend.chem packer, 1.5 Å min spacing; 1.9 fails)."""
    from sim_backend.chem.build import build_box

    return build_box({"EC": 32}, density=1.32, seed=seed, min_distance=1.5)


def make_model(kind: str) -> tuple[Any, str]:
    """The potential and a sentence saying which one it is."""
    default = ROOT / "sim_backend" / "models" / "default.pt"
    if kind in ("auto", "learned") and default.is_file():
        from sim_backend.nn.model import load_model

        return load_model(default), f"learned model {default.name}"
    if kind == "learned":
        raise SystemExit(f"--model learned: {default} does not exist")
    if kind == "lj":
        from sim_backend.nn.lj import LennardJones

        return LennardJones(sigma=1.0, epsilon=0.01, cutoff=5.0), "Lennard-Jones (sigma 1 A)"
    from sim_backend.nn.model import MomentPotential

    torch.manual_seed(0)
    return MomentPotential(), "untrained MomentPotential (random weights, learned-model cost)"


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _AseCalc:
    """Forces-only ASE calculator around a Potential (what ASE's MD needs, nothing more)."""

    @staticmethod
    def make(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
        from ase.calculators.calculator import Calculator, all_changes

        from sim_backend.nn.evaluate import evaluate

        class Calc(Calculator):  # type: ignore[misc]
            implemented_properties = ["energy", "forces"]  # noqa: RUF012

            def calculate(
                self, atoms: Any = None, properties: Any = None, changes: Any = all_changes
            ) -> None:
                super().calculate(atoms, properties, changes)
                at = self.atoms
                kw = {"dtype": dtype, "device": device}
                out = evaluate(
                    model,
                    torch.tensor(at.positions, **kw),
                    torch.tensor(at.numbers, dtype=torch.long, device=device),
                    torch.tensor(at.cell.array, **kw)[None],
                    torch.tensor(at.pbc, device=device)[None],
                    torch.zeros(len(at), dtype=torch.long, device=device),
                )
                self.results["energy"] = float(out.energy[0])
                self.results["forces"] = out.forces.detach().cpu().double().numpy()

        return Calc()


def _ts_model(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from torch_sim.models.interface import ModelInterface

    from sim_backend.nn.evaluate import evaluate

    class Wrapped(ModelInterface):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self._device = device
            self._dtype = dtype
            self._compute_stress = False
            self._compute_forces = True

        def forward(self, state: Any, **_: Any) -> dict[str, torch.Tensor]:
            pbc = torch.as_tensor(state.pbc, device=device).expand(state.n_systems, 3)
            out = evaluate(
                self.model,
                state.positions,
                state.atomic_numbers,
                state.row_vector_cell,
                pbc,
                state.system_idx,
            )
            return {"energy": out.energy, "forces": out.forces}

    return Wrapped()


def worker(engine: str, n_rep: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time one engine/replica configuration; returns one JSON-able row."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    label = engine
    if engine.startswith("mace-"):  # the MACE peer from --mace, same engines
        from sim_backend.nn.model import load_model

        if not args.mace:
            raise SystemExit(f"engine {engine!r} needs --mace PATH")
        model, engine = load_model(args.mace), engine.removeprefix("mace-")
    else:
        model, _ = make_model(args.model)
    model = model.to(device=device, dtype=dtype)
    box = ec_box()
    n_atoms = len(box) * n_rep
    dt_fs = args.timestep_fs
    steps, warm = args.steps, 2
    if engine == "ase":
        from ase import units
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet

        atoms = box.copy()
        atoms.calc = _AseCalc.make(model, device, dtype)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
        dyn.run(warm)
        t0 = time.perf_counter()
        dyn.run(steps)
        wall = time.perf_counter() - t0
        extra: dict[str, Any] = {}
    elif engine == "ours":
        from sim_backend.md import integrators as integ
        from sim_backend.md.state import state_from_atoms

        st = state_from_atoms([box] * n_rep, temperature_k=300, seed=0, device=device, dtype=dtype)
        st = integ.nve_init(st, model, skin=args.skin)
        for _ in range(warm):
            st = integ.nve_step(st, model, dt_fs)
        _sync(device)
        builds0 = st.neighbors.n_builds if st.neighbors else 0
        t0 = time.perf_counter()
        for _ in range(steps):
            st = integ.nve_step(st, model, dt_fs)
        _sync(device)
        wall = time.perf_counter() - t0
        extra = {"neighbor_builds": (st.neighbors.n_builds if st.neighbors else 0) - builds0}
    elif engine == "torchsim":
        import torch_sim as ts

        wrapped = _ts_model(model, device, dtype)
        state = ts.io.atoms_to_state([box] * n_rep, device=device, dtype=dtype)
        kt = torch.tensor(300 * 8.617333262e-5, device=device, dtype=dtype)
        dt = torch.tensor(dt_fs * 0.09822694788464063, device=device, dtype=dtype)
        init, update = ts.integrators.nve(wrapped, dt=dt, kT=kt, seed=0)
        s = init(state)
        for _ in range(warm):
            s = update(s, dt=dt)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            s = update(s, dt=dt)
        _sync(device)
        wall = time.perf_counter() - t0
        extra = {}
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    return {
        "engine": label,
        "replicas": n_rep,
        "atoms": n_atoms,
        "steps": steps,
        "ms_per_step": 1e3 * wall / steps,
        "atom_steps_per_s": n_atoms * steps / wall,
        "peak_mib": _peak_mib(device),
        **extra,
    }


def correctness(args: argparse.Namespace) -> dict[str, Any]:
    """FD forces (float64), NVE drift of our engine, step-0 forces across engines."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = make_model(args.model)
    model64 = model.to(device=device, dtype=torch.float64)
    box = ec_box()
    from ase import units

    from sim_backend.md import integrators as integ
    from sim_backend.md.state import state_from_atoms
    from sim_backend.nn.evaluate import evaluate

    t = {"dtype": torch.float64, "device": device}
    pos = torch.tensor(box.positions, **t)
    z = torch.tensor(box.numbers, dtype=torch.long, device=device)
    cell = torch.tensor(box.cell.array, **t)[None]
    pbc = torch.ones(1, 3, dtype=torch.bool, device=device)
    sidx = torch.zeros(len(box), dtype=torch.long, device=device)
    f = evaluate(model64, pos, z, cell, pbc, sidx).forces
    assert f is not None
    h, errs = 1e-4, []
    rng = np.random.default_rng(1)
    for a in rng.choice(len(box), size=8, replace=False):
        for c in range(3):
            p1, p2 = pos.clone(), pos.clone()
            p1[a, c] += h
            p2[a, c] -= h
            e1 = evaluate(model64, p1, z, cell, pbc, sidx, forces=False).energy
            e2 = evaluate(model64, p2, z, cell, pbc, sidx, forces=False).energy
            errs.append(abs(float(-(e1 - e2) / (2 * h)) - float(f[a, c])))
    out: dict[str, Any] = {
        "fd_max_abs_err_eV_A": max(errs),
        "force_scale_eV_A": float(f.abs().max()),
    }

    drift = {}
    for name in ("float64", "float32"):
        dtype = DTYPES[name]
        mdl = model.to(device=device, dtype=dtype)
        st = state_from_atoms([box], temperature_k=300, seed=0, device=device, dtype=dtype)
        st = integ.nve_init(st, mdl, skin=args.skin)
        es, ts_ = [], []
        for k in range(args.drift_steps + 1):
            if k % 10 == 0:
                es.append(float(integ.conserved_energy(st)[0]))
                ts_.append(k * args.timestep_fs / 1000.0)
            if k < args.drift_steps:
                st = integ.nve_step(st, mdl, args.timestep_fs)
        slope = float(np.polyfit(ts_, np.asarray(es) / len(box), 1)[0])
        drift[name] = {
            "eV_per_atom_per_ps": slope,
            "ps": ts_[-1],
            "finite": bool(np.isfinite(es).all()),
        }
    out["nve_drift"] = drift

    # step-0 forces: ours (batched init), ASE calculator, TorchSim wrapper, same float64 model
    model64 = model.to(device=device, dtype=torch.float64)
    st = integ.nve_init(
        state_from_atoms([box] * 2, temperature_k=300, seed=0, device=device, dtype=torch.float64),
        model64,
        skin=args.skin,
    )
    ours = st.forces[: len(box)].cpu().numpy()
    atoms = box.copy()
    atoms.calc = _AseCalc.make(model64, device, torch.float64)
    ase_f = atoms.get_forces()
    import torch_sim as ts

    s = ts.io.atoms_to_state([box], device=device, dtype=torch.float64)
    ts_f = _ts_model(model64, device, torch.float64)(s)["forces"].detach().cpu().numpy()
    out["step0_max_abs_diff_eV_A"] = {
        "ours_vs_ase": float(np.abs(ours - ase_f).max()),
        "ours_vs_torchsim": float(np.abs(ours - ts_f).max()),
    }
    del units
    return out


def _run_sub(extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *extra, *_common(args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _common(args: argparse.Namespace) -> list[str]:
    return [
        "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
        "--threads", str(args.threads), "--model", args.model, "--skin", str(args.skin),
        "--timestep-fs", str(args.timestep_fs), "--drift-steps", str(args.drift_steps),
        *(["--mace", str(args.mace)] if args.mace else []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse options, run each configuration in a subprocess, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and replicas (< 2 min)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--replicas", default="1,8,32,64")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="auto", choices=["auto", "learned", "moment", "lj"])
    p.add_argument("--skin", type=float, default=1.0)
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--drift-steps", type=int, default=400)
    p.add_argument("--engines", default="ase,ours,torchsim")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--mace", type=Path, default=None, help="a MACE model file: extra rows")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "REPLICAS"), help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return 0
    if args.check:
        print(json.dumps(correctness(args)))
        return 0
    if args.quick:
        args.steps = min(args.steps, 5)
        args.drift_steps = min(args.drift_steps, 100)
        if args.replicas == "1,8,32,64" and args.device == "cpu":
            args.replicas = "1,8,32"
    _, model_desc = make_model(args.model)
    reps = [int(r) for r in args.replicas.split(",")]
    engines = args.engines.split(",")
    rows = []
    if "ase" in engines:
        rows.append(_run_sub(["--worker", "ase", "1"], args))
    for n_rep in reps:
        if "ours" in engines:
            rows.append(_run_sub(["--worker", "ours", str(n_rep)], args))
        if "torchsim" in engines and n_rep in (1, 32, max(reps)):
            rows.append(_run_sub(["--worker", "torchsim", str(n_rep)], args))
    if args.mace:
        if not args.mace.is_file():
            raise SystemExit(f"--mace: no model file at {args.mace}")
        rows.append(_run_sub(["--worker", "mace-ase", "1"], args))
        for n_rep in (1, 8):
            rows.append(_run_sub(["--worker", "mace-ours", str(n_rep)], args))
    check = _run_sub(["--check"], args)
    dev = args.device
    if dev.startswith("cuda"):
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    print(f"model: {model_desc}; system: EC box, 320 atoms, 1.32 g/cm3; device {dev}; "
          f"{args.dtype}; {args.threads} thread(s); dt {args.timestep_fs} fs; "
          f"{args.steps} timed steps")  # fmt: skip
    # "vs ASE" compares each model with ASE's loop on the same model (MACE rows: mace-ase).
    bases = {
        r["engine"]: r["atom_steps_per_s"] for r in rows if r.get("engine") in ("ase", "mace-ase")
    }
    print(f"{'engine':<10}{'replicas':>9}{'atoms':>8}{'ms/step':>11}{'atom-steps/s':>15}"
          f"{'vs ASE':>8}{'peak MiB':>10}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"  failed: {r['error']}")
            continue
        base = bases.get("mace-ase" if r["engine"].startswith("mace-") else "ase")
        rel = f"{r['atom_steps_per_s'] / base:.1f}x" if base else "-"
        print(f"{r['engine']:<10}{r['replicas']:>9}{r['atoms']:>8}{r['ms_per_step']:>11.1f}"
              f"{r['atom_steps_per_s']:>15.0f}{rel:>8}{r['peak_mib']:>10.0f}")  # fmt: skip
    print("correctness:", json.dumps(check, indent=1))
    if args.json:
        args.json.write_text(
            json.dumps({"model": model_desc, "rows": rows, "check": check}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
