"""`labctl sim`: the machine-learned potential and batched MD of sim_backend.

    labctl sim label DIR [--recipe default|tiny|FILE.json]     GFN2-xTB labels (resumable)
    labctl sim train DATA.xyz --out MODEL.pt [--kind mace]       train the potential
    labctl sim md --system EC=32 [--system Li+=1 ...] [--json]   dry test of an electrolyte
    labctl sim active-learn DATA.xyz --out DIR [--iterations N]  committee + xTB (DP-GEN)

Everything goes through ``sim_backend.api`` (the one door from labctl into sim_backend).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

sim = typer.Typer(no_args_is_help=True, help=__doc__.split("\n\n")[0])


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _composition(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise typer.BadParameter(f"--system takes NAME=COUNT (e.g. EC=32), got {item!r}")
        out[name.strip()] = out.get(name.strip(), 0) + int(count)
    return out


def _fail(exc: Exception) -> typer.Exit:
    print(f"error: {exc}", file=sys.stderr)
    return typer.Exit(2)


@sim.command("label")
def label_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory of the dataset (created).")],
    recipe: Annotated[str, typer.Option(help="default, tiny or a DatasetRecipe JSON.")] = "default",
    seed: Annotated[int, typer.Option()] = 0,
    fresh: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
) -> None:
    """Build electrolyte structures (rdkit), sample them (xTB MD, perturbations) and label
    them with GFN2-xTB (tblite); resumes where a previous run stopped."""
    from sim_backend.api import label
    from sim_backend.errors import SimError

    try:
        summary = label(out_dir, recipe=recipe, seed=seed, fresh=fresh, say=_say)
    except (SimError, ValueError) as exc:
        raise _fail(exc) from None
    print(json.dumps(summary, indent=1))


@sim.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled extended XYZ.")],
    out: Annotated[Path, typer.Option(help="Model file to write.")],
    epochs: Annotated[int, typer.Option()] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    hyper: Annotated[str, typer.Option(help="JSON of hyper-parameters to override.")] = "{}",
    checkpoint: Annotated[Path | None, typer.Option(help="Resumable checkpoint file.")] = None,
    kind: Annotated[
        str, typer.Option(help="Model family: moment-mlp, or mace (needs the sim-peers extra).")
    ] = "moment-mlp",
) -> None:
    """Train the potential (energy + force loss, early stopping on validation) and print
    the held-out energy and force errors against GFN2-xTB."""
    from sim_backend.api import train_model
    from sim_backend.errors import SimError

    try:
        extra: dict[str, Any] = json.loads(hyper)
        metrics = train_model(
            data, out, epochs=epochs, seed=seed, hyper=extra, checkpoint=checkpoint, say=_say,
            kind=kind,
        )  # fmt: skip
    except (SimError, ValueError) as exc:
        raise _fail(exc) from None
    print(json.dumps(metrics, indent=1, default=str))


@sim.command("md")
def md_cmd(
    system: Annotated[
        list[str], typer.Option(help="NAME=COUNT, repeatable: EC=32, or EC=24 Li+=2 PF6-=2.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Model name or file (default: shipped).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="K.")] = 313.0,
    replicas: Annotated[int, typer.Option()] = 4,
    steps: Annotated[int, typer.Option(help="Production steps (CSVR).")] = 1000,
    equil_steps: Annotated[int, typer.Option(help="Langevin equilibration steps.")] = 200,
    timestep: Annotated[float, typer.Option(help="fs.")] = 1.0,
    viscosity: Annotated[
        float | None, typer.Option(help="Pa s, for the Yeh-Hummer correction.")
    ] = None,
    density: Annotated[float | None, typer.Option(help="g/cm3 (default: liquid).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if any).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A dry test: density, self-diffusion, Li-O coordination and Nernst-Einstein
    conductivity of a box, from replicas run as one batch."""
    from sim_backend.api import dry_test
    from sim_backend.errors import SimError

    try:
        res = dry_test(
            _composition(system), model=model, temperature_k=temperature, replicas=replicas,
            steps=steps, equil_steps=equil_steps, timestep_fs=timestep,
            viscosity_pa_s=viscosity, density=density, device=device, seed=seed,
            progress=not as_json,
        )  # fmt: skip
    except (SimError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(res))
        return
    for key, value in res.items():
        print(f"{key:>24}: {json.dumps(value)}")


@sim.command("active-learn")
def active_learn_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled extended XYZ (frames are appended).")],
    out: Annotated[Path, typer.Option(help="Directory for the model and report.")],
    iterations: Annotated[int, typer.Option()] = 2,
    n_models: Annotated[int, typer.Option(help="Committee size.")] = 3,
    epochs: Annotated[int, typer.Option()] = 60,
    trust_lo: Annotated[float, typer.Option(help="eV/A")] = 0.05,
    trust_hi: Annotated[float, typer.Option(help="eV/A")] = 0.35,
    max_new_frames: Annotated[int, typer.Option()] = 24,
) -> None:
    """Committee disagreement picks MD frames for xTB labels, then the committee retrains."""
    from sim_backend.api import active_learn
    from sim_backend.errors import SimError

    cfg = {
        "iterations": iterations, "n_models": n_models, "epochs": epochs,
        "trust_lo": trust_lo, "trust_hi": trust_hi, "max_new_frames": max_new_frames,
    }  # fmt: skip
    try:
        report = active_learn(data, out, config=cfg, say=_say)
    except (SimError, ValueError) as exc:
        raise _fail(exc) from None
    print(json.dumps(report, indent=1))
