"""An independent MT-SICS client (mettler-toledo-device) against the balance simulator.

It proves the simulator speaks the protocol as real client code expects it, not just
as our own codec does.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Iterator

import pytest

from hardware_mocks.lab import LabThread
from tests.conftest import start_lab


@pytest.fixture
def lab() -> Iterator[LabThread]:
    lab = start_lab("balance", transport="pty", speed=50.0)
    yield lab
    lab.stop()


def _shim_pkg_resources() -> None:
    """serial_interface (its transport) reads its own version through pkg_resources,
    which modern setuptools no longer ships; its except clause then names an
    undefined symbol. Give it the two names it looks up, nothing more."""
    if "pkg_resources" in sys.modules:
        return
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):  # noqa: N818 - the name it imports
            pass

        def get_distribution(name: str) -> None:
            raise DistributionNotFound(name)

        shim.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
        shim.get_distribution = get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


def test_mettler_toledo_device_client(lab: LabThread) -> None:
    _shim_pkg_resources()
    with warnings.catch_warnings():
        # The library (2018) is old: its import pulls deprecated pkg_resources-era APIs.
        warnings.simplefilter("ignore", DeprecationWarning)
        from mettler_toledo_device import MettlerToledoDevice

        dev = MettlerToledoDevice(port=lab.urls["balance"])
    try:
        assert dev.get_serial_number() == "B948372615"
        assert dev.get_balance_data() == ["XS205DU", "220.0000", "g"]
        assert dev.get_mtsics_level()[0] == "01"
        lab.call(lambda: (lab.world.pick("rack/1"), lab.world.place("balance")))
        grams, unit = dev.get_weight_stable()
        assert unit == "g"
        assert grams == pytest.approx(12.0, abs=5e-4)
        lab.call(lab.world.dispense, "DEC", 1.0)
        assert dev.zero_stable() is True  # waits for stability, then zeroes
        grams, unit, status = dev.get_weight()
        assert status in ("S", "D")
        assert abs(grams) < 0.002
    finally:
        dev.close()
