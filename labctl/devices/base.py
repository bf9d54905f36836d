"""What every serial instrument device shares.

A device owns a :class:`~labctl.devices.transport.SerialTransport` and a codec.
``connect()`` opens the port and identifies the instrument; ``connect(mock=True)``
(``init_devices(mock=True)``) opens nothing, so plans and unit tests run with no
hardware and signals are driven with ``set_mock_value``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ophyd_async.core import (
    AsyncStatus,
    Device,
    DeviceConnector,
    DeviceMock,
    StandardReadable,
)

from labctl.devices.errors import InstrumentError
from labctl.devices.transport import ReplyComplete, SerialTransport

T = TypeVar("T")


class SerialConnector(DeviceConnector):
    """Opens the transport (and runs ``identify``) on a real connect; nothing on mock."""

    def __init__(self, transport: SerialTransport, identify: Callable[[], Awaitable[None]]) -> None:
        self.transport = transport
        self.identify = identify
        self.mock = False

    async def connect_mock(self, device: Device, mock: DeviceMock[Any]) -> None:
        self.mock = True
        await super().connect_mock(device, mock)

    async def connect_real(self, device: Device, timeout: float, force_reconnect: bool) -> None:
        self.mock = False
        if force_reconnect:
            await self.transport.close()
        await self.transport.open()
        await asyncio.wait_for(self.identify(), timeout)
        await super().connect_real(device, timeout, force_reconnect)


class SerialInstrument(StandardReadable):
    """Base for devices that talk to one serial instrument."""

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        baudrate: int = 9600,
        serial_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._transport = SerialTransport(
            url,
            name=name or type(self).__name__,
            baudrate=baudrate,
            timeout=timeout,
            serial_kwargs=serial_kwargs,
        )
        self._serial_connector = SerialConnector(self._transport, self._identify)
        super().__init__(name=name, connector=self._serial_connector)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        if name and hasattr(self, "_transport"):
            self._transport.name = name

    @property
    def transport(self) -> SerialTransport:
        return self._transport

    @property
    def is_mock(self) -> bool:
        return self._serial_connector.mock

    async def _identify(self) -> None:
        """Check that the instrument answers and is what we expect (override)."""

    async def _query(
        self, payload: bytes, complete: ReplyComplete, *, timeout: float | None = None
    ) -> bytes:
        try:
            return await self._transport.query(payload, complete, timeout=timeout)
        except InstrumentError as exc:
            exc.instrument = exc.instrument or self.name
            raise

    def _decode(self, fn: Callable[[], T]) -> T:
        """Run a codec decode, stamping this device's name on any error it raises."""
        try:
            return fn()
        except InstrumentError as exc:
            exc.instrument = exc.instrument or self.name
            raise

    async def _write(self, payload: bytes) -> None:
        await self._transport.write(payload)

    async def disconnect(self) -> None:
        await self._transport.close()


class Action(Device):
    """A one-shot instrument action (zero, tare, home, stop) as a Triggerable child.

    Plans run it with ``yield from bps.trigger(device.zero, wait=True)``. In mock
    mode the action completes at once and is counted in :attr:`mock_calls`.
    """

    def __init__(self, action: Callable[[], Awaitable[None]], name: str = "") -> None:
        self._action = action
        self._mock_mode = False
        self.mock_calls = 0
        super().__init__(name=name)

    async def connect(
        self,
        mock: bool | DeviceMock[Any] = False,
        timeout: float = 10.0,
        force_reconnect: bool = False,
    ) -> None:
        self._mock_mode = bool(mock)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self._mock_mode:
            self.mock_calls += 1
            return
        await self._action()
