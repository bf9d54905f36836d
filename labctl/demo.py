"""`make demo`: the main job on embedded defaults.

Starts the embedded Tiled server (SQLite under ``$LABCTL_DATA``, default ./data/tiled)
and the simulated lab (``labctl mocks serve`` as a separate process, devices over real
ptys); makes two electrolytes gravimetrically and measures each one's conductivity at
three temperatures; then cycles one cell filled with the first electrolyte for a few
time-accelerated cycles. Every document goes to Tiled through the journaled writer.
Prints progress, the results next to the simulator's ground truth, where the data is and
how to read it; writes a PNG of the measurements.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.recipes import Recipe

DEMO_RECIPES: tuple[tuple[str, Recipe, str], ...] = (
    ("demo-EC-DMC", Recipe(fractions={"EC": 0.5, "DMC": 0.5}, salt_molality=1.0, solvent_g=4.0),
     "rack/1"),
    ("demo-EC-EMC", Recipe(fractions={"EC": 0.3, "EMC": 0.7}, salt_molality=1.2, solvent_g=4.0),
     "rack/2"),
)  # fmt: skip
DEMO_TEMPERATURES_C = (15.0, 25.0, 40.0)
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


@dataclass
class DemoResult:
    campaign_id: str
    samples: list[dict[str, Any]]
    cycling: dict[str, Any]
    run_uids: list[str]
    data_directory: Path
    tiled_url: str
    plot: Path | None


def _plot(samples: Sequence[dict[str, Any]], cycling_rows: Any, path: Path) -> Path | None:
    """Conductivity vs temperature per electrolyte, and the cell's voltage over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `models` extra is not installed: no plot, say so
        print("(matplotlib not installed: no plot)")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
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
) -> int:
    """The demo; returns the process exit code (0: every dose in tolerance, every run ok)."""
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

        closed_loop = None
        if campaign_budget > 0:
            control({"op": "speed", "speed": speed})  # back to the electrolytes' pace
            closed_loop = _campaign(session, store, campaign, campaign_budget, campaign_batch)

    store.flush()
    rows = store.read(uids[-1], "cycling") if uids else None
    plot = _plot(samples, rows, config.directory.resolve() / "demo" / f"{campaign}.png")
    _report(samples, cycling, store, campaign, uids, plot)
    if closed_loop is not None:
        print(closed_loop)
    ok &= all(d["within_tolerance"] for s in samples for d in s["doses"])
    store.close()
    return 0 if ok else 1


def _campaign(session: Any, store: Any, campaign: str, budget: int, batch: int) -> str:
    """A short closed-loop campaign (BoTorch; the property model as prior once trained)
    on the same lab; returns the lines to print at the end."""
    from labctl.campaign.report import write_report
    from labctl.campaign.runner import Campaign, CampaignConfig

    cfg = CampaignConfig(
        campaign_id=f"{campaign}-dmta", budget=budget, batch_size=batch, optimizer="bo"
    )
    print(f"\n== closed loop: campaign {cfg.id}, {budget} experiments in batches of {batch}")
    t = time.monotonic()
    result = Campaign(cfg, session, store, say=lambda text: print(text, flush=True)).run()
    summary = result.summary()
    out = store.config.directory.resolve() / "demo" / cfg.id
    files = write_report(result.state, out)
    best = summary["best"] or {}
    fr = ", ".join(f"{k} {v:.3f}" for k, v in best.get("fractions", {}).items())
    return (
        f"Campaign {cfg.id}: {summary['n_experiments']} experiments in {summary['batches']} "
        f"batches, {time.monotonic() - t:.0f} s; best {best.get('conductivity_mS_cm', 0):.3f} "
        f"mS/cm ({fr}; LiPF6 {best.get('salt_molality', 0):.3f} mol/kg)\n"
        f"  report: {files[-1]}\n  labctl campaign status {cfg.id}"
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
