"""`labctl queue`: run plans remotely through bluesky-queueserver (start, status, add, stop)."""

from __future__ import annotations

import json
import re
import signal
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from labctl.queue import QueueConfig

queue = typer.Typer(
    no_args_is_help=True,
    help="Queue plans on an RE Manager (bluesky-queueserver) that drives the lab.",
)

Host = Annotated[str, typer.Option(help="Host of the RE Manager's 0MQ ports.")]
ControlPort = Annotated[int, typer.Option(help="0MQ control port of the RE Manager.")]
InfoPort = Annotated[int, typer.Option(help="0MQ console (info) port of the RE Manager.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _config(host: str, control_port: int, info_port: int, **more: Any) -> QueueConfig:
    from pydantic import ValidationError

    from labctl.queue import QueueConfig

    try:
        return QueueConfig(host=host, control_port=control_port, info_port=info_port, **more)
    except ValidationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def default_prefix(lab: str | None) -> str:
    """A Redis key prefix naming the lab: ``labctl_sim`` for the default simulated lab,
    else ``labctl_`` + the lab file's stem or the control address."""
    if lab is None:
        return "labctl_sim"
    name = Path(lab).stem if not lab.startswith("tcp://") else lab.removeprefix("tcp://")
    return ("labctl_" + re.sub(r"[^A-Za-z0-9_\-]+", "_", name))[:64]


@queue.command("start")
def start(
    lab: Annotated[
        str | None,
        typer.Option(
            help="Lab: a lab TOML (simulated), a JSON file of instrument records, or "
            "tcp://HOST:PORT of a running simulated lab. Default: the simulated lab."
        ),
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Time acceleration of the simulated lab.")
    ] = None,
    redis: Annotated[str, typer.Option(help="Redis HOST:PORT keeping the queue.")] = (
        "127.0.0.1:6379"
    ),
    prefix: Annotated[
        str | None,
        typer.Option(help="Redis key prefix (one per lab; default from the lab's name)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Data directory of the embedded Tiled server.")
    ] = None,
    host: Host = "127.0.0.1",
    control_port: ControlPort = 60615,
    info_port: InfoPort = 60625,
    open_environment: Annotated[
        bool, typer.Option("--open/--no-open", help="Open the RE environment at once.")
    ] = True,
) -> None:
    """Start the lab (simulated by default) and an RE Manager driving it; run until Ctrl-C.

    Prints one JSON line with the addresses once the manager answers.
    """
    from labctl.plans.session import DEFAULT_SPEED
    from labctl.queue import QueueError, QueueManager
    from labctl.simlab import SimulatedLabError, SimulatedLabProcess

    config = _config(
        host, control_port, info_port, redis_addr=redis, name_prefix=prefix or default_prefix(lab)
    )
    env = {"LABCTL_DATA": str(data)} if data is not None else {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ExitStack() as stack:
        try:
            if lab is None or lab.endswith(".toml"):
                run_speed = speed if speed is not None else DEFAULT_SPEED
                typer.echo(
                    f"starting the simulated lab ({lab or 'default'}, {run_speed:g}x)", err=True
                )
                sim = stack.enter_context(
                    SimulatedLabProcess(config=lab, transport="tcp", speed=run_speed)
                )
                source, speed = str(sim.records[0]["control"]), run_speed
            else:
                source = lab
            typer.echo(
                f"starting the RE Manager (Redis {redis}, prefix {config.name_prefix})", err=True
            )
            manager = stack.enter_context(QueueManager(config, lab=source, speed=speed, env=env))
            api = stack.enter_context(config.connect())
            if open_environment:
                typer.echo("opening the RE environment (connecting the lab)", err=True)
                api.environment_open()
                api.wait_for_idle(timeout=120)
                if not api.status()["worker_environment_exists"]:
                    raise QueueError(f"environment did not open: {manager.tail()}")
        except (QueueError, SimulatedLabError) as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
        info = {
            "control": config.control_addr,
            "info": config.info_addr,
            "redis": redis,
            "prefix": config.name_prefix,
            "lab": source,
            "log": str(manager.log),
        }
        typer.echo(json.dumps(info), nl=True)
        typer.echo("queue ready; Ctrl-C stops it", err=True)
        while not stop.wait(0.5):
            if manager.proc is not None and manager.proc.poll() is not None:
                typer.echo(f"RE Manager exited: {manager.tail()}", err=True)
                raise typer.Exit(1)
        if api.status()["worker_environment_exists"]:
            api.environment_close()
            api.wait_for_idle(timeout=60)
        typer.echo("stopped", err=True)


@queue.command("status")
def status(
    host: Host = "127.0.0.1",
    control_port: ControlPort = 60615,
    info_port: InfoPort = 60625,
    as_json: AsJson = False,
) -> None:
    """The manager's state, queue and history sizes, and the plans it accepts."""
    config = _config(host, control_port, info_port)
    with config.connect(timeout_recv=5.0) as api:
        try:
            st = api.status()
            plans = sorted(api.plans_allowed()["plans_allowed"])
            queued = api.queue_get()["items"]
        except Exception as exc:  # the API raises its own timeout and request errors
            typer.echo(f"no RE Manager answering at {config.control_addr}: {exc}", err=True)
            raise typer.Exit(1) from None
    out = {
        "manager_state": st["manager_state"],
        "environment_open": st["worker_environment_exists"],
        "items_in_queue": st["items_in_queue"],
        "items_in_history": st["items_in_history"],
        "running_item": st.get("running_item_uid"),
        "queue": [{"name": i["name"], "kwargs": i.get("kwargs", {})} for i in queued],
        "plans": plans,
    }
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(
        f"{config.control_addr}: {out['manager_state']}, environment "
        f"{'open' if out['environment_open'] else 'closed'}, "
        f"{out['items_in_queue']} queued, {out['items_in_history']} in history"
    )
    for item in out["queue"]:
        typer.echo(f"  queued: {item['name']} {json.dumps(item['kwargs'])}")
    typer.echo(f"plans: {', '.join(plans)}")


@queue.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Plan name (see `labctl plans list`).")],
    assignments: Annotated[
        list[str] | None, typer.Argument(help="Parameters as key=value.")
    ] = None,
    start_queue: Annotated[
        bool, typer.Option("--start", help="Start the queue after adding.")
    ] = False,
    host: Host = "127.0.0.1",
    control_port: ControlPort = 60615,
    info_port: InfoPort = 60625,
) -> None:
    """Validate a plan's parameters and queue it; invalid ones are refused (exit 2)."""
    from labctl.plans.common import PlanParameterError
    from labctl.plans.registry import get_plan
    from labctl.queue import QueueError, add_plan

    try:
        values = get_plan(name).parse(assignments or []) if name != "noop" else {}
        if name != "noop":
            get_plan(name).validate(values)
    except (KeyError, PlanParameterError) as exc:
        typer.echo(str(exc).strip('"'), err=True)
        raise typer.Exit(2) from None
    config = _config(host, control_port, info_port)
    with config.connect(timeout_recv=5.0) as api:
        try:
            item = add_plan(api, name, values)
            if start_queue:
                api.queue_start()
        except QueueError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # the API raises its own timeout and request errors
            typer.echo(f"no RE Manager answering at {config.control_addr}: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps({"item_uid": item["item_uid"], "name": name, "kwargs": values}))


@queue.command("stop")
def stop(
    now: Annotated[
        bool, typer.Option("--now", help="Abort the running plan instead of finishing it.")
    ] = False,
    host: Host = "127.0.0.1",
    control_port: ControlPort = 60615,
    info_port: InfoPort = 60625,
) -> None:
    """Stop the queue after the running plan (or abort it with --now)."""
    config = _config(host, control_port, info_port)
    with config.connect(timeout_recv=5.0) as api:
        st = api.status()
        if now and st["manager_state"] == "executing_queue":
            api.re_pause(option="immediate")
            api.wait_for_idle_or_paused(timeout=60)
            api.re_abort()
            typer.echo("running plan aborted; queue stopped")
        elif st["manager_state"] == "executing_queue":
            api.queue_stop()
            typer.echo("queue stops after the running plan")
        else:
            typer.echo(f"nothing running ({st['manager_state']})")


if __name__ == "__main__":
    queue()
