"""`labctl plans list` and `labctl plans run` (in-process and as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hardware_mocks.lab import LabThread
from labctl.cli import app
from labctl.data import DataConfig, open_store
from labctl.plans.registry import PLANS
from tests.conftest import start_lab

runner = CliRunner()


def labctl(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "labctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "COLUMNS": "200",
            "PATH": "/usr/bin:/bin",
            "LABCTL_OPERATOR": "tester",
            "LABCTL_DATA": os.environ["LABCTL_DATA"],
        },  # the session's (tests/conftest.py)
    )


@pytest.fixture
def lab_file(tmp_path: Path) -> Iterator[tuple[LabThread, Path]]:
    """A running lab described the way a real lab is: a JSON file of records."""
    lab = start_lab("balance", "pump", "robot", "stirrer", transport="tcp", speed=1000.0)
    path = tmp_path / "lab.json"
    path.write_text(
        json.dumps(
            {
                "instruments": lab.call(lab.lab.describe),
                "pump_options": {"contents_ml": 10.0, "rate_ml_min": 5.0},
                "time_scale": 1000.0,
            }
        )
    )
    yield lab, path
    lab.stop()


def test_list_shows_every_plan_with_its_signature_and_doc() -> None:
    result = runner.invoke(app, ["plans", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for name in PLANS:
        assert f"{name} " in out
    assert "prepare_electrolyte recipe=... [key=value ...]" in out
    assert "move_vial source=... destination=... [key=value ...]" in out
    assert "    recipe: Recipe  what to make" in out
    assert "    temperatures: list[float] = 25" in out
    assert "    protocol: CyclingProtocol = 'quick'" in out
    assert "Make ``recipe`` gravimetrically" in out
    full = runner.invoke(app, ["plans", "list", "--full"], env={"COLUMNS": "200"}).output
    assert "Doses every reagent" in full
    lines = runner.invoke(app, ["plans", "list", "--json"]).output.splitlines()
    described = {d["name"]: d for d in map(json.loads, lines)}
    assert set(described) == set(PLANS)
    hppc = {p["name"]: p for p in described["hppc"]["parameters"]}
    assert hppc["channel"]["required"] is True
    assert hppc["soc_points"]["default"] == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert hppc["soc_points"]["type"] == "list[float]"


def test_run_refuses_bad_parameters_naming_key_and_value() -> None:
    result = runner.invoke(app, ["plans", "run", "prepare_electrolyte", "recipe=EC1.0+LiPF6 3m"])
    assert result.exit_code == 2
    assert "recipe.salt_molality = 3.0: Input should be less than or equal to 2.5" in result.output
    result = runner.invoke(app, ["plans", "run", "measure_conductivity", "windw=3", "window=x"])
    assert result.exit_code == 2
    assert "windw = '3': unknown parameter; known: " in result.output
    result = runner.invoke(app, ["plans", "run", "cycle_cell", "channel=two"])
    assert result.exit_code == 2
    assert "channel = 'two': Input should be a valid integer" in result.output
    result = runner.invoke(app, ["plans", "run", "calibrate"])
    assert result.exit_code == 2
    assert "unknown plan 'calibrate'; known: prepare_electrolyte" in result.output
    result = runner.invoke(
        app, ["plans", "run", "move_vial", "source=rack/1", "destination=meter", "--lab", "x.yml"]
    )
    assert result.exit_code == 2
    assert "--lab 'x.yml': give a lab TOML (simulated), a JSON file" in result.output


def test_dry_run_prints_the_plan_without_a_lab() -> None:
    result = runner.invoke(
        app,
        [
            "plans",
            "run",
            "measure_conductivity",
            "sample_id=S-9",
            "temperatures=10,30",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chamber -> 10.0" in result.output
    assert "chamber -> 30.0" in result.output
    assert "dry run OK" in result.output
    assert "limits checked" in result.output
    refused = runner.invoke(
        app,
        [
            "plans",
            "run",
            "cycle_cell",
            "channel=1",
            "protocol=quick",
            "protocol.cycling.discharge_c_rate=3",
            "--dry-run",
        ],
    )
    assert refused.exit_code == 2
    assert "protocol = 'cycle 1': step 3: 15 A above the channel rating" in refused.output


def test_run_against_a_lab_of_records_shows_progress_and_a_summary(
    lab_file: tuple[LabThread, Path],
) -> None:
    lab, path = lab_file
    out = labctl(
        "plans", "run", "prepare_electrolyte", "recipe=EC0.5:DMC0.5+LiPF6 1.0m",
        "vial_station=rack/4", "mix_time_s=30", "equilibrate_s=30", "campaign_id=C-1",
        "--lab", str(path), "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    assert summary["exit_status"] == "success"
    assert summary["lab"] == f"lab of {path}"
    assert summary["parameters"]["campaign_id"] == "C-1"
    assert summary["parameters"]["operator"] == "tester"
    assert summary["parameters"]["time_scale"] == 1000.0
    assert summary["events"]["doses"] == 4
    result = summary["result"]
    truth = lab.call(lab.world.snapshot)["vials"]["V04"]
    assert truth["station"] == "rack/4"
    assert result["salt_molality"] == pytest.approx(truth["salt_molality"], abs=0.01)
    assert result["salt_molality"] == pytest.approx(1.0, abs=0.01)
    # Progress (on stderr with --json): each dose as it completes, then the summary.
    assert "doses: LiPF6-EC" in out.stderr
    assert "composition: EC 0.5" in out.stderr
    assert "run finished: success" in out.stderr
    assert "prepare_electrolyte: success" in out.stderr
    # Stored in Tiled (the session's LABCTL_DATA): the run and its doses.
    assert f"stored in Tiled: labctl runs show {summary['run_uid'][:8]}" in out.stderr
    with open_store(DataConfig.from_env()) as store:
        (stored,) = store.runs(campaign="C-1")
        assert (stored.uid, stored.exit_status) == (summary["run_uid"], "success")
        doses = store.read(stored.uid, "doses")
        assert list(doses["actual_g"]) == [d["actual_g"] for d in result["doses"]]
    # A failing run: exit status 1 and its reason (no meter in this lab: refused, 2).
    missing = labctl("plans", "run", "measure_conductivity", "sample_id=S", "--lab", str(path))
    assert missing.returncode == 2
    assert "the lab has no chamber, meter" in missing.stdout


def test_run_starts_the_default_simulated_lab() -> None:
    out = labctl(
        "plans", "run", "move_vial", "source=rack/2", "destination=meter", "--json", "--no-store"
    )  # fmt: skip
    assert "stored in Tiled" not in out.stderr
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["exit_status"] == "success"
    assert summary["lab"].startswith("simulated lab (default config, 500x")
    assert summary["result"] == {"source": "rack/2", "destination": "meter"}
