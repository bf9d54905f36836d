"""Active learning: the committee's force deviation, the trust-level selection, and one
small DP-GEN iteration end to end (train a committee, explore by MD, label with xTB)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from sim_backend.active import (
    ActiveLearningConfig,
    max_force_deviation,
    select_candidates,
)
from sim_backend.errors import SimInputError


def test_max_force_deviation_by_hand() -> None:
    # two frames (2 and 1 atoms), three models
    f = np.zeros((3, 3, 3))
    f[:, 0, 0] = [1.0, 2.0, 3.0]  # atom 0: std over models of x = sqrt(2/3)
    f[:, 1, 1] = [0.0, 0.0, 0.3]  # atom 1: a smaller disagreement
    f[:, 2, 2] = [5.0, 5.0, 5.0]  # frame 2's only atom: all agree
    devi = max_force_deviation(f, [2, 1])
    np.testing.assert_allclose(devi, [np.sqrt(2.0 / 3.0), 0.0], rtol=1e-12)
    # a constant offset common to all members is agreement, not disagreement
    np.testing.assert_allclose(max_force_deviation(f + 7.0, [2, 1]), devi, rtol=1e-12)


def test_max_force_deviation_checks_shapes() -> None:
    with pytest.raises(SimInputError, match="n_models >= 2"):
        max_force_deviation(np.zeros((1, 4, 3)), [4])
    with pytest.raises(SimInputError, match="frame sizes sum to 3"):
        max_force_deviation(np.zeros((2, 4, 3)), [1, 2])


def test_selection_keeps_the_trust_window_and_spreads_over_it() -> None:
    devi = np.array([0.01, 0.06, 0.5, 0.1, np.nan, 0.2, 0.3, 0.07, 0.04])
    pick, counts = select_candidates(devi, 0.05, 0.35, max_frames=10)
    assert counts == {"below": 2, "inside": 5, "above": 2}
    assert pick.tolist() == [1, 3, 5, 6, 7]
    pick3, _ = select_candidates(devi, 0.05, 0.35, max_frames=3)
    # the lowest and the highest inside the window are kept, and one between
    assert devi[pick3].min() == pytest.approx(0.06)
    assert devi[pick3].max() == pytest.approx(0.3)
    assert pick3.size == 3


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="trust_hi"):
        ActiveLearningConfig(trust_lo=0.3, trust_hi=0.1)
    with pytest.raises(ValidationError, match="n_models"):
        ActiveLearningConfig(n_models=1)
    with pytest.raises(ValidationError, match="unknown_key"):
        ActiveLearningConfig.model_validate({"unknown_key": 1})


def test_one_iteration_end_to_end(tmp_path: Path) -> None:
    """Label a small EC/Li+ set, then one iteration: the committee disagrees somewhere
    in the window, those frames are labelled and appended, and the final model is saved."""
    from sim_backend.active import active_learn
    from sim_backend.chem.label import label_frames
    from sim_backend.chem.species import species_atoms
    from sim_backend.nn.dataset import read_frames

    rng = np.random.default_rng(0)
    seeds = [species_atoms("EC"), species_atoms("DMC")]
    frames = []
    for s in seeds:
        for k in range(24):
            at = s.copy()  # type: ignore[no-untyped-call]
            at.positions += rng.normal(0.0, 0.04, at.positions.shape)
            at.info["split"] = "val" if k % 6 == 0 else "train"
            frames.append(at)
    data = tmp_path / "data.xyz"
    label_frames(frames, data)
    n0 = len(read_frames(data))
    cfg = ActiveLearningConfig(
        iterations=1,
        n_models=2,
        epochs=8,
        hyper={"hidden": [16], "n_channels": 4, "n_basis": 6},
        trust_lo=1e-4,
        trust_hi=50.0,
        max_new_frames=4,
        temperatures_k=[400.0],
        md_steps=40,
        sample_every=10,
    )
    lines: list[str] = []
    report = active_learn(data, seeds, tmp_path / "al", cfg, say=lines.append)
    it = report.iterations[0]
    assert it.n_candidates == 8  # 4 samples x 2 replicas (frame 0 is the seed)
    assert it.below + it.inside + it.above == it.n_candidates
    assert it.labelled == min(4, it.inside) > 0
    after = read_frames(data)
    assert len(after) == n0 + it.labelled
    assert all(a.info["source"].startswith("al-iter-0@400K") for a in after[n0:])
    assert Path(report.model_path or "").is_file()
    saved = json.loads((tmp_path / "al" / "report.json").read_text())
    assert saved["iterations"][0]["labelled"] == it.labelled
    assert any("candidates" in line for line in lines)
