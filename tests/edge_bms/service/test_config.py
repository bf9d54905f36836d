"""Service config: TOML in, validated; every error names the file, line, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_bms.service.config import ConfigError, ServiceConfig, load_config

GOOD = """\
instance = "gw-1"
prefix = "bms/v1"

[broker]
url = "mqtts://alice:s3cret@broker.local"
keepalive_s = 20

[[packs]]
id = "p1"
n_cells = 96

[[packs]]
id = "p2"
n_cells = 200
cells_per_temp_sensor = 8
capacity_ah = 4.8

[checkpoint]
path = "state/ck.sqlite"
interval_s = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pack.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), **kw)  # type: ignore[arg-type]
    return str(info.value)


def test_a_good_file_loads_with_defaults_and_resolved_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_BMS_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGE_BMS_MQTT_PASSWORD", raising=False)
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.instance == "gw-1"
    assert [p.id for p in cfg.packs] == ["p1", "p2"]
    assert cfg.packs[1].n_temp == 25  # ceil(200 / 8)
    assert cfg.broker.host == "broker.local"
    assert cfg.broker.port == 8883  # mqtts default
    assert cfg.broker.use_tls
    assert cfg.broker.credentials() == ("alice", "s3cret")
    assert cfg.checkpoint.path == tmp_path / "state" / "ck.sqlite"  # relative to the file
    assert cfg.limits.max_payload_bytes == 65536
    assert cfg.estimator.method == "ekf"
    assert "s3cret" not in repr(cfg.broker.password)


def test_environment_credentials_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_BMS_MQTT_USERNAME", "svc")
    monkeypatch.setenv("EDGE_BMS_MQTT_PASSWORD", "from-env")
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.broker.credentials() == ("svc", "from-env")


def test_overrides_merge_over_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), overrides={"instance": "gw-2", "broker.qos": 0})
    assert (cfg.instance, cfg.broker.qos, cfg.broker.keepalive_s) == ("gw-2", 0, 20)


def test_a_bad_value_names_file_line_field_and_value(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("n_cells = 200", "n_cells = 0"))
    path = tmp_path / "pack.toml"
    assert msg.startswith(f"{path}:14: packs[1].n_cells: ")
    assert "greater than or equal to 1" in msg
    assert msg.endswith("(got 0)")


def test_a_misspelt_key_is_found_with_a_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("keepalive_s = 20", "keepalive = 20"))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:6: broker.keepalive: unknown key")
    assert "did you mean 'keepalive_s'?" in msg


def test_a_missing_key_points_at_its_table(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace('id = "p2"\n', ""))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:12: packs[1].id: Field required")


def test_duplicate_pack_ids_point_at_the_second(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace('id = "p2"', 'id = "p1"'))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:13: packs[1].id: id 'p1' repeats packs[0].id")


def test_every_problem_is_reported_once(tmp_path: Path) -> None:
    text = GOOD.replace("n_cells = 96", "n_cells = -1").replace("interval_s = 5", "interval_s = 0")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    lines = info.value.problems
    assert [ln.split(": ")[0].rsplit(":", 1)[1] for ln in lines] == ["10", "20"]


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "reason"),
    [
        ('url = "mqtts://alice', 'url = "http://alice', 5, "broker.url", "mqtt:// or mqtts://"),
        ('id = "p1"', 'id = "p 1"', 9, "packs[0].id", "topic level"),
        ('id = "p1"', 'id = "status"', 9, "packs[0].id", "reserved"),
        ('prefix = "bms/v1"', 'prefix = "bms/+"', 2, "prefix", "no wildcards"),
        ("keepalive_s = 20", "qos = 2", 6, "broker.qos", "less than or equal to 1"),
        ("capacity_ah = 4.8", "capacity_ah = -4.8", 16, "packs[1].capacity_ah", "greater than 0"),
    ],
)
def test_bad_values(tmp_path: Path, old: str, new: str, line: int, field: str, reason: str) -> None:
    assert old in GOOD
    msg = error_of(tmp_path, GOOD.replace(old, new))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:{line}: {field}: ")
    assert reason in msg


def test_a_password_is_never_echoed(tmp_path: Path) -> None:
    text = GOOD.replace("keepalive_s = 20", "password = 12345")
    msg = error_of(tmp_path, text)
    assert "broker.password" in msg
    assert "12345" not in msg
    assert "(got '***')" in msg


def test_reconnect_bounds_point_at_the_max(tmp_path: Path) -> None:
    text = GOOD.replace("keepalive_s = 20", "reconnect_min_s = 5.0\nreconnect_max_s = 1.0")
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:7: broker.reconnect_max_s: must be >=")
    assert "(got 1.0)" in msg


def test_tls_files_must_exist(tmp_path: Path) -> None:
    text = GOOD.replace("keepalive_s = 20", "[broker.tls]\nca_file = 'ca.pem'")
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:7: broker.tls.ca_file: no such file")
    (tmp_path / "ca.pem").write_text("x")
    assert load_config(tmp_path / "pack.toml").broker.tls is not None


def test_an_unknown_cell_model_fails_at_its_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("capacity_ah = 4.8", 'cell = "no-such-cell"'))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:16: packs[1].cell: ")
    assert "no-such-cell" in msg


def test_toml_syntax_errors_carry_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("n_cells = 96", "n_cells = = 96"))
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:10: TOML syntax")


def test_limits_must_lie_within_the_estimators(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD + "[limits]\nvoltage_v = [0.0, 12.0]\n")
    assert msg.startswith(f"{tmp_path / 'pack.toml'}:22: limits.voltage_v: ")
    assert "within the estimator's" in msg


def test_nothing_to_serve_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to serve"):
        ServiceConfig.model_validate({})
    assert ServiceConfig.model_validate({"accept_unknown_packs": True}).instance.startswith(
        "edge-bms-"
    )


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
