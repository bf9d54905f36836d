"""`labctl sim ...` through the CLI: a dry test with the shipped model as JSON, training
on a small labelled set, and errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from labctl.cli import app

runner = CliRunner()


def test_md_json_gives_the_properties_of_a_small_box() -> None:
    res = runner.invoke(
        app,
        ["sim", "md", "--system", "EC=6", "--replicas", "2", "--steps", "100",
         "--equil-steps", "20", "--timestep", "0.5", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["composition"] == {"EC": 6}
    assert out["n_atoms"] == 60
    assert out["n_replicas"] == 2
    # EC packed at its liquid density (NVT keeps it)
    assert abs(out["density_g_cm3"]["value"] - 1.32) < 0.01
    d = out["diffusion_m2_s"]["C3H4O3"]
    assert d["value_m2_s"] > 0 and d["error_m2_s"] >= 0
    assert out["stability"]["n_replicas"] == 2
    assert out["model"].endswith("default.pt")


def test_md_errors_name_the_input() -> None:
    res = runner.invoke(app, ["sim", "md", "--system", "EC32"])
    assert res.exit_code != 0
    assert "NAME=COUNT" in res.output
    res = runner.invoke(app, ["sim", "md", "--system", "XYZ=3", "--json"])
    assert res.exit_code == 2
    assert "XYZ" in res.output
    res = runner.invoke(app, ["sim", "md", "--system", "EC=4", "--model", "no-such-model"])
    assert res.exit_code == 2
    assert "no-such-model" in res.output


def test_train_on_a_small_labelled_set(tmp_path: Path) -> None:
    from sim_backend.chem.label import label_frames
    from sim_backend.chem.species import species_atoms

    rng = np.random.default_rng(1)
    frames = []
    for k in range(30):
        at = species_atoms("DMC")
        at.positions += rng.normal(0.0, 0.03, at.positions.shape)
        at.info["split"] = ["train", "train", "train", "val", "test"][k % 5]
        frames.append(at)
    data = tmp_path / "dmc.xyz"
    label_frames(frames, data)
    out = tmp_path / "m.pt"
    res = runner.invoke(
        app,
        ["sim", "train", str(data), "--out", str(out), "--epochs", "5",
         "--hyper", '{"hidden": [16], "n_channels": 4}'],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout[res.stdout.index("{") :])
    assert metrics["epochs_run"] == 5
    assert metrics["test"]["n_frames"] >= 1  # label_frames splits by frame id (stable)
    assert metrics["test"]["force_mae_mev_per_a"] > 0
    assert out.is_file()
    bad = runner.invoke(app, ["sim", "train", str(data), "--out", str(out), "--hyper", "{oops"])
    assert bad.exit_code == 2
