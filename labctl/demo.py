"""`make demo`: the main job on embedded defaults.

Starts the embedded Tiled server (SQLite under ``$LABCTL_DATA``, default ./data/tiled)
and the simulated lab (``labctl mocks serve`` as a separate process, devices over real
ptys); makes two electrolytes gravimetrically and measures each one's conductivity at
three temperatures; then cycles one cell filled with the first electrolyte for a few
time-accelerated cycles. Every document goes to Tiled through the journaled writer.
Prints progress, the results next to the simulator's ground truth, where the data is and
how to read it; writes a PNG of the measurements.

edge_bms runs beside the lab: an in-process MQTT broker (amqtt, the ``edge-demo`` extra)
on a free port, the cycler told to publish its channels' telemetry there (a lab config
override), and the edge_bms service estimating them live with the simulated cell's own
model (``labctl-sim-5ah``); the report sets its SOC against the simulator's ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import socket
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labctl.recipes import Recipe

DEMO_RECIPES: tuple[tuple[str, Recipe, str], ...] = (
    ("demo-EC-DMC", Recipe(fractions={"EC": 0.5, "DMC": 0.5}, salt_molality=1.0, solvent_g=4.0),
     "rack/1"),
    ("demo-EC-EMC", Recipe(fractions={"EC": 0.3, "EMC": 0.7}, salt_molality=1.2, solvent_g=4.0),
     "rack/2"),
)  # fmt: skip
DEMO_TEMPERATURES_C = (15.0, 25.0, 40.0)
# sim_backend's dry test of the campaign's best candidate: a small box (12-16 solvent
# molecules, ~140-200 atoms), 2 replicas x 300 steps of 1 fs on CPU (~10-15 s).
DEMO_DRY_TEST: dict[str, Any] = {
    "enabled": True, "replicas": 2, "steps": 300, "equil_steps": 100,
    "n_solvent": (12, 16), "device": "cpu",
}  # fmt: skip
ELECTROLYTE_SPEED = 500.0
CYCLING_SPEED = 4000.0


class Progress:
    """A RunEngine subscriber that prints one line per meaningful document."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.streams: dict[str, str] = {}

    def _t(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f} s]"

    def on_msg(self, msg: Any) -> None:
        """Print what the plan asks instruments to do (robot moves, setpoints)."""
        if msg.command == "set" and msg.obj is not None:
            name = msg.obj.name
            if name.endswith("transfer"):
                print(f"{self._t()}   robot: vial {msg.args[0][0]} -> {msg.args[0][1]}", flush=True)
            elif name.endswith(("setpoint", "temperature")):
                print(f"{self._t()}   {name} -> {msg.args[0]}", flush=True)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        t = self._t()
        if name == "start":
            what = doc.get("sample_id") or doc.get("cell_id") or ""
            print(f"{t} run {doc['uid'][:8]} {doc.get('plan_name')} {what} started", flush=True)
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = self.streams.get(doc["descriptor"], "?")
            data = doc["data"]
            if stream == "doses":
                print(
                    f"{t}   dosed {data.get('reagent')}: {data.get('actual_g', 0):.4f} g "
                    f"(target {data.get('target_g', 0):.4f} g)",
                    flush=True,
                )
            elif stream == "conductivity":
                print(
                    f"{t}   conductivity {data['conductivity_mS_cm']:7.3f} mS/cm at "
                    f"{data['temperature_c']:5.2f} C",
                    flush=True,
                )
            elif stream == "cycles":
                print(
                    f"{t}   {data['label']}: {data['discharge_ah'] * 1e3:7.2f} mAh out, "
                    f"CE {data['coulombic_efficiency']:.4f}",
                    flush=True,
                )
        elif name == "stop":
            print(f"{t} run finished: {doc['exit_status']} {doc.get('reason') or ''}", flush=True)


# -- edge_bms beside the lab -----------------------------------------------------------------
EDGE_CELL = "labctl-sim-5ah"  # the simulated cell's model (scripts/characterize_mock_cell.py)
# The shipped correction network learned the LG M50 DFN's residuals against the lg-m50 model;
# this cell and model are another pair, so the plain filter runs.
EDGE_CORRECTION = "none"
TELEMETRY_PERIOD_S = 30.0  # lab seconds between samples (133 per wall second at 4000x)
SETTLE_S = 600.0  # lab seconds left out of the error figures (the filter converging)
CYCLER_CHANNELS = 8  # the cycler simulator's default


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml(data: dict[str, Any]) -> str:
    """A lab config as TOML: scalars first, then arrays of tables (inline sub-tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not _is_table_list(v)]
    for k, v in data.items():
        if _is_table_list(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _default_lab_path() -> Path:
    """The simulated lab's default config file, found without importing the simulators."""
    spec = importlib.util.find_spec("hardware_mocks")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("hardware_mocks is not installed: no default lab config")
    return Path(spec.origin).parent / "default_lab.toml"


def lab_with_telemetry(
    lab_config: Path | None, url: str, directory: Path
) -> tuple[Path, list[str]]:
    """A copy of the lab config whose cyclers publish telemetry to ``url``; with the pack
    ids they will publish as (``<cycler>-ch<N>``)."""
    source = lab_config or _default_lab_path()
    data = tomllib.loads(Path(source).read_text())
    packs: list[str] = []
    for inst in data.get("instruments", []):
        if inst.get("kind") != "cycler":
            continue
        options = inst.setdefault("options", {})
        options.update(telemetry_url=url, telemetry_prefix="bms/v1",
                       telemetry_period_s=TELEMETRY_PERIOD_S)  # fmt: skip
        n = int(options.get("channels", CYCLER_CHANNELS))
        packs += [f"{inst['name']}-ch{k}" for k in range(1, n + 1)]
    path = directory / "lab-with-telemetry.toml"
    path.write_text(f"# {source} with the cyclers' telemetry on (labctl demo)\n" + _toml(data))
    return path, packs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class EdgeBeside:
    """Broker + edge_bms service + a collector of state and truth, on a thread of their own
    (the RunEngine has the main thread)."""

    def __init__(self, packs: list[str], port: int) -> None:
        self.packs = packs
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        # (pack, seq) -> message; one estimate per telemetry sample, one truth per sample
        self.states: dict[tuple[str, int], dict[str, Any]] = {}
        self.truth: dict[tuple[str, int], dict[str, Any]] = {}
        self.errors: dict[str, int] = {}  # the service's rejections, by reason
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="edge-bms", daemon=True)

    def start(self, timeout: float = 20.0) -> EdgeBeside:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"edge_bms beside the lab did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)

    def wait_quiet(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
        """Until no state arrived for ``quiet_s`` (the service caught up), at most ``limit_s``."""
        end = time.monotonic() + limit_s
        n = -1
        while time.monotonic() < end and n != len(self.states):
            n = len(self.states)
            time.sleep(quiet_s)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); the demo goes on without it
            self._error = exc
            self._ready.set()

    def config(self) -> Any:
        from edge_bms.service.config import (
            BrokerConfig,
            CheckpointConfig,
            EstimatorConfig,
            LimitsConfig,
            PackConfig,
            ServiceConfig,
        )

        return ServiceConfig(
            instance="labctl-demo",
            broker=BrokerConfig(url=self.url, qos=0),
            packs=[PackConfig(id=p, n_cells=1, cell=EDGE_CELL) for p in self.packs],
            # SOP (a bisection over the horizon) every 10 lab minutes, not every sample: at
            # 4000x a sample arrives every 7.5 ms of wall time
            estimator=EstimatorConfig(correction=EDGE_CORRECTION, sop_interval_s=600.0),
            checkpoint=CheckpointConfig(path=None),
            # ts is lab time, which runs up to 4000x ahead of the wall clock
            limits=LimitsConfig(max_future_s=None),
        )

    async def _main(self) -> None:
        import aiomqtt

        from edge_bms.service.cli import start_broker
        from edge_bms.service.mqtt import run_service

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        broker = await start_broker(self.port)
        service_ready = asyncio.Event()
        service = asyncio.create_task(
            run_service(self.config(), stop=self._stop, ready=service_ready.set)
        )
        try:
            async with aiomqtt.Client("127.0.0.1", self.port, identifier="labctl-demo-soc") as c:
                await c.subscribe("bms/v1/+/state")
                await c.subscribe("sim/v1/+/truth")
                await c.subscribe("bms/v1/+/errors")
                await asyncio.wait_for(service_ready.wait(), 15.0)
                self._ready.set()
                collect = asyncio.create_task(self._collect(c))
                await self._stop.wait()
                collect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
        finally:
            self._stop.set()
            with contextlib.suppress(Exception):  # shutting down: nothing left to report
                await asyncio.wait_for(service, 5.0)
            await broker.shutdown()

    async def _collect(self, client: Any) -> None:
        async for m in client.messages:
            try:
                doc = json.loads(m.payload)
                pack, kind = m.topic.value.split("/")[-2:]
                if kind == "errors":
                    reason = str(doc.get("code", "?"))
                    self.errors[reason] = self.errors.get(reason, 0) + 1
                    continue
                key = (pack, int(doc["seq"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            (self.states if kind == "state" else self.truth)[key] = doc

    def series(self) -> dict[str, dict[str, np.ndarray]]:
        """Per pack with estimates: lab time, estimated and true SOC, paired by seq."""
        out: dict[str, dict[str, Any]] = {}
        for pack in self.packs:
            seqs = sorted(s for p, s in self.states if p == pack and (p, s) in self.truth)
            if not seqs:
                continue
            out[pack] = {
                "ts": np.array([self.truth[(pack, s)]["ts"] for s in seqs]),
                "est": np.array([self.states[(pack, s)]["soc"][0] for s in seqs]),
                "true": np.array([self.truth[(pack, s)]["soc"] for s in seqs]),
                "model": self.states[(pack, seqs[-1])].get("model", {}),
                "n_states": sum(1 for p, _ in self.states if p == pack),
                "n_truth": sum(1 for p, _ in self.truth if p == pack),
            }
        return out


def soc_table(series: dict[str, dict[str, Any]]) -> list[str]:
    """The report's lines: estimated against true SOC per pack."""
    lines = [f"  {'pack':12s} {'states':>6s} {'truth':>6s} {'SOC RMSE':>9s} {'max err':>8s} "
             f"{'final est':>9s} {'true':>7s}  model"]  # fmt: skip
    for pack, s in series.items():
        late = s["ts"] >= s["ts"][0] + SETTLE_S
        err = (s["est"] - s["true"])[late] if late.any() else np.array([math.nan])
        rmse = float(np.sqrt(np.mean(err**2)))
        model = s["model"]
        lines.append(
            f"  {pack:12s} {s['n_states']:6d} {s['n_truth']:6d} {100 * rmse:7.2f} % "
            f"{100 * float(np.abs(err).max()):6.2f} % {100 * s['est'][-1]:7.1f} % "
            f"{100 * s['true'][-1]:5.1f} %  {model.get('cell')} ({model.get('method')}, "
            f"correction {model.get('correction') or 'none'})"
        )
    return lines


@dataclass
class DemoResult:
    campaign_id: str
    samples: list[dict[str, Any]]
    cycling: dict[str, Any]
    run_uids: list[str]
    data_directory: Path
    tiled_url: str
    plot: Path | None


def _plot(
    samples: Sequence[dict[str, Any]],
    cycling_rows: Any,
    path: Path,
    soc: dict[str, dict[str, Any]] | None = None,
) -> Path | None:
    """Conductivity vs temperature per electrolyte, the cell's voltage over time, and
    edge_bms's SOC estimate against the simulator's truth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `models` extra is not installed: no plot, say so
        print("(matplotlib not installed: no plot)")
        return None
    fig, axes = plt.subplots(1, 3 if soc else 2, figsize=(16 if soc else 11, 4.2))
    ax1, ax2 = axes[0], axes[1]
    for s in samples:
        pts = s["points"]
        ax1.plot([p["temperature_c"] for p in pts], [p["conductivity_mS_cm"] for p in pts], "o-",
                 label=f"{s['name']} (measured)")  # fmt: skip
        ax1.plot([p["temperature_c"] for p in pts], [p["truth_mS_cm"] for p in pts], "k:",
                 alpha=0.6)  # fmt: skip
    ax1.set_xlabel("temperature (C)")
    ax1.set_ylabel("conductivity (mS/cm)")
    ax1.set_title("Electrolytes (dotted: simulator ground truth)")
    ax1.legend()
    if cycling_rows is not None and len(cycling_rows):
        # The plan's lab time is a data key named "time"; Tiled renames it "time_".
        lab_s = cycling_rows["time_"] if "time_" in cycling_rows else cycling_rows["time"]
        ax2.plot((lab_s - lab_s.iloc[0]) / 3600.0, cycling_rows["voltage"], lw=0.8)
        ax2.set_xlabel("lab time (h)")
        ax2.set_ylabel("cell voltage (V)")
        ax2.set_title("Cell cycling (quick protocol)")
    if soc:
        ax3 = axes[2]
        for pack, s in soc.items():
            h = (s["ts"] - s["ts"][0]) / 3600.0
            ax3.plot(h, 100 * s["true"], "k-", lw=1.0, label=f"{pack} true")
            ax3.plot(h, 100 * s["est"], "--", lw=1.0, label=f"{pack} edge_bms")
        ax3.set_xlabel("lab time (h)")
        ax3.set_ylabel("SOC (%)")
        ax3.set_title("edge_bms over MQTT vs the simulator's SOC")
        ax3.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(
    *,
    speed: float = ELECTROLYTE_SPEED,
    cycling_speed: float = CYCLING_SPEED,
    lab_config: Path | None = None,
    transport: str = "pty",
    data_directory: Path | None = None,
    campaign_budget: int = 12,
    campaign_batch: int = 4,
    edge_bms: bool = True,
) -> int:
    """The demo; returns the process exit code (0: every dose in tolerance, every run ok).
    ``edge_bms``: run the edge_bms service beside the lab on the cycler's telemetry."""
    from bluesky import RunEngine

    from labctl.data import DataConfig, open_store
    from labctl.plans.cycling import cycle_cell
    from labctl.plans.electrolyte import prepare_and_measure
    from labctl.plans.session import open_lab

    config = DataConfig.from_env(directory=data_directory)
    campaign = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"Run data: embedded Tiled in {config.directory.resolve()} (starting it if needed)...")
    store = open_store(config)
    print(f"  Tiled at {store.url}")
    engine = RunEngine(call_returns_result=True)
    progress = Progress()
    engine.subscribe(progress)  # type: ignore[no-untyped-call]
    store.subscribe(engine)
    engine.msg_hook = progress.on_msg  # type: ignore[assignment]
    uids: list[str] = []
    samples: list[dict[str, Any]] = []
    ok = True
    tmp = Path(tempfile.mkdtemp(prefix="labctl-demo-"))
    edge = _start_edge(lab_config, tmp) if edge_bms else None
    if edge is not None:
        lab_config = edge[1]
    with open_lab(
        str(lab_config) if lab_config else None,
        RE=engine,
        speed=speed,
        transport=transport,
        progress=lambda text: print(f"  {text}", flush=True),
    ) as session:
        control = session.control
        assert control is not None  # a simulated lab
        for rec in session.records:
            print(f"  {rec['name']:8s} {rec['protocol']:12s} {rec['url']}")
        for name, recipe, station in DEMO_RECIPES:
            print(f"\n== {name}: {recipe.name}, then conductivity at "
                  f"{', '.join(f'{t:g}' for t in DEMO_TEMPERATURES_C)} C")  # fmt: skip
            result: dict[str, Any] = {}
            outcome = engine(
                prepare_and_measure(
                    session.devices,
                    recipe,
                    session.reagents,
                    vial_station=station,
                    temperature_c=DEMO_TEMPERATURES_C,
                    mix_time_s=120.0,
                    equilibrate_s=300.0,
                    sample_id=name,
                    campaign_id=campaign,
                    time_scale=session.time_scale,
                    results=result,
                )
            )
            uids.extend(outcome.run_start_uids)  # type: ignore[union-attr]
            ok &= outcome.exit_status == "success"  # type: ignore[union-attr]
            vial = control({"op": "state"})["state"]["stations"][station]
            for p in result["points"]:
                truth = {"op": "conductivity", "vial": vial, "temperature_c": p["temperature_c"]}
                p["truth_mS_cm"] = control(truth)["conductivity_mS_cm"]
            samples.append({"name": name, "station": station, **result})

        print(f"\n== cycling one cell (electrolyte {DEMO_RECIPES[0][0]}) at {cycling_speed:g}x")
        control({"op": "speed", "speed": cycling_speed})
        outcome = engine(
            cycle_cell(
                session.devices,
                1,
                "quick",
                cell_id="demo-cell-1",
                electrolyte_station=DEMO_RECIPES[0][2],
                sample_id=DEMO_RECIPES[0][0],
                campaign_id=campaign,
                time_scale=cycling_speed,
            )
        )
        uids.extend(outcome.run_start_uids)  # type: ignore[union-attr]
        ok &= outcome.exit_status == "success"  # type: ignore[union-attr]
        cycling: dict[str, Any] = outcome.plan_result or {}  # type: ignore[union-attr]
        soc: dict[str, dict[str, Any]] | None = None
        if edge is not None:  # the cycling is what it is there for: stop it now
            edge[0].wait_quiet()
            edge[0].stop()
            soc = edge[0].series()

        closed_loop = None
        if campaign_budget > 0:
            control({"op": "speed", "speed": speed})  # back to the electrolytes' pace
            closed_loop = _campaign(session, store, campaign, campaign_budget, campaign_batch)

    store.flush()
    rows = store.read(uids[-1], "cycling") if uids else None
    plot = _plot(samples, rows, config.directory.resolve() / "demo" / f"{campaign}.png", soc)
    _report(samples, cycling, store, campaign, uids, plot)
    if soc is not None:
        print(f"\nedge_bms beside the lab (MQTT telemetry every {TELEMETRY_PERIOD_S:g} s of lab "
              f"time; SOC errors after the first {SETTLE_S / 60:g} min):")  # fmt: skip
        print("\n".join(soc_table(soc)) if soc else "  no estimates received")
        if edge is not None and edge[0].errors:
            print(f"  telemetry the service rejected: {edge[0].errors}")
    if closed_loop is not None:
        print(closed_loop)
    ok &= all(d["within_tolerance"] for s in samples for d in s["doses"])
    store.close()
    return 0 if ok else 1


def _start_edge(lab_config: Path | None, tmp: Path) -> tuple[EdgeBeside, Path] | None:
    """Broker and edge_bms service up, and the lab config that points the cycler at them;
    None (the demo runs without) when amqtt, the ``edge-demo`` extra, is missing."""
    if importlib.util.find_spec("amqtt") is None:
        print("(amqtt not installed: edge_bms does not run beside the lab; "
              "pip install -e '.[edge-demo]')")  # fmt: skip
        return None
    port = _free_port()
    path, packs = lab_with_telemetry(lab_config, f"mqtt://127.0.0.1:{port}", tmp)
    if not packs:
        print("(the lab has no cycler: edge_bms does not run beside it)")
        return None
    t = time.monotonic()
    edge = EdgeBeside(packs, port).start()
    print(f"edge_bms beside the lab: broker {edge.url} (amqtt, in-process), service for "
          f"{len(packs)} cycler channels, cell {EDGE_CELL}, correction {EDGE_CORRECTION} "
          f"({time.monotonic() - t:.1f} s)")  # fmt: skip
    return edge, path


def _campaign(session: Any, store: Any, campaign: str, budget: int, batch: int) -> str:
    """A short closed-loop campaign (BoTorch; the property model as prior once trained)
    on the same lab; returns the lines to print at the end."""
    from labctl.campaign.dry_test import DryTestConfig, describe
    from labctl.campaign.report import write_report
    from labctl.campaign.runner import Campaign, CampaignConfig

    cfg = CampaignConfig(
        campaign_id=f"{campaign}-dmta", budget=budget, batch_size=batch, optimizer="bo",
        dry_test=DryTestConfig(**DEMO_DRY_TEST if importlib.util.find_spec("sim_backend") else {}),
    )  # fmt: skip
    print(f"\n== closed loop: campaign {cfg.id}, {budget} experiments in batches of {batch}")
    t = time.monotonic()
    result = Campaign(cfg, session, store, say=lambda text: print(text, flush=True)).run()
    summary = result.summary()
    out = store.config.directory.resolve() / "demo" / cfg.id
    files = write_report(result.state, out)
    best = summary["best"] or {}
    fr = ", ".join(f"{k} {v:.3f}" for k, v in best.get("fractions", {}).items())
    dry = [line for test in result.state.dry_tests for line in describe(test)]
    if not cfg.dry_test.enabled:
        dry = ["(sim_backend not installed: no dry test of the best candidate)"]
    return (
        f"Campaign {cfg.id}: {summary['n_experiments']} experiments in {summary['batches']} "
        f"batches, {time.monotonic() - t:.0f} s; best {best.get('conductivity_mS_cm', 0):.3f} "
        f"mS/cm ({fr}; LiPF6 {best.get('salt_molality', 0):.3f} mol/kg)\n"
        + "".join(f"  {line}\n" for line in dry)
        + f"  report: {files[-1]}\n  labctl campaign status {cfg.id}"
    )


def _report(
    samples: Sequence[dict[str, Any]],
    cycling: dict[str, Any],
    store: Any,
    campaign: str,
    uids: Sequence[str],
    plot: Path | None,
) -> None:
    print("\nElectrolytes (doses by the balance; conductivity vs the simulator's ground truth):")
    for s in samples:
        worst = max(abs(d["actual_g"] - d["target_g"]) for d in s["doses"])
        fr = ", ".join(f"{k} {v:.3f}" for k, v in s["fractions"].items())
        print(f"  {s['name']}: {fr}; LiPF6 {s['salt_molality']:.3f} mol/kg "
              f"({len(s['doses'])} doses, worst {worst * 1e3:.1f} mg off)")  # fmt: skip
        for p in s["points"]:
            err = (p["conductivity_mS_cm"] / p["truth_mS_cm"] - 1) * 100
            print(f"    {p['temperature_c']:6.2f} C  {p['conductivity_mS_cm']:7.3f} mS/cm  "
                  f"(truth {p['truth_mS_cm']:7.3f}, {err:+.1f} %)")  # fmt: skip
    print(f"Cell: {cycling.get('stop_reason', '?')}")
    for c in cycling.get("cycles", []):
        print(f"    {c['label']:22s} {c['discharge_ah'] * 1e3:8.2f} mAh  "
              f"CE {c['coulombic_efficiency']:.4f}  retention {c['retention']:.4f}")  # fmt: skip
    directory = store.config.directory.resolve()
    print(f"\nEverything is in Tiled ({store.url}, data in {directory}):")
    print(f"  campaign {campaign}: {len(uids)} runs")
    data = f"LABCTL_DATA={directory} " if store.config.directory != Path("data/tiled") else ""
    print(f"  {data}labctl runs list --campaign {campaign}")
    print(f"  {data}labctl runs show {uids[0][:8] if uids else 'UID'}")
    print(f"  {data}labctl runs export {uids[-1][:8] if uids else 'UID'} --format csv")
    print("  Python: from labctl.data import open_store; store = open_store(); "
          f"store.read(store.runs(campaign={campaign!r})[0].uid, 'conductivity')")  # fmt: skip
    print(
        "  The server keeps running for those commands; stop it with `labctl runs server --stop`."
    )
    if plot is not None:
        print(f"Plot: {plot}")
