"""The `labctl` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from labctl.cli.campaign import campaign
from labctl.cli.mocks import mocks
from labctl.cli.models import models
from labctl.cli.plans import plans
from labctl.cli.queue import queue
from labctl.cli.runs import runs
from labctl.cli.sim import sim

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
)
app.add_typer(campaign, name="campaign")
app.add_typer(mocks, name="mocks")
app.add_typer(models, name="models")
app.add_typer(plans, name="plans")
app.add_typer(queue, name="queue")
app.add_typer(runs, name="runs")
app.add_typer(sim, name="sim")


@app.command("demo")
def demo(
    speed: Annotated[
        float, typer.Option(help="Time acceleration of the simulated lab for the electrolytes.")
    ] = 500.0,
    cycling_speed: Annotated[
        float, typer.Option(help="Time acceleration while the cell cycles.")
    ] = 4000.0,
    lab_config: Annotated[Path | None, typer.Option(help="Lab TOML for the simulators.")] = None,
    transport: Annotated[str, typer.Option(help="pty or tcp.")] = "pty",
    data: Annotated[
        Path | None,
        typer.Option(help="Data directory of the embedded Tiled (env LABCTL_DATA; ./data/tiled)."),
    ] = None,
    campaign_budget: Annotated[
        int, typer.Option(help="Experiments of the closing campaign (0: none).")
    ] = 12,
    campaign_batch: Annotated[int, typer.Option(help="Its batch size.")] = 4,
) -> None:
    """The main job on embedded defaults: make two electrolytes, measure their conductivity
    at three temperatures, cycle one cell, run a short closed-loop campaign; everything
    into the embedded Tiled, with a report."""
    from labctl.demo import run_demo

    raise typer.Exit(
        run_demo(
            speed=speed,
            cycling_speed=cycling_speed,
            lab_config=lab_config,
            transport=transport,
            data_directory=data,
            campaign_budget=campaign_budget,
            campaign_batch=campaign_batch,
        )
    )


def main() -> None:
    app()
