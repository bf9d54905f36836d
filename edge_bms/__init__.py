"""Battery state estimation on the edge: numpy + onnxruntime, no torch, no lab code.

    from edge_bms import PackEstimator, load_cell
    est = PackEstimator(load_cell(), n_cells=96)
    e = est.step(ts, current_a, cell_v, temp_c)   # e.soc, e.soc_sigma, e.pack_soc

    # with the shipped learned voltage correction (falls back to the plain filter, flagged):
    net, reason, _ = try_load_correction()
    est = PackEstimator(load_cell(), 96, correction=net, correction_fallback=reason or "none")

Units and signs: seconds, volts, amperes with positive current = discharge, deg C, SOC 0..1.
Heavy parts load where used (onnxruntime only with a correction network).
"""

from edge_bms.cell import CellModel, Limits, Params, default_cell, load_cell
from edge_bms.correction import VoltageCorrectionNet, load_correction, try_load_correction
from edge_bms.errors import (
    BmsError,
    CellModelError,
    CheckpointError,
    CorrectionModelError,
    IdentificationError,
    InputError,
)
from edge_bms.estimator import (
    CorrectionInputs,
    CorrectionOutputLike,
    EstimateFlags,
    HealthEstimator,
    PackEstimate,
    PackEstimator,
    PowerHook,
    SafetyCheck,
    VoltageCorrection,
    pack_soc,
)
from edge_bms.filters import (
    EkfSettings,
    FilterNoise,
    FilterState,
    StepResult,
    UkfSettings,
    ekf_step,
    ukf_step,
)

__all__ = [
    "BmsError",
    "CellModel",
    "CellModelError",
    "CheckpointError",
    "CorrectionInputs",
    "CorrectionModelError",
    "CorrectionOutputLike",
    "EkfSettings",
    "EstimateFlags",
    "FilterNoise",
    "FilterState",
    "HealthEstimator",
    "IdentificationError",
    "InputError",
    "Limits",
    "PackEstimate",
    "PackEstimator",
    "Params",
    "PowerHook",
    "SafetyCheck",
    "StepResult",
    "UkfSettings",
    "VoltageCorrection",
    "VoltageCorrectionNet",
    "default_cell",
    "ekf_step",
    "load_cell",
    "load_correction",
    "pack_soc",
    "try_load_correction",
    "ukf_step",
]
