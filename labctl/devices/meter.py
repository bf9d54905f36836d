"""Conductivity meter over the Orion Star A-series remote protocol (A212, A215 and kin)."""

from __future__ import annotations

import asyncio

from ophyd_async.core import (
    AsyncStatus,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from labctl.devices.base import SerialInstrument
from labctl.devices.errors import CommandRejectedError, DeviceTimeoutError
from labctl.devices.protocols import orion
from labctl.devices.transport import ReplyComplete


class ConductivityMeter(SerialInstrument):
    """A conductivity meter: ``trigger()`` takes a measurement (``GETMEAS``), ``read()`` returns it.

    Readings: ``conductivity`` (mS/cm, whatever unit the meter autoranged to),
    ``temperature`` (C) and ``stable``. Configuration: ``model``, ``serial_number``,
    ``software``, ``cell_constant`` (1/cm) and ``temperature_compensation``.

    With ``wait_for_stable=True`` (default) a trigger repeats ``GETMEAS`` every
    ``poll_period`` s until the meter reports the reading stable, and fails with
    :class:`~labctl.devices.errors.DeviceTimeoutError` after ``stable_timeout`` s.
    With ``wait_for_stable=False`` it records the first reading and its flag.
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        wait_for_stable: bool = True,
        stable_timeout: float = 60.0,
        poll_period: float = 0.2,
    ) -> None:
        self.wait_for_stable = wait_for_stable
        self.stable_timeout = stable_timeout
        self.poll_period = poll_period
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.conductivity, self._set_conductivity = soft_signal_r_and_setter(
                float, units="mS/cm", precision=4
            )
        with self.add_children_as_readables():
            self.temperature, self._set_temperature = soft_signal_r_and_setter(
                float, units="degC", precision=1
            )
            self.stable, self._set_stable = soft_signal_r_and_setter(bool)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.model, self._set_model = soft_signal_r_and_setter(str)
            self.serial_number, self._set_serial = soft_signal_r_and_setter(str)
            self.software, self._set_software = soft_signal_r_and_setter(str)
            self.cell_constant, self._set_cell_constant = soft_signal_r_and_setter(
                float, units="1/cm"
            )
            self.temperature_compensation, self._set_compensation = soft_signal_r_and_setter(str)
        self._resync = False  # a timed-out command's reply may still be on its way
        super().__init__(url, name, timeout=timeout)

    async def _exchange(
        self, payload: bytes, complete: ReplyComplete, timeout: float | None
    ) -> bytes:
        # Shielded: a cancelled trigger must not free the port mid-exchange.
        return await asyncio.shield(self._query(payload, complete, timeout=timeout))

    async def _command(self, payload: bytes, *, timeout: float | None = None) -> bytes:
        if self._resync:
            # Replies carry no command identity (a late GETMEAS answer looks like a fresh
            # one), so after a timeout, sync on an empty command's prompt first.
            await self._exchange(orion.encode_sync(), orion.sync_complete, None)
            self._resync = False
        try:
            return await self._exchange(payload, orion.reply_complete, timeout)
        except DeviceTimeoutError:
            self._resync = True
            raise

    async def _identify(self) -> None:
        raw = await self._command(orion.encode("SYSTEM"))
        info = self._decode(lambda: orion.decode_system(raw))
        self._set_model(info.model)
        self._set_serial(info.serial_number)
        self._set_software(info.software)
        raw = await self._command(orion.encode("GETMODE"))
        if self._decode(lambda: orion.decode_mode(raw)) != "COND":
            setmode = orion.encode_setmode("COND")
            await self._command(setmode)
            raw = await self._command(orion.encode("GETMODE"))
            if self._decode(lambda: orion.decode_mode(raw)) != "COND":
                raise CommandRejectedError(
                    "meter refused SETMODE COND", instrument=self.name, command=setmode, raw=raw
                )
        first = await self.measure()
        self._set_cell_constant(first.cell_constant)
        self._set_compensation(first.temperature_compensation)

    async def measure(self) -> orion.Measurement:
        """One ``GETMEAS``: the current reading, stable or not."""
        payload = orion.encode_getmeas()
        raw = await self._command(payload)
        return self._decode(lambda: orion.decode_measurement(raw, payload))

    async def measure_stable(self, timeout: float | None = None) -> orion.Measurement:
        """Repeat ``GETMEAS`` until the meter reports a stable reading."""
        limit = self.stable_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            reading = await self.measure()
            if reading.stable:
                return reading
            if loop.time() >= deadline:
                raise DeviceTimeoutError(
                    f"reading not stable within {limit:g} s (last {reading.conductivity_ms_cm:.4g} "
                    f"mS/cm at {reading.temperature_c:.1f} C)",
                    instrument=self.name,
                    command=orion.encode_getmeas(),
                    raw=reading.raw,
                )
            await asyncio.sleep(self.poll_period)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self.is_mock:
            return
        reading = await (self.measure_stable() if self.wait_for_stable else self.measure())
        self._set_conductivity(reading.conductivity_ms_cm)
        self._set_temperature(reading.temperature_c)
        self._set_stable(reading.stable)
