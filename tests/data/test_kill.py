"""No data lost: SIGKILL a process mid-run; every event it had journaled is readable.

The child process runs a long ``bp.count`` of a soft counter with the store subscribed
(the journaled writer, the default) and a second subscriber after it that prints each
event's ``seq_num``: RunEngine callbacks run in subscription order, so a printed
``seq_num`` is an event whose journal line had been written. The test kills the child
after ``CONFIRMED`` such lines, then opens the store (which replays the dead child's
journal into Tiled) and reads the run back from the server.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl.data import open_store
from tests.data import new_campaign

ROOT = Path(__file__).resolve().parents[2]
CONFIRMED = 12

CHILD = """
import sys
import bluesky.plans as bp
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from labctl.data import DataConfig, open_store
from tests.data import Counter

config = DataConfig.model_validate_json(sys.argv[1])
store = open_store(config)
RE = RunEngine()
store.subscribe(RE)
RE.subscribe(lambda name, doc: name == "event" and print(doc["seq_num"], flush=True))
counter = Counter()
call_in_bluesky_event_loop(counter.connect())
RE(bp.count([counter], num=100000, delay=0.01), campaign_id=sys.argv[2])
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_run_leaves_every_written_event_readable(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    config, _ = request.getfixturevalue(f"{backend}_server")
    campaign = new_campaign()
    stderr = tmp_path / "child.err"
    with open(stderr, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, config.model_dump_json(), campaign],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    confirmed = 0
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 90
        with selectors.DefaultSelector() as sel:
            sel.register(child.stdout, selectors.EVENT_READ)
            while confirmed < CONFIRMED and time.monotonic() < deadline:
                if not sel.select(deadline - time.monotonic()):
                    break
                line = child.stdout.readline()
                if not line:
                    break
                confirmed = int(line)
        if confirmed >= CONFIRMED:
            os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()  # no-op when it is dead already
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    assert confirmed >= CONFIRMED, f"child confirmed {confirmed} events: {stderr.read_text()}"
    assert child.returncode == -signal.SIGKILL

    with open_store(config) as store:
        assert [r.uid for r in store.recovered if not r.complete]  # the child's journal
        (summary,) = store.runs(campaign=campaign)
        assert summary.exit_status == "incomplete"
        assert summary.num_events == {}
        info = store.run(summary.uid)
        assert info.stop is None
        frame = store.read(summary.uid, "primary")
    rows = len(frame)
    # Every confirmed event, and at most the one that was being written at the kill.
    assert confirmed <= rows <= confirmed + 1
    assert info.streams["primary"].rows == rows
    assert list(frame["seq_num"]) == list(range(1, rows + 1))
    assert list(frame["counter-value"]) == [float(n) for n in range(1, rows + 1)]
    assert (frame["counter-setpoint"] == 0.5).all()
