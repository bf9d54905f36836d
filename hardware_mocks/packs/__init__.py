"""Pack telemetry simulator: N packs of M series cells publishing contract-5 telemetry.

See :mod:`hardware_mocks.packs.sim` for the model, :func:`run_publisher` for MQTT and
``python -m hardware_mocks.packs --help`` for the command line.
"""

from hardware_mocks.packs.config import LOAD_KINDS, PackConfigError, PackSimConfig, load_pack_config
from hardware_mocks.packs.publisher import PublishStats, parse_broker_url, run_publisher
from hardware_mocks.packs.sim import (
    FOLLOW,
    RECHARGE,
    ActiveFault,
    Fault,
    PackSimulator,
    TelemetryMessage,
    pack_step,
)
from hardware_mocks.packs.truth import Truth, load_truth

__all__ = [
    "FOLLOW",
    "LOAD_KINDS",
    "RECHARGE",
    "ActiveFault",
    "Fault",
    "PackConfigError",
    "PackSimConfig",
    "PackSimulator",
    "PublishStats",
    "TelemetryMessage",
    "Truth",
    "load_pack_config",
    "load_truth",
    "pack_step",
    "parse_broker_url",
    "run_publisher",
]
