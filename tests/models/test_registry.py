"""The content-addressed registry: hashes, tampering, versions, promotion, rollback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from labctl.models.registry import (
    InputSpec,
    ModelIntegrityError,
    ModelRecord,
    OutputSpec,
    Registry,
    RegistryError,
    TrainingDataInfo,
)
from labctl.models.runtime import OnnxModel, _tiny_model, load_model


def record(rmse: float, name: str = "tiny") -> ModelRecord:
    return ModelRecord(
        name=name,
        kind="test",
        inputs=[InputSpec(name="x", shape=[2], min=-10.0, max=10.0, units="V")],
        outputs=[OutputSpec(name="y", shape=[2])],
        training_data=TrainingDataInfo(query="none", sha256="00" * 32, rows=3),
        metrics={"rmse": rmse, "mae": rmse / 2},
    )


def test_models_are_stored_under_their_sha256_with_metadata(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rec = reg.add(_tiny_model(), record(0.5))
    path = tmp_path / "tiny" / f"{rec.sha256}.onnx"
    assert path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256
    assert rec.version == "v1" and rec.created and reg.promoted("tiny") is None
    side = json.loads((tmp_path / "tiny" / f"{rec.sha256}.json").read_text())
    assert side["sha256"] == rec.sha256 and side["metrics"]["rmse"] == 0.5
    assert side["training_data"] == {"query": "none", "sha256": "00" * 32, "rows": 3}
    # The ONNX file carries its record too (all but its own hash).
    model = load_model(reg, "tiny", "v1")
    meta = json.loads(model.session.get_modelmeta().custom_metadata_map["labctl.record"])
    assert meta["version"] == "v1" and meta["inputs"][0]["units"] == "V" and "sha256" not in meta
    out = model.run({"x": [1.0, 2.0]})["y"]  # the probe model has no batch axis: 2 "rows"
    np.testing.assert_allclose(out, [2.0, 4.0])
    # Versions resolve by label or by sha256 prefix; unknown ones name the known ones.
    assert reg.record("tiny", rec.sha256[:10]).version == "v1"
    with pytest.raises(RegistryError, match=r"version: unknown 'v9' of 'tiny'; known: v1"):
        reg.record("tiny", "v9")
    with pytest.raises(RegistryError, match="no promoted version"):
        reg.load_bytes("tiny")
    with pytest.raises(RegistryError, match=r"name: '\.\./x'"):
        reg.versions("../x")
    assert reg.names() == ["tiny"]


def test_a_tampered_model_is_refused_naming_file_and_hashes(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rec = reg.add(_tiny_model(), record(0.5))
    path = reg.path("tiny", "v1")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ModelIntegrityError) as info:
        load_model(reg, "tiny", "v1")
    err = info.value
    assert (err.path, err.expected, err.actual) == (path, rec.sha256, actual)
    assert str(path) in str(err) and rec.sha256 in str(err) and actual in str(err)


def test_an_edited_record_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rec = reg.add(_tiny_model(), record(0.5))
    side = tmp_path / "tiny" / f"{rec.sha256}.json"
    data = json.loads(side.read_text())
    data["inputs"][0]["max"] = 1e9  # widen the valid range behind the model's back
    side.write_text(json.dumps(data))
    with pytest.raises(ModelIntegrityError, match=r"record \(embedded vs stored\) digest mismatch"):
        load_model(reg, "tiny", "v1")


def test_promotion_refuses_a_worse_model_and_rollback_restores(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.add(_tiny_model(), record(0.50))
    first = reg.promote_if_not_worse("tiny", v1.version)
    assert first.promoted and first.reason == "no promoted version yet"
    v2 = reg.add(_tiny_model(), record(0.60))
    assert v2.sha256 != v1.sha256  # the embedded version and time differ
    worse = reg.promote_if_not_worse("tiny", v2.version)
    assert not worse.promoted and reg.promoted("tiny") == "v1"
    assert worse.candidate_score == 0.60 and worse.incumbent_score == 0.50
    assert "rmse 0.6 of v2 is worse than 0.5 of v1" in worse.reason
    # Within a 25 % tolerance it is "not worse".
    assert reg.promote_if_not_worse("tiny", v2.version, tolerance=0.25).promoted
    v3 = reg.add(_tiny_model(), record(0.40))
    better = reg.promote_if_not_worse("tiny", v3.version)
    assert better.promoted and reg.promoted("tiny") == "v3"
    assert reg.load_bytes("tiny")[1].version == "v3"
    # Scores measured elsewhere (same held-out set) override the stored ones.
    v4 = reg.add(_tiny_model(), record(0.10))
    assert not reg.promote_if_not_worse(
        "tiny", v4.version, candidate_score=0.9, incumbent_score=0.3
    ).promoted
    # Rollback: back through the promotion history; every version stays loadable.
    assert reg.rollback("tiny").version == "v2"
    assert reg.rollback("tiny").version == "v1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback("tiny")
    assert [r.version for r in reg.versions("tiny")] == ["v1", "v2", "v3", "v4"]
    for r in reg.versions("tiny"):
        data, rec = reg.load_bytes("tiny", r.version)
        assert OnnxModel(data, rec).run({"x": [0.5, 1.0]})["y"].shape == (2,)
    with pytest.raises(ValueError, match="tolerance: must be >= 0"):
        reg.promote_if_not_worse("tiny", "v4", tolerance=-1.0)


def test_nan_metrics_survive_the_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rec = record(0.5)
    rec.metrics["r2"] = float("nan")  # R^2 of a constant held-out target
    reg.add(_tiny_model(), rec)
    assert np.isnan(reg.record("tiny", "v1").metrics["r2"])
    assert load_model(reg, "tiny", "v1").record.metrics["rmse"] == 0.5


def test_record_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="name: 'bad name!'"):
        record(0.1, name="bad name!")
