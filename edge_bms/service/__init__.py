"""edge_bms as a service: pack telemetry over MQTT in, estimates, alarms and errors out.

    from edge_bms.service import PackService, load_config
    service = PackService(load_config("pack.toml"))
    for out in service.handle("bms/v1/p1/telemetry", payload):
        publish(out.topic, out.payload, qos=out.qos, retain=out.retain)

:mod:`~edge_bms.service.core` is the whole logic without a network (config, codec,
estimators, commands, checkpoints); :mod:`~edge_bms.service.mqtt` moves its messages
through a broker. Topics and payloads: DESIGN.md contract 5.
"""

from edge_bms.service.checkpoint import CheckpointStore
from edge_bms.service.codec import Rejected, Telemetry, decode_telemetry
from edge_bms.service.config import (
    BrokerConfig,
    BufferConfig,
    CheckpointConfig,
    ConfigError,
    EstimatorConfig,
    LimitsConfig,
    PackConfig,
    ServiceConfig,
    TlsConfig,
    load_config,
)
from edge_bms.service.core import Outgoing, PackService

__all__ = [
    "BrokerConfig",
    "BufferConfig",
    "CheckpointConfig",
    "CheckpointStore",
    "ConfigError",
    "EstimatorConfig",
    "LimitsConfig",
    "Outgoing",
    "PackConfig",
    "PackService",
    "Rejected",
    "ServiceConfig",
    "Telemetry",
    "TlsConfig",
    "decode_telemetry",
    "load_config",
]
