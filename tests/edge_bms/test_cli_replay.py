"""`edge-bms replay` (DESIGN.md contract 4) end to end, and its error paths."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edge_bms.cell import CellModel
from edge_bms.cli import main
from edge_bms.estimator import OCV_PRIOR_SIGMA_RANGE
from edge_bms.filters import FilterNoise

from .conftest import pulse_profile, simulate

NOISE = FilterNoise(voltage_v=2e-3, v2_v_per_sqrt_s=2e-4)


def _recording(cell: CellModel, path: Path, n_rows: int = 900, soc0: float = 0.7) -> np.ndarray:
    """A one-cell CSV (columns shuffled, an extra column, a comment, a missing voltage);
    returns the true SOC per row."""
    rng = np.random.default_rng(21)
    sim = simulate(cell, pulse_profile(rng, n_rows), np.array([soc0]), rng, noise=NOISE)
    with path.open("w", newline="") as f:
        f.write("# recorded by a test\n")
        w = csv.writer(f)
        w.writerow(["temperature_c", "voltage_v", "time_s", "current_a", "note"])
        for k in range(n_rows):
            v = "" if k == 400 else f"{sim.voltage[k, 0]:.4f}"
            w.writerow(["25.0", v, f"{1.7e9 + sim.t[k]:.1f}", f"{sim.current[k, 0]:.3f}", "x"])
    return sim.soc[:, 0]


def _read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=float)


@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_replay_tracks_soc(
    cell: CellModel,
    cell_file: Path,
    tmp_path: Path,
    method: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, out = tmp_path / "cell.csv", tmp_path / "est.csv"
    truth = _recording(cell, src)
    argv = ["replay", "--input", str(src), "--output", str(out), "--cell", str(cell_file)]
    assert main([*argv, "--initial-soc", "0.4", "--method", method]) == 0
    header, data = _read(out)
    assert header == ["time_s", "soc", "soc_sigma", "v_pred", "innovation", "correction_used"]
    assert data.shape == (900, 6)
    assert np.all(data[:, 5] == 0)  # the shipped network is for lg-m50, not this cell
    np.testing.assert_allclose(data[:, 0] - 1.7e9, np.arange(900.0), atol=1e-3)
    err = np.abs(data[:, 1] - truth)
    assert err[120:].max() < 0.01  # 30 points off at the start, within 1 % from 2 min on
    assert np.all(data[:, 2] > 0) and data[-1, 2] < 0.01
    assert np.isnan(data[400, 4]) and np.isfinite(data[401, 4])
    assert (
        "900 rows (1 without voltage, 0 with current or temperature held)"
        in capsys.readouterr().err
    )
    # a confident wrong start is honoured (and stays wrong for a while)
    assert main([*argv, "--initial-soc", "0.4", "--initial-soc-sigma", "0.001"]) == 0
    _, data = _read(out)
    assert abs(data[0, 1] - truth[0]) > 0.25
    # no --initial-soc: from the first row's voltage, as OCV
    assert main(argv) == 0
    _, data = _read(out)
    assert abs(data[0, 1] - truth[0]) < 0.02
    assert OCV_PRIOR_SIGMA_RANGE[0] <= data[0, 2] <= OCV_PRIOR_SIGMA_RANGE[1]


def test_replay_streams_stdin_to_stdout(cell: CellModel, cell_file: Path, tmp_path: Path) -> None:
    """The module entry point in a pipe: '-' for both ends."""
    src = tmp_path / "cell.csv"
    _recording(cell, src, n_rows=50)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "edge_bms.cli", "replay"),
            *("--input", "-", "--output", "-", "--cell", str(cell_file)),
        ],
        input=src.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "time_s,soc,soc_sigma,v_pred,innovation,correction_used" and len(lines) == 51
    first = lines[1].split(",")
    assert first[0] == "1700000000.0" and abs(float(first[1]) - 0.7) < 0.02


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("time_s,current_a,voltage_v\n0,1,3.7\n", "cell.csv:1: missing column(s) temperature_c"),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,1,3.7,25\n1,1,abc,25\n",
            "cell.csv:3: voltage_v 'abc' is not a number",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,1,3.7,25\n# c\n\n5,1,3.7,25\n5,1,3.7,25\n",
            "cell.csv:6: time_s 5 is not after the previous row's 5.0",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,,3.7,25\n",
            "cell.csv:2: current_a or temperature_c missing in the first row",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,inf,3.7,25\n",
            "cell.csv:2: current_a 'inf' is not a finite number",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,1,3.7\n",
            "cell.csv:2: 3 fields, the header has 4",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,1,3.7,25\n1,1,-3.7,25\n",
            "cell.csv:3: cell_v[0] = -3.7 is outside (0.0, 10.0) V",
        ),
        (
            "time_s,current_a,voltage_v,temperature_c\n0,1,3.7,900\n",
            "cell.csv:2: temp_c = 900.0 is outside [-60.0, 150.0] C",
        ),
        ("", "cell.csv: empty: no header line"),
        ("time_s,current_a,voltage_v,temperature_c\n", "cell.csv: no data rows after the header"),
    ],
)
def test_replay_bad_rows_name_file_and_line(
    cell_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    src, out = tmp_path / "cell.csv", tmp_path / "est.csv"
    src.write_text(body)
    status = main(["replay", "--input", str(src), "--output", str(out), "--cell", str(cell_file)])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.startswith("edge-bms: error: ")
    assert not out.exists()  # no half-written output
    assert list(tmp_path.glob(".est.csv.*")) == []


def test_replay_bad_arguments(
    cell_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "est.csv")
    assert (
        main(
            [
                "replay",
                "--input",
                str(tmp_path / "none.csv"),
                "--output",
                out,
                "--cell",
                str(cell_file),
            ]
        )
        == 2
    )
    assert "cannot read --input" in capsys.readouterr().err
    assert (
        main(["replay", "--input", "x.csv", "--output", out, "--cell", str(tmp_path / "no.json")])
        == 2
    )
    assert "cell model file not found" in capsys.readouterr().err
    assert main(["replay", "--input", "x.csv", "--output", out, "--cell", "no-such-cell"]) == 2
    assert "no cell model named 'no-such-cell'" in capsys.readouterr().err
    (tmp_path / "bin.csv").write_bytes(b"time_s,current_a,voltage_v,temperature_c\n\xff\xfe\n")
    argv = ["replay", "--input", str(tmp_path / "bin.csv"), "--cell", str(cell_file)]
    assert main([*argv, "--output", out]) == 2
    assert "bin.csv: not a text (UTF-8) CSV file" in capsys.readouterr().err
    (tmp_path / "good.csv").write_text("time_s,current_a,voltage_v,temperature_c\n0,0,3.7,25\n")
    argv = ["replay", "--input", str(tmp_path / "good.csv"), "--cell", str(cell_file)]
    assert main([*argv, "--output", str(tmp_path)]) == 2  # a directory
    assert "cannot write --output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["replay", "--input", "x.csv", "--output", out, "--initial-soc", "1.5"])
    assert info.value.code == 2
    assert "must be within 0..1, got 1.5" in capsys.readouterr().err


def test_optional_subcommands_register(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge_bms.identify` (or any OPTIONAL_COMMANDS module) adds its subcommand."""
    fake = types.ModuleType("edge_bms.identify")

    def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        p = sub.add_parser("identify")
        p.add_argument("--output")
        p.set_defaults(func=lambda args: print(f"identify -> {args.output}") or 0)

    fake.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_bms.identify", fake)
    assert main(["identify", "--output", "m.json"]) == 0
    assert capsys.readouterr().out == "identify -> m.json\n"


def test_replay_and_identify_need_no_mqtt_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway without aiomqtt still runs the offline commands; `run` is listed and
    imports the client only when it starts."""
    monkeypatch.setitem(sys.modules, "aiomqtt", None)  # `import aiomqtt` now fails
    for name in ("edge_bms.service.cli", "edge_bms.service.mqtt"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "replay" in out and "identify" in out and "run" in out
    assert "edge_bms.service.mqtt" not in sys.modules
