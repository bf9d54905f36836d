"""Re-export a shipped correction network with its normalisation folded into the Gemms.

    .venv/bin/python scripts/fold_bms_network.py [--model edge_bms/data/models/bms-correction]

The same weights (read back from the ONNX file), exported by today's
``labctl.models.bms_correction.export_correction`` (6 nodes instead of 11). The record
keeps its metrics and training data, gets the new sha256 and the next version, and says
what it was derived from. Refuses to write if any output differs by more than float32
rounding on 20,000 feature rows drawn across the record's feature ranges. Networks
trained by ``labctl models train-bms`` from now on are exported folded; this is for the
one shipped before.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edge_bms.correction import FEATURES, read_pair
from labctl.models.bms_correction import (
    BmsTrainConfig,
    TrainedCorrection,
    build_module,
    export_correction,
)
from labctl.models.registry import TrainingDataInfo, sha256_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="edge_bms/data/models/bms-correction")
    args = parser.parse_args()
    model, record, onnx_path = read_pair(args.model)
    json_path = onnx_path.with_suffix(".json")
    graph = onnx.load_from_string(model).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    if "mu" not in weights:
        raise SystemExit(f"{onnx_path}: no 'mu' initializer: already folded?")
    cfg = BmsTrainConfig.model_validate(record.extra["config"])
    module = build_module(cfg, weights["mu"].astype(np.float64), weights["sd"].astype(np.float64))
    import torch

    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items() if k.startswith("net.")}
    state["mu"] = torch.from_numpy(np.array(weights["mu"]))
    state["sd"] = torch.from_numpy(np.array(weights["sd"]))
    module.load_state_dict(state)
    info = TrainingDataInfo(query="", sha256="0" * 64, rows=0)
    folded = export_correction(TrainedCorrection(module.eval(), cfg, {}, {}, info, 0.0))

    rng = np.random.default_rng(0)
    ranges = record.extra["feature_ranges"]
    lo = np.array([ranges[c][0] for c in FEATURES])
    hi = np.array([ranges[c][1] for c in FEATURES])
    x = (lo + (hi - lo) * rng.random((20000, len(FEATURES)))).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    old = ort.InferenceSession(model, providers=cpu).run(None, {"features": x})
    new = ort.InferenceSession(folded, providers=cpu).run(None, {"features": x})
    d_dv = float(np.abs(old[0] - new[0]).max())
    d_lv = float(np.abs(old[1] - new[1]).max())
    print(
        f"max |difference|: dv {d_dv:.2e} V (outputs up to {np.abs(old[0]).max():.3f} V), "
        f"log_var {d_lv:.2e}"
    )
    if d_dv > 1e-6 or d_lv > 1e-4:
        raise SystemExit("the folded network differs by more than float32 rounding: not written")
    raw = json.loads(json_path.read_text())
    number = int(str(raw["version"]).lstrip("v")) + 1
    raw["extra"]["derived_from"] = {
        "version": raw["version"],
        "sha256": raw["sha256"],
        "change": "the same weights re-exported with the input normalisation and output "
        f"scaling folded into the Gemms (scripts/fold_bms_network.py; max |d dv| {d_dv:.1e} V, "
        f"|d log_var| {d_lv:.1e})",
    }
    raw["version"] = f"v{number}"
    raw["sha256"] = sha256_bytes(folded)
    onnx_path.write_bytes(folded)
    json_path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {onnx_path} ({len(folded)} bytes) and {json_path}: version {raw['version']}")


if __name__ == "__main__":
    main()
