"""`labctl mocks`: the simulated instruments (DESIGN contract 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

mocks = typer.Typer(no_args_is_help=True, help="Simulated instruments (hardware_mocks).")


@mocks.command("serve")
def mocks_serve(
    config: Annotated[
        Path | None, typer.Option(help="Lab TOML (default: the lab shipped with the package).")
    ] = None,
    transport: Annotated[
        str | None, typer.Option(help="pty or tcp (default: the config's, tcp).")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Time acceleration (default: the config's).")
    ] = None,
    exit_with_parent: Annotated[
        bool,
        typer.Option(help="Exit when stdin closes (the parent died): for labs a program starts."),
    ] = False,
) -> None:
    """Start every instrument of the lab; print one JSON line per instrument; run until SIGINT."""
    # The one sanctioned door from labctl into the simulators (import-linter allows it).
    from hardware_mocks.config import ConfigError
    from hardware_mocks.serve import main as serve_main

    if transport not in (None, "pty", "tcp"):
        raise typer.BadParameter(f"transport must be pty or tcp, got {transport!r}")
    try:
        serve_main(str(config) if config else None, transport, speed, exit_with_parent)  # type: ignore[arg-type]
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
