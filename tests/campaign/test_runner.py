"""The closed loop on the simulated lab: state in Tiled, resume after SIGKILL, failures.

Real lab process, real plans, real RunEngine, the session's embedded Tiled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.campaign.runner import (
    Campaign,
    CampaignConfigError,
    load_campaign_config,
    read_state,
)
from labctl.data import DataConfig, Store, open_store
from labctl.plans.session import open_lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store() -> Iterator[Store]:
    with open_store(DataConfig.from_env()) as s:  # the session's LABCTL_DATA
        yield s


def test_config_errors_name_the_file_line_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text('name = "x"\nbudget = 0\noptimizer = "greedy"\n\n[space]\nmolality_max = -1\n')
    with pytest.raises(CampaignConfigError) as err:
        load_campaign_config(path)
    text = str(err.value)
    assert f"{path}:2: budget = 0: Input should be greater than or equal to 1" in text
    assert f"{path}:3: optimizer = 'greedy'" in text
    assert f"{path}:5: space.molality_max = -1" in text
    cfg = load_campaign_config(path, budget=5, optimizer="random", space={})
    assert (cfg.budget, cfg.optimizer, cfg.id) == (5, "random", "x-random-s0")


def _campaign(cid: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "labctl.cli", "campaign", "run", "--campaign-id", cid,
            "--budget", "4", "--batch-size", "2", "--optimizer", "random", "--speed", "1000",
            *extra]  # fmt: skip


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_campaign_resumes_without_repeating_or_losing_an_experiment(
    store: Store, tmp_path: Path
) -> None:
    cid = f"K-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_campaign(cid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=ROOT)  # fmt: skip
    seen: list[str] = []
    try:
        assert first.stdout is not None
        for line in first.stdout:
            seen.append(line)
            if line.strip().startswith(f"{cid}-E002:"):  # E001 measured, E002 starting
                # Kill once E002's run has begun: its journal file exists.
                journal = store.config.journal_directory
                deadline = time.monotonic() + 30
                while not list(journal.glob("*.jsonl")) and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.5)  # a few events into the run
                first.send_signal(signal.SIGKILL)
                break
    finally:
        first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
    assert any(re.match(r"\s+[\d.]+ mS/cm", s) for s in seen), "".join(seen)
    before = read_state(store, cid)
    assert [len(e.attempts) for e in before.experiments] == [1, 1]
    e1, e2 = before.experiments
    assert e1.done and not e2.done and e2.attempts[0].exit_status == "incomplete"

    again = subprocess.run(_campaign(cid, "--json"), capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"resuming {cid}: 1 measured, 0 skipped, 1 batches so far" in again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])  # DESIGN contract 3
    assert summary["n_experiments"] == 4 and len(summary["trace"]) == 4
    assert summary["best"]["conductivity_mS_cm"] == max(
        t["conductivity_mS_cm"] for t in summary["trace"])  # fmt: skip
    state = read_state(store, cid)
    ids = [e.id for e in state.experiments]
    assert ids == [f"{cid}-E00{i}" for i in range(1, 5)]  # nothing lost, nothing extra
    runs = {e.id: [(a.sample_id, a.exit_status) for a in e.attempts] for e in state.experiments}
    assert runs[f"{cid}-E001"] == [(f"{cid}-E001", "success")]  # not repeated
    assert runs[f"{cid}-E002"] == [
        (f"{cid}-E002", "incomplete"), (f"{cid}-E002-r2", "success")]  # fmt: skip
    assert state.experiments[0].measured == e1.measured
    assert next(t["experiment"] for t in summary["trace"]) == f"{cid}-E001"

    shown = subprocess.run([sys.executable, "-m", "labctl.cli", "campaign", "status", cid],
                           capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.count(" done ") == 4, shown.stdout
    report = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "campaign", "report", cid, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert page.count("<tr><td>") == 4 and "incomplete" in page
    assert (tmp_path / "trace.png").stat().st_size > 5000


@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_a_failing_experiment_is_retried_then_skipped_and_the_deck_cleared(
    store: Store,
) -> None:
    cid = f"F-{uuid.uuid4().hex[:8]}"
    cfg = load_campaign_config(
        None, campaign_id=cid, budget=2, batch_size=1, optimizer="random", max_retries=1,
        max_skipped=1, speed=1000.0,
    )  # fmt: skip
    said: list[str] = []
    with open_lab(None, speed=cfg.speed, transport="tcp") as session:
        assert session.control is not None
        # The meter never answers: every measurement fails after the preparation.
        session.control({"op": "inject", "instrument": "meter", "fault": "no_reply",
                         "count": 1000})  # fmt: skip
        store.subscribe(session.RE)
        with pytest.raises(RuntimeError, match=rf"1 experiments failed for good .*{cid}-E001"):
            Campaign(cfg, session, store, say=said.append).run()
        world = session.control({"op": "state"})["state"]
    (exp,) = read_state(store, cid).experiments
    assert [(a.sample_id, a.exit_status) for a in exp.attempts] == [
        (cid + "-E001", "fail"), (cid + "-E001-r2", "fail")]  # fmt: skip
    assert "meter" in exp.attempts[0].reason
    assert exp.state(cfg) == "skipped"
    # Both failed vials went back to the rack; no vial was left on a working station.
    assert all(v is None for st, v in world["stations"].items() if not st.startswith("rack/"))
    assert sum("clearing" in s for s in said) == 2


def test_a_measured_composition_a_hair_outside_the_space_is_still_data() -> None:
    from labctl.campaign.space import DesignSpace

    space = DesignSpace()
    x = space.encode_measured({"EC": 0.0999, "DMC": 0.9001}, 2.0000145)
    assert x.tolist() == pytest.approx([0.0999, 0.0, 0.0, 0.9001, 0.0, 1.0])
    assert space.encode_measured({"PC": 2.0, "EMC": 2.0}, 0.1)[[1, 2, 5]].tolist() == [
        0.5,
        0.5,
        0.0,
    ]
