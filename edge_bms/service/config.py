"""The service's configuration: one TOML file, validated by pydantic, errors at the line.

    instance = "gw-1"                # default: edge-bms-<hostname>
    prefix = "bms/v1"

    [broker]
    url = "mqtts://broker.local:8883"
    username = "bms"                 # EDGE_BMS_MQTT_USERNAME / _PASSWORD win over the file
    [broker.tls]
    ca_file = "ca.pem"               # relative paths are relative to the config file

    [[packs]]
    id = "rack1-p01"
    n_cells = 200
    cells_per_temp_sensor = 8        # temp_c carries ceil(200 / 8) = 25 values

    [checkpoint]
    path = "state.sqlite"

A bad file raises :class:`ConfigError` with one line per problem,
``file:line: field.path: reason (got VALUE)``; passwords are never echoed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_bms.errors import BmsError

ENV_USERNAME = "EDGE_BMS_MQTT_USERNAME"
ENV_PASSWORD = "EDGE_BMS_MQTT_PASSWORD"
TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Topic levels the service itself publishes under, so no pack may take them as its id.
RESERVED_IDS = ("status",)
_SECRET_FIELDS = ("password",)


class ConfigError(BmsError, ValueError):
    """A configuration that cannot run; ``problems`` holds one message per error."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class _LocatedError(ValueError):
    """A validator's error about a field below the one it validates (``loc`` is appended
    to pydantic's location, so the message points at the right TOML line)."""

    def __init__(self, message: str, loc: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.loc = loc


class _Model(BaseModel):
    # unknown keys are typos more often than not: an error names them (with a suggestion)
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _topic_level(value: str, what: str) -> str:
    if not TOPIC_SAFE.match(value):
        raise ValueError(f"{what} must be letters, digits, '_', '.' or '-' (a topic level)")
    return value


class TlsConfig(_Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip the broker certificate check (tests only)

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        for name in ("ca_file", "cert_file", "key_file"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                raise _LocatedError(f"no such file: {p}", (name,))
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise _LocatedError("cert_file and key_file go together", (missing,))
        return self


class BrokerConfig(_Model):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: TlsConfig | None = None
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=1, le=65535)
    qos: int = Field(default=1, ge=0, le=1)
    shared_group: str | None = None
    reconnect_min_s: float = Field(default=0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = _split_url(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("the scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("no host in the URL")
        try:
            parts.port  # noqa: B018 (raises for a bad port)
        except ValueError:
            raise ValueError("the port must be a number in 0..65535") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("the URL takes no path, query or fragment")
        return v

    @field_validator("shared_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return None if v is None else _topic_level(v, "shared_group")

    @model_validator(mode="after")
    def _backoff(self) -> BrokerConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise _LocatedError(
                f"must be >= reconnect_min_s ({self.reconnect_min_s})", ("reconnect_max_s",)
            )
        return self

    # -- what the MQTT client needs, resolved ----------------------------------------
    @property
    def host(self) -> str:
        return _split_url(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = _split_url(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return _split_url(self.url).scheme == "mqtts" or self.tls is not None

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): the fields (or the environment, see load_config) win
        over a ``user:password@`` in the URL."""
        parts = _split_url(self.url)
        user = self.username if self.username is not None else _unquote(parts.username)
        password = self.password if self.password is not None else _unquote(parts.password)
        return user, password


def _split_url(url: str) -> SplitResult:
    return urlsplit(url)


def _unquote(s: str | None) -> str | None:
    return None if s is None else unquote(s)


class PackConfig(_Model):
    id: str = Field(max_length=64)
    n_cells: int = Field(ge=1, le=4096)
    # temp_c carries ceil(n_cells / cells_per_temp_sensor) values, sensor j covering cells
    # j*k .. j*k+k-1 (the pack simulator's layout); 1: one sensor per cell
    cells_per_temp_sensor: int = Field(default=1, ge=1)
    cell: str | None = None  # name or file/dir for edge_bms.cell.load_cell; None: default
    capacity_ah: float | None = Field(default=None, gt=0, le=10000, allow_inf_nan=False)
    initial_soc: float | None = Field(default=None, ge=0, le=1)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        _topic_level(v, "id")
        if v in RESERVED_IDS:
            raise ValueError(f"{v!r} is reserved (the service publishes under it)")
        return v

    @property
    def n_temp(self) -> int:
        return -(-self.n_cells // self.cells_per_temp_sensor)


class EstimatorConfig(_Model):
    method: Literal["ekf", "ukf"] = "ekf"
    # "default": the shipped network; "none": the plain filter; else a path (.onnx)
    correction: str = "default"
    soh: bool = False  # online capacity and R0 (edge_bms.soh)
    safety: bool = True  # latching limit alarms (edge_bms.safety) from the cell's limits
    # SOP costs ~20 ms for a 200-cell pack (a bisection over a 10 s horizon): computed
    # once per sop_interval_s slot of a pack's telemetry time (slots shifted by a phase
    # of the pack id, so packs sampled on one tick spread their SOPs), the last one
    # repeated in between; 0 computes it every message
    sop_interval_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    sop_horizon_s: float = Field(default=10.0, gt=0, le=600)


class CheckpointConfig(_Model):
    path: Path | None = None  # None: no persistence
    interval_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)


class BufferConfig(_Model):
    max_messages: int = Field(default=10000, ge=1)


# Plausibility limits of the estimator itself: the codec's must lie within them, so
# whatever the codec accepts the estimator takes.
_ESTIMATOR_V = (0.0, 10.0)
_ESTIMATOR_T = (-60.0, 150.0)
_ESTIMATOR_I = 1e4


class LimitsConfig(_Model):
    max_payload_bytes: int = Field(default=65536, ge=64, le=16 * 1024 * 1024)
    voltage_v: tuple[float, float] = (0.0, 6.0)  # exclusive: 0 V is a dead channel
    temperature_c: tuple[float, float] = (-60.0, 150.0)  # inclusive
    current_a_abs: float = Field(default=2000.0, gt=0, le=_ESTIMATOR_I)
    # ts further ahead of the service clock is refused: one far-future ts would otherwise
    # block the pack (ts must increase). None: no check (time-accelerated simulations).
    max_future_s: float | None = Field(default=300.0, gt=0)
    max_unknown_packs: int = Field(default=256, ge=0)  # with accept_unknown_packs
    max_cells: int = Field(default=4096, ge=1)  # of a pack created from its first message

    @field_validator("voltage_v", "temperature_c")
    @classmethod
    def _range(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        lo, hi = v
        outer = _ESTIMATOR_V if info.field_name == "voltage_v" else _ESTIMATOR_T
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError("must be [low, high] with low < high")
        if lo < outer[0] or hi > outer[1]:
            raise ValueError(f"must lie within the estimator's {list(outer)}")
        return v


def _default_instance() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    return f"edge-bms-{host}"


class ServiceConfig(_Model):
    instance: str = Field(default_factory=_default_instance, max_length=128)
    prefix: str = "bms/v1"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    packs: list[PackConfig] = Field(default_factory=list)
    accept_unknown_packs: bool = False
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str) -> str:
        return _topic_level(v, "instance")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        levels = v.split("/")
        if v.startswith("$") or any(not TOPIC_SAFE.match(level) for level in levels):
            raise ValueError(
                "must be topic levels of letters, digits, '_', '.', '-' joined by '/' "
                "(no wildcards, no empty level, no leading '$')"
            )
        return v

    @field_validator("packs")
    @classmethod
    def _unique(cls, v: list[PackConfig]) -> list[PackConfig]:
        seen: dict[str, int] = {}
        for j, p in enumerate(v):
            if p.id in seen:
                raise _LocatedError(f"id {p.id!r} repeats packs[{seen[p.id]}].id", (j, "id"))
            seen[p.id] = j
        return v

    @model_validator(mode="after")
    def _some_packs(self) -> ServiceConfig:
        if not self.packs and not self.accept_unknown_packs:
            raise ValueError("no [[packs]] and accept_unknown_packs is false: nothing to serve")
        return self


# -- loading -------------------------------------------------------------------------------
def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """The service configuration of a TOML file.

    ``overrides`` (e.g. from the command line) are merged over the file: nested mappings
    merge, a dotted key (``"broker.url"``) reaches into tables. Then the environment's
    ``EDGE_BMS_MQTT_USERNAME`` / ``EDGE_BMS_MQTT_PASSWORD`` win. Relative paths (TLS
    files, checkpoint, a correction network, a cell file) are taken relative to the
    file's directory. Raises :class:`ConfigError` naming the file, line and field.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)"
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{p}:{m.group(1)}" if m else str(p)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(f"{where}: TOML syntax: {reason}") from exc
    from_overrides: set[tuple[str, ...]] = set()
    if overrides:
        for key, value in overrides.items():
            keys = tuple(key.split("."))
            _merge(data, keys, value)
            from_overrides.add(keys)
    broker = data.get("broker")
    if broker is None or isinstance(broker, dict):
        for env, field in ((ENV_USERNAME, "username"), (ENV_PASSWORD, "password")):
            if os.environ.get(env):
                broker = data.setdefault("broker", {})
                broker[field] = os.environ[env]
    _resolve_paths(data, p.parent)
    try:
        config = ServiceConfig.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = [_describe(p, err, lines, from_overrides) for err in exc.errors()]
        raise ConfigError("\n".join(problems), problems) from exc
    _check_cells(config, p, _key_lines(text))
    return config


def _merge(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    last = keys[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _merge(node[last], (str(k),), v)
    else:
        node[last] = value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def fix(table: Any, key: str, *, must_exist: bool = False) -> None:
        if isinstance(table, dict) and isinstance(table.get(key), str):
            q = Path(table[key]).expanduser()
            if not q.is_absolute() and (not must_exist or (base / q).exists()):
                table[key] = str(base / q)

    broker = data.get("broker")
    tls = broker.get("tls") if isinstance(broker, dict) else None
    for key in ("ca_file", "cert_file", "key_file"):
        fix(tls, key)
    fix(data.get("checkpoint"), "path")
    est = data.get("estimator")
    if isinstance(est, dict) and est.get("correction") not in (None, "default", "none"):
        fix(est, "correction", must_exist=True)
    packs = data.get("packs")
    if isinstance(packs, list):
        for pack in packs:  # a cell name ("lg-m50") stays a name unless such a file exists
            fix(pack, "cell", must_exist=True)


def _check_cells(
    config: ServiceConfig, path: Path, lines: dict[tuple[str | int, ...], int]
) -> None:
    """Every pack's cell model must load (a typo in a name fails here, at its line)."""
    from edge_bms.cell import load_cell

    tried: dict[str | None, str] = {}
    problems = []
    for j, pack in enumerate(config.packs):
        if pack.cell not in tried:
            try:
                load_cell(pack.cell)
                tried[pack.cell] = ""
            except (BmsError, OSError) as exc:
                tried[pack.cell] = str(exc)
        if tried[pack.cell]:
            loc: tuple[str | int, ...] = ("packs", j, "cell")
            problems.append(
                f"{_where(path, loc, lines)}: {_dotted(loc)}: {tried[pack.cell]} "
                f"(got {pack.cell!r})"
            )
    if problems:
        raise ConfigError("\n".join(problems), problems)


def _describe(
    path: Path,
    err: Any,
    lines: dict[tuple[str | int, ...], int],
    from_overrides: set[tuple[str, ...]],
) -> str:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    msg = str(err["msg"])
    if isinstance(cause, _LocatedError):
        loc = loc + cause.loc
        msg = str(cause)
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden" and loc:
        msg = f"unknown key {loc[-1]!r}" + _suggest(loc)
    str_loc = tuple(str(x) for x in loc)
    where = (
        f"{path} (overrides)"
        if any(str_loc[: len(k)] == k for k in from_overrides)
        else _where(path, loc, lines)
    )
    text = f"{where}: {_dotted(loc) or '(top level)'}: {msg}"
    if err["type"] not in ("missing", "extra_forbidden"):
        value = err.get("input")
        if isinstance(cause, _LocatedError) and isinstance(value, Mapping | BaseModel):
            value = _pick(value, cause.loc)
        if any(s in str(x) for x in loc for s in _SECRET_FIELDS):
            value = "***"
        text += f" (got {_short(value)})"
    return text


def _suggest(loc: tuple[str | int, ...]) -> str:
    """ ", did you mean 'n_cells'?" for a misspelt key, from the model at that place."""
    model: Any = ServiceConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)),
            ann,
        )
        if getattr(model, "__origin__", None) is list:
            model = model.__args__[0]
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f", did you mean {close[0]!r}?" if close else ""


def _pick(value: Any, loc: tuple[str | int, ...]) -> Any:
    for part in loc:
        if isinstance(value, BaseModel):
            value = getattr(value, str(part), None)
        elif isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _where(path: Path, loc: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> str:
    """``file:line`` of the deepest part of ``loc`` the file spells out (a missing key:
    its table's header), ``file`` when the file has none of it (a default)."""
    for k in range(len(loc), 0, -1):
        line = lines.get(loc[:k])
        if line is not None:
            return f"{path}:{line}"
    return str(path)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _key_parts(dotted: str) -> list[str]:
    return [
        p.strip().strip("\"'") for p in re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", dotted)
    ]


def _key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Where each table and key is in a TOML text: ("packs", 1, "n_cells") -> line.

    A line scanner, not a parser (tomllib has no positions): it follows ``[table]`` and
    ``[[array]]`` headers and ``key =`` lines, skipping multi-line strings. Keys inside
    inline tables or multi-line arrays map to the line of their outer key."""
    out: dict[tuple[str | int, ...], int] = {}
    arrays: dict[tuple[str | int, ...], int] = {}  # array-of-tables path -> last index
    table: tuple[str | int, ...] = ()
    in_string: str | None = None
    depth = 0  # open brackets of a multi-line value
    for lineno, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        if depth > 0:
            depth = max(0, depth + _brackets(line))
            continue
        header = _HEADER.match(line)
        if header:
            path: tuple[str | int, ...] = ()
            for part in _key_parts(header.group(2)):
                path = (*path, part)
                if path in arrays:
                    path = (*path, arrays[path])
            if header.group(1) == "[[":
                base = path[:-1] if path and isinstance(path[-1], int) else path
                arrays[base] = arrays.get(base, -1) + 1
                path = (*base, arrays[base])
                out.setdefault(base, lineno)
            table = path
            out.setdefault(table, lineno)
            continue
        key = _KEY.match(line)
        if key:
            full = table + tuple(_key_parts(key.group(1)))
            out.setdefault(full, lineno)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
            if in_string is None:
                depth = max(0, _brackets(rest))
    return out


def _brackets(text: str) -> int:
    """Net open brackets on a line, outside strings and comments."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', "", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")
