"""The `labctl` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from labctl.cli.mocks import mocks
from labctl.cli.plans import plans
from labctl.cli.queue import queue
from labctl.cli.runs import runs

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
)
app.add_typer(mocks, name="mocks")
app.add_typer(plans, name="plans")
app.add_typer(queue, name="queue")
app.add_typer(runs, name="runs")


@app.command("demo")
def demo(
    speed: Annotated[float, typer.Option(help="Time acceleration of the simulated lab.")] = 200.0,
    lab_config: Annotated[Path | None, typer.Option(help="Lab TOML for the simulators.")] = None,
    transport: Annotated[str, typer.Option(help="pty or tcp.")] = "pty",
) -> None:
    """Start the simulated lab, dose one electrolyte gravimetrically, measure its conductivity."""
    from labctl.demo import run_demo

    raise typer.Exit(run_demo(speed=speed, lab_config=lab_config, transport=transport))


def main() -> None:
    app()
