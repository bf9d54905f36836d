"""Lab config validation: errors name the file, line, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardware_mocks.config import ConfigError, load_lab_config, parse_lab_config
from hardware_mocks.lab import SimulatedLab
from tests.conftest import lab_config

DEFAULT = Path(__file__).parents[2] / "hardware_mocks" / "default_lab.toml"


def test_default_lab_loads() -> None:
    cfg = load_lab_config()
    assert {i.kind for i in cfg.instruments} == {
        "balance", "pump", "robot", "stirrer", "chamber", "meter", "cycler",
    }  # fmt: skip
    assert len(cfg.reagents) == 10


def test_errors_point_at_the_line() -> None:
    text = DEFAULT.read_text().replace('kind = "meter"', 'kind = "metre"')
    text = text.replace("speed = 1.0", "speed = -2")
    with pytest.raises(ConfigError) as info:
        parse_lab_config(text, "lab.toml")
    msg = str(info.value)
    speed_line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("speed"))
    metre_line = next(i for i, l in enumerate(text.splitlines(), 1) if "metre" in l)
    assert f"lab.toml:{speed_line}: speed = -2" in msg
    assert f"lab.toml:{metre_line}: instruments.5.kind = 'metre'" in msg
    assert "unknown instrument kind" in msg


def test_bad_reagent_and_toml() -> None:
    text = DEFAULT.read_text().replace(
        "solvent_fractions = { PC = 1.0 }\n[[", "solvent_fractions = { PC = 0.5 }\n[[", 1
    )
    with pytest.raises(ConfigError, match=r"reagents\.1\.solvent_fractions.*sum to 1"):
        parse_lab_config(text)
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_lab_config("seed = = 1")
    with pytest.raises(ConfigError, match="cannot read lab config"):
        load_lab_config("/no/such/lab.toml")


def test_unknown_instrument_option_is_named() -> None:
    cfg = lab_config("balance")
    cfg.instruments[0].options = {"capacity_g": 100.0, "colour": "red"}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        SimulatedLab(cfg)


def test_bad_electrolyte_model_path() -> None:
    cfg = lab_config("balance", electrolyte_model="hardware_mocks.physics.electrolyte:nope")
    with pytest.raises(ConfigError, match="electrolyte_model"):
        SimulatedLab(cfg)


def test_nan_fraction_and_duplicate_reagents_are_refused() -> None:
    text = DEFAULT.read_text().replace(
        "solvent_fractions = { PC = 1.0 }\n[[", "solvent_fractions = { PC = nan }\n[[", 1
    )
    with pytest.raises(ConfigError, match="finite"):
        parse_lab_config(text)
    text = DEFAULT.read_text().replace('name = "PC"', 'name = "EC"', 1)
    with pytest.raises(ConfigError, match=r"repeated: \['EC'\]"):
        parse_lab_config(text)


def test_option_types_are_checked_against_the_simulator() -> None:
    cfg = lab_config("balance")
    cfg.instruments[0].options = {"latency_s": "2ms"}
    with pytest.raises(ConfigError, match=r"options\.latency_s = '2ms'"):
        SimulatedLab(cfg)


@pytest.mark.parametrize("speed", [0.0, -1.0, float("inf"), 1e9])
def test_speed_override_is_validated(speed: float) -> None:
    with pytest.raises(ConfigError, match="speed"):
        SimulatedLab(lab_config("balance"), speed=speed)
