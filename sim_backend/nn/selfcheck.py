"""Device self-check: the same batch on CPU and on CUDA must agree.

``python -m sim_backend.nn.selfcheck`` builds a mixed batch (periodic triclinic boxes,
a molecule), compares the neighbour list and energy/forces/stress of a small random
model between CPU and CUDA (float64), times both, and prints one JSON object. Exit
status 1 when they disagree, 2 when no CUDA device is present.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sim_backend.nn.evaluate import evaluate
from sim_backend.nn.model import MomentPotential
from sim_backend.nn.neighbors import neighbor_list


def _batch(
    n_boxes: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pos, numbers, cells, sidx = [], [], [], []
    species = torch.tensor([1, 3, 6, 8, 9, 15])
    for s in range(n_boxes):
        cell = torch.eye(3, dtype=dtype) * 15.0 + torch.rand(3, 3, generator=g, dtype=dtype)
        frac = torch.rand(320, 3, generator=g, dtype=dtype)
        pos.append(frac @ cell)
        numbers.append(species[torch.randint(0, 6, (320,), generator=g)])
        cells.append(cell)
        sidx.append(torch.full((320,), s))
    pbc = torch.ones(n_boxes, 3, dtype=torch.bool)
    return torch.cat(pos), torch.cat(numbers), torch.stack(cells), pbc, torch.cat(sidx)


def main() -> int:
    """Run the comparison; see the module docstring for the exit status."""
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False}))
        return 2
    dtype = torch.float64
    pos, numbers, cell, pbc, sidx = _batch(8, dtype)
    torch.manual_seed(0)
    model = MomentPotential().to(dtype)
    report: dict[str, object] = {"cuda": True, "device": torch.cuda.get_device_name(0)}
    results = {}
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        args = (pos.to(dev), numbers.to(dev), cell.to(dev), pbc.to(dev), sidx.to(dev))
        nl = neighbor_list(args[0], args[2], args[3], args[4], m.cutoff)
        out = evaluate(m, *args, neighbors=nl, stress=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            nl = neighbor_list(args[0], args[2], args[3], args[4], m.cutoff)
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(5):
            out = evaluate(m, *args, neighbors=nl, stress=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        report[f"{dev}_neighbor_list_ms"] = 1e3 * (t1 - t0) / 5
        report[f"{dev}_evaluate_ms"] = 1e3 * (t2 - t1) / 5
        assert out.forces is not None
        assert out.stress is not None
        results[dev] = (nl.n_edges, out.energy.cpu(), out.forces.cpu(), out.stress.cpu())
    c, g = results["cpu"], results["cuda"]
    ok = (
        c[0] == g[0]
        and torch.allclose(c[1], g[1], atol=1e-8)
        and torch.allclose(c[2], g[2], atol=1e-8)
        and torch.allclose(c[3], g[3], atol=1e-10)
    )
    report.update(
        {
            "edges_cpu": c[0],
            "edges_cuda": g[0],
            "max_force_diff": float((c[2] - g[2]).abs().max()),
            "atoms": int(pos.shape[0]),
            "agree": ok,
        }
    )
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
