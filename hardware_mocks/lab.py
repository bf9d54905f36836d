"""A whole simulated lab: one world, every instrument, served over pty or TCP."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import shutil
import tempfile
import typing
from types import TracebackType
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from hardware_mocks.clock import SimClock
from hardware_mocks.config import SIMULATORS, ConfigError, LabConfig, load_lab_config
from hardware_mocks.server import Endpoint, Simulator, serve_pty, serve_tcp
from hardware_mocks.world import LabWorld, Reagent

Transport = Literal["pty", "tcp"]
log = logging.getLogger(__name__)


def simulator_class(kind: str) -> type[Simulator]:
    module, _, cls = SIMULATORS[kind].partition(":")
    sim_cls: type[Simulator] = getattr(importlib.import_module(module), cls)
    return sim_cls


def _validated_options(cls: type[Simulator], options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check each option against the simulator's ``__init__`` annotation (TOML types)."""
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, Any] = {}
    for key, value in options.items():
        hint = hints.get(key, Any)
        try:
            out[key] = TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise ConfigError(f"{where}: options.{key} = {value!r}: {msg}") from None
    return out


class SimulatedLab:
    """Build the world and simulators of a :class:`LabConfig`; start/stop their servers.

    >>> async with SimulatedLab(load_lab_config()) as lab:   # doctest: +SKIP
    ...     url = lab.urls["balance"]
    """

    def __init__(self, config: LabConfig | None = None, *, speed: float | None = None) -> None:
        config = config or load_lab_config()
        if speed is not None:  # an override is validated like the file's own value
            try:
                config = LabConfig.model_validate({**config.model_dump(), "speed": speed})
            except ValidationError as exc:
                raise ConfigError(f"speed = {speed!r}: {exc.errors()[0]['msg']}") from None
        self.config = config
        self.clock = SimClock(self.config.speed)
        reagents = {
            r.name: Reagent(r.name, dict(r.solvent_fractions), r.salt_molality, r.density_g_ml)
            for r in self.config.reagents
        }
        self.world = LabWorld(
            self.clock,
            self.config.load_electrolyte_model(),
            reagents=reagents,
            rack_slots=self.config.rack_slots,
            ambient_c=self.config.ambient_c,
            seed=self.config.seed,
        )
        self.simulators: dict[str, Simulator] = {}
        for i, inst in enumerate(self.config.instruments):
            cls = simulator_class(inst.kind)
            params = inspect.signature(cls.__init__).parameters
            unknown = sorted(set(inst.options) - set(params) - {"self", "name", "world"})
            if unknown:
                allowed = sorted(set(params) - {"self", "name", "world", "seed"})
                raise ConfigError(
                    f"instruments[{i}] ({inst.name!r}, kind {inst.kind!r}): unknown option(s) "
                    f"{unknown}; allowed: {allowed}"
                )
            options = _validated_options(cls, inst.options, f"instruments[{i}] ({inst.name!r})")
            try:
                self.simulators[inst.name] = cls(
                    inst.name, self.world, seed=self.config.seed + i, **options
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"instruments[{i}] ({inst.name!r}): {exc}") from exc
        self.endpoints: dict[str, Endpoint] = {}
        self._pty_dir: str | None = None

    async def start(self, transport: Transport | None = None) -> dict[str, Endpoint]:
        transport = transport or self.config.transport
        if transport == "pty" and self._pty_dir is None:
            self._pty_dir = tempfile.mkdtemp(prefix="labctl-pty-")
        for name, sim in self.simulators.items():
            if transport == "tcp":
                self.endpoints[name] = await serve_tcp(sim)
            else:
                self.endpoints[name] = await serve_pty(sim, self._pty_dir)
        return self.endpoints

    async def stop(self) -> None:
        for ep in self.endpoints.values():
            await ep.close()
        self.endpoints.clear()
        if self._pty_dir is not None:
            shutil.rmtree(self._pty_dir, ignore_errors=True)
            self._pty_dir = None

    @property
    def urls(self) -> dict[str, str]:
        return {name: ep.url for name, ep in self.endpoints.items()}

    def describe(self) -> list[dict[str, Any]]:
        """One contract-1 record per instrument."""
        return [
            {
                "name": name,
                "kind": ep.simulator.kind,
                "protocol": ep.simulator.protocol,
                "url": ep.url,
            }
            for name, ep in self.endpoints.items()
        ]

    async def __aenter__(self) -> SimulatedLab:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- control (fault injection, ground truth) -------------------------------------
    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Execute one control request; used by the control port and by tests."""
        op = request.get("op")
        if op == "state":
            return {"ok": True, "state": self.world.snapshot()}
        if op == "list":
            return {"ok": True, "instruments": self.describe()}
        if op == "conductivity":  # ground truth of a vial's contents at any temperature
            vial = self.world.vials.get(str(request.get("vial")))
            if vial is None:
                return {"ok": False, "error": f"vial: unknown {request.get('vial')!r}"}
            try:
                temperature = float(request.get("temperature_c", ""))
            except (ValueError, TypeError):
                return {"ok": False, "error": f"temperature_c: {request.get('temperature_c')!r}"}
            fractions, molality = vial.composition()
            kappa = (
                self.world.electrolyte_model(fractions, molality, temperature) if fractions else 0.0
            )
            return {"ok": True, "conductivity_mS_cm": kappa}
        if op == "fresh_rack":  # the operator swaps used vials for empty ones
            return {"ok": True, "vials": self.world.fresh_rack()}
        if op == "speed":  # e.g. electrolytes at 500x, then cycling at 2000x
            try:
                self.clock.set_speed(float(request.get("speed", "")))
            except (ValueError, TypeError) as exc:
                return {"ok": False, "error": f"speed: {exc}"}
            return {"ok": True, "speed": self.clock.speed}
        if op in ("inject", "clear"):
            name = request.get("instrument")
            sim = self.simulators.get(str(name))
            if sim is None:
                return {"ok": False, "error": f"instrument: unknown {name!r}"}
            if op == "clear":
                sim.faults.clear()
                return {"ok": True}
            try:
                sim.faults.inject(
                    request.get("fault", ""),
                    count=request.get("count", 1),
                    delay_s=float(request.get("delay_s", 2.0)),
                )
            except (ValueError, TypeError) as exc:
                return {"ok": False, "error": f"fault: {exc}"}
            return {"ok": True}
        return {
            "ok": False,
            "error": f"op: unknown {op!r}; use "
            "state|list|conductivity|fresh_rack|speed|inject|clear",
        }

    def control_line(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
        except ValueError as exc:
            return json.dumps({"ok": False, "error": f"request: {exc}"}).encode() + b"\n"
        try:
            reply = self.control(req)
        except Exception as exc:  # the control port answers every line, even on a bug
            log.exception("control request %r failed", req)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return json.dumps(reply, default=str).encode() + b"\n"


class LabThread:
    """Run a :class:`SimulatedLab` on its own event loop in a background thread.

    Clients (a RunEngine, pyvisa, nesp-lib) then talk to it exactly as to a
    separate process, through its ptys or sockets::

        with LabThread(config, transport="pty", speed=100) as lab:
            Balance(lab.urls["balance"])
    """

    def __init__(
        self,
        config: LabConfig | None = None,
        *,
        transport: Transport = "tcp",
        speed: float | None = None,
    ) -> None:
        import threading

        self._threading = threading
        self.transport: Transport = transport
        self.lab = SimulatedLab(config, speed=speed)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="simulated-lab", daemon=True
        )

    @property
    def world(self) -> LabWorld:
        return self.lab.world

    @property
    def urls(self) -> dict[str, str]:
        return self.lab.urls

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the lab's loop thread (thread-safe access to the world)."""

        async def run() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def start(self) -> LabThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.lab.start(self.transport), self.loop).result(30)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.lab.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> LabThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
