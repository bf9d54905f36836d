"""Alternative ground-truth landscapes (contract 2): other optima, same physics sanity."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardware_mocks.config import LabConfig
from hardware_mocks.physics.electrolyte import landesfeind_blend
from hardware_mocks.physics.landscapes import narrow_low_ec, pc_rich_high_salt
from hardware_mocks.physics.materials import SOLVENTS

Model = Callable[[dict[str, float], float, float], float]
# The documented optima at 25 C (found by multi-start SLSQP, scripts/bench_campaign.py).
OPTIMA: dict[str, tuple[Model, dict[str, float], float, float]] = {
    "default": (landesfeind_blend, {"EC": 0.511, "DMC": 0.489}, 1.142, 12.958),
    "pc_rich": (pc_rich_high_salt, {"EC": 0.038, "PC": 0.671, "DMC": 0.291}, 1.761, 8.109),
    "narrow": (
        narrow_low_ec,
        {"EC": 0.130, "PC": 0.317, "DMC": 0.146, "DEC": 0.407},
        0.867,
        12.619,
    ),
}


def random_space(n: int, seed: int) -> list[tuple[dict[str, float], float]]:
    """Feasible design-space points (<= 4 solvents, EC + PC >= 0.1, 0.2..2 mol/kg)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[dict[str, float], float]] = []
    while len(out) < n:
        w = np.zeros(5)
        keep = rng.choice(5, size=4, replace=False)
        w[keep] = rng.dirichlet(np.ones(4))
        if w[0] + w[1] >= 0.1:
            out.append((dict(zip(SOLVENTS, w.tolist(), strict=True)), float(rng.uniform(0.2, 2.0))))
    return out


@pytest.mark.parametrize("name", sorted(OPTIMA))
def test_documented_optimum_beats_random_points(name: str) -> None:
    fn, fractions, m, value = OPTIMA[name]
    assert fn(fractions, m, 25.0) == pytest.approx(value, abs=0.01)
    best = max(fn(f, mm, 25.0) for f, mm in random_space(1500, 1))
    assert value >= best > 0.75 * value
    # A local maximum too: nothing better within a small feasible step around it.
    rng = np.random.default_rng(0)
    keys = list(fractions)
    for _ in range(200):
        w = np.clip(np.array([fractions[k] for k in keys]) + rng.normal(0, 0.02, len(keys)), 0, 1)
        near = dict(zip(keys, (w / w.sum()).tolist(), strict=True))
        if near.get("EC", 0.0) + near.get("PC", 0.0) >= 0.1:
            assert fn(near, m + rng.normal(0, 0.05), 25.0) <= value + 0.005


def test_optima_are_at_different_formulations() -> None:
    # Each landscape's optimum is clearly worse on the other landscapes.
    for name, (_, fractions, m, _) in OPTIMA.items():
        for other, (fn, _, _, value) in OPTIMA.items():
            if other != name:
                assert fn(fractions, m, 25.0) < 0.8 * value, (name, other)
    # And where they are: PC-rich at high salt; low EC with DEC; EC-rich with DMC.
    assert OPTIMA["pc_rich"][1]["PC"] > 0.5 and OPTIMA["pc_rich"][2] > 1.6
    assert OPTIMA["narrow"][1]["EC"] < 0.2 and OPTIMA["narrow"][1]["DEC"] > 0.3
    assert OPTIMA["default"][1]["EC"] > 0.4 and "DEC" not in OPTIMA["default"][1]


fractions = st.lists(st.floats(0, 1), min_size=5, max_size=5).filter(lambda v: sum(v) > 1e-3)


@pytest.mark.parametrize("fn", [pc_rich_high_salt, narrow_low_ec])
@given(w=fractions, m=st.floats(0.2, 2.0), t=st.floats(-20, 60))
def test_positive_finite_and_plausible(fn: Model, w: list[float], m: float, t: float) -> None:
    total = sum(w)
    kappa = fn({s: x / total for s, x in zip(SOLVENTS, w, strict=True)}, m, t)
    assert math.isfinite(kappa)
    assert 0.0 < kappa < 30.0


@pytest.mark.parametrize("fn", [pc_rich_high_salt, narrow_low_ec])
def test_physical_trends(fn: Model) -> None:
    base = {"EC": 0.1, "PC": 0.5, "DMC": 0.4}
    assert fn(base, 0.0, 25.0) == 0.0
    temps = [fn(base, 1.0, t) for t in (-10, 0, 25, 40, 60)]
    assert temps == sorted(temps)
    # Over the design space at 25 C: 1-20 mS/cm except at the low-salt, low-permittivity
    # corners (no landscape is silent anywhere, though).
    values = np.array([fn(f, m, 25.0) for f, m in random_space(800, 2)])
    assert values.min() > 0.2
    assert np.median(values) > 1.0
    assert values.max() < 20.0


@pytest.mark.parametrize("name", ["pc_rich_high_salt", "narrow_low_ec"])
def test_pluggable_through_the_lab_config(name: str) -> None:
    cfg = LabConfig(electrolyte_model=f"hardware_mocks.physics.landscapes:{name}")
    fn = cfg.load_electrolyte_model()
    assert list(inspect.signature(fn).parameters) == ["fractions", "salt_molality", "temperature_c"]
    assert isinstance(fn({"EC": 0.3, "EMC": 0.7}, 1.0, 25.0), float)


@pytest.mark.parametrize("fn", [pc_rich_high_salt, narrow_low_ec])
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
    fn: Model, fractions: dict[str, float], m: float, t: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fn(fractions, m, t)
