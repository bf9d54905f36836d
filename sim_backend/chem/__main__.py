"""``python -m sim_backend.chem OUT_DIR``: generate (or resume) a labelled dataset.

A plain entry point for long background runs (nohup); `labctl sim label` is the user-facing door.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim_backend.chem.dataset import DatasetRecipe, generate_dataset
from sim_backend.chem.label import LabelProgress


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run `generate_dataset`, print one progress line per frame and a summary."""
    parser = argparse.ArgumentParser(prog="python -m sim_backend.chem", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--recipe", default="default", help="'default', 'tiny' or a JSON file of a DatasetRecipe"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)

    if args.recipe == "default":
        recipe = DatasetRecipe.default()
    elif args.recipe == "tiny":
        recipe = DatasetRecipe.tiny()
    else:
        recipe = DatasetRecipe.model_validate_json(Path(args.recipe).read_text())
    t0 = time.perf_counter()

    def progress(p: LabelProgress) -> None:
        total = p.total if p.total is not None else "?"
        msg = f" {p.message}" if p.message else ""
        print(
            f"[{time.perf_counter() - t0:8.1f}s] {p.index + 1}/{total} {p.status:8s} "
            f"{p.frame_id} ({p.n_atoms} atoms, {p.seconds:.3f}s){msg}",
            flush=True,
        )

    report = generate_dataset(
        recipe, args.out_dir, seed=args.seed, progress=progress, resume=not args.fresh
    )
    s = report.summary
    print(
        json.dumps(
            {
                "path": str(report.path),
                "n_frames": s.n_frames,
                "n_atoms": s.n_atoms,
                "per_config_type": s.per_config_type,
                "per_split": s.per_split,
                "per_source": s.per_source,
                "n_labelled": report.n_labelled,
                "n_reused": report.n_reused,
                "n_skipped": report.n_skipped,
                "failed": [f.__dict__ for f in report.failed],
                "md_failures": report.md_failures,
                "wall_s": round(report.wall_s, 1),
            },
            indent=1,
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
