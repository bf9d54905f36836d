"""Plans without instruments: dry runs on mock devices, parameter validation, the registry."""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, cast

import pytest
from bluesky import RunEngine
from bluesky.simulators import RunEngineSimulator
from bluesky.simulators import check_limits as _check_limits
from bluesky.simulators import summarize_plan as _summarize_plan
from bluesky.utils import Msg as _Msg

from labctl.devices.errors import LimitError
from labctl.devices.lab import LabDevices
from labctl.plans.common import PlanParameterError, Record
from labctl.plans.cycling import PRESETS, CyclingProtocol, cycle_cell, hppc, protocol_segments
from labctl.plans.electrolyte import measure_conductivity, parse_recipe, prepare_electrolyte
from labctl.plans.registry import PLANS, get_plan, parse_assignments
from labctl.plans.session import mock_lab

# bluesky is untyped: typed aliases keep mypy --strict quiet.
check_limits = cast(Callable[[Iterable[Any]], None], _check_limits)
summarize_plan = cast(Callable[[Iterable[Any]], None], _summarize_plan)
Msg = cast(Callable[..., Any], _Msg)

REQUIRED: dict[str, dict[str, Any]] = {
    "prepare_electrolyte": {"recipe": "EC0.3:EMC0.7+LiPF6 1.2m"},
    "measure_conductivity": {"sample_id": "S-1", "temperatures": [15.0, 25.0, 40.0]},
    "cycle_cell": {"channel": 2, "protocol": "quick"},
    "hppc": {"channel": 1, "soc_points": [0.8, 0.5]},
    "move_vial": {"source": "rack/1", "destination": "meter"},
}


@pytest.fixture
def mock(RE: RunEngine) -> LabDevices:
    return mock_lab(RE)


def test_every_plan_has_a_dry_run_case() -> None:
    assert set(REQUIRED) == set(PLANS)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_plan_dry_runs_on_mock_devices(
    name: str, RE: RunEngine, mock: LabDevices, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = PLANS[name]
    messages = spec.dry_run(REQUIRED[name], RE=RE)
    commands = Counter(m.command for m in messages)
    assert commands["open_run"] == commands["close_run"] == 1
    assert messages[-1].command == "rewindable"  # restored after the run
    assert commands["checkpoint"] >= 1
    start = next(m for m in messages if m.command == "open_run").kwargs
    assert start["plan_name"] == name
    assert start["plan_args"]["campaign_id"] == ""
    assert start["operator"]
    # summarize_plan walks the whole plan too (it prints moves and reads).
    summarize_plan(spec.build(mock, REQUIRED[name]))
    out = capsys.readouterr().out
    assert "Open Run" in out
    assert "Close Run" in out


def test_prepare_dry_run_shows_each_dose_with_one_correction(mock: LabDevices) -> None:
    messages = list(prepare_electrolyte(mock, "EC0.3:EMC0.7+LiPF6 1.2m"))
    sets = [m for m in messages if m.command == "set" and m.obj.name.startswith("pumps-pump-")]
    # Nominal doses in a dry run: 97 % first, then the remainder, for every reagent.
    per_pump = Counter(m.obj.name for m in sets)
    assert per_pump == {f"pumps-pump-{r}": 2 for r in ("LiPF6-EC", "EC", "LiPF6-EMC", "EMC")}
    first, second = (m.args[0] for m in sets if m.obj.name == "pumps-pump-EC")
    assert second == pytest.approx(first * 0.03 / 0.97, rel=0.01)
    start = next(m for m in messages if m.command == "open_run").kwargs
    assert start["components"] == {
        "EC": "C1COC(=O)O1",
        "EMC": "CCOC(=O)OC",
        "LiPF6": "[Li+].F[P-](F)(F)(F)(F)F",
    }
    assert start["recipe"]["salt_molality"] == 1.2
    assert start["sample_id"].startswith("S-")
    assert sum(start["target_doses_g"].values()) == pytest.approx(4.0 * (1 + 1.2 * 0.151905))
    declared = [m.kwargs["name"] for m in messages if m.command == "declare_stream"]
    assert declared == ["dosing", "doses", "composition"]


def test_dry_run_under_bluesky_run_engine_simulator(mock: LabDevices) -> None:
    """bluesky's RunEngineSimulator answers reads with None, like summarize_plan."""
    sim = RunEngineSimulator()
    messages = sim.simulate_plan(measure_conductivity(mock, "S-1", [10.0, 30.0]))
    setpoints = [m.args[0] for m in messages if m.command == "set" and m.obj is mock.chamber]
    assert setpoints == [10.0, 30.0]
    saves = sum(1 for m in messages if m.command == "save")
    assert saves == 2 * 3 + 2  # window of 3 readings per temperature + one summary each


def test_check_limits_refuses_a_chamber_setpoint_outside_its_range(RE: RunEngine) -> None:
    narrow = mock_lab(RE, chamber_range_c=(-20.0, 80.0))
    # bluesky warns about every moved device that has no limits (the robot): expected.
    with pytest.warns(UserWarning, match="robot-transfer has no check_value"):
        check_limits(measure_conductivity(narrow, "S-1", [25.0, 60.0]))
    with (
        pytest.warns(UserWarning, match="robot-transfer has no check_value"),
        pytest.raises(LimitError, match=r"100 degC outside the chamber's range -20..80"),
    ):
        check_limits(measure_conductivity(narrow, "S-1", [25.0, 100.0]))


def test_check_limits_refuses_cycler_steps_the_instrument_would_refuse(
    RE: RunEngine, mock: LabDevices
) -> None:
    assert mock.cycler is not None
    ok = cycle_cell(mock, 1, "quick")
    check_limits(ok)
    from labctl.devices.cycler import Step
    from labctl.plans.cycling import ChannelRunner

    runner = ChannelRunner(mock.cycler.channels[1])
    with pytest.raises(LimitError, match=r"7 A above the channel rating 6.25 A"):
        check_limits(iter([Msg("set", runner, [Step.rest(10), Step.discharge(7.0, 2.5, 60)])]))
    with pytest.raises(LimitError, match=r"voltage limit 1.5 V outside 2..4.5 V"):
        runner.check_value([Step.discharge(1.0, 1.5, 60)])


def test_parameter_errors_name_the_field_and_value(mock: LabDevices) -> None:
    with pytest.raises(PlanParameterError) as err:
        prepare_electrolyte(mock, {"fractions": {"EC": 1.0}, "salt_molality": 3.0})
    assert "recipe.salt_molality = 3.0: Input should be less than or equal to 2.5" in str(err.value)
    assert err.value.errors[0][:2] == ("recipe.salt_molality", 3.0)
    with pytest.raises(PlanParameterError, match=r"recipe.fractions = \{'XY': 1.0\}: unknown"):
        prepare_electrolyte(mock, {"fractions": {"XY": 1.0}, "salt_molality": 1.0})
    with pytest.raises(PlanParameterError, match=r"tolerance_g = -1.0: Input should be greater"):
        prepare_electrolyte(mock, "EC1.0", tolerance_g=-1.0)
    with pytest.raises(PlanParameterError, match="vial_station = 'rack/99': unknown station"):
        prepare_electrolyte(mock, "EC1.0", vial_station="rack/99")
    with pytest.raises(PlanParameterError, match=r"temperatures = \[25.0, 200.0\]: .*-40..150"):
        measure_conductivity(mock, "S-1", [25.0, 200.0])
    with pytest.raises(PlanParameterError, match=r"channel = 9: the cycler has channels 1..8"):
        cycle_cell(mock, 9)
    with pytest.raises(PlanParameterError, match=r"channel = 0: Input should be greater"):
        cycle_cell(mock, 0)
    with pytest.raises(PlanParameterError, match=r"protocol = 'fast': .*preset"):
        cycle_cell(mock, 1, "fast")
    with pytest.raises(
        PlanParameterError,
        match=r"protocol = 'cycle 1': step 3: 15 A above the channel rating 6.25 A",
    ):
        cycle_cell(
            mock, 1, {"formation": None, "rate_test": None, "cycling": {"discharge_c_rate": 3}}
        )
    with pytest.raises(PlanParameterError, match=r"soc_points = .*strictly decreasing"):
        hppc(mock, 1, soc_points=[0.5, 0.8])
    with pytest.raises(PlanParameterError, match="operator = 'a\\\\nb': must be printable"):
        hppc(mock, 1, operator="a\nb")


def test_recipe_labels_and_protocol_presets_parse() -> None:
    assert parse_recipe("EC0.3:EMC0.7+LiPF6 1.2m") == {
        "fractions": {"EC": 0.3, "EMC": 0.7},
        "salt_molality": 1.2,
    }
    assert parse_recipe("dmc1") == {"fractions": {"DMC": 1.0}, "salt_molality": 0.0}
    with pytest.raises(ValueError, match="not a recipe"):
        parse_recipe("EC and some salt")
    quick = CyclingProtocol.model_validate(PRESETS["quick"])
    labels = [s.label for s in protocol_segments(quick)]
    assert labels == ["rate test 0.5C", "rate test 1C", "cycle 1", "cycle 2", "cycle 3"]
    standard = protocol_segments(CyclingProtocol())
    assert [s.kind for s in standard].count("cycling") == 100
    assert standard[0].steps[0].current_a == pytest.approx(0.5)  # C/10 of 5 Ah
    assert standard[0].steps[0].tests[0].value == pytest.approx(0.25)  # C/20 taper


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_fits_a_5_ah_cell_on_the_cycler(preset: str, mock: LabDevices) -> None:
    messages = list(cycle_cell(mock, 1, preset))
    runs = [m for m in messages if m.command == "set"]
    start = next(m for m in messages if m.command == "open_run").kwargs
    assert len(runs) == len(start["segments"]) >= 1
    assert all(step.current_a <= 6.25 for m in runs for step in m.args[0])


def test_command_line_assignments_become_typed_values() -> None:
    spec = get_plan("measure_conductivity")
    values = spec.parse(["sample_id=123", "temperatures=15,25, 40", "window=4", "recipe=null"])
    assert values == {"sample_id": "123", "temperatures": "15,25, 40", "window": 4, "recipe": None}
    p = spec.validate(values)
    assert p.sample_id == "123"
    assert p.temperatures == [15.0, 25.0, 40.0]  # type: ignore[attr-defined]
    cycling = get_plan("cycle_cell")
    nested = cycling.parse(
        ["channel=3", "protocol.rest_s=60", "protocol.cycling.cycles=2", "protocol.formation=null"]
    )
    assert nested == {
        "channel": 3,
        "protocol": {"rest_s": 60, "cycling": {"cycles": 2}, "formation": None},
    }
    # Changing a preset: the rest of it stays (quick has no formation, 3 cycles at 1C).
    changed = cycling.parse(["channel=1", "protocol=quick", "protocol.cycling.cycles=2"])
    assert changed["protocol"] == {"preset": "quick", "cycling": {"cycles": 2}}
    proto = cycling.validate(changed).protocol  # type: ignore[attr-defined]
    assert proto.formation is None
    assert proto.cycling.cycles == 2
    assert proto.cycling.discharge_c_rate == 1.0
    with pytest.raises(PlanParameterError) as err:
        parse_assignments(spec.params, spec.name, ["windw=3", "oops"])
    assert err.value.errors[0][:2] == ("windw", "3")
    assert "unknown parameter" in err.value.errors[0][2]
    assert err.value.errors[1] == ("oops", "oops", "expected key=value")


def test_registry_matches_the_plan_functions() -> None:
    """Each model field is a keyword of its function, with the same default."""
    for spec in PLANS.values():
        fn = inspect.signature(spec.func).parameters
        model = spec.params.model_fields
        for name, field in model.items():
            assert name in fn, f"{spec.name}: {name} missing from the function"
            if name in ("operator", "protocol") or field.is_required():
                continue
            default = fn[name].default
            if default is inspect.Parameter.empty:
                continue  # the function asks for it (measure_conductivity's sample_id)
            if isinstance(default, tuple):
                default = list(default)
            assert default == field.get_default(call_default_factory=True), (spec.name, name)
        sig = spec.signature()
        assert all(p.kind is p.KEYWORD_ONLY for p in sig.parameters.values())
        assert set(sig.parameters) == set(model)
        info = spec.describe()
        assert info["summary"] and info["instruments"]
        assert [p["name"] for p in info["parameters"] if p["required"]] == [
            n for n, f in model.items() if f.is_required()
        ]
    with pytest.raises(KeyError, match="unknown plan 'nope'; known: prepare_electrolyte"):
        get_plan("nope")


def test_record_checks_its_fields() -> None:
    rec = Record("r", {"a": ("number", "g"), "n": ("integer", ""), "s": ("string", "")})
    with pytest.raises(RuntimeError, match="read before any put"):
        rec.read()
    rec.put(a=1, n=2, s="x")
    assert rec.read()["a"]["value"] == 1.0
    described = rec.describe()["a"]
    assert described == {"source": "labctl:r", "dtype": "number", "shape": [], "units": "g"}
    with pytest.raises(TypeError, match=r"r.n: expected integer, got True"):
        rec.put(a=1.0, n=True, s="x")
    with pytest.raises(KeyError, match=r"missing fields \['s'\], unknown fields \['t'\]"):
        rec.put(a=1.0, n=1, t="x")
