"""Ground truth of a pack simulation: what the estimator should have found.

One row per recorded step (``PackSimConfig.record_every``). Arrays are indexed
``[step, pack, cell]``; ``ts`` equals the ``ts`` of the telemetry sampled after that step,
so estimates join on ``(pack_id, ts)``. Saved as ``.npz`` (every array) or as a long
``.csv`` (one line per step and cell).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

CSV_COLUMNS = (
    "t_s",
    "ts",
    "pack_id",
    "cell",
    "current_a",
    "soc",
    "temp_c",
    "cell_v",
    "capacity_ah",
)


@dataclass(frozen=True)
class Truth:
    """Recorded ground truth. Shapes: T steps, P packs, C cells."""

    pack_ids: list[str]
    t_s: FloatArray  # (T,) simulated seconds since start
    ts: FloatArray  # (T,) epoch seconds (= telemetry ts)
    current_a: FloatArray  # (T, P) mean pack current over the step, discharge > 0
    soc: FloatArray  # (T, P, C) of each cell's present capacity
    temp_c: NDArray[np.float32]  # (T, P, C)
    cell_v: NDArray[np.float32]  # (T, P, C) true terminal voltage
    capacity_ah: NDArray[np.float32]  # (T, P, C) present capacity
    # Fault events: dicts with pack_id, fault, cell, start_t_s, end_t_s (None: still on).
    faults: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return int(self.t_s.shape[0])

    @property
    def pack_soc(self) -> FloatArray:
        """(T, P) charge left over total capacity of each pack's cells. (A series
        string's usable charge is bounded by its weakest cell: ``soc.min(axis=2)``.)"""
        charge = self.soc * self.capacity_ah
        return np.asarray(charge.sum(axis=2) / self.capacity_ah.sum(axis=2))

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` or ``.csv`` (chosen by the suffix)."""
        p = Path(path)
        if p.suffix == ".npz":
            np.savez(
                p,
                pack_ids=np.asarray(self.pack_ids),
                t_s=self.t_s,
                ts=self.ts,
                current_a=self.current_a,
                soc=self.soc,
                temp_c=self.temp_c,
                cell_v=self.cell_v,
                capacity_ah=self.capacity_ah,
                faults=np.asarray(json.dumps(self.faults)),
            )
        elif p.suffix == ".csv":
            self._save_csv(p)
        else:
            raise ValueError(f"truth path must end in .npz or .csv, got {str(p)!r}")
        return p

    def _save_csv(self, p: Path) -> None:
        n_t, _, n_c = self.soc.shape
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            cells = np.arange(n_c)
            for k in range(n_t):
                for j, pid in enumerate(self.pack_ids):
                    for c in cells:
                        w.writerow(
                            (
                                repr(float(self.t_s[k])),
                                repr(float(self.ts[k])),
                                pid,
                                int(c),
                                repr(float(self.current_a[k, j])),
                                repr(float(self.soc[k, j, c])),
                                repr(float(self.temp_c[k, j, c])),
                                repr(float(self.cell_v[k, j, c])),
                                repr(float(self.capacity_ah[k, j, c])),
                            )
                        )


def load_truth(path: str | Path) -> Truth:
    """Read what :meth:`Truth.save` wrote (``.npz`` or ``.csv``; a CSV has no fault events)."""
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            return Truth(
                pack_ids=[str(s) for s in z["pack_ids"]],
                t_s=z["t_s"],
                ts=z["ts"],
                current_a=z["current_a"],
                soc=z["soc"],
                temp_c=z["temp_c"],
                cell_v=z["cell_v"],
                capacity_ah=z["capacity_ah"],
                faults=json.loads(str(z["faults"])),
            )
    if p.suffix == ".csv":
        return _load_csv(p)
    raise ValueError(f"truth path must end in .npz or .csv, got {str(p)!r}")


def _load_csv(p: Path) -> Truth:
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != CSV_COLUMNS:
        raise ValueError(f"{p}: expected header {','.join(CSV_COLUMNS)}")
    body = rows[1:]
    pack_ids = list(dict.fromkeys(r[2] for r in body))
    n_c = max(int(r[3]) for r in body) + 1 if body else 0
    n_p = len(pack_ids)
    n_t = len(body) // max(1, n_p * n_c)
    num = np.array([[float(r[i]) for i in (0, 1, 4, 5, 6, 7, 8)] for r in body]).reshape(
        n_t, n_p, n_c, 7
    )
    return Truth(
        pack_ids=pack_ids,
        t_s=num[:, 0, 0, 0].copy(),
        ts=num[:, 0, 0, 1].copy(),
        current_a=num[:, :, 0, 2].copy(),
        soc=num[..., 3].copy(),
        temp_c=num[..., 4].astype(np.float32),
        cell_v=num[..., 5].astype(np.float32),
        capacity_ah=num[..., 6].astype(np.float32),
    )


class TruthRecorder:
    """Collects rows in memory; :meth:`truth` stacks them into a :class:`Truth`."""

    def __init__(self, pack_ids: list[str]) -> None:
        self.pack_ids = list(pack_ids)
        self._t: list[float] = []
        self._ts: list[float] = []
        self._current: list[FloatArray] = []
        self._soc: list[FloatArray] = []
        self._temp: list[NDArray[np.float32]] = []
        self._v: list[NDArray[np.float32]] = []
        self._cap: list[NDArray[np.float32]] = []
        self.faults: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._t)

    def add(
        self,
        t_s: float,
        ts: float,
        current_a: FloatArray,
        soc: FloatArray,
        temp_c: FloatArray,
        cell_v: FloatArray,
        capacity_ah: FloatArray,
    ) -> None:
        self._t.append(t_s)
        self._ts.append(ts)
        self._current.append(np.array(current_a, dtype=np.float64))
        self._soc.append(np.array(soc, dtype=np.float64))
        self._temp.append(np.asarray(temp_c, dtype=np.float32))
        self._v.append(np.asarray(cell_v, dtype=np.float32))
        self._cap.append(np.asarray(capacity_ah, dtype=np.float32))

    def truth(self) -> Truth:
        n_p = len(self.pack_ids)

        def stack(rows: list[Any], dtype: type, tail: tuple[int, ...]) -> Any:
            return np.stack(rows).astype(dtype) if rows else np.zeros((0, *tail), dtype=dtype)

        n_c = self._soc[0].shape[1] if self._soc else 0
        return Truth(
            pack_ids=list(self.pack_ids),
            t_s=np.asarray(self._t, dtype=np.float64),
            ts=np.asarray(self._ts, dtype=np.float64),
            current_a=stack(self._current, np.float64, (n_p,)),
            soc=stack(self._soc, np.float64, (n_p, n_c)),
            temp_c=stack(self._temp, np.float32, (n_p, n_c)),
            cell_v=stack(self._v, np.float32, (n_p, n_c)),
            capacity_ah=stack(self._cap, np.float32, (n_p, n_c)),
            faults=[dict(f) for f in self.faults],
        )
