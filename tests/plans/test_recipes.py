"""Recipes -> reagent doses, and back to the composition they make."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from labctl.recipes import SOLVENTS, Recipe, composition, default_reagents, plan_doses

REAGENTS = default_reagents()


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    k = draw(st.integers(1, 4))
    names = draw(st.permutations(SOLVENTS))[:k]
    raw = [draw(st.floats(0.05, 1.0)) for _ in names]
    total = sum(raw)
    fractions = {n: x / total for n, x in zip(names, raw, strict=True)}
    fractions[names[0]] += 1.0 - sum(fractions.values())
    return Recipe(
        fractions=fractions, salt_molality=draw(st.just(0.0) | st.floats(0.01, 2.5)), solvent_g=4.0
    )


@given(recipes())
def test_doses_make_exactly_the_recipe(recipe: Recipe) -> None:
    doses = plan_doses(recipe, REAGENTS)
    assert all(d.target_g > 0 for d in doses)
    fractions, molality = composition({d.reagent: d.target_g for d in doses}, REAGENTS)
    assert molality == pytest.approx(recipe.salt_molality, abs=1e-9)
    for s, w in recipe.fractions.items():
        assert fractions[s] == pytest.approx(w, abs=1e-9)


def test_ec_dmc_one_molal() -> None:
    doses = {
        d.reagent: d.target_g
        for d in plan_doses(Recipe(fractions={"EC": 0.5, "DMC": 0.5}, salt_molality=1.0), REAGENTS)
    }
    # 2 g of each solvent; 40 % of it comes with the 2.5 m stock (0.8 g solvent + 0.304 g salt).
    assert doses["EC"] == pytest.approx(1.2)
    assert doses["LiPF6-EC"] == pytest.approx(0.8 * (1 + 2.5 * 0.151905))
    assert set(doses) == {"EC", "DMC", "LiPF6-EC", "LiPF6-DMC"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": {"EC": 0.5, "DMC": 0.4}, "salt_molality": 1.0}, "sum to 1"),
        ({"fractions": {"EC": 0.5, "H2O": 0.5}, "salt_molality": 1.0}, "unknown solvent"),
        ({"fractions": {"EC": 1.0}, "salt_molality": 3.0}, "salt_molality"),
        ({"fractions": {"EC": 1.0}, "salt_molality": 1.0, "solvent_g": 0}, "solvent_g"),
        ({"fractions": {"EC": 1.0}, "salt_molality": 1e-300}, "at least 0.01"),
    ],
)
def test_bad_recipes_name_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Recipe(**kwargs)  # type: ignore[arg-type]


def test_missing_reagent_is_named() -> None:
    reagents = {k: v for k, v in REAGENTS.items() if k != "LiPF6-PC"}
    with pytest.raises(ValueError, match="LiPF6-PC"):
        plan_doses(Recipe(fractions={"PC": 1.0}, salt_molality=1.0), reagents)
