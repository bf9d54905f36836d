"""The design space: constraints, encoding, sampling (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from labctl.campaign.space import SOLVENTS, DesignSpace, InfeasibleError

SPACE = DesignSpace()


@given(st.integers(0, 2**32 - 1), st.integers(1, 64))
def test_samples_are_feasible(seed: int, n: int) -> None:
    pts = SPACE.sample(n, np.random.default_rng(seed))
    assert pts.shape == (n, 6)
    assert SPACE.is_feasible(pts).all()
    w, m = SPACE.to_arrays(pts)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert ((w > 0).sum(axis=1) <= 4).all()
    assert (w[:, 0] + w[:, 1] >= 0.1 - 1e-12).all()
    assert ((m >= 0.2) & (m <= 2.0)).all()
    for p in pts:
        f = SPACE.decode(p)
        SPACE.check(f.fractions, f.salt_molality)  # raises if not


@given(st.integers(0, 2**32 - 1))
def test_encode_decode_round_trip(seed: int) -> None:
    p = SPACE.sample(1, np.random.default_rng(seed))[0]
    f = SPACE.decode(p)
    np.testing.assert_allclose(SPACE.encode(f.fractions, f.salt_molality), p, atol=1e-12)
    assert set(f.fractions) <= set(SOLVENTS)
    assert all(v > 0 for v in f.fractions.values())  # zeros are left out


def test_samples_cover_every_subspace() -> None:
    pts = SPACE.sample(2000, np.random.default_rng(0))
    zero = pts[:, :5] == 0
    # Each solvent is the one left out in about a fifth of the points.
    assert np.all(zero.mean(axis=0) > 0.12)
    assert len(SPACE.subspaces()) == 5
    # Only EC counts as cyclic: subspaces without EC cannot meet min_cyclic.
    assert len(DesignSpace(cyclic=("EC",)).subspaces()) == 4


@pytest.mark.parametrize(
    ("fractions", "m", "match"),
    [
        ({"EC": 0.5, "DMC": 0.4}, 1.0, r"sum to 1, got 0\.9"),
        ({"EC": 0.05, "DMC": 0.95}, 1.0, r"EC \+ PC must be >= 0\.1, got 0\.05"),
        (dict.fromkeys(SOLVENTS, 0.2), 1.0, r"at most 4 solvents may be nonzero, got 5"),
        (
            {"EC": 0.5, "DMC": 0.5},
            2.5,
            r"salt_molality must be within 0\.2\.\.2\.0 mol/kg, got 2\.5",
        ),
        ({"EC": 0.5, "XX": 0.5}, 1.0, r"unknown solvent\(s\) \['XX'\]"),
        ({"EC": 1.2, "DMC": -0.2}, 1.0, r"fractions\['EC'\] must be within 0\.\.1, got 1\.2"),
        ({"EC": 0.5, "DMC": 0.5}, float("nan"), r"salt_molality .* got nan"),
    ],
)
def test_infeasible_names_field_and_value(
    fractions: dict[str, float], m: float, match: str
) -> None:
    with pytest.raises(InfeasibleError, match=match):
        SPACE.check(fractions, m)
    with pytest.raises(InfeasibleError):
        SPACE.encode(fractions, m)


def test_vectorised_feasibility_agrees() -> None:
    good = SPACE.encode({"EC": 0.3, "DMC": 0.7}, 1.0)
    bad_sum = good.copy()
    bad_sum[0] += 0.1
    five = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.5])
    low_cyclic = SPACE.encode({"EC": 0.1, "DMC": 0.9}, 1.0)
    low_cyclic[[0, 3]] = [0.05, 0.95]
    out = SPACE.is_feasible(np.stack([good, bad_sum, five, low_cyclic]))
    assert out.tolist() == [True, False, False, False]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"molality_min \(2\.0\) must be below molality_max"):
        DesignSpace(molality_min=2.0, molality_max=1.0)
    with pytest.raises(ValidationError, match=r"unknown solvent\(s\) \['XX'\]"):
        DesignSpace(cyclic=("XX",))
    with pytest.raises(ValidationError, match="max_components"):
        DesignSpace(max_components=6)


@given(st.integers(0, 2**32 - 1), st.floats(0.001, 0.3))
def test_perturb_stays_feasible_and_in_support(seed: int, step: float) -> None:
    rng = np.random.default_rng(seed)
    x = SPACE.sample(1, rng)[0]
    near = SPACE.perturb(x, 32, step, rng)
    assert SPACE.is_feasible(near).all()
    assert np.all(near[:, :5][:, x[:5] == 0] == 0)  # never adds a solvent
