"""`labctl plans`: list the plans, run one against a lab (simulated by default)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from labctl.plans.registry import PlanSpec

plans = typer.Typer(
    no_args_is_help=True,
    help="Bluesky plans: list them, or run one against the simulated lab or a real one.",
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.5g}" if abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


@plans.command("list")
def plans_list(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per plan.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Whole docstrings.")] = False,
) -> None:
    """Every plan with its parameters (name: type = default) and documentation."""
    from labctl.plans.registry import PLANS

    if json_out:
        for spec in PLANS.values():
            typer.echo(json.dumps(spec.describe(), default=str))
        return
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    for spec in PLANS.values():
        info = spec.describe()
        required = " ".join(f"{p['name']}=..." for p in info["parameters"] if p["required"])
        usage = escape(f"{required} [key=value ...]".strip())
        console.print(
            f"[bold]{spec.name}[/bold] {usage}  [dim](needs {', '.join(spec.roles)})[/dim]"
        )
        console.print(f"  {escape(spec.summary)}")
        for prm in info["parameters"]:
            value = prm["default"]
            shown = repr(value) if isinstance(value, str) else _fmt(value)
            default = "" if prm["required"] else f" = {shown}"
            note = f"  [dim]{escape(prm['description'])}[/dim]" if prm["description"] else ""
            console.print(f"    {prm['name']}: {escape(prm['type'] + default)}{note}")
        if full:
            console.print(escape("\n".join("  " + line for line in spec.doc.splitlines()[1:])))
        console.print()


class RunProgress:
    """A RunEngine subscriber: a progress bar over the plan's main stream, one line per
    summary event, and the documents' counts for the final summary."""

    SUMMARY_STREAMS = ("doses", "composition", "conductivity", "cycles", "pulses")

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress = progress
        self.console = console
        self.task: TaskID | None = None
        self.streams: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.start: dict[str, Any] = {}
        self.stop: dict[str, Any] = {}
        self.main_stream = ""
        self.t0 = time.monotonic()

    def _say(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[dim]{time.monotonic() - self.t0:7.1f} s[/dim]  {escape(text)}")

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.start = doc
            expected = doc.get("expected_events") or {}
            self.main_stream = next(iter(expected), "")
            total = expected.get(self.main_stream)
            self.task = self.progress.add_task(
                f"{doc.get('plan_name')} {doc.get('sample_id') or ''}".strip(), total=total
            )
            self._say(f"run {doc['uid'][:8]} started: {doc.get('plan_name')}")
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = self.streams.get(doc["descriptor"], "?")
            self.counts[stream] = self.counts.get(stream, 0) + 1
            self._event(stream, doc["data"])
        elif name == "stop":
            self.stop = doc
            self._say(f"run finished: {doc['exit_status']} {doc.get('reason') or ''}".rstrip())

    def _event(self, stream: str, data: dict[str, Any]) -> None:
        if self.task is not None:
            if stream == self.main_stream:
                self.progress.advance(self.task)
            self.progress.update(self.task, description=self._describe(stream, data))
        if stream in self.SUMMARY_STREAMS:
            self._say(f"{stream}: {self._describe(stream, data)}")

    @staticmethod
    def _describe(stream: str, d: dict[str, Any]) -> str:
        if stream == "dosing":
            w = next((v for k, v in d.items() if k.endswith("-weight")), math.nan)
            return f"dosing {d.get('reagent')}: step {d.get('dose_step')}, balance {w:.4f} g"
        if stream == "doses":
            ok = "ok" if d["within_tolerance"] else "OUT OF TOLERANCE"
            return (
                f"{d['reagent']} {d['target_g']:.4f} g -> {d['actual_g']:.4f} g "
                f"({d['volume_ml']:.4f} mL, {d['steps']} steps) {ok}"
            )
        if stream == "composition":
            fr = ", ".join(
                f"{k.removeprefix('fraction_')} {v:.4f}"
                for k, v in d.items()
                if k.startswith("fraction_") and v > 0
            )
            return f"{fr}; LiPF6 {d['salt_molality']:.4f} mol/kg"
        if stream == "conductivity_readings":
            k = next((v for key, v in d.items() if key.endswith("-conductivity")), math.nan)
            t = next((v for key, v in d.items() if key.endswith("meter-temperature")), math.nan)
            return (
                f"{d.get('setpoint_c'):g} C: reading {d.get('reading')}: {k:.4g} mS/cm at {t:.2f} C"
            )
        if stream == "conductivity":
            eq = "equilibrated" if d["equilibrated"] else "NOT equilibrated"
            return (
                f"{d['conductivity_mS_cm']:.4g} mS/cm at {d['temperature_c']:.2f} C "
                f"(setpoint {d['setpoint_c']:g} C, {d['readings']} readings, {eq})"
            )
        if stream == "cycling":
            return (
                f"cycle {d['cycle']} step {d['step']}: {d['voltage']:.4f} V "
                f"{d['current']:+.3f} A {d['capacity']:.4f} Ah {d['temperature']:.1f} C"
            )
        if stream == "cycles":
            return (
                f"{d['label']}: charge {d['charge_ah']:.4f} Ah, discharge "
                f"{d['discharge_ah']:.4f} Ah, CE {d['coulombic_efficiency']:.4f}, "
                f"retention {d['retention']:.4f}"
            )
        if stream == "pulses":
            return (
                f"SOC {d['soc']:g} {d['direction']}: R0 {d['r0_ohm'] * 1e3:.3f} mOhm, "
                f"R1 {d['r1_ohm'] * 1e3:.3f} mOhm, tau1 {d['tau1_s']:.1f} s"
            )
        return f"{stream}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in list(d.items())[:4])


def _result_tables(console: Console, result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    scalars = Table(show_header=False, box=None, pad_edge=False)
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            continue
        scalars.add_row(f"  {key}", escape(_fmt(value)))
    console.print(scalars)
    for key, value in result.items():
        if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            continue
        table = Table(title=key, title_justify="left")
        columns = list(value[0])
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in value[:50]:
            table.add_row(*(escape(_fmt(row.get(c))) for c in columns))
        if len(value) > 50:
            console.print(f"  ({len(value) - 50} more rows of {key} in the run's events)")
        console.print(table)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


@plans.command(
    "run",
    context_settings={"allow_extra_args": False, "ignore_unknown_options": True},
)
def plans_run(
    name: Annotated[str, typer.Argument(help="Plan name (see `labctl plans list`).")],
    assignments: Annotated[
        list[str] | None,
        typer.Argument(help="Parameters as key=value (JSON values, or text); a.b=v nests."),
    ] = None,
    lab: Annotated[
        str | None,
        typer.Option(
            "--lab",
            help="A lab TOML (simulated), a JSON file of instrument records (real lab), or "
            "tcp://HOST:PORT (a running simulated lab's control port). Default: start the "
            "default simulated lab.",
        ),
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option(help="Simulated lab speed (default: a speed suited to the plan)."),
    ] = None,
    transport: Annotated[str, typer.Option(help="Simulated lab transport: pty or tcp.")] = "pty",
    time_scale: Annotated[
        float | None,
        typer.Option(help="Lab seconds per wall second for the plan's waits (default: speed)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the plan's messages on mock devices; run nothing."),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary last (progress goes to stderr).")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Data directory of the embedded Tiled the run is stored in "
            "(env LABCTL_DATA; default ./data/tiled; LABCTL_TILED_URL for another server).",
        ),
    ] = None,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="Store the run's documents in Tiled.")
    ] = True,
) -> None:
    """Run plan NAME with key=value parameters; show progress and a summary; the run's
    documents go to Tiled (see `labctl runs`)."""
    from labctl.plans.common import PlanParameterError
    from labctl.plans.registry import get_plan

    try:
        spec = get_plan(name)
        values = spec.parse(assignments or [])
        spec.validate(values)
    except KeyError as exc:
        raise _fail(str(exc.args[0]), 2) from None
    except PlanParameterError as exc:
        raise _fail(str(exc), 2) from None
    if transport not in ("pty", "tcp"):
        raise _fail(f"--transport: must be pty or tcp, got {transport!r}", 2)
    if dry_run:
        _dry_run(spec, values)
        return
    code = _run(spec, values, lab, speed, transport, time_scale, json_out, data, store)
    raise typer.Exit(code)


def _dry_run(spec: PlanSpec, values: dict[str, Any]) -> None:
    from bluesky import RunEngine
    from bluesky.simulators import summarize_plan

    from labctl.plans.common import PlanParameterError
    from labctl.plans.session import mock_lab

    engine = RunEngine(call_returns_result=True)
    try:
        messages = spec.dry_run(values, RE=engine)
    except PlanParameterError as exc:
        raise _fail(str(exc), 2) from None
    except Exception as exc:  # a limit check refused a setpoint: report, do not crash
        raise _fail(f"dry run refused: {type(exc).__name__}: {exc}", 1) from None
    summarize_plan(spec.build(mock_lab(engine), values))  # type: ignore[no-untyped-call]
    counts: dict[str, int] = {}
    for msg in messages:
        counts[msg.command] = counts.get(msg.command, 0) + 1
    typer.echo(
        f"dry run OK: {len(messages)} messages ("
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + "); limits checked"
    )


def _run(
    spec: PlanSpec,
    values: dict[str, Any],
    lab: str | None,
    speed: float | None,
    transport: str,
    time_scale: float | None,
    json_out: bool,
    data: Path | None = None,
    store_runs: bool = True,
) -> int:
    from bluesky import RunEngine
    from bluesky.utils import RunEngineInterrupted
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from labctl.plans.common import PlanParameterError
    from labctl.plans.session import LabSourceError, open_lab
    from labctl.simlab import SimulatedLabError

    console = Console(stderr=json_out, highlight=False)
    engine = RunEngine(call_returns_result=True)
    store = None
    if store_runs:
        from labctl.data import DataConfig, DataConfigError, DataError, open_store

        try:
            config = DataConfig.from_env(directory=data)
            console.print(
                f"[dim]run data: Tiled ({config.url or config.directory.resolve()})[/dim]"
            )
            store = open_store(config)
        except (DataConfigError, DataError) as exc:
            console.print(f"[red]{escape(str(exc))}[/red] (--no-store runs without Tiled)")
            return 2
        store.subscribe(engine)
    run_speed = speed if speed is not None else (spec.sim_speed if lab is None else None)
    t0 = time.monotonic()
    try:
        with open_lab(
            lab,
            RE=engine,
            speed=run_speed,
            transport=transport,
            time_scale=time_scale,
            progress=lambda text: console.print(f"[dim]{escape(text)}[/dim]"),
        ) as session:
            session.devices.require(*spec.roles)
            plan = spec.build(
                session.devices,
                values,
                reagents=session.reagents,
                time_scale=session.time_scale,
            )
            console.print(f"[bold]{spec.name}[/bold] on {escape(session.source)}")
            progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            watcher = RunProgress(progress, console)
            result: Any = None
            error: BaseException | None = None
            with progress:
                try:
                    outcome = engine(plan, watcher)  # type: ignore[arg-type]
                    result = getattr(outcome, "plan_result", None)
                except RunEngineInterrupted:
                    # Ctrl-C paused the RunEngine: end the run cleanly (safe state).
                    engine.abort("interrupted from the command line")  # type: ignore[no-untyped-call]
                except Exception as exc:  # the run already says why (stop document)
                    error = exc
    except (LabSourceError, SimulatedLabError, LookupError, PlanParameterError) as exc:
        # Bad arguments (parameters, --lab, instruments the lab lacks): 2; a lab that
        # did not start or connect: 3.
        console.print(f"[red]{escape(str(exc))}[/red]")
        if store is not None:
            store.close()
        return 3 if isinstance(exc, SimulatedLabError) else 2
    if store is not None:
        store.close()  # waits until Tiled holds every document
    elapsed = time.monotonic() - t0
    status = watcher.stop.get("exit_status", "fail" if error else "unknown")
    reason = watcher.stop.get("reason") or (str(error) if error else "")
    colour = "green" if status == "success" else "red"
    console.print(
        f"\n[bold]{spec.name}[/bold]: [{colour}]{status}[/{colour}] {escape(reason)}".rstrip()
    )
    uid = watcher.start.get("uid", "")
    console.print(f"  run uid {uid}  ({elapsed:.1f} s wall)")
    if store is not None and uid:
        console.print(f"  stored in Tiled: labctl runs show {uid[:8]}")
    if watcher.counts:
        console.print("  events: " + ", ".join(f"{k} {v}" for k, v in watcher.counts.items()))
    if isinstance(result, dict):
        _result_tables(console, result)
    if json_out:
        summary = {
            "plan": spec.name,
            "parameters": watcher.start.get("plan_args", values),
            "lab": session.source,
            "run_uid": uid,
            "exit_status": status,
            "reason": reason,
            "elapsed_s": elapsed,
            "events": watcher.counts,
            "result": result,
        }
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0 if status == "success" else 1
