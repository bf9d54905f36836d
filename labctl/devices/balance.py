"""Analytical balance over MT-SICS (Mettler Toledo XS/XPR/XSR and compatibles)."""

from __future__ import annotations

from ophyd_async.core import (
    AsyncStatus,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from labctl.devices.base import Action, SerialInstrument
from labctl.devices.protocols import mtsics


class Balance(SerialInstrument):
    """A balance: ``trigger()`` takes a stable weight (MT-SICS ``S``), ``read()`` returns it.

    Readings: ``weight`` (g, net of tare) and ``stable``. Configuration:
    ``serial_number``, ``tare_weight``. Actions: ``zero``, ``tare``, ``clear_tare``.
    With ``immediate=True`` triggers use ``SI`` (no wait for stability).
    """

    def __init__(
        self,
        url: str,
        name: str = "",
        *,
        timeout: float = 2.0,
        stable_timeout: float = 30.0,
        immediate: bool = False,
    ) -> None:
        self.stable_timeout = stable_timeout
        self.immediate = immediate
        with self.add_children_as_readables():
            self.weight, self._set_weight = soft_signal_r_and_setter(float, units="g", precision=4)
            self.stable, self._set_stable = soft_signal_r_and_setter(bool)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.serial_number, self._set_serial = soft_signal_r_and_setter(str)
            self.tare_weight, self._set_tare = soft_signal_r_and_setter(float, units="g")
        self.zero = Action(self._zero)
        self.tare = Action(self._tare)
        self.clear_tare = Action(self._clear_tare)
        super().__init__(url, name, timeout=timeout)

    async def _command(self, command: str, *, timeout: float | None = None) -> bytes:
        raw = await self._query(
            mtsics.encode(command), mtsics.reply_complete_for(command), timeout=timeout
        )
        return mtsics.last_reply(raw)

    async def _identify(self) -> None:
        raw = await self._command("I4")
        self._set_serial(self._decode(lambda: mtsics.decode_serial_number(raw)))
        raw = await self._command("TA")
        self._set_tare(self._decode(lambda: mtsics.decode_weight("TA", raw)).grams)

    async def measure(self, immediate: bool | None = None) -> mtsics.WeightReply:
        """One weighing: ``S`` (wait for stability) or ``SI`` (immediate)."""
        cmd = "SI" if (self.immediate if immediate is None else immediate) else "S"
        timeout = None if cmd == "SI" else self.stable_timeout
        raw = await self._command(cmd, timeout=timeout)
        return self._decode(lambda: mtsics.decode_weight(cmd, raw))

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        if self.is_mock:
            return
        reply = await self.measure()
        self._set_weight(reply.grams)
        self._set_stable(reply.stable)

    async def _zero(self) -> None:
        raw = await self._command("Z", timeout=self.stable_timeout)
        self._decode(lambda: mtsics.decode_ack("Z", raw))
        self._set_tare(0.0)

    async def _tare(self) -> None:
        raw = await self._command("T", timeout=self.stable_timeout)
        self._set_tare(self._decode(lambda: mtsics.decode_weight("T", raw)).grams)

    async def _clear_tare(self) -> None:
        raw = await self._command("TAC")
        self._decode(lambda: mtsics.decode_ack("TAC", raw))
        self._set_tare(0.0)
