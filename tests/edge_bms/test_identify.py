"""ECM identification: recover a known 2-RC model from its own pseudo-OCV and HPPC data."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_bms.cell import CellModel, load_cell
from edge_bms.errors import IdentificationError
from edge_bms.identify import (
    DEFAULT_SOC_GRID,
    LG_M50_LIMITS,
    Identification,
    _branch_current,
    evaluate,
    linear_scan,
    rc_basis,
    register,
    run_identification,
    simulate_ecm,
)
from tests.edge_bms.conftest import pulse_profile, synthetic_cell_dict

NOISE_V = 0.5e-3  # voltage noise on the synthetic files


def write_test(
    path: Path, t: np.ndarray, i: np.ndarray, v: np.ndarray, temp: float, meta: dict[str, object]
) -> Path:
    cols = np.column_stack([t, i, v, np.full(t.size, temp)])
    np.savetxt(
        path,
        cols,
        delimiter=",",
        header="time_s,current_a,voltage_v,temperature_c",
        comments="",
        fmt="%.6f",
    )
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def pseudo_ocv_profile(q_ah: float, dt: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """C/20 from full to empty, a 20 min rest, C/20 back to full (ZOH samples)."""
    n = round(20 * 3600 / dt)
    i = np.concatenate([np.zeros(3), np.full(n, q_ah / 20), np.zeros(60), np.full(n, -q_ah / 20)])
    i = np.concatenate([i, np.zeros(3)])
    return np.arange(i.size) * dt, i


def hppc_profile(q_ah: float, rest_s: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """At 100, 90, ... 10 % SOC: 1C discharge 10 s, rest 40 s, 0.75C charge 10 s, rest 40 s;
    then 10 % SOC at 1C and a rest. 1 s samples."""
    parts = [np.zeros(600)]
    for level in range(10):
        parts += [np.full(10, q_ah), np.zeros(40), np.full(10, -0.75 * q_ah), np.zeros(40)]
        if level < 9:
            parts += [np.full(360, q_ah), np.zeros(rest_s)]
    i = np.concatenate(parts)
    return np.arange(i.size, dtype=float), i


def characterize(cell: CellModel, directory: Path, seed: int = 0) -> Path:
    """The lab's characterization of ``cell`` at each of its temperatures, with noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for temp in cell.temperature_c:
        for kind, (t, i) in (
            ("pseudo_ocv", pseudo_ocv_profile(cell.capacity_ah)),
            ("hppc", hppc_profile(cell.capacity_ah)),
        ):
            v, _ = simulate_ecm(cell, t, i, float(temp), 1.0)
            v = v + NOISE_V * rng.standard_normal(v.size)
            meta = {"kind": kind, "temperature_c": float(temp), "initial_soc": 1.0}
            write_test(directory / f"{kind}_{temp:g}C.csv", t, i, v, float(temp), meta)
    return directory


@pytest.fixture(scope="module")
def truth() -> CellModel:
    return CellModel.from_dict(synthetic_cell_dict())


@pytest.fixture(scope="module")
def identified(truth: CellModel, tmp_path_factory: pytest.TempPathFactory) -> Identification:
    directory = characterize(truth, tmp_path_factory.mktemp("characterization"))
    return run_identification(directory, name="recovered")


def rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.abs(got / want - 1)
    return out


def test_linear_scan_and_rc_basis_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (37, 3))
    b = rng.normal(size=(37, 3))
    x = np.zeros(3)
    ref = []
    for k in range(37):
        x = a[k] * x + b[k]
        ref.append(x)
    assert np.allclose(linear_scan(a, b), ref)
    t = np.cumsum(rng.uniform(0.5, 2.0, 50))
    i = rng.normal(size=50)
    phi = rc_basis(t, i, np.array([3.0]))[:, 0]
    x1, want = 0.0, [0.0]
    for k in range(49):
        al = np.exp(-(t[k + 1] - t[k]) / 3.0)
        x1 = al * x1 + (1 - al) * i[k]
        want.append(x1)
    assert np.allclose(phi, want)


def test_identification_recovers_the_known_parameters(
    identified: Identification, truth: CellModel
) -> None:
    """Measured on this data (noise 0.5 mV): OCV within 1.5 mV, R0 within 1.2 %,
    R1/R2 within 7 %/5 %, tau1/tau2 within 5 %/7 %, on SOC 0.15-0.95 (the HPPC's range)."""
    cell = identified.cell
    assert cell.capacity_ah == pytest.approx(5.0, rel=1e-3)
    assert cell.temperature_c.tolist() == [0.0, 25.0, 45.0]
    assert cell.soc.tolist() == DEFAULT_SOC_GRID.tolist()
    socs = np.linspace(0.15, 0.95, 17)
    for temp in truth.temperature_c:
        want = truth.lookup(socs, temp)
        got = cell.lookup(socs, temp)
        assert np.abs(got.ocv - want.ocv).max() < 2e-3
        assert rel_err(got.r0, want.r0).max() < 0.025
        assert rel_err(got.r1, want.r1).max() < 0.10
        assert rel_err(got.r2, want.r2).max() < 0.10
        assert rel_err(got.tau1, want.tau1).max() < 0.12
        assert rel_err(got.tau2, want.tau2).max() < 0.12
    # the OCV over the whole SOC range, ends included (the pseudo-OCV covers them)
    full = np.linspace(0.0, 1.0, 101)
    for temp in truth.temperature_c:
        err = cell.ocv(full, temp) - truth.ocv(full, temp)
        assert np.abs(err).max() < 3e-3  # measured 1.95 mV, at the knee near 5 % SOC
        assert np.sqrt(np.mean(err**2)) < 0.6e-3  # measured 0.32 mV
        assert np.all(np.diff(cell.tables[0, :, 0]) > 0)
    # the simulated cell has no hysteresis: the half-gap is the pseudo-OCV current's
    # polarisation, larger where it is colder (measured 19 / 10 / 6 mV)
    gap = cell.ocv_half_gap_v
    assert gap is not None and 0 < gap[2] < gap[1] < gap[0] < 0.03, gap
    assert CellModel.from_dict(cell.to_dict()).ocv_half_gap_v is not None
    # the current the gap was measured at (the pseudo-OCV test's C/20), kept in the file
    q = truth.capacity_ah
    assert cell.ocv_test_current_a == pytest.approx(q / 20, rel=1e-3)
    assert CellModel.from_dict(cell.to_dict()).ocv_test_current_a == cell.ocv_test_current_a


def test_report_gives_the_fit_rmse_of_every_file(identified: Identification) -> None:
    kinds = sorted((r.kind, r.temperature_c) for r in identified.tests)
    want = [(kind, temp) for kind in ("hppc", "ocv") for temp in (0.0, 25.0, 45.0)]
    assert kinds == want
    for r in identified.tests:
        # noise alone is 0.5 mV; measured 0.6-1.4 mV
        assert r.rmse_mv + 0.05 >= NOISE_V * 1e3
        assert r.rmse_mv < 2.0, r.line()
    assert identified.cell.source["fit"][0]["rmse_mv"] == pytest.approx(
        identified.tests[0].rmse_mv, abs=1e-3
    )
    assert "capacity measured by each pseudo-OCV test" in identified.summary()


def test_identified_model_predicts_a_held_out_drive_profile(
    identified: Identification, truth: CellModel, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    i = pulse_profile(rng, 4000, -5.0, 10.0)
    t = np.arange(i.size, dtype=float)
    v, _ = simulate_ecm(truth, t, i, 10.0, 0.8)  # 10 degC: between grid temperatures
    path = write_test(tmp_path / "drive.csv", t, i, v, 10.0, {"initial_soc": 0.8})
    report = evaluate(identified.cell, path)
    assert report.rmse_mv < 3.0  # measured 1.1 mV


def one_temperature_cell() -> CellModel:
    """The synthetic cell's 25 degC row alone (enough for the command's plumbing)."""
    d = synthetic_cell_dict()
    d["temperature_c"] = [25.0]
    for key in ("ocv_v", "r0_ohm", "r1_ohm", "tau1_s", "r2_ohm", "tau2_s"):
        rows = d[key]
        assert isinstance(rows, list)
        d[key] = [rows[1]]
    return CellModel.from_dict(d)


def test_cli_writes_a_loadable_model_and_prints_the_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = characterize(one_temperature_cell(), tmp_path / "lab")
    # a CSV that is not a test (a truth table) is skipped when a directory is searched
    (data / "truth_ocv.csv").write_text("soc_true,ocv_v\n0.0,3.0\n1.0,4.2\n")
    parser = argparse.ArgumentParser(prog="edge-bms")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "model" / "cell.json"
    args = parser.parse_args(
        [
            *("identify", "--input", str(data), "--output", str(out)),
            *("--name", "mine", "--limits", "lg-m50", "--json"),
        ]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output"] == str(out)
    assert [t["kind"] for t in printed["tests"]] == ["hppc", "ocv"]
    assert all(t["rmse_mv"] < 2.0 for t in printed["tests"])
    model = load_cell(out)
    assert model.name == "mine"
    assert model.limits == LG_M50_LIMITS
    # a bad input: the command says which file and what is wrong, and exits 2
    bad = tmp_path / "hppc_x.csv"
    bad.write_text("time_s,current_a,voltage_v\n0,0,4\n")
    args = parser.parse_args(["identify", "--input", str(bad), "--output", str(out)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "hppc_x.csv" in err and "temperature_c" in err


def test_a_directory_listing_names_the_tests(tmp_path: Path) -> None:
    """The layout of data/bms/characterization: no sidecar per file, one protocol.json
    whose ``files`` say each file's test and chamber temperature."""
    lab = characterize(one_temperature_cell(), tmp_path / "lab")
    files = []
    for k, kind in enumerate(("pseudo_ocv", "hppc")):
        src = lab / f"{kind}_25C.csv"
        src.rename(lab / f"test{k}.csv")
        (lab / f"{kind}_25C.json").unlink()
        files.append({"file": f"test{k}.csv", "test": kind.split("_")[-1], "temperature_c": 25})
    (lab / "truth_ocv.csv").write_text("soc_true,ocv_v\n0.0,3.0\n1.0,4.2\n")
    (lab / "protocol.json").write_text(json.dumps({"files": files}))
    result = run_identification(lab)
    assert sorted((r.kind, Path(r.path).name) for r in result.tests) == [
        ("hppc", "test1.csv"),
        ("ocv", "test0.csv"),
    ]
    assert max(r.rmse_mv for r in result.tests) < 2.0
    files.append({"file": "gone.csv", "test": "hppc", "temperature_c": 25})
    (lab / "protocol.json").write_text(json.dumps({"files": files}))
    with pytest.raises(IdentificationError, match=r"protocol\.json: lists missing file"):
        run_identification(lab)


def test_errors_name_the_file_and_the_problem(tmp_path: Path, truth: CellModel) -> None:
    bad = tmp_path / "ocv_bad.csv"
    bad.write_text(
        "time_s,current_a,voltage_v,temperature_c\n" + "".join(f"{t},0,4,25\n" for t in range(20))
    )
    (tmp_path / "ocv_bad.json").write_text('{"kind": "pseudo_ocv"}')
    with pytest.raises(
        IdentificationError, match=r"ocv_bad\.csv: pseudo-OCV test has no discharge"
    ):
        run_identification(bad)
    back = tmp_path / "hppc_back.csv"
    back.write_text(
        "time_s,current_a,voltage_v,temperature_c\n"
        + "".join(f"{t},0,4,25\n" for t in [0, 1, 2, 3, 2, 5, 6, 7, 8, 9, 10])
    )
    with pytest.raises(
        IdentificationError, match=r"hppc_back\.csv: time_s goes backwards at data row 5"
    ):
        run_identification([back])
    nan = tmp_path / "x.csv"
    nan.write_text("time_s,current_a,voltage_v,temperature_c\n" + "0,0,nan,25\n" * 12)
    with pytest.raises(
        IdentificationError,
        match=r"x\.csv: column voltage_v has 12 non-finite value\(s\) \(more than 1%",
    ):
        run_identification([nan])
    with pytest.raises(IdentificationError, match="no such file"):
        run_identification(tmp_path / "missing")
    only_ocv = tmp_path / "only"
    only_ocv.mkdir()
    t, i = pseudo_ocv_profile(5.0, dt=200.0)
    v, _ = simulate_ecm(truth, t, i, 25.0, 1.0)
    write_test(only_ocv / "ocv_25C.csv", t, i, v, 25.0, {"kind": "pseudo_ocv"})
    with pytest.raises(IdentificationError, match="no HPPC test"):
        run_identification(only_ocv)


def test_shipped_lg_m50_model_loads_with_datasheet_limits() -> None:
    cell = load_cell("lg-m50")
    assert cell.limits == LG_M50_LIMITS
    assert 4.8 < cell.capacity_ah < 5.2  # Chen2020: 5 Ah nominal
    assert cell.source["tool"] == "edge_bms.identify"
    assert -10.0 in cell.temperature_c and 40.0 in cell.temperature_c
    p = cell.lookup(0.5, 25.0)
    assert 2e-3 < float(p.r0) < 5e-2
    assert float(p.ocv) == pytest.approx(3.7, abs=0.15)
    # colder is more resistive, and every fitted test is reproduced to a few mV
    assert cell.lookup(0.5, -10.0).r0 > p.r0
    assert max(f["rmse_mv"] for f in cell.source["fit"] if f["kind"] == "hppc") < 30.0
    # the half pseudo-OCV gap the identification measured, per temperature: larger cold
    assert cell.ocv_half_gap_v is not None
    gaps = [cell.source["ocv"][f"{t:g}"]["half_gap_mv_median"] * 1e-3 for t in cell.temperature_c]
    np.testing.assert_allclose(cell.ocv_half_gap_v, gaps, atol=1e-6)
    assert cell.ocv_half_gap(-10.0) > 2 * cell.ocv_half_gap(25.0) > 0


def test_the_gaps_current_is_the_mean_of_the_branch_currents() -> None:
    """The half gap is (I_d R + I_c R) / 2: its current is the branches' mean; a test
    whose branches differ by more than 10 % has no single current (NaN, and identify
    then writes no ocv_test_current_a)."""
    assert _branch_current(np.full(50, 0.25), np.full(9, -0.25)) == pytest.approx(0.25)
    assert _branch_current(np.full(50, 0.25), np.full(9, -0.26)) == pytest.approx(0.255)
    assert _branch_current(np.full(50, 0.25), np.zeros(0)) == pytest.approx(0.25)
    assert math.isnan(_branch_current(np.full(50, 0.25), np.full(9, -0.5)))
