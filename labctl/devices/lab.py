"""Build the lab's devices from instrument records (contract 1 of DESIGN.md).

Records are ``{"name", "kind", "protocol", "url"}`` dicts, as printed by
``labctl mocks serve`` or written by hand for a real lab. Nothing here knows
whether an URL leads to a simulator or to hardware.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ophyd_async.core import Device

from labctl.devices.balance import Balance
from labctl.devices.chamber import TemperatureChamber
from labctl.devices.cycler import BatteryCycler
from labctl.devices.meter import ConductivityMeter
from labctl.devices.pump import PumpNetwork
from labctl.devices.robot import Gantry
from labctl.devices.stirrer import Stirrer


@dataclass
class LabDevices:
    """The devices of one lab, by role (``None`` where the lab lacks that instrument)."""

    balance: Balance | None = None
    pumps: PumpNetwork | None = None
    robot: Gantry | None = None
    stirrer: Stirrer | None = None
    chamber: TemperatureChamber | None = None
    meter: ConductivityMeter | None = None
    cycler: BatteryCycler | None = None
    by_name: dict[str, Device] = field(default_factory=dict)

    def role(self, role: str) -> Any:
        """The device in ``role`` (``"balance"``, ``"pumps"``...), or a LookupError naming it."""
        self.require(role)
        return getattr(self, role)

    def require(self, *roles: str) -> None:
        missing = [r for r in roles if getattr(self, r) is None]
        if missing:
            raise LookupError(
                f"the lab has no {', '.join(missing)} (instruments: {sorted(self.by_name)})"
            )

    async def connect(self, *, mock: bool = False, timeout: float = 10.0) -> None:
        for device in self.by_name.values():
            await device.connect(mock=mock, timeout=timeout)

    async def disconnect(self) -> None:
        for device in self.by_name.values():
            close = getattr(device, "disconnect", None)
            if close is not None:
                await close()


_ROLE = {
    "balance": "balance",
    "pump": "pumps",
    "robot": "robot",
    "stirrer": "stirrer",
    "chamber": "chamber",
    "meter": "meter",
    "cycler": "cycler",
}


def build_lab_devices(
    records: Iterable[Mapping[str, Any]],
    *,
    reagents: Sequence[str],
    pump_options: Mapping[str, Any] | None = None,
) -> LabDevices:
    """One device per record; ``reagents`` are the pump network's reagents in address order."""
    lab = LabDevices()
    for rec in records:
        kind, name, url = str(rec["kind"]), str(rec["name"]), str(rec["url"])
        device: Device
        if kind == "balance":
            device = Balance(url, name)
        elif kind == "pump":
            device = PumpNetwork(url, name, reagents=list(reagents), **dict(pump_options or {}))
        elif kind == "robot":
            device = Gantry(url, name)
        elif kind == "stirrer":
            device = Stirrer(url, name)
        elif kind == "chamber":
            device = TemperatureChamber(url, name)
        elif kind == "meter":
            device = ConductivityMeter(url, name)
        elif kind == "cycler":
            device = BatteryCycler(url, name)
        else:
            raise ValueError(f"kind: unknown instrument kind {kind!r} for {name!r}")
        setattr(lab, _ROLE[kind], device)
        lab.by_name[name] = device
    return lab
