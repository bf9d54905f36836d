"""The default ground-truth conductivity model (contract 2)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardware_mocks.physics.electrolyte import (
    LG2019_EC_DMC_1_1,
    landesfeind_2019,
    landesfeind_blend,
    linear_only_blend,
)
from hardware_mocks.physics.materials import SOLVENTS


def test_reproduces_landesfeind_ec_emc_fit_exactly() -> None:
    for m in (0.2, 0.8, 1.0, 1.6, 2.0):
        for t in (-10.0, 0.0, 25.0, 40.0):
            assert landesfeind_blend({"EC": 0.3, "EMC": 0.7}, m, t) == pytest.approx(
                landesfeind_2019(m, t + 273.15), rel=1e-12
            )
    # The published value: ~9.1 mS/cm at 1 mol/kg and 25 C.
    assert landesfeind_2019(1.0, 298.15) == pytest.approx(9.13, abs=0.01)


def test_close_to_the_independent_ec_dmc_fit() -> None:
    for m in (0.5, 1.0, 1.5):
        ours = landesfeind_blend({"EC": 0.5, "DMC": 0.5}, m, 25.0)
        published = landesfeind_2019(m, 298.15, LG2019_EC_DMC_1_1)
        assert ours == pytest.approx(published, rel=0.25)
    assert landesfeind_blend({"EC": 0.5, "DMC": 0.5}, 1.0, 25.0) == pytest.approx(
        landesfeind_2019(1.0, 298.15, LG2019_EC_DMC_1_1), rel=0.10
    )


def test_physical_trends() -> None:
    base = {"EC": 0.3, "DMC": 0.7}
    assert landesfeind_blend(base, 0.0, 25.0) == 0.0
    temps = [landesfeind_blend(base, 1.0, t) for t in (-10, 0, 10, 25, 40, 60)]
    assert temps == sorted(temps)  # warmer conducts better
    curve = [landesfeind_blend(base, m / 10, 25.0) for m in range(1, 21)]
    peak = (curve.index(max(curve)) + 1) / 10
    assert 0.8 <= peak <= 1.4  # peak near 1 mol/kg, as for every carbonate blend
    # Lower viscosity co-solvent conducts better at the same EC fraction: DMC > EMC > DEC.
    k = {s: landesfeind_blend({"EC": 0.3, s: 0.7}, 1.0, 25.0) for s in ("DMC", "EMC", "DEC")}
    assert k["DMC"] > k["EMC"] > k["DEC"]
    # 1 M LiPF6 in PC is reported at ~5.8 mS/cm.
    assert landesfeind_blend({"PC": 1.0}, 1.0, 25.0) == pytest.approx(5.8, rel=0.1)


def test_other_landscape_has_a_different_optimum() -> None:
    a = landesfeind_blend({"EC": 0.5, "DMC": 0.5}, 1.0, 25.0) > landesfeind_blend(
        {"EC": 0.1, "DMC": 0.9}, 1.0, 25.0
    )
    b = linear_only_blend({"EC": 0.5, "DMC": 0.5}, 1.0, 25.0) > linear_only_blend(
        {"EC": 0.1, "DMC": 0.9}, 1.0, 25.0
    )
    assert a and not b


fractions = st.lists(st.floats(0, 1), min_size=5, max_size=5).filter(lambda v: sum(v) > 1e-3)


@given(fractions, st.floats(0, 3), st.floats(-40, 80))
def test_finite_nonnegative_everywhere(w: list[float], m: float, t: float) -> None:
    total = sum(w)
    kappa = landesfeind_blend({s: x / total for s, x in zip(SOLVENTS, w, strict=True)}, m, t)
    assert math.isfinite(kappa)
    assert 0.0 <= kappa < 60.0


@pytest.mark.parametrize(
    ("fractions", "m", "t", "match"),
    [
        ({"XX": 1.0}, 1.0, 25.0, "unknown solvent"),
        ({"EC": -0.1, "DMC": 1.1}, 1.0, 25.0, r"fractions\['EC'\]"),
        ({"EC": 1.0}, float("nan"), 25.0, "salt_molality"),
        ({"EC": 1.0}, 1.0, 500.0, "temperature_c"),
    ],
)
def test_bad_input_names_the_field(
    fractions: dict[str, float], m: float, t: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        landesfeind_blend(fractions, m, t)
