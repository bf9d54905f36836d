"""`labctl campaign`: the closed DMTA loop on the simulated lab (DESIGN contract 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

campaign = typer.Typer(
    no_args_is_help=True,
    help="Closed-loop campaigns: run (or resume), status, report.",
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Data directory of the embedded Tiled (env LABCTL_DATA; ./data/tiled)."
    ),
]


def _store(data: Path | None) -> Any:
    from labctl.data import DataConfig, DataConfigError, DataError, open_store

    try:
        return open_store(DataConfig.from_env(directory=data))
    except (DataConfigError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _state(campaign_id: str, data: Path | None) -> Any:
    """The campaign's state from Tiled; exit 1 when there is no such campaign."""
    from labctl.campaign.runner import read_state

    store = _store(data)
    try:
        state = read_state(store, campaign_id)
    finally:
        store.close()
    if not state.experiments:
        typer.echo(f"no campaign {campaign_id!r} in Tiled", err=True)
        raise typer.Exit(1)
    return state


@campaign.command("run")
def run(
    config: Annotated[
        Path | None, typer.Option(help="campaign.toml (every field optional).")
    ] = None,
    lab_config: Annotated[
        Path | None, typer.Option(help="Lab TOML of the simulated lab (its electrolyte model).")
    ] = None,
    budget: Annotated[int | None, typer.Option(help="Experiments to measure.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the optimizer.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="bo or random.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Experiments per batch.")] = None,
    campaign_id: Annotated[
        str | None, typer.Option(help="Campaign id (default from name, optimizer, seed).")
    ] = None,
    speed: Annotated[float | None, typer.Option(help="Simulated lab speed.")] = None,
    no_prior: Annotated[
        bool, typer.Option("--no-prior", help="Do not use the property model as prior.")
    ] = False,
    data: DataDir = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON, last.")
    ] = False,
) -> None:
    """Run the campaign (or resume it: same id) on the simulated lab; results in Tiled."""
    from labctl.campaign.runner import CampaignConfigError, load_campaign_config, run_campaign

    try:
        cfg = load_campaign_config(
            config, budget=budget, seed=seed, optimizer=optimizer, batch_size=batch_size,
            campaign_id=campaign_id, speed=speed, use_prior=False if no_prior else None,
        )  # fmt: skip
    except CampaignConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if lab_config is not None and not lab_config.is_file():
        typer.echo(f"--lab-config {lab_config}: no such file", err=True)
        raise typer.Exit(2)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if as_json else print
    store = _store(data)
    try:
        say(f"campaign {cfg.id}: budget {cfg.budget}, batches of {cfg.batch_size}, {cfg.optimizer}")
        result = run_campaign(cfg, lab_config=lab_config, store=store, say=say)
    finally:
        store.close()
    summary = result.summary()
    best = summary["best"]
    if best:
        fr = ", ".join(f"{k} {v:.3f}" for k, v in best["fractions"].items())
        n = summary["n_experiments"]
        say(f"best: {best['conductivity_mS_cm']:.3f} mS/cm ({fr}; LiPF6 "
            f"{best['salt_molality']:.3f} mol/kg) after {n} experiments")  # fmt: skip
    say(f"report: labctl campaign report {cfg.id}")
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")


@campaign.command("status")
def status(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    data: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a campaign has measured, skipped and still has to do (read from Tiled)."""
    from labctl.campaign.runner import CampaignConfig

    state = _state(campaign_id, data)
    cfg = CampaignConfig.model_validate(state.config or {})
    if as_json:
        typer.echo(json.dumps([e.as_dict() for e in state.experiments], default=str))
        return
    typer.echo(f"{campaign_id}: {state.batches} batches, {len(state.done())} measured")
    for e in state.experiments:
        m = e.measured
        value = f"{m['conductivity_mS_cm']:8.3f} mS/cm" if m else " " * 14
        fr = ", ".join(f"{k} {v:.2f}" for k, v in e.target.fractions.items())
        typer.echo(
            f"  {e.id:28s} {e.state(cfg):8s} {value}  {fr}; {e.target.salt_molality:.2f} m"
            f"  ({len(e.attempts)} runs)"
        )


@campaign.command("report")
def report(
    campaign_id: Annotated[str, typer.Argument(help="Campaign id.")],
    out: Annotated[Path | None, typer.Option(help="Directory (default ./reports/<id>).")] = None,
    data: DataDir = None,
) -> None:
    """Plots (trace, best so far, measured landscape) as PNG and one HTML page."""
    from labctl.campaign.report import write_report

    state = _state(campaign_id, data)
    for path in write_report(state, out or Path("reports") / campaign_id):
        typer.echo(str(path))
