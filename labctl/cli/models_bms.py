"""`labctl models bms-data`: generate the edge-BMS benchmark's ground-truth data with
PyBaMM (a dev/bench dependency; see labctl/models/bms and docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bms_data(
    out: Annotated[
        Path, typer.Option(help="Output directory (profiles/, sop/, characterization/, manifest).")
    ] = Path("data/bms"),
    quick: Annotated[
        bool, typer.Option(help="Two 4-minute profiles and a short HPPC: checks the pipeline.")
    ] = False,
    jobs: Annotated[int, typer.Option(help="Profiles simulated at once (processes).")] = 1,
    draw: Annotated[
        int,
        typer.Option(
            help="Another random draw of the same profiles (seeds shifted): initial SOC, "
            "sensor errors, synthetic drives. 0 is the benchmark's own data."
        ),
    ] = 0,
    only: Annotated[
        str | None,
        typer.Option(
            "--split", help="Only this split's profiles ('train' or 'test'), no characterization."
        ),
    ] = None,
) -> None:
    """Simulate the BMS benchmark's profiles (DFN, Chen2020, lumped thermal) with sensor
    errors, SOP truth and characterization tests, into OUT with a manifest. Resumable:
    files that match the manifest are kept. Progress goes to stderr; a summary to stdout."""
    from labctl.models.bms.dataset import DatasetError, generate

    if jobs < 1:
        typer.echo(f"error: --jobs={jobs}: must be >= 1", err=True)
        raise typer.Exit(2)
    try:
        manifest = generate(
            out,
            quick=quick,
            jobs=jobs,
            draw=draw,
            split=only,  # type: ignore[arg-type]
        )
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    profiles = manifest["profiles"]
    size = sum(p.stat().st_size for p in out.rglob("*.csv"))
    split = manifest["split"]
    typer.echo(
        f"{len(profiles)} profiles ({len(split['train'])} train, {len(split['test'])} test; "
        f"held out: {', '.join(split['held_out_cycles'])} and "
        f"{split['held_out_temperature_c']:g} C), "
        f"{sum(1 for p in profiles.values() if 'sop_file' in p)} SOP files, "
        f"{len(manifest['characterization']['files'])} characterization files, "
        f"{size / 1e6:.1f} MB in {out} ({manifest['generated_in_s']:.0f} s)"
    )
