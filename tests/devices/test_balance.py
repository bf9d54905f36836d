"""The Balance device against the MT-SICS simulator, through real ptys and TCP."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.core import init_devices, set_mock_value
from ophyd_async.testing import assert_reading

from hardware_mocks.lab import LabThread
from labctl.devices.balance import Balance
from labctl.devices.errors import (
    ConnectionLostError,
    DeviceTimeoutError,
    InstrumentBusyError,
    ProtocolError,
)
from tests.conftest import start_lab


@pytest.fixture
def lab(transport: str) -> Iterator[LabThread]:
    lab = start_lab("balance", transport=transport, speed=50.0)
    yield lab
    lab.stop()


@pytest.fixture
def balance(lab: LabThread, RE: RunEngine, opened: list[Any]) -> Balance:
    with init_devices():
        balance = Balance(lab.urls["balance"], timeout=1.0)
    opened.append(balance)
    return balance


def _vial_on_balance(lab: LabThread) -> None:
    lab.call(lambda: (lab.world.pick("rack/1"), lab.world.place("balance")))


def _events(RE: RunEngine, plan: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    RE(plan, lambda name, doc: docs.append(doc) if name == "event" else None)
    return [d["data"] for d in docs]


def test_count_weighs_the_vial_on_the_pan(lab: LabThread, balance: Balance, RE: RunEngine) -> None:
    _vial_on_balance(lab)
    data = _events(RE, bp.count([balance], num=2))
    assert len(data) == 2
    assert data[0]["balance-weight"] == pytest.approx(12.0, abs=5e-4)  # empty vial tare mass
    assert data[0]["balance-stable"] is True


def test_dispensed_liquid_lands_on_the_balance(
    lab: LabThread, balance: Balance, RE: RunEngine, call: Callable[..., Any]
) -> None:
    _vial_on_balance(lab)
    RE(bps.trigger(balance.tare, wait=True))
    grams = lab.call(lab.world.dispense, "DMC", 2.0)
    assert grams == pytest.approx(2.0 * 1.063)
    reply = call(balance.measure())
    assert reply.stable
    assert reply.grams == pytest.approx(grams, abs=1e-3)
    assert call(balance.tare_weight.get_value()) == pytest.approx(12.0, abs=5e-4)


def test_identify_reads_serial_number(balance: Balance, call: Callable[..., Any]) -> None:
    assert call(balance.serial_number.get_value()) == "B948372615"


def test_immediate_reading_is_dynamic_while_settling(
    lab: LabThread, balance: Balance, call: Callable[..., Any]
) -> None:
    _vial_on_balance(lab)
    lab.call(lab.world.dispense, "EC", 5.0)
    reply = call(balance.measure(immediate=True))
    assert not reply.stable  # settling takes ~1 s simulated; we asked at once
    assert reply.grams < 12.0 + 5.0 * 1.321


@pytest.mark.parametrize(
    ("fault", "exc"),
    [
        ("no_reply", DeviceTimeoutError),
        ("garbage", ProtocolError),
        ("busy", InstrumentBusyError),
        ("drop", ConnectionLostError),
    ],
)
def test_faults_raise_clear_errors_and_recover(
    lab: LabThread, balance: Balance, call: Callable[..., Any], fault: str, exc: type[Exception]
) -> None:
    _vial_on_balance(lab)
    lab.lab.simulators["balance"].faults.inject(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        call(balance.measure(immediate=True))
    assert time.monotonic() - t0 < 5.0  # bounded, never a hang
    assert "balance" in str(info.value)
    # The next command works again (reconnecting after a drop).
    assert call(balance.measure()).grams == pytest.approx(12.0, abs=5e-4)


def test_late_reply_is_not_taken_for_the_next_answer(
    lab: LabThread, balance: Balance, call: Callable[..., Any]
) -> None:
    _vial_on_balance(lab)
    lab.lab.simulators["balance"].faults.inject("late_reply", delay_s=1.5)
    with pytest.raises(DeviceTimeoutError):
        call(balance.measure(immediate=True))
    # The late "S S ..." arrives during the next exchange's drain, not as its reply.
    lab.call(lab.world.dispense, "DMC", 1.0)

    async def zero() -> None:
        await balance.zero.trigger()

    call(zero())
    assert call(balance.measure()).grams == pytest.approx(0.0, abs=5e-4)


def test_failed_trigger_fails_the_run(lab: LabThread, balance: Balance, RE: RunEngine) -> None:
    lab.lab.simulators["balance"].faults.inject("garbage")
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([balance], num=1))
    assert isinstance(info.value.__cause__, ProtocolError)
    assert info.value.__cause__.raw  # the garbled bytes travel with the error
    assert RE.state == "idle"


async def test_mock_mode_needs_no_hardware() -> None:
    async with init_devices(mock=True):
        bal = Balance("/dev/does-not-exist")
    set_mock_value(bal.weight, 3.25)
    set_mock_value(bal.stable, True)
    await bal.trigger()
    await assert_reading(
        bal, {"bal-weight": {"value": 3.25}, "bal-stable": {"value": True}}, full_match=False
    )
    await bal.zero.trigger()
    assert bal.zero.mock_calls == 1
