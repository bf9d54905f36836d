"""Which lab the plans run against: simulated, or real from instrument records.

:func:`open_lab` (a context manager) gives a :class:`LabSession`: connected devices,
the reagents on the pumps, the time scale (a simulator's speed), and a RunEngine whose
loop the devices live on. The lab comes from:

* nothing: the default simulated lab, started as a separate process
  (``labctl mocks serve``, :class:`labctl.simlab.SimulatedLabProcess`) at
  :data:`DEFAULT_SPEED`;
* ``path/to/lab.toml``: the simulated lab of that config (its ``[[reagents]]`` are what
  the pumps hold);
* ``path/to/lab.json``: a real (or already running) lab described by instrument records
  (DESIGN contract 1); see :func:`load_lab_json` for the format;
* ``tcp://HOST:PORT``: the control port of a running ``labctl mocks serve`` (its records
  come from the port's ``list`` request).

:func:`mock_lab` builds every instrument in mock mode (nothing opened) for dry runs
with ``bluesky.simulators``.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bluesky import RunEngine
from pydantic import ValidationError

from labctl import simlab
from labctl.devices.lab import LabDevices, build_lab_devices
from labctl.recipes import Reagent, default_reagents

T = TypeVar("T")

DEFAULT_SPEED = 500.0
"""Time acceleration of the simulated lab :func:`open_lab` starts when given no speed."""

SIM_PUMP_OPTIONS: dict[str, Any] = {"contents_ml": 10.0, "rate_ml_min": 5.0}
"""The simulated lab's syringes start full (10 mL); 5 mL/min keeps dispensing brisk."""

KINDS = ("balance", "pump", "robot", "stirrer", "chamber", "meter", "cycler")


class LabSourceError(ValueError):
    """The lab argument names nothing usable (unknown file type, bad JSON, no port)."""


@dataclass
class LabSession:
    """A connected lab: devices, reagents, time scale, the RunEngine they live on."""

    devices: LabDevices
    reagents: dict[str, Reagent]
    time_scale: float
    records: list[dict[str, Any]]
    source: str
    RE: RunEngine
    control: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the devices' loop (the RunEngine's) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.RE.loop).result(timeout)


# -- reagents -----------------------------------------------------------------------------

_NOMINAL_DENSITY = {k: r.density_g_ml for k, r in default_reagents().items() if "-" not in k}


def _density(fractions: Mapping[str, float], molality: float) -> float:
    """Nominal density of a mix: pure-solvent densities mixed by volume, +0.12 g/mL per
    mol/kg of LiPF6 (a first guess: gravimetric dosing measures the truth)."""
    inv = sum(w / _NOMINAL_DENSITY.get(k, 1.1) for k, w in fractions.items())
    return (1.0 / inv if inv > 0 else 1.1) + 0.12 * molality


def reagents_from_list(items: Sequence[Mapping[str, Any]], source: str) -> dict[str, Reagent]:
    """``[{"name", "solvent_fractions", "salt_molality"?, "density_g_ml"?}, ...]`` in pump
    address order; a missing density is estimated."""
    out: dict[str, Reagent] = {}
    for n, item in enumerate(items):
        data = dict(item)
        data.setdefault("salt_molality", 0.0)
        if data.get("density_g_ml") is None:
            data["density_g_ml"] = _density(
                data.get("solvent_fractions") or {}, float(data["salt_molality"])
            )
        try:
            reagent = Reagent.model_validate(data)
        except ValidationError as exc:
            raise LabSourceError(f"{source}: reagents[{n}]: {exc}") from None
        out[reagent.name] = reagent
    return out


def reagents_from_toml(path: str | Path) -> tuple[dict[str, Reagent], float]:
    """The reagents on the pumps of a lab TOML (pump address order) and its ``speed``."""
    text = Path(path).read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LabSourceError(f"{path}: {exc}") from None
    reagents = reagents_from_list(data.get("reagents", []), str(path))
    for inst in data.get("instruments", []):
        names = (inst.get("options") or {}).get("reagents")
        if inst.get("kind") == "pump" and names:
            reagents = {n: reagents[n] for n in names if n in reagents}
    return reagents or default_reagents(), float(data.get("speed", 1.0))


# -- sources ------------------------------------------------------------------------------


def load_lab_json(path: str | Path) -> dict[str, Any]:
    """Read a lab description.

    Accepted forms: an object ``{"instruments": [record, ...], "reagents": [...],
    "pump_options": {...}, "time_scale": 1.0}`` (only ``instruments`` is required);
    a bare list of records; or JSON lines, one record each (what ``labctl mocks serve``
    prints). A record is ``{"name", "kind", "protocol", "url"}`` (DESIGN contract 1).
    """
    text = Path(path).read_text()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise LabSourceError(f"{path}: not JSON or JSON lines: {exc}") from None
    if isinstance(data, list):
        data = {"instruments": data}
    if not isinstance(data, dict) or not isinstance(data.get("instruments"), list):
        raise LabSourceError(f"{path}: expected {{'instruments': [...]}} or a list of records")
    for n, rec in enumerate(data["instruments"]):
        missing = [k for k in ("name", "kind", "url") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise LabSourceError(f"{path}: instruments[{n}]: missing {missing}")
        if rec["kind"] not in KINDS:
            raise LabSourceError(
                f"{path}: instruments[{n}].kind = {rec['kind']!r}: not one of {list(KINDS)}"
            )
    return data


def control_request(url: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to a simulated lab's control port; failures name the lab source."""
    try:
        return simlab.control_request(url, request, timeout)
    except simlab.SimulatedLabError as exc:
        raise LabSourceError(str(exc)) from None


def connect_lab(
    records: Sequence[Mapping[str, Any]],
    reagents: Mapping[str, Reagent],
    *,
    RE: RunEngine,  # noqa: N803 - bluesky's name for it
    pump_options: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> LabDevices:
    """Build the devices of ``records`` and connect them on ``RE``'s loop."""
    devices = build_lab_devices(records, reagents=list(reagents), pump_options=pump_options)
    asyncio.run_coroutine_threadsafe(devices.connect(timeout=timeout), RE.loop).result(
        timeout * max(1, len(devices.by_name)) + 10
    )
    return devices


@contextmanager
def open_lab(
    lab: str | Path | None = None,
    *,
    RE: RunEngine | None = None,  # noqa: N803 - bluesky's name for it
    speed: float | None = None,
    transport: str = "pty",
    time_scale: float | None = None,
    connect_timeout: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> Iterator[LabSession]:
    """Start or reach a lab, connect its devices; disconnect (and stop a simulated lab)
    on exit. ``speed`` applies to simulated labs; ``time_scale`` overrides the plans'
    time scale (default: the simulator's speed, 1 for a lab from records)."""

    say = progress or (lambda _text: None)
    engine = RE if RE is not None else RunEngine(call_returns_result=True)
    text = str(lab) if lab is not None else None
    with ExitStack() as stack:
        control: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        pump_options: dict[str, Any] | None = None
        if text is None or text.endswith(".toml"):
            if text is not None and not Path(text).is_file():
                raise LabSourceError(f"{text}: no such lab config")
            if text is None:
                reagents, speed_cfg = default_reagents(), DEFAULT_SPEED
            else:
                reagents, speed_cfg = reagents_from_toml(text)
            run_speed = speed if speed is not None else speed_cfg
            say(f"starting the simulated lab ({text or 'default config'}, {run_speed:g}x)")
            sim = stack.enter_context(
                simlab.SimulatedLabProcess(config=text, transport=transport, speed=run_speed)
            )
            records = list(sim.records)
            control = sim.control
            scale = run_speed
            source = f"simulated lab ({text or 'default config'}, {run_speed:g}x, {transport})"
            pump_options = dict(SIM_PUMP_OPTIONS)
        elif text.startswith("tcp://"):
            reply = control_request(text, {"op": "list"})
            if not reply.get("ok"):
                raise LabSourceError(f"{text}: {reply.get('error')}")
            records = list(reply["instruments"])
            reagents = default_reagents()
            scale = speed if speed is not None else 1.0
            url = text
            control = lambda request: control_request(url, request)  # noqa: E731
            source = f"running lab at {text}"
            pump_options = dict(SIM_PUMP_OPTIONS)
        elif text.endswith((".json", ".jsonl")):
            if not Path(text).is_file():
                raise LabSourceError(f"{text}: no such lab file")
            data = load_lab_json(text)
            records = list(data["instruments"])
            reagents = (
                reagents_from_list(data["reagents"], text)
                if data.get("reagents")
                else default_reagents()
            )
            pump_options = data.get("pump_options")
            scale = float(data.get("time_scale", 1.0))
            source = f"lab of {text}"
        else:
            raise LabSourceError(
                f"--lab {text!r}: give a lab TOML (simulated), a JSON file of instrument "
                "records (real lab), or tcp://HOST:PORT (a running simulated lab's control port)"
            )
        say(f"connecting {len(records)} instruments")
        devices = connect_lab(
            records, reagents, RE=engine, pump_options=pump_options, timeout=connect_timeout
        )
        session = LabSession(
            devices=devices,
            reagents=dict(reagents),
            time_scale=time_scale if time_scale is not None else scale,
            records=records,
            source=source,
            RE=engine,
            control=control,
        )
        try:
            yield session
        finally:
            session.call(devices.disconnect(), timeout=30)


# -- dry runs -----------------------------------------------------------------------------


def mock_lab(
    RE: RunEngine | None = None,  # noqa: N803 - bluesky's name for it
    *,
    reagents: Mapping[str, Reagent] | None = None,
    kinds: Sequence[str] = KINDS,
    chamber_range_c: tuple[float, float] = (-40.0, 150.0),
) -> LabDevices:
    """Every instrument in mock mode (nothing is opened), for ``bluesky.simulators``.

    The chamber's setpoint range (read from the instrument at a real connect) is set to
    ``chamber_range_c`` so that ``check_limits`` has limits to check.
    """
    from ophyd_async.core import set_mock_value

    engine = RE if RE is not None else RunEngine(call_returns_result=True)
    records = [
        {"name": k if k != "pump" else "pumps", "kind": k, "url": f"mock://{k}"} for k in kinds
    ]
    devices = build_lab_devices(records, reagents=list(reagents or default_reagents()))

    async def connect() -> None:
        await devices.connect(mock=True)
        if devices.chamber is not None:
            set_mock_value(devices.chamber.setpoint_min, chamber_range_c[0])
            set_mock_value(devices.chamber.setpoint_max, chamber_range_c[1])

    asyncio.run_coroutine_threadsafe(connect(), engine.loop).result(30)
    return devices
