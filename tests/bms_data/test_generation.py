"""A quick generation end to end (one module-scoped run): the profile and SOP files'
columns, units and signs, SOC truth against coulomb counting, the manifest, the
characterization files, and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labctl.models.bms import dataset as ds


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    out = tmp_path_factory.mktemp("bms") / "data"
    messages: list[str] = []
    manifest = ds.generate(out, quick=True, progress=messages.append)
    return out, manifest, messages


def read(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True)


def header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def test_manifest_records_model_cells_and_profiles(
    quick: tuple[Path, dict[str, Any], list[str]],
) -> None:
    out, manifest, messages = quick
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["cell_model"]["parameter_set"] == "Chen2020"
    assert manifest["cell_model"]["options"] == {"thermal": "lumped", "contact resistance": "true"}
    import pybamm

    assert manifest["versions"]["pybamm"] == pybamm.__version__
    fresh = manifest["cells"]["fresh"]
    # The LG M50 of Chen2020: ~5.1 Ah at C/20 and 25 C, R0 ~23 mOhm at 50 % SOC.
    assert 5.0 < fresh["capacity_ah"] < 5.25
    assert 0.015 < fresh["r0_ohm"] < 0.035
    assert set(manifest["profiles"]) == {"hwfet_fresh_25C", "udds_fresh_10C"}
    for name, p in manifest["profiles"].items():
        for key in ("kind", "ambient_c", "aging", "split", "seed", "capacity_ah", "r0_ohm",
                    "initial_soc", "file", "sensor", "sha256"):  # fmt: skip
            assert key in p, (name, key)
        assert p["capacity_ah"] == fresh["capacity_ah"]
    assert manifest["split"]["test"] == ["udds_fresh_10C"]
    assert manifest["split"]["train"] == ["hwfet_fresh_25C"]
    assert "soc_true" in manifest["definitions"] and "capacity_ah" in manifest["definitions"]
    assert any("udds_fresh_10C" in m for m in messages)


def test_profile_columns_units_and_signs(quick: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, manifest, _ = quick
    for p in manifest["profiles"].values():
        path = out / p["file"]
        assert header(path) == list(ds.PROFILE_COLUMNS)
        d = read(path)
        t = d["time_s"]
        assert t[0] == 0.0 and np.all(np.diff(t) >= 1.0) and np.all(t == np.round(t))
        assert t[-1] == 240.0
        v, i, soc, ocv = d["voltage_true_v"], d["current_true_a"], d["soc_true"], d["ocv_true_v"]
        assert v.min() >= 2.5 and v.max() <= 4.2 + 1e-6
        assert np.all((soc > 0.8) & (soc < 1.0))
        assert soc[0] == pytest.approx(p["initial_soc"], abs=1e-6)
        # Positive current = discharge: SOC falls while it flows, and the terminal
        # voltage sits below the OCV (above it while charging).
        dis = i[1:] > 1.0
        assert np.all(np.diff(soc)[dis] < 0)
        assert np.all(v[i > 1.0] < ocv[i > 1.0]) and np.all(v[i < -1.0] > ocv[i < -1.0])
        assert (i > 5.0).any() and (i < -1.0).any()  # drive and regen both present
        # Cell temperature starts at the ambient and warms.
        assert d["temperature_true_c"][0] == pytest.approx(p["ambient_c"], abs=1e-3)
        assert d["temperature_true_c"].max() > p["ambient_c"] + 0.1
        assert np.all(d["ambient_c"] == p["ambient_c"])


def test_soc_truth_matches_coulomb_counting(quick: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, manifest, _ = quick
    for p in manifest["profiles"].values():
        d = read(out / p["file"])
        i, t = d["current_true_a"], d["time_s"]
        q = np.concatenate([[0.0], np.cumsum(np.diff(t) * (i[1:] + i[:-1]) / 2)]) / 3600.0
        counted = d["soc_true"][0] - q / p["capacity_ah"]
        assert np.max(np.abs(counted - d["soc_true"])) < 1e-3
        assert np.max(np.abs(q - d["discharged_ah_true"])) < 5e-3


def test_measured_columns_follow_the_sensor_model(
    quick: tuple[Path, dict[str, Any], list[str]],
) -> None:
    out, manifest, _ = quick
    p = manifest["profiles"]["udds_fresh_10C"]
    s = p["sensor"]
    d = read(out / p["file"])
    ok = ~np.isnan(d["voltage_v"])
    err = d["voltage_v"][ok] - d["voltage_true_v"][ok] - s["voltage_offset_v"]
    expected = np.hypot(s["voltage_noise_v"], s["voltage_lsb_v"] / np.sqrt(12))
    assert np.std(err) == pytest.approx(expected, rel=0.25)
    ok = ~np.isnan(d["current_a"])
    resid = d["current_a"][ok] - (
        s["current_gain"] * d["current_true_a"][ok] + s["current_offset_a"]
    )
    assert np.std(resid) == pytest.approx(np.hypot(0.02, 0.01 / np.sqrt(12)), rel=0.25)


def test_sop_truth_file(quick: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, manifest, _ = quick
    p = manifest["profiles"]["udds_fresh_10C"]
    path = out / p["sop_file"]
    assert header(path) == list(ds.SOP_COLUMNS)
    d = np.atleast_1d(read(path))
    np.testing.assert_array_equal(d["time_s"], [120.0, 240.0])
    limits = manifest["sop"]["limits"]
    for h in ("10s", "30s"):
        assert np.all((d[f"i_dis_{h}_a"] >= 0) & (d[f"i_dis_{h}_a"] <= limits["i_discharge_max_a"]))
        assert np.all((d[f"i_chg_{h}_a"] >= 0) & (d[f"i_chg_{h}_a"] <= limits["i_charge_max_a"]))
        # Power = current x end voltage, within the voltage window.
        v_dis = d[f"p_dis_{h}_w"] / d[f"i_dis_{h}_a"]
        assert np.all((v_dis >= 2.5 - 1e-3) & (v_dis <= 4.2))
    # A longer hold allows no more current.
    assert np.all(d["i_dis_30s_a"] <= d["i_dis_10s_a"] + 0.02)
    assert np.all(d["i_chg_30s_a"] <= d["i_chg_10s_a"] + 0.02)
    # Near full, charge is the limited direction.
    assert np.all(d["i_chg_10s_a"] < 10.0)


def test_characterization_files(quick: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, manifest, _ = quick
    directory = out / "characterization"
    sidecar = json.loads((directory / "protocol.json").read_text())
    assert sidecar["nominal_capacity_ah"] == 5.0 and sidecar["temperatures_c"] == [25.0]
    files = {f["file"]: f for f in sidecar["files"]}
    assert set(files) == {"ocv_25C.csv", "hppc_25C.csv"}
    for name in files:
        assert header(directory / name) == [
            "time_s",
            "current_a",
            "voltage_v",
            "temperature_c",
            "step",
        ]
    ocv = read(directory / "ocv_25C.csv")
    steps = {s["step"]: s for s in files["ocv_25C.csv"]["steps"]}
    dis = ocv["step"] == 1
    assert steps[1]["kind"] == "discharge" and np.allclose(ocv["current_a"][dis], 0.25, atol=0.01)
    # The C/20 discharge runs to 2.5 V and delivers the true capacity.
    assert ocv["voltage_v"][dis].min() == pytest.approx(2.5, abs=0.01)
    ah = np.sum(ocv["current_a"][dis]) * 10.0 / 3600.0
    assert ah == pytest.approx(manifest["cells"]["fresh"]["capacity_ah"], rel=0.01)
    hppc = read(directory / "hppc_25C.csv")
    table = files["hppc_25C.csv"]["steps"]
    first = next(s for s in table if s["kind"] == "pulse" and s["current_a"] == 5.0)
    rows = hppc["step"] == first["step"]
    assert rows.sum() == 100  # 10 s at 0.1 s
    assert np.allclose(hppc["current_a"][rows], 5.0, atol=0.01)
    before = hppc["voltage_v"][hppc["step"] == first["step"] - 1][-1]
    drop = before - hppc["voltage_v"][rows][0]
    # ~25 mOhm x 5 A in the first 0.1 s.
    assert 0.08 < drop < 0.2
    truth = read(directory / "truth_ocv.csv")
    assert truth["ocv_v"][-1] == pytest.approx(4.2, abs=1e-3)
    assert np.all(np.diff(truth["ocv_v"]) > 0)


def test_rerun_skips_finished_files_and_redoes_a_missing_one(
    quick: tuple[Path, dict[str, Any], list[str]],
) -> None:
    out, manifest, _ = quick
    profile = out / manifest["profiles"]["hwfet_fresh_25C"]["file"]
    stamp = profile.stat().st_mtime_ns
    messages: list[str] = []
    again = ds.generate(out, quick=True, progress=messages.append)
    assert "0 to generate, 4 up to date" in messages
    assert profile.stat().st_mtime_ns == stamp
    assert again["profiles"] == manifest["profiles"]
    (out / manifest["profiles"]["udds_fresh_10C"]["sop_file"]).unlink()
    messages.clear()
    third = ds.generate(out, quick=True, progress=messages.append)
    assert "1 to generate, 3 up to date" in messages
    assert (out / "sop" / "udds_fresh_10C.csv").is_file()
    # Same seed, same numbers.
    assert (
        third["profiles"]["udds_fresh_10C"]["sha256"]
        == manifest["profiles"]["udds_fresh_10C"]["sha256"]
    )
    with pytest.raises(ds.DatasetError, match="quick=True"):
        ds.generate(out, quick=False)


def test_a_second_draw_of_the_held_out_split(
    quick: tuple[Path, dict[str, Any], list[str]], tmp_path: Path
) -> None:
    """``draw=1, split="test"``: the same held-out profiles (names, cells, ambients) with
    other seeds, hence other sensor errors and numbers; no training profile and no
    characterization; a directory of another draw is refused, naming the draw."""
    out0, manifest0, _ = quick
    full0, full1 = ds.plan(draw=0), ds.plan(draw=1)
    assert [(s.name, s.split, s.ambient) for s in full0] == [
        (s.name, s.split, s.ambient) for s in full1
    ]
    assert {b.seed - a.seed for a, b in zip(full0, full1, strict=True)} == {ds.DRAW_SEED_STRIDE}
    # draw 0 keeps the seeds existing data sets were made with (so they stay up to date)
    assert full0[0].seed == 101 and [s.seed for s in ds.plan(quick=True)] == [1, 2]
    out = tmp_path / "draw1"
    manifest = ds.generate(out, quick=True, draw=1, split="test", progress=None)
    assert list(manifest["profiles"]) == ["udds_fresh_10C"]
    assert manifest["draw"] == 1 and manifest["only_split"] == "test"
    assert manifest["split"]["train"] == [] and manifest["characterization"]["files"] == {}
    assert not list((out / "characterization").glob("*.csv"))
    a = manifest0["profiles"]["udds_fresh_10C"]
    b = manifest["profiles"]["udds_fresh_10C"]
    assert a["sensor"] != b["sensor"] and a["sha256"] != b["sha256"]
    v0 = read(out0 / a["file"])["voltage_v"]
    v1 = read(out / b["file"])["voltage_v"]
    n = min(v0.size, v1.size)
    assert np.nanmax(np.abs(v0[:n] - v1[:n])) > 1e-3  # other noise and offsets
    with pytest.raises(ds.DatasetError, match="draw=1"):
        ds.generate(out, quick=True, draw=2, split="test", progress=None)
    with pytest.raises(ds.DatasetError, match="draw=-1"):
        ds.plan(draw=-1)
    with pytest.raises(ds.DatasetError, match="draw=-1"):  # before any simulation
        ds.generate(tmp_path / "bad", quick=True, draw=-1, progress=None)
    assert not (tmp_path / "bad").exists()
    # a manifest written before draws existed (no draw / only_split keys) still resumes
    old = json.loads((out0 / "manifest.json").read_text())
    old.pop("draw"), old.pop("only_split")
    (out0 / "manifest.json").write_text(json.dumps(old))
    messages: list[str] = []
    ds.generate(out0, quick=True, progress=messages.append)
    assert "0 to generate, 4 up to date" in messages


def test_importing_the_package_stays_light() -> None:
    code = (
        "import sys, labctl.models.bms.dataset, labctl.models.bms.truth, labctl.cli.models_bms\n"
        "heavy = ('pybamm', 'fastsim', 'torch', 'casadi')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_bms_registers_ships_and_gates_promotion(
    quick: tuple[Path, dict[str, Any], list[str]], tmp_path: Path
) -> None:
    """`labctl models train-bms` on the quick data: a verified ONNX network with its
    record, scored plain vs corrected on the held-out profile; later candidates are
    registered and promoted only if not worse than the promoted network re-run on the
    tuning profiles, or if that network cannot run at all."""
    from typer.testing import CliRunner

    from edge_bms.correction import FEATURES, load_correction
    from labctl.cli import app
    from labctl.models.registry import Registry

    out, _, _ = quick
    reg, ship = tmp_path / "reg", tmp_path / "ship"
    args = ["models", "train-bms", "--data", str(out), "--registry", str(reg)]
    first = CliRunner().invoke(app, [*args, "--steps", "300", "--ship-to", str(ship)])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout[first.stdout.index("{") :])
    assert result["version"] == "v1" and result["promoted"] is True
    for side in ("heldout_plain", "heldout_corrected"):
        assert 0.0 < result[side]["rmse"] < 0.2
    net = load_correction(ship / "bms-correction.onnx")
    assert net.record.extra["features"] == list(FEATURES)
    assert len(net.record.model_extra["training_data"]["sha256"]) == 64  # type: ignore[index]
    assert net.record.metrics["heldout_soc_rmse"] == pytest.approx(
        result["heldout_corrected"]["rmse"]
    )
    assert result["tune_incumbent_rmse"] is None  # nothing promoted before
    assert net.record.metrics["tune_soc_rmse"] == pytest.approx(result["tune_corrected_rmse"])
    # v1's network again as v2, with a record from before decision 0020 (no tune score):
    # the incumbent's score must be measured, not read from its record.
    registry = Registry(reg)
    data, rec = registry.load_bytes("bms-correction", "v1")
    old = rec.model_copy(
        update={"metrics": {k: v for k, v in rec.metrics.items() if k != "tune_soc_rmse"}}
    )
    registry.promote("bms-correction", registry.add(data, old).version)
    # A candidate trained for 10 steps: registered, promoted only if not worse than v2
    # run on the same tuning profiles.
    second = CliRunner().invoke(app, [*args, "--steps", "10"])
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout[second.stdout.index("{") :])
    assert again["version"] == "v3"
    assert again["tune_incumbent_rmse"] == pytest.approx(result["tune_corrected_rmse"], rel=1e-6)
    worse = again["tune_corrected_rmse"] > again["tune_incumbent_rmse"]
    assert again["promoted"] is not worse
    assert ("worse than" if worse else "not worse than") in again["reason"]
    assert "tune_soc_rmse" in again["reason"]
    # A promoted network this edge_bms cannot run (made for other features): the new
    # one is registered and promoted, and the reason says why.
    broken = rec.model_copy(update={"extra": {**rec.extra, "features": ["soc", "x"]}})
    registry.promote("bms-correction", registry.add(data, broken).version)
    third = CliRunner().invoke(app, [*args, "--steps", "10"])
    assert third.exit_code == 0, third.output
    last = json.loads(third.stdout[third.stdout.index("{") :])
    assert last["version"] == "v5" and last["promoted"] is True
    assert last["tune_incumbent_rmse"] is None
    assert "v4 cannot be scored" in last["reason"] and "features" in last["reason"]
    assert registry.promoted("bms-correction") == "v5"
