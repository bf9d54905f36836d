"""The shipped voltage-correction network: verified loading, fallbacks, and its effect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_bms.cell import load_cell
from edge_bms.cli import main
from edge_bms.correction import (
    EMA_TAUS_S,
    FEATURES,
    ema_step,
    load_correction,
    try_load_correction,
)
from edge_bms.errors import CorrectionModelError
from edge_bms.estimator import PackEstimator

SHIPPED = Path(__file__).parents[2] / "edge_bms" / "data" / "models"


def _copy(tmp_path: Path) -> Path:
    for suffix in (".onnx", ".json"):
        shutil.copy(SHIPPED / f"bms-correction{suffix}", tmp_path / f"net{suffix}")
    return tmp_path / "net.onnx"


def test_shipped_network_loads_with_its_record() -> None:
    net = load_correction()
    assert net.record.kind == "bms-correction"
    assert net.record.extra["features"] == list(FEATURES)
    assert net.record.extra["cell"] == "lg-m50"
    # the record says it beats the plain filter on held-out profiles
    m = net.record.metrics
    assert m["heldout_soc_rmse"] < m["heldout_plain_soc_rmse"]


def test_a_modified_file_is_refused_and_the_filter_falls_back(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorrectionModelError, match="sha256 mismatch") as err:
        load_correction(path)
    assert err.value.reason == "integrity"
    net, reason, message = try_load_correction(path)
    assert net is None and reason == "integrity" and "refusing" in message
    cell = load_cell()
    est = PackEstimator(cell, 2, correction=net, correction_fallback=reason)
    e = est.step(0.0, 1.0, [3.7, 3.7], 25.0)
    e = est.step(1.0, 1.0, [3.7, 3.7], 25.0)
    assert not e.flags.correction_used and e.flags.correction_reason == "integrity"


def test_missing_and_malformed_records(tmp_path: Path) -> None:
    assert try_load_correction(tmp_path / "nope.onnx")[1] == "missing"
    path = _copy(tmp_path)
    record = json.loads(path.with_suffix(".json").read_text())
    record["extra"]["features"] = ["soc", "temperature_c"]
    path.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(CorrectionModelError, match="features"):
        load_correction(path)
    # a record without its hash is a metadata fault, though its message names sha256
    del record["sha256"]
    path.with_suffix(".json").write_text(json.dumps(record))
    net, reason, message = try_load_correction(path)
    assert net is None and reason == "metadata" and "sha256" in message


def test_cells_outside_the_training_range_use_the_plain_filter() -> None:
    cell = load_cell()
    net = load_correction()
    est = PackEstimator(cell, 3, correction=net)
    lo, hi = net.lo, net.hi
    cold = float(lo[1]) - 5.0  # colder than anything in training
    temps = np.array([25.0, cold, 25.0])
    v = cell.ocv(np.array([0.6, 0.6, 0.6]), temps)
    est.step(0.0, 0.0, v, temps)
    e = est.step(1.0, 2.0, v - 0.05, temps)
    assert e.flags.correction_cells is not None
    assert list(e.flags.correction_cells) == [True, False, True]
    assert e.flags.correction_reason == "range" and not e.flags.correction_used
    assert hi[2] > 5.0  # trained with real drive currents, not a toy range


def test_moving_averages_follow_a_current_step() -> None:
    ema = np.zeros((1, 3))
    for _ in range(60):
        ema = ema_step(ema, np.array([1.0]), 1.0)
    # after 60 s of 1 A: 1 - exp(-60/tau) for each time constant
    assert np.allclose(ema[0], 1.0 - np.exp(-60.0 / np.array(EMA_TAUS_S)), rtol=1e-12)


def test_onnx_matches_torch() -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from labctl.models.bms_correction import (
        BmsTrainConfig,
        TrainedCorrection,
        build_module,
        export_correction,
    )
    from labctl.models.registry import TrainingDataInfo

    rng = np.random.default_rng(0)
    cfg = BmsTrainConfig(hidden=8, steps=10)
    # features of the real scales (SOC ~0.5, T ~20 C, currents of amps): the folded
    # normalisation must reproduce (x - mu) / sd
    mean, std = rng.normal(0, 10, 6), rng.uniform(0.1, 20, 6)
    module = build_module(cfg, mean, std)
    info = TrainingDataInfo(query="", sha256="0" * 64, rows=0)
    onnx_bytes = export_correction(TrainedCorrection(module, cfg, {}, {}, info, 0.0))
    ops = [n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node]
    assert ops == ["Gemm", "Tanh", "Gemm", "Tanh", "Gemm", "Split"]

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = (mean + std * rng.normal(size=(257, 6))).astype(np.float32)
    dv, lv = sess.run(None, {"features": x})
    with torch.no_grad():
        tdv, tlv = module(torch.from_numpy(x))
    assert np.abs(tdv.numpy()).max() > 1e-3  # not a trivially zero comparison
    np.testing.assert_allclose(dv, tdv.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lv, tlv.numpy(), rtol=1e-5, atol=1e-5)


def test_replay_uses_the_shipped_network_and_holds_missing_samples(tmp_path: Path) -> None:
    # 30 min of the held-out UDDS profile at 25 C (PyBaMM DFN + sensor model, with its
    # own dropouts), given a SOC 20 points wrong with the default sigma 0.3: on the steep
    # top of the OCV curve the first sample pulls it back to within 2 points at once.
    # (On this head the plain filter is closer than the corrected one, 0.15 vs 0.41 %
    # RMSE; the network's gain shows on the whole held-out set, scripts/bench_bms.py.)
    src_data = Path(__file__).parent / "data" / "udds_fresh_25C_head.csv"
    lines = src_data.read_text().splitlines()
    header = lines[0].split(",")
    truth = np.genfromtxt(src_data, delimiter=",", names=True)
    f = lines[300].split(",")
    lines[300] = ",".join([f[0], "", *f[2:]])  # a dropped current sample: held
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("\n".join(lines) + "\n")
    assert header[:4] == ["time_s", "current_a", "voltage_v", "temperature_c"]
    start = ["--initial-soc", f"{truth['soc_true'][0] - 0.2:.3f}"]
    assert main(["replay", "--input", str(src), "--output", str(out), *start]) == 0
    dl = np.genfromtxt(out, delimiter=",", names=True)
    assert dl["correction_used"][1:].mean() > 0.99
    assert (
        main(["replay", "--input", str(src), "--output", str(out), *start, "--no-correction"]) == 0
    )
    plain = np.genfromtxt(out, delimiter=",", names=True)
    assert plain["correction_used"].sum() == 0
    assert abs(dl["soc"][0] - truth["soc_true"][0]) < 0.02  # the given start was 0.2 off
    ok = np.isfinite(truth["current_a"])
    err_dl = np.abs(dl["soc"] - truth["soc_true"])[ok][300:]
    err_plain = np.abs(plain["soc"] - truth["soc_true"])[ok][300:]
    # converged within 5 min, and within 2 points for the rest
    assert err_dl.max() < 0.02, err_dl.max()
    assert err_plain.max() < 0.03, err_plain.max()
