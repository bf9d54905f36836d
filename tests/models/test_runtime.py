"""onnxruntime serving: which provider runs, input validation, batching.

No GPU on the CI machine: the CUDA branch is exercised with fake onnxruntime modules
(and a real onnxruntime told that CUDA is available when it is not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # type: ignore[import-untyped]
import pytest

from labctl.models import runtime
from labctl.models.property import PropertyPredictor
from labctl.models.registry import ModelError, ModelRecord
from labctl.models.runtime import CPU, CUDA, InputRangeError, check_inputs


class FakeSession:
    def __init__(self, providers: list[str], fail_run: bool = False) -> None:
        self.providers = providers
        self.fail_run = fail_run

    def get_providers(self) -> list[str]:
        return self.providers

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.fail_run:
            raise RuntimeError("CUDA error: no kernel image is available")
        return [feed["x"] * 2]


class FakeOrt:
    """Enough of onnxruntime for cuda_usable: what it lists and what a session does."""

    def __init__(self, listed: list[str], runs_on: list[str], fail_run: bool = False) -> None:
        self.listed, self.runs_on, self.fail_run = listed, runs_on, fail_run
        self.sessions: list[list[str]] = []

    def get_available_providers(self) -> list[str]:
        return self.listed

    def InferenceSession(self, model: bytes, providers: list[str]) -> FakeSession:
        self.sessions.append(providers)
        return FakeSession(self.runs_on, self.fail_run)


def test_cpu_here_and_the_provider_is_reported(predictor: PropertyPredictor) -> None:
    assert CUDA not in onnxruntime.get_available_providers()  # this machine has no GPU
    assert runtime.select_provider() == [CPU]
    assert predictor.provider == CPU == predictor.model.session.get_providers()[0]


def test_cuda_is_used_only_when_listed_and_a_tiny_session_really_runs_on_it() -> None:
    works = FakeOrt([CUDA, CPU], runs_on=[CUDA, CPU])
    assert runtime.cuda_usable(works)
    assert works.sessions == [[CUDA, CPU]]
    not_listed = FakeOrt([CPU], runs_on=[CPU])
    assert not runtime.cuda_usable(not_listed) and not_listed.sessions == []
    # Listed, but the session fell back to CPU (missing CUDA/cuDNN libraries).
    assert not runtime.cuda_usable(FakeOrt([CUDA, CPU], runs_on=[CPU]))
    # Listed and the session claims CUDA, but running fails (driver/arch mismatch).
    assert not runtime.cuda_usable(FakeOrt([CUDA, CPU], runs_on=[CUDA], fail_run=True))


def test_real_onnxruntime_claiming_cuda_falls_back_to_cpu(
    monkeypatch: pytest.MonkeyPatch, property_store: tuple[Path, ModelRecord]
) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    assert not runtime.cuda_usable()
    assert runtime.select_provider("auto") == [CPU]
    with pytest.raises(ModelError, match="'cuda' asked for, but"):
        runtime.select_provider("cuda")
    assert PropertyPredictor.load(property_store[0]).provider == CPU


def test_a_usable_cuda_is_chosen_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cuda_usable", lambda ort=None: True)
    assert runtime.select_provider("auto") == [CUDA, CPU]
    assert runtime.select_provider("cuda") == [CUDA, CPU]
    assert runtime.select_provider("cpu") == [CPU]
    with pytest.raises(ValueError, match="provider: must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        runtime.select_provider("tpu")  # type: ignore[arg-type]


def valid(n: int = 3) -> dict[str, Any]:
    return {
        "fractions": np.tile([0.3, 0.0, 0.7, 0.0, 0.0], (n, 1)),
        "salt_molality": np.full(n, 1.0),
        "temperature_c": np.full(n, 25.0),
    }


def test_inputs_are_checked_against_the_recorded_ranges(predictor: PropertyPredictor) -> None:
    rec = predictor.record
    lo, hi = rec.input("salt_molality").min, rec.input("salt_molality").max
    assert check_inputs(rec, valid())["fractions"].dtype == np.float32
    bad = valid()
    bad["salt_molality"][1] = hi + 1.0
    with pytest.raises(InputRangeError) as info:
        predictor.predict(**bad)
    assert info.value.field == "salt_molality" and info.value.value == pytest.approx(hi + 1.0)
    assert f"[{lo:g}, {hi:g}] mol/kg" in str(info.value) and "(row 1)" in str(info.value)
    bad = valid()
    bad["fractions"][2] = [-0.1, 0.0, 1.1, 0.0, 0.0]
    with pytest.raises(InputRangeError, match=r"fractions\[EC\]: -0.1 \(row 2\) is outside"):
        check_inputs(rec, bad)
    bad = valid()
    bad["fractions"][0] = [0.3, 0.0, 0.3, 0.0, 0.0]
    with pytest.raises(InputRangeError, match=r"fractions: 0.6 \(row 0\) must sum to 1"):
        check_inputs(rec, bad)
    bad = valid()
    bad["temperature_c"][0] = np.nan
    with pytest.raises(InputRangeError, match="temperature_c: nan"):
        check_inputs(rec, bad)
    with pytest.raises(InputRangeError, match=r"fractions: 'shape \(3, 4\)' must have shape"):
        check_inputs(rec, {**valid(), "fractions": np.full((3, 4), 0.25)})
    with pytest.raises(InputRangeError, match="salt_molality: '2 rows' must have 3 rows"):
        check_inputs(rec, {**valid(), "salt_molality": [1.0, 1.0]})
    with pytest.raises(InputRangeError, match="temperature_c: None is missing"):
        check_inputs(rec, {k: v for k, v in valid().items() if k != "temperature_c"})
    with pytest.raises(InputRangeError, match=r"pressure: .* is not an input"):
        check_inputs(rec, {**valid(), "pressure": [1.0]})
    # One sample without the batch axis is accepted as a batch of one.
    one = check_inputs(rec, {"fractions": [0.3, 0, 0.7, 0, 0], "salt_molality": 1.0,
                             "temperature_c": 25.0})  # fmt: skip
    assert one["fractions"].shape == (1, 5) and one["salt_molality"].shape == (1,)


def test_batched_inference_matches_one_pass(predictor: PropertyPredictor) -> None:
    rng = np.random.default_rng(3)
    n = 101
    fr = rng.dirichlet(np.ones(5), n)
    m = rng.uniform(0.3, 1.9, n)
    t = rng.uniform(12.0, 48.0, n)
    mean, std = predictor.predict(fr, m, t)
    mean7, std7 = predictor.predict(fr, m, t, batch_size=7)
    assert mean.shape == std.shape == (n,)
    np.testing.assert_allclose(mean7, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std7, std, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        predictor.predict(fr, m, t, batch_size=0)
