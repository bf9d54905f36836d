"""Documents per second into Tiled (SQLite and PostgreSQL catalogs), `runs list` time, and
what a SIGKILL mid-run leaves readable.

For each backend a fresh embedded server (labctl.data) is started; the same plan,
``bp.count`` of a soft device with three scalars, runs three times: without a writer
(the RunEngine's own rate); with the journaled writer (labctl's default: each document
journaled to a local file before the plan goes on, written to Tiled in background
batches; the run's end waits until Tiled holds all of it), also with ``fsync`` per
document; with TiledWriter writing each event before the plan goes on (``batch_size=1``,
the durable mode without a journal) and with TiledWriter's default batching (all events
written at the stop document; a kill loses them). Then ``--runs`` small
runs are written and ``Store.runs()`` and ``labctl runs list`` are timed over them.
Last, a child process writing durably is SIGKILLed after ``--kill-after`` confirmed
events and the run is read back.

    .venv/bin/python scripts/bench_tiled.py [--events 1000] [--runs 100]
        [--kill-after 50] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bluesky.plans as bp
from bluesky import RunEngine
from bluesky.protocols import Triggerable
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import AsyncStatus, StandardReadable, soft_signal_r_and_setter, soft_signal_rw

from labctl.data import DataConfig, open_store, stop_server
from labctl.data.journal import JournaledWriter
from labctl.data.writer import make_writer

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/labctl_bench"


class Scalars(StandardReadable, Triggerable):
    """Three scalars per event: a count, a voltage and a temperature."""

    def __init__(self, name: str = "dev") -> None:
        self._n = itertools.count(1)
        with self.add_children_as_readables():
            self.count, self._set_count = soft_signal_r_and_setter(float, units="count")
            self.voltage = soft_signal_rw(float, initial_value=3.7, units="V")
            self.temperature = soft_signal_rw(float, initial_value=25.0, units="degC")
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        self._set_count(float(next(self._n)))


CHILD = """
import itertools, sys
import bluesky.plans as bp
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from labctl.data import DataConfig, open_store
sys.path.insert(0, sys.argv[3])
from bench_tiled import Scalars
store = open_store(DataConfig.model_validate_json(sys.argv[1]))
RE = RunEngine()
store.subscribe(RE)
RE.subscribe(lambda name, doc: name == "event" and print(doc["seq_num"], flush=True))
dev = Scalars()
call_in_bluesky_event_loop(dev.connect())
RE(bp.count([dev], num=100000), campaign_id=sys.argv[2])
"""


def drop_database(uri: str) -> None:
    import asyncpg

    name = uri.rsplit("/", 1)[1]

    async def go() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())


def timed_run(engine: RunEngine, plan: Any, **md: Any) -> float:
    t0 = time.perf_counter()
    engine(plan, **md)
    return time.perf_counter() - t0


def bench_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    catalog = PG if backend == "postgresql" else None
    if catalog:
        drop_database(catalog)  # a fresh database, as the SQLite one is a fresh file
    config = DataConfig(directory=workdir / backend, catalog=catalog)
    out: dict[str, Any] = {"backend": backend}
    print(f"[{backend}] starting the embedded server...", flush=True)
    t0 = time.perf_counter()
    store = open_store(config)
    out["server_start_s"] = time.perf_counter() - t0
    try:
        RE = RunEngine()
        dev = Scalars()
        call_in_bluesky_event_loop(dev.connect())
        n = args.events
        docs = n + 3  # start, descriptor, n events, stop
        RE(bp.count([dev], num=5))  # warm up the RunEngine and the device
        out["no_writer_s"] = timed_run(RE, bp.count([dev], num=n))
        modes: list[tuple[str, Any]] = [
            ("journaled", lambda: JournaledWriter(store.client, config.journal_directory)),
            (
                "journaled_fsync",
                lambda: JournaledWriter(store.client, config.journal_directory, fsync=True),
            ),
            ("durable", lambda: make_writer(store.client, batch_size=1)),
            ("batched", lambda: make_writer(store.client, batch_size=n + 1)),
        ]
        for mode, make in modes:
            writer = make()
            token = RE.subscribe(writer)  # type: ignore[no-untyped-call]
            print(f"[{backend}] {n} events, {mode} writer...", flush=True)
            out[f"{mode}_s"] = timed_run(RE, bp.count([dev], num=n), campaign_id=f"bench-{mode}")
            RE.unsubscribe(token)  # type: ignore[no-untyped-call]
            if isinstance(writer, JournaledWriter):
                out[f"{mode}_batches"] = writer.stats.batches
                writer.close()
            (run,) = store.runs(campaign=f"bench-{mode}", limit=1)
            assert run.num_events == {"primary": n}, run
            assert store.run(run.uid).streams["primary"].rows == n
        for mode in ("no_writer", *(m for m, _ in modes)):
            out[f"{mode}_docs_per_s"] = docs / out[f"{mode}_s"]
        out["durable_ms_per_event"] = (out["durable_s"] - out["no_writer_s"]) / n * 1e3

        print(f"[{backend}] writing {args.runs} runs for `runs list`...", flush=True)
        token = store.subscribe(RE)
        for i in range(args.runs):
            RE(bp.count([dev], num=2), campaign_id="bench-list", sample_id=f"S{i:03d}")
        RE.unsubscribe(token)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        listed = store.runs(campaign="bench-list")
        out["api_list_s"] = time.perf_counter() - t0
        assert len(listed) == args.runs, len(listed)
        t0 = time.perf_counter()
        every = store.runs()
        out["api_list_all_s"] = time.perf_counter() - t0
        out["runs_total"] = len(every)
        cli = [sys.executable, "-m", "labctl.cli", "runs", "list", "--data", str(config.directory)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cli, "--campaign", "bench-list"], capture_output=True, text=True)
        out["cli_list_s"] = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("success") == args.runs, proc.stdout
        out.update(kill(config, args.kill_after, backend))
    finally:
        store.close()
        stop_server(config.directory)
        if catalog:
            drop_database(catalog)
    return out


def kill(config: DataConfig, after: int, backend: str) -> dict[str, Any]:
    print(f"[{backend}] SIGKILL after {after} confirmed events...", flush=True)
    campaign = f"bench-kill-{os.getpid()}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, config.model_dump_json(), campaign, str(ROOT / "scripts")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    confirmed = 0
    with selectors.DefaultSelector() as sel:
        sel.register(child.stdout, selectors.EVENT_READ)
        while confirmed < after and sel.select(120):
            line = child.stdout.readline()
            if not line:
                break
            confirmed = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    with open_store(config) as store:
        (run,) = store.runs(campaign=campaign)
        frame = store.read(run.uid, "primary")
    contiguous = list(frame["seq_num"]) == list(range(1, len(frame) + 1))
    return {
        "kill_confirmed": confirmed,
        "kill_readable": len(frame),
        "kill_status": run.exit_status,
        "kill_contiguous": contiguous,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--kill-after", type=int, default=50)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="labctl-bench-") as tmp:
        for backend in args.backends.split(","):
            results.append(bench_backend(backend, args, Path(tmp)))
    print()
    print(f"Tiled {args.events} events of 3 scalars (bp.count), {os.cpu_count()} CPUs")
    for r in results:
        print(f"== {r['backend']} (server start {r['server_start_s']:.1f} s)")
        print(f"  RunEngine alone        {r['no_writer_docs_per_s']:8.0f} docs/s")
        for mode in ("journaled", "journaled_fsync"):
            print(
                f"  {mode:22s} {r[f'{mode}_docs_per_s']:8.0f} docs/s  "
                f"({r[f'{mode}_docs_per_s'] / r['durable_docs_per_s']:.1f}x TiledWriter batch 1; "
                f"{r[f'{mode}_batches']} writes to Tiled)"
            )
        print(
            f"  durable (batch 1)      {r['durable_docs_per_s']:8.1f} docs/s  "
            f"(+{r['durable_ms_per_event']:.1f} ms per event)"
        )
        print(f"  TiledWriter at stop    {r['batched_docs_per_s']:8.1f} docs/s (not durable)")
        print(
            f"  runs list, {args.runs} runs: API {r['api_list_s'] * 1e3:.0f} ms, "
            f"all {r['runs_total']} runs {r['api_list_all_s'] * 1e3:.0f} ms, "
            f"CLI (new process) {r['cli_list_s']:.2f} s"
        )
        print(
            f"  SIGKILL after {r['kill_confirmed']} journaled events: {r['kill_readable']} "
            f"readable after recovery, contiguous={r['kill_contiguous']}, "
            f"status {r['kill_status']}"
        )


if __name__ == "__main__":
    main()
