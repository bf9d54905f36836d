"""`labctl models`: list, show, verify, promote, rollback on a real registry."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from labctl.cli import app
from labctl.models.property import TrainedProperty, register_property_model

runner = CliRunner()


def test_models_cli_lists_verifies_promotes_rolls_back_and_refuses_a_tampered_file(
    trained_property: TrainedProperty, tmp_path: Path
) -> None:
    reg = tmp_path / "models"
    v1 = register_property_model(reg, trained_property, promote=True)
    v2 = register_property_model(reg, trained_property)  # same bytes? a new version all the same
    args = ["--registry", str(reg)]
    listed = json.loads(runner.invoke(app, ["models", "list", "--json", *args]).stdout)
    assert [(r["version"], r["promoted"]) for r in listed] == [("v1", True), ("v2", False)]
    promoted = runner.invoke(app, ["models", "promote", "conductivity", "v2", *args])
    assert promoted.exit_code == 0 and "promoted conductivity v2" in promoted.stdout
    shown = json.loads(runner.invoke(app, ["models", "show", "conductivity", *args]).stdout)
    assert shown["version"] == "v2" and shown["sha256"] == v2.sha256
    assert {i["name"] for i in shown["inputs"]} == {"fractions", "salt_molality", "temperature_c"}
    back = runner.invoke(app, ["models", "rollback", "conductivity", *args])
    assert back.exit_code == 0 and "rolled back conductivity to v1" in back.stdout
    ok = runner.invoke(app, ["models", "verify", "conductivity", *args])
    assert ok.exit_code == 0 and v1.sha256 in ok.stdout
    # Tamper with the promoted file: verify names it and fails.
    path = reg / "conductivity" / f"{v1.sha256}.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    bad = runner.invoke(app, ["models", "verify", "conductivity", *args])
    assert bad.exit_code == 1 and v1.sha256 in bad.output and str(path.name) in bad.output
    unknown = runner.invoke(app, ["models", "promote", "conductivity", "v9", *args])
    assert unknown.exit_code == 1 and "v9" in unknown.output
