"""`labctl mocks serve` as a separate process (DESIGN contract 1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

pytestmark = pytest.mark.subprocess

LABCTL = [sys.executable, "-m", "labctl.cli"]


def _start(*args: str) -> tuple[subprocess.Popen[str], list[dict[str, object]]]:
    proc = subprocess.Popen(
        [*LABCTL, "mocks", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        rec = json.loads(line)
        records.append(rec)
        if rec["index"] == rec["total"] - 1:  # type: ignore[operator]
            return proc, records
    proc.kill()
    raise AssertionError(
        f"serve did not list its instruments: {proc.stderr.read() if proc.stderr else ''}"
    )


def _control(url: str, request: dict[str, object]) -> dict[str, object]:
    host, port = url.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(1 << 20)
    return json.loads(data)  # type: ignore[no-any-return]


@pytest.mark.parametrize("transport", ["pty", "tcp"])
def test_serve_lists_every_instrument_and_stops_on_sigterm(transport: str) -> None:
    proc, records = _start("--transport", transport, "--speed", "100")
    try:
        kinds = {r["kind"] for r in records}
        assert kinds == {"balance", "pump", "robot", "stirrer", "chamber", "meter", "cycler"}
        for r in records:
            assert set(r) >= {"name", "kind", "protocol", "url"}
            url = str(r["url"])
            if transport == "tcp":
                assert url.startswith("socket://127.0.0.1:")
            else:
                assert os.path.exists(url)
        balance = next(r for r in records if r["kind"] == "balance")
        port = serial.serial_for_url(str(balance["url"]), timeout=2)
        port.write(b"I4\r\n")
        assert port.read_until(b"\r\n").startswith(b'I4 A "')
        # Fault injection and ground truth through the control port.
        ctl = str(balance["control"])
        assert _control(ctl, {"op": "inject", "instrument": "balance", "fault": "garbage"})["ok"]
        port.write(b"SI\r\n")
        assert not port.read_until(b"\r\n").startswith(b"S ")
        state = _control(ctl, {"op": "state"})["state"]
        assert state["stations"]["rack/1"] == "V01"  # type: ignore[index]
        bad = _control(ctl, {"op": "inject", "instrument": "nope", "fault": "garbage"})
        assert bad == {"ok": False, "error": "instrument: unknown 'nope'"}
        empty = _control(ctl, {"op": "conductivity", "vial": "V01", "temperature_c": 25})
        assert empty == {"ok": True, "conductivity_mS_cm": 0.0}
        assert _control(ctl, {"op": "conductivity", "vial": "V99", "temperature_c": 25}) == {
            "ok": False, "error": "vial: unknown 'V99'"}  # fmt: skip
        assert _control(ctl, {"op": "fresh_rack"}) == {"ok": True, "vials": []}  # none used
        # Time acceleration changes at run time; simulated time stays continuous.
        t0 = float(state["time_s"])  # type: ignore[index, arg-type]
        assert _control(ctl, {"op": "speed", "speed": 4000}) == {"ok": True, "speed": 4000.0}
        time.sleep(0.25)
        t1 = float(_control(ctl, {"op": "state"})["state"]["time_s"])  # type: ignore[index]
        assert 0.2 * 4000 < t1 - t0 < 2.0 * 4000, (t0, t1)
        for wrong in (0, -1, "fast", None):
            reply = _control(ctl, {"op": "speed", "speed": wrong})
            assert reply["ok"] is False and str(reply["error"]).startswith("speed:"), reply
        port.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if transport == "pty":
        assert not any(os.path.exists(str(r["url"])) for r in records)


def test_serve_rejects_a_bad_config_with_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text('seed = 1\nspeed = "fast"\n')
    out = subprocess.run(
        [*LABCTL, "mocks", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert f"{cfg}:2: speed = 'fast'" in out.stderr


def test_a_lab_started_by_a_program_exits_when_the_program_is_killed() -> None:
    """SimulatedLabProcess passes --exit-with-parent: a SIGKILLed parent leaves no orphan."""
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from labctl.simlab import SimulatedLabProcess\n"
            "lab = SimulatedLabProcess(transport='tcp').start()\n"
            "print(lab.proc.pid, flush=True)\n"
            "time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError(f"lab process {child} outlived its killed parent")
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
