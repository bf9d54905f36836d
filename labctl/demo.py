"""`make demo`: the main job on embedded defaults.

Starts the simulated lab (`labctl mocks serve`, a separate process), connects the
devices over real ptys, doses one electrolyte gravimetrically, mixes it, measures
its conductivity at 25 C, and prints progress and the result next to the
simulator's ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop

from labctl.devices.lab import build_lab_devices
from labctl.plans.electrolyte import prepare_and_measure
from labctl.recipes import Recipe, default_reagents
from labctl.simlab import SimulatedLabProcess

DEMO_RECIPE = Recipe(fractions={"EC": 0.5, "DMC": 0.5}, salt_molality=1.0, solvent_g=4.0)


class Progress:
    """A RunEngine subscriber that prints one line per meaningful document."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.streams: dict[str, str] = {}

    def on_msg(self, msg: Any) -> None:
        """Print what the plan asks instruments to do (robot moves, setpoints)."""
        if msg.command == "set" and msg.obj is not None:
            t = f"[{time.monotonic() - self.t0:6.1f} s]"
            name = msg.obj.name
            if name.endswith("transfer"):
                print(f"{t}   robot: vial {msg.args[0][0]} -> {msg.args[0][1]}", flush=True)
            elif not name.startswith("pumps"):
                print(f"{t}   {name} -> {msg.args[0]}", flush=True)
        elif msg.command == "trigger" and msg.obj is not None and msg.obj.name.endswith("home"):
            print(f"[{time.monotonic() - self.t0:6.1f} s]   robot: homing", flush=True)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        t = f"[{time.monotonic() - self.t0:6.1f} s]"
        if name == "start":
            print(f"{t} run {doc['uid'][:8]} started: sample {doc.get('sample_id')}", flush=True)
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = self.streams.get(doc["descriptor"], "?")
            data = doc["data"]
            if stream == "dosing":
                w = next(v for k, v in data.items() if k.endswith("weight"))
                print(f"{t}   weighed {w:9.4f} g", flush=True)
            elif stream == "conductivity_readings":
                k = next(v for k, v in data.items() if k.endswith("-conductivity"))
                temp = next(v for k, v in data.items() if k.endswith("meter-temperature"))
                print(f"{t}   conductivity {k:7.3f} mS/cm at {temp:5.2f} C", flush=True)
        elif name == "stop":
            print(f"{t} run finished: {doc['exit_status']} {doc.get('reason') or ''}", flush=True)


def run_demo(
    *, speed: float = 200.0, lab_config: Path | None = None, transport: str = "pty"
) -> int:
    reagents = default_reagents()
    print(f"Starting the simulated lab (transport {transport}, {speed:g}x time)...", flush=True)
    with SimulatedLabProcess(config=lab_config, transport=transport, speed=speed) as sim:
        for rec in sim.records:
            print(f"  {rec['name']:8s} {rec['protocol']:12s} {rec['url']}")
        lab = build_lab_devices(
            sim.records,
            reagents=list(reagents),
            pump_options={"contents_ml": 10.0, "rate_ml_min": 5.0},
        )
        engine = RunEngine(call_returns_result=True)
        progress = Progress()
        engine.subscribe(progress)  # type: ignore[no-untyped-call]
        engine.msg_hook = progress.on_msg  # type: ignore[assignment]
        call_in_bluesky_event_loop(lab.connect(timeout=30))
        print(f"Connected {len(lab.by_name)} instruments. Recipe: {DEMO_RECIPE.name}", flush=True)
        result: dict[str, Any] = {}
        plan = prepare_and_measure(
            lab, DEMO_RECIPE, reagents, mix_time_s=120 / speed, equilibrate_s=300 / speed,
            results=result,
        )  # fmt: skip
        t = time.monotonic()
        engine(plan)
        elapsed = time.monotonic() - t
        truth = sim.control({"op": "state"})["state"]["vials"]["V01"]
        call_in_bluesky_event_loop(lab.disconnect())

    print("\nDoses (target -> actual, by the balance):")
    for d in result["doses"]:
        mark = "ok" if d["within_tolerance"] else "OUT OF TOLERANCE"
        print(
            f"  {d['reagent']:10s} {d['target_g']:7.4f} g -> {d['actual_g']:7.4f} g "
            f"({d['volume_ml']:.4f} mL in {d['steps']} steps) {mark}"
        )
    fr = ", ".join(f"{k} {v:.4f}" for k, v in result["fractions"].items())
    target = DEMO_RECIPE.salt_molality
    print(f"Achieved: {fr}; LiPF6 {result['salt_molality']:.4f} mol/kg (target {target})")
    print(
        f"Conductivity: {result['conductivity_mS_cm']:.3f} mS/cm "
        f"at {result['temperature_c']:.2f} C "
        f"(simulator ground truth now: {truth['conductivity_mS_cm']:.3f} mS/cm "
        f"for {truth['salt_molality']:.4f} mol/kg at {truth['temperature_c']:.2f} C)"
    )
    print(f"Plan took {elapsed:.1f} s wall clock at {speed:g}x.")
    ok = all(d["within_tolerance"] for d in result["doses"])
    return 0 if ok else 1
