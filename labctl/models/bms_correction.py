"""Train the edge BMS voltage-correction network in torch and export it to ONNX.

The data are the ground-truth profiles of ``labctl models bms-data`` (PyBaMM DFN,
measured columns plus the truth). For each training profile the shipped 2-RC model is
run with the *true* SOC and the measured current, temperature and time; what it gets
wrong (measured voltage minus ECM voltage) is the target. The network
(:mod:`edge_bms.correction`: features SOC, T, I and three moving averages of I) learns
the mean of that residual and its log variance (Gaussian negative log-likelihood), so
the filter gets both a better voltage model and a measurement noise that grows where
the ECM is poor.

The SOC feature is jittered by a few percent in training, because at run time the
network sees the filter's estimate, not the truth. Input normalisation is part of the
exported graph, so the edge feeds raw features.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from edge_bms.cell import CellModel
from edge_bms.correction import EMA_TAUS_S, FEATURES, KIND, ema_step, features
from labctl.models._export import quiet_exporter
from labctl.models.registry import InputSpec, ModelRecord, OutputSpec, TrainingDataInfo

if TYPE_CHECKING:
    import torch

FloatArray = npt.NDArray[np.float64]
OPSET = 18
MEASURED = ("time_s", "current_a", "voltage_v", "temperature_c")
# the network's raw outputs: dv in units of 10 mV, log variance around ln(1.2e-4 V^2)
DV_SCALE_V = 0.01
LOG_VAR_SHIFT = -9.0


class BmsTrainConfig(BaseModel):
    """Settings of the correction network's training."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(default=32, ge=4, le=256)
    layers: int = Field(default=2, ge=1, le=4)
    steps: int = Field(default=3000, ge=10)
    batch: int = Field(default=4096, ge=64)
    lr: float = Field(default=3e-3, gt=0)
    soc_jitter: float = Field(default=0.02, ge=0, description="std of the SOC feature noise")
    var_floor_v2: float = Field(default=1e-6, gt=0, description="variance floor, V^2 (1 mV std)")
    seed: int = 0
    r_inflations: tuple[float, ...] = (4.0, 16.0, 64.0, 256.0, 1024.0)
    plain_noises_v: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
    tune_soh: bool = Field(
        default=True,
        description="tune (and gate promotion) with the online SOH estimator fed back, "
        "the configuration edge_bms ships",
    )
    max_rows_per_profile: int = Field(default=20000, ge=100)


@dataclass
class Profile:
    """One ground-truth profile: measured columns, plus the truth where the file has it."""

    name: str
    time_s: FloatArray
    current_a: FloatArray
    voltage_v: FloatArray
    temperature_c: FloatArray
    soc_true: FloatArray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_profile(path: Path, meta: dict[str, Any] | None = None) -> Profile:
    """A profile CSV (contract-4 columns first; ``soc_true`` if present)."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        missing = [c for c in MEASURED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        data = np.array(
            [[float(x) if x not in ("", "nan", "NaN") else np.nan for x in row] for row in reader]
        )
    col = {name: k for k, name in enumerate(header)}
    return Profile(
        name=path.stem,
        time_s=data[:, col["time_s"]],
        current_a=data[:, col["current_a"]],
        voltage_v=data[:, col["voltage_v"]],
        temperature_c=data[:, col["temperature_c"]],
        soc_true=data[:, col["soc_true"]] if "soc_true" in col else None,
        meta=dict(meta or {}),
    )


def load_split(root: Path, split: str) -> list[Profile]:
    """The profiles of ``split`` ("train" or "test") listed in ``root/manifest.json``."""
    manifest = json.loads((root / "manifest.json").read_text())
    entries = manifest["profiles"]
    fresh_r0 = manifest.get("cells", {}).get("fresh", {}).get("r0_ohm")
    out = []
    for entry in entries.values() if isinstance(entries, dict) else entries:
        if entry["split"] == split and (root / entry["file"]).is_file():
            meta = dict(entry)
            if fresh_r0 and entry.get("r0_ohm"):
                # An aged cell's resistance growth, as the SOH estimator reports it.
                meta["r0_scale"] = float(entry["r0_ohm"]) / float(fresh_r0)
            out.append(read_profile(root / entry["file"], meta))
    if not out:
        raise ValueError(f"{root}/manifest.json lists no {split!r} profiles")
    return out


def ecm_residuals(cell: CellModel, p: Profile) -> tuple[npt.NDArray[np.float32], FloatArray]:
    """Features [n, 6] (true SOC) and the residual v_measured - v_ECM [n] of one profile.

    The ECM runs with the cell's true R0 scale (``meta["r0_scale"]``, aged cells): aging
    is the SOH estimator's job at run time, so the network learns only what the circuit
    itself gets wrong. Rows where a measurement is missing (NaN) get NaN residuals; the
    states still run.
    """
    if p.soc_true is None:
        raise ValueError(f"profile {p.name}: no soc_true column to train on")
    n = p.time_s.size
    i_meas = np.nan_to_num(p.current_a, nan=0.0)
    temp = _ffill(p.temperature_c)
    soc = p.soc_true
    prm = cell.lookup(soc, temp)
    r0 = prm.r0 * float(p.meta.get("r0_scale", 1.0))
    dt = np.diff(p.time_s, prepend=p.time_s[0])
    v1 = np.zeros(n)
    v2 = np.zeros(n)
    ema = np.zeros((n, len(EMA_TAUS_S)))
    a1 = np.exp(-dt / prm.tau1)
    a2 = np.exp(-dt / prm.tau2)
    b1 = prm.r1 * (1.0 - a1)
    b2 = prm.r2 * (1.0 - a2)
    x1 = x2 = 0.0
    e = np.full((1, len(EMA_TAUS_S)), i_meas[0])  # as the estimator starts its averages
    # v1/v2 use the current held over the step that ends at row k (zero-order hold)
    for k in range(n):
        if k:
            x1 = a1[k] * x1 + b1[k] * i_meas[k - 1]
            x2 = a2[k] * x2 + b2[k] * i_meas[k - 1]
        # the moving averages include the sample at k, as the estimator's do
        e = ema_step(e, i_meas[k : k + 1], dt[k])
        v1[k], v2[k] = x1, x2
        ema[k] = e[0]
    v_ecm = prm.ocv - i_meas * r0 - v1 - v2
    resid = p.voltage_v - v_ecm
    return features(soc, temp, i_meas, ema), resid


def _ffill(x: FloatArray) -> FloatArray:
    out = x.copy()
    bad = ~np.isfinite(out)
    if bad.all():
        raise ValueError("temperature column has no finite value")
    if bad.any():
        idx = np.where(~bad, np.arange(out.size), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.argmax(~bad))
        idx[:first] = first
        out = out[idx]
    return out


@dataclass
class TrainedCorrection:
    module: Any  # torch.nn.Module
    config: BmsTrainConfig
    ranges: dict[str, tuple[float, float]]
    metrics: dict[str, float]
    training_data: TrainingDataInfo
    seconds: float
    r_inflation: float = 1.0


def _dataset(
    cell: CellModel, profiles: Sequence[Profile], max_rows: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    xs, ys = [], []
    for p in profiles:
        x, r = ecm_residuals(cell, p)
        ok = np.isfinite(r) & np.all(np.isfinite(x), axis=1)
        x, r = x[ok], r[ok]
        if x.shape[0] > max_rows:
            keep = np.linspace(0, x.shape[0] - 1, max_rows).astype(int)
            x, r = x[keep], r[keep]
        xs.append(x)
        ys.append(r.astype(np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def data_hash(profiles: Sequence[Profile]) -> str:
    h = hashlib.sha256()
    for p in profiles:
        h.update(p.name.encode())
        for arr in (p.time_s, p.current_a, p.voltage_v, p.temperature_c):
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()


def build_module(cfg: BmsTrainConfig, mean: FloatArray, std: FloatArray) -> torch.nn.Module:
    import torch
    from torch import nn

    class CorrectionMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mu: torch.Tensor
            self.sd: torch.Tensor
            self.register_buffer("mu", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("sd", torch.tensor(std, dtype=torch.float32))
            layers: list[nn.Module] = []
            width = len(FEATURES)
            for _ in range(cfg.layers):
                layers += [nn.Linear(width, cfg.hidden), nn.Tanh()]
                width = cfg.hidden
            layers.append(nn.Linear(width, 2))
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.net((x - self.mu) / self.sd)
            # dv in units of 10 mV inside the net keeps the last layer well scaled
            return out[:, :1] * DV_SCALE_V, out[:, 1:] + LOG_VAR_SHIFT

    return CorrectionMLP()


def folded_module(module: torch.nn.Module) -> torch.nn.Module:
    """The same function with the input normalisation folded into the first layer and the
    output scaling into the last: 6 ONNX nodes instead of 11 (Gemm/Tanh x2, Gemm, Split).
    At 200 rows onnxruntime's cost is per node, not per multiply (~2 us a node), so this
    halves the network's share of a pack step; outputs agree to float32 rounding."""
    import copy

    import torch
    from torch import nn

    net = cast(nn.Sequential, module.net)
    mu = cast(torch.Tensor, module.mu)
    sd = cast(torch.Tensor, module.sd)
    layers = [copy.deepcopy(m) for m in net]
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first = linear[0]
        w = first.weight / sd  # W ((x - mu) / sd) + b = (W / sd) x + (b - (W / sd) mu)
        first.bias.sub_(w @ mu)
        first.weight.copy_(w)
        last = linear[-1]
        last.weight[0] *= DV_SCALE_V
        last.bias[0] *= DV_SCALE_V
        last.bias[1] += LOG_VAR_SHIFT

    class FoldedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dv, log_var = torch.split(self.net(x), 1, dim=1)
            return dv, log_var

    return FoldedMLP().eval()


def train_correction(
    cell: CellModel,
    train: Sequence[Profile],
    cfg: BmsTrainConfig | None = None,
    *,
    query: str = "",
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedCorrection:
    """Fit the network on ``train`` profiles (held-out metrics are the caller's job)."""
    import torch

    cfg = cfg or BmsTrainConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x, y = _dataset(cell, train, cfg.max_rows_per_profile)
    mean = x.mean(axis=0).astype(np.float64)
    std = np.maximum(x.std(axis=0), 1e-3).astype(np.float64)
    module = build_module(cfg, mean, std)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    n = xt.shape[0]
    log_floor = float(np.log(cfg.var_floor_v2))
    loss_val = float("nan")
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.integers(0, n, size=min(cfg.batch, n)))
        xb = xt[idx].clone()
        xb[:, 0] += torch.randn(xb.shape[0]) * cfg.soc_jitter
        mu, log_var = module(xb)
        log_var = torch.clamp(log_var[:, 0], min=log_floor)
        r = yt[idx] - mu[:, 0]
        loss = 0.5 * (log_var + r * r / torch.exp(log_var)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_val = loss.item()
        if progress is not None and (step % 200 == 0 or step == cfg.steps - 1):
            progress(step + 1, cfg.steps, loss_val)
    module.eval()
    with torch.no_grad():
        mu, _ = module(xt)
    fit = y - mu[:, 0].numpy()
    lo = x.min(axis=0)
    hi = x.max(axis=0)
    ranges = {c: (float(lo[k]), float(hi[k])) for k, c in enumerate(FEATURES)}
    # SOC is what the filter estimates: give it the jitter's margin, and the physical ends.
    ranges["soc"] = (max(-0.05, ranges["soc"][0] - 0.05), min(1.05, ranges["soc"][1] + 0.05))
    metrics = {
        "train_resid_rms_mv_before": float(np.sqrt(np.mean(y**2)) * 1e3),
        "train_resid_rms_mv_after": float(np.sqrt(np.mean(fit**2)) * 1e3),
        "train_loss": loss_val,
    }
    info = TrainingDataInfo(query=query, sha256=data_hash(train), rows=int(n))
    return TrainedCorrection(module, cfg, ranges, metrics, info, time.perf_counter() - t0)


def export_correction(trained: TrainedCorrection) -> bytes:
    """The network as ONNX: input ``features`` [batch, 6], outputs ``dv_v``, ``log_var``."""
    import torch

    module = folded_module(trained.module.eval())
    batch = torch.export.Dim("batch")
    with quiet_exporter():
        program = torch.onnx.export(
            module,
            (torch.zeros(4, len(FEATURES)),),
            input_names=["features"],
            output_names=["dv_v", "log_var"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def correction_record(
    trained: TrainedCorrection,
    metrics: dict[str, float],
    *,
    name: str = "bms-correction",
    cell: CellModel | None = None,
) -> ModelRecord:
    import onnx
    import torch

    lo = min(r[0] for r in trained.ranges.values())
    hi = max(r[1] for r in trained.ranges.values())
    return ModelRecord(
        name=name,
        kind=KIND,
        inputs=[
            InputSpec(
                name="features",
                shape=[None, len(FEATURES)],
                units="1, degC, A, A, A, A",
                min=lo,
                max=hi,
                columns=list(FEATURES),
                description="per cell: filter SOC, temperature, current (+ = discharge) and "
                f"its moving averages with time constants {list(EMA_TAUS_S)} s; "
                "per-column ranges in extra.feature_ranges",
            )
        ],
        outputs=[
            OutputSpec(name="dv_v", shape=[None, 1], units="V", description="ECM voltage error"),
            OutputSpec(
                name="log_var", shape=[None, 1], units="ln V^2", description="residual variance"
            ),
        ],
        training_data=trained.training_data,
        metrics={**trained.metrics, **metrics},
        primary_metric="tune_soc_rmse",
        higher_is_better=False,
        framework={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": str(OPSET),
            "python": platform.python_version(),
        },
        extra={
            "features": list(FEATURES),
            "ema_taus_s": list(EMA_TAUS_S),
            "feature_ranges": {k: list(v) for k, v in trained.ranges.items()},
            "r_floor_v2": trained.config.var_floor_v2,
            "r_inflation": trained.r_inflation,
            "config": trained.config.model_dump(mode="json"),
            "cell": cell.name if cell is not None else "",
            "train_seconds": round(trained.seconds, 2),
        },
    )


@dataclass
class BmsTrainResult:
    """What ``labctl models train-bms`` did: the record, the promotion, the held-out
    scores, and the tuning-profile scores the promotion compared."""

    record: ModelRecord
    promoted: bool
    reason: str
    plain: dict[str, float]
    corrected: dict[str, float]
    plain_noise_v: float
    onnx: bytes
    tune_corrected: float = float("nan")
    tune_incumbent: float | None = None


def train_bms(
    data_root: Path,
    registry: Any,
    *,
    cell: CellModel | None = None,
    config: BmsTrainConfig | None = None,
    name: str = "bms-correction",
    progress: Callable[[str], None] | None = None,
) -> BmsTrainResult:
    """Train on the ``train`` profiles of ``data_root``, tune, register, promote if not
    worse than the promoted version, and score plain vs corrected filter on the held-out
    ``test`` profiles (reported and recorded, never used for a choice).

    Both filters get the same tuning budget on every other training profile, in the
    configuration edge_bms ships (online SOH fed back, unless ``tune_soh`` is off): the
    plain filter's voltage noise from ``plain_noises_v`` and the corrected filter's
    variance inflation from ``r_inflations``, each the grid value with the lowest SOC
    RMSE (the sensor's 1-3 mV would make the plain filter overconfident). Promotion
    compares the candidate with the promoted version run on the same tuning profiles in
    the same configuration, so the held-out set takes no part in it (decision 0020).
    """
    from edge_bms.cell import load_cell
    from edge_bms.correction import CorrectionRecord, VoltageCorrectionNet
    from edge_bms.errors import CorrectionModelError
    from labctl.models.bms_eval import evaluate
    from labctl.models.registry import ModelError, Registry, sha256_bytes

    say = progress or (lambda _m: None)
    cell = cell or load_cell()
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    train = load_split(data_root, "train")
    test = load_split(data_root, "test")
    say(f"{len(train)} training and {len(test)} held-out profiles from {data_root}")
    trained = train_correction(
        cell,
        train,
        config,
        query=f"{data_root}/manifest.json split=train",
        progress=lambda s, n, loss: say(f"training step {s}/{n}, loss {loss:.3f}"),
    )
    model = export_correction(trained)

    def candidate() -> VoltageCorrectionNet:
        draft = correction_record(trained, {}, name=name, cell=cell).model_dump(mode="json")
        draft.update(version="candidate", sha256=sha256_bytes(model))
        return VoltageCorrectionNet(model, CorrectionRecord.model_validate(draft), "candidate")

    # Tune both filters' measurement noise on (every other) training profile, same budget:
    # the plain filter's voltage noise, the corrected filter's variance inflation.
    tune = list(train[::2])
    cfg = trained.config
    soh = cfg.tune_soh
    where = "with online SOH" if soh else "without SOH"
    scores = {}
    for v in cfg.plain_noises_v:
        noise = {**cell.filter_noise, "voltage_v": v}
        scores[v] = evaluate(cell, tune, None, soh=soh, noise=noise)[0]["rmse"]
        say(f"tuning ({where}): plain filter, noise {v * 1e3:g} mV: SOC RMSE {scores[v]:.4f}")
    plain_noise_v = min(scores, key=scores.__getitem__)
    inflation = {}
    for k in cfg.r_inflations:
        trained.r_inflation = k
        inflation[k] = evaluate(cell, tune, candidate(), soh=soh)[0]["rmse"]
        say(f"tuning ({where}): corrected filter, variance x{k:g}: SOC RMSE {inflation[k]:.4f}")
    trained.r_inflation = min(inflation, key=inflation.__getitem__)
    tune_score = inflation[trained.r_inflation]
    incumbent_score = None
    unscorable = ""  # why the promoted version cannot run here (then the candidate wins)
    incumbent = reg.promoted(name)
    if incumbent is not None:
        try:
            data, rec = reg.load_bytes(name, incumbent)
            old = VoltageCorrectionNet(
                data, CorrectionRecord.model_validate(rec.model_dump(mode="json")), incumbent
            )
        # e.g. a network made for other features, a damaged file: it cannot run in this
        # edge_bms, so it is no yardstick; the new network must not be lost for it
        except (CorrectionModelError, ModelError, ValueError) as exc:
            unscorable = f"{type(exc).__name__}: {exc}"
            say(f"promoted {incumbent} cannot be scored ({unscorable})")
        else:
            incumbent_score = evaluate(cell, tune, old, soh=soh)[0]["rmse"]
            say(f"promoted {incumbent} on the same tuning profiles: SOC RMSE {incumbent_score:.4f}")
    net = candidate()
    say("scoring the plain filter on the held-out profiles")
    noise = {**cell.filter_noise, "voltage_v": plain_noise_v}
    plain, _ = evaluate(cell, test, None, soh=soh, noise=noise)
    say("scoring the corrected filter on the held-out profiles")
    corrected, traces = evaluate(cell, test, net, soh=soh)
    metrics = {
        "tune_soc_rmse": tune_score,
        "heldout_soc_rmse": corrected["rmse"],
        "heldout_soc_max_abs": corrected["max_abs"],
        "heldout_plain_soc_rmse": plain["rmse"],
        "heldout_plain_soc_max_abs": plain["max_abs"],
        "heldout_correction_used": float(np.mean([t.correction_frac for t in traces])),
        "plain_voltage_noise_v": plain_noise_v,
        "tuned_with_soh": float(soh),
    }
    record = reg.add(model, correction_record(trained, metrics, name=name, cell=cell))
    if unscorable:
        reg.promote(name, record.version)
        promoted, reason = (
            True,
            (
                f"promoted {incumbent} cannot be scored in this edge_bms ({unscorable}); "
                f"{record.version} promoted as the runnable network"
            ),
        )
    else:
        outcome = reg.promote_if_not_worse(
            name,
            record.version,
            candidate_score=tune_score if incumbent_score is not None else None,
            incumbent_score=incumbent_score,
        )
        promoted, reason = outcome.promoted, outcome.reason
    return BmsTrainResult(
        record,
        promoted,
        reason,
        plain,
        corrected,
        plain_noise_v,
        model,
        tune_corrected=tune_score,
        tune_incumbent=incumbent_score,
    )


def ship(registry: Any, name: str, version: str | None, dest: Path) -> tuple[Path, Path]:
    """Copy a registered network to ``dest/<name>.onnx`` + ``.json`` (what edge_bms loads)."""
    from labctl.models.registry import Registry

    reg = registry if isinstance(registry, Registry) else Registry(registry)
    data, record = reg.load_bytes(name, version)
    dest.mkdir(parents=True, exist_ok=True)
    onnx_path = dest / f"{name}.onnx"
    json_path = dest / f"{name}.json"
    onnx_path.write_bytes(data)
    json_path.write_text(record.model_dump_json(indent=1) + "\n")
    return onnx_path, json_path
