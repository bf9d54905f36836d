"""`make demo` end to end: the command a newcomer runs first.

Runs ``labctl demo`` as a separate process (what `make demo` runs) with its data in a
temporary directory, then reads the runs back from the embedded Tiled it left running,
and stops that server.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.data import DataConfig, open_store, stop_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_makes_two_electrolytes_cycles_a_cell_and_stores_it_all(tmp_path: Path) -> None:
    data = tmp_path / "tiled"
    try:
        proc = subprocess.run(
            # The closing campaign shortened (12 experiments by default) to keep CI brisk.
            [sys.executable, "-m", "labctl.cli", "demo", "--data", str(data),
             "--campaign-budget", "4", "--campaign-batch", "2"],
            cwd=ROOT, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        out = proc.stdout
        assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
        campaign = re.search(r"labctl runs list --campaign (\S+)", out)
        assert campaign, out[-2000:]
        # Each temperature's reading within 3 % of the simulator's ground truth.
        errors = [float(e) for e in re.findall(r"truth +[\d.]+, ([+-][\d.]+) %\)", out)]
        assert len(errors) == 6, out[-2000:]
        assert all(abs(e) < 3.0 for e in errors), errors
        assert (data / "demo" / f"{campaign[1]}.png").stat().st_size > 10_000

        # edge_bms beside the lab: the cycler's channel 1 estimated live over MQTT.
        # Measured: ~4200 states, SOC RMSE 0.4 %, max 1.5 % after the first 10 min.
        rows = re.findall(
            r"^  (cycler-ch\d+) +(\d+) +(\d+) +([\d.]+) % +([\d.]+) % +([\d.]+) % +([\d.]+) %"
            r"  (\S+) \(ekf, correction none\)$",
            out,
            re.MULTILINE,
        )
        assert [r[0] for r in rows] == ["cycler-ch1"], out[-2000:]  # only the cycled channel
        _, states, truth, rmse, worst, final_est, final_true, model = rows[0]
        assert model == "labctl-sim-5ah"
        assert int(states) > 2000 and int(states) >= 0.95 * int(truth), rows
        assert float(rmse) < 1.5 and float(worst) < 4.0, rows
        assert abs(float(final_est) - float(final_true)) < 2.0, rows
        assert "telemetry the service rejected" not in out

        loop = re.search(r"Campaign (\S+-dmta): 4 experiments in 2 batches", out)
        assert loop, out[-2000:]
        # sim_backend's dry test of the best candidate (2 replicas x 300 steps, CPU).
        head = re.search(r"^  dry test of (\S+-E\d{3}) \(.*\): box Li\+ (\d+), PF6- (\d+), "
                         r".*\((\d+) atoms, ([\d.]+) g/cm3.*2 x 300 steps at 298.15 K, "
                         r"([\d.]+) s$", out, re.MULTILINE)  # fmt: skip
        assert head, out[-3000:]
        assert head[2] == head[3] and 100 < int(head[4]) < 300 and 1.0 < float(head[5]) < 1.6
        assert float(head[6]) < 120.0  # the dry test: ~15 s on an idle 2-core box, 63 s loaded
        stable = re.search(r"^    stable replicas (\d)/2 \(mean T (\d+|-) K\)$", out, re.MULTILINE)
        assert stable, out[-3000:]
        d = dict(re.findall(r"^    D (\S+) +([\d.e+-]+) \+- [\d.e+-]+ m2/s$", out, re.MULTILINE))
        # The salt box loses a replica now and then (the model has seen few ion-solvent
        # contacts in the liquid), never both: the packing leaves no false bonds.
        assert int(stable[1]) >= 1, out[-3000:]
        assert {"Li+", "PF6-", "EC"} <= set(d) or {"Li+", "PF6-", "DMC"} <= set(d), d
        assert all(math.isfinite(float(v)) and 1e-11 < float(v) < 1e-6 for v in d.values())
        cn = re.search(r"^    Li-O coordination ([\d.]+) \+- ([\d.]+)", out, re.MULTILINE)
        ne = re.search(r"^    Nernst-Einstein conductivity ([\d.e+-]+) \+- ([\d.e+-]+) "
                       r"mS/cm$", out, re.MULTILINE)  # fmt: skip
        assert cn and ne, out[-3000:]
        assert all(math.isfinite(float(x)) for x in (*cn.groups(), *ne.groups()))
        assert 0.0 <= float(cn[1]) < 8.0 and float(ne[1]) > 0
        assert (data / "demo" / loop[1] / "report.html").stat().st_size > 10_000

        with open_store(DataConfig(directory=data)) as store:
            dmta = store.runs(campaign=loop[1])
            assert sorted(r.plan_name for r in dmta) == [
                "campaign_batch"] * 2 + ["prepare_and_measure"] * 4 + ["sim_dry_test"]  # fmt: skip
            (dry,) = [r for r in dmta if r.plan_name == "sim_dry_test"]
            assert dry.sample_id == head[1]
            row = store.read(dry.uid, "dry_test").iloc[0]
            assert row["n_replicas"] == 2 and row["n_stable"] == int(stable[1])
            assert {r.exit_status for r in dmta} == {"success"}
            runs = store.runs(campaign=campaign[1])
            assert sorted(r.plan_name for r in runs) == [
                "cycle_cell", "prepare_and_measure", "prepare_and_measure"]  # fmt: skip
            assert {r.exit_status for r in runs} == {"success"}
            assert not list((data / "journal").glob("*.jsonl"))  # everything reached Tiled
            for r in runs:
                if r.plan_name == "prepare_and_measure":
                    frame = store.read(r.uid, "conductivity")
                    assert list(frame["setpoint_c"]) == [15.0, 25.0, 40.0]
                    kappa = list(frame["conductivity_mS_cm"])
                    assert kappa == sorted(kappa) and 4.0 < kappa[0] < kappa[-1] < 20.0
                    assert store.read(r.uid, "doses")["within_tolerance"].all()
                else:
                    cycles = store.read(r.uid, "cycles")
                    assert list(cycles["label"])[-3:] == ["cycle 1", "cycle 2", "cycle 3"]
                    last = cycles.iloc[-3:]
                    assert (last["discharge_ah"] > 4.5).all()
                    assert ((last["coulombic_efficiency"] > 0.98) & (
                        last["coulombic_efficiency"] < 1.0)).all(), last  # fmt: skip
                    rows = store.read(r.uid, "cycling")
                    assert len(rows) > 1000
                    assert rows["voltage"].between(2.4, 4.3).all()
    finally:
        stop_server(data)
