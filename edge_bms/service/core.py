"""The service without the network: MQTT messages in, messages to publish out.

:class:`PackService` owns one :class:`~edge_bms.estimator.PackEstimator` per pack (with
its safety, SOH and correction hooks) and turns each received ``(topic, payload)`` into a
list of :class:`Outgoing` messages; the MQTT layer (:mod:`edge_bms.service.mqtt`) only
moves bytes. Nothing here blocks or talks to a broker, so every rule is testable alone.

Topics (prefix ``bms/v1``, DESIGN.md contract 5):

* in  ``<prefix>/<pack>/telemetry`` -> ``<prefix>/<pack>/state`` (and ``.../alarms``,
  retained, when an alarm trips or clears);
* in  ``<prefix>/<pack>/cmd/<name>`` (``reset_soc``, ``set_capacity``, ``clear_alarm``)
  -> ``<prefix>/<pack>/cmd_ack``;
* every rejected input -> one ``<prefix>/<pack>/errors`` message ``{"ts","pack","topic",
  "code","detail"[,"seq"]}`` (a topic without a valid pack id:
  ``<prefix>/status/<instance>/errors``), counted in ``counters["rejected.<code>"]``.

A rejection never reaches the estimator: the codec checks types, finiteness, ranges and
lengths, this module the order (below); a pack's state is the same before and after.

Order: ``seq`` must increase and ``ts`` must increase. ``seq == last`` is a
``duplicate``; a lower ``seq`` or a ``ts`` not after the last accepted one is
``out_of_order``. A restarted publisher counts from 0 again: ``seq == 0`` with a ``ts``
after the last accepted one is taken as a new publisher session (counted as
``seq_reset``), since a replayed old message always carries an old ``ts``. A publisher
that restarts at another seq, or with a clock behind the last accepted ``ts``, is
refused until its seq (and ts) pass the last accepted ones.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_bms.cell import CellModel, load_cell
from edge_bms.correction import VoltageCorrectionNet, try_load_correction
from edge_bms.errors import BmsError, CheckpointError, InputError
from edge_bms.estimator import PackEstimate, PackEstimator
from edge_bms.safety import KINDS, Alarm, SafetyConfig, SafetyMonitor
from edge_bms.service.checkpoint import CheckpointStore
from edge_bms.service.codec import (
    Rejected,
    Telemetry,
    encode_ack,
    encode_alarms,
    encode_error,
    encode_state,
    loads,
    rounded,
    telemetry_from_obj,
)
from edge_bms.service.config import RESERVED_IDS, TOPIC_SAFE, PackConfig, ServiceConfig
from edge_bms.soh import SohEstimator
from edge_bms.sop import pack_power_limits

log = logging.getLogger("edge_bms.service")
FloatArray = npt.NDArray[np.float64]

COMMANDS = ("reset_soc", "set_capacity", "clear_alarm")
RESET_SIGMA = 0.02  # SOC sigma after reset_soc when the command gives none
PACK_FORMAT = "edge_bms.service.pack/1"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish; ``ts`` is the service clock when it was made."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    ts: float = 0.0


class _Pack:
    """One pack's estimator, hooks, order state and topics."""

    def __init__(self, service: PackService, cfg: PackConfig, *, dynamic: bool) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.dynamic = dynamic
        self.n = cfg.n_cells
        self.cells_per_temp = cfg.cells_per_temp_sensor
        self.n_temp = cfg.n_temp
        self.model = service._model(cfg)
        est_cfg = service.config.estimator
        self.method = est_cfg.method
        self.net: VoltageCorrectionNet | None = None
        if service._net is not None:
            # one onnxruntime session for all packs; each copy keeps its own history
            self.net = copy.copy(service._net)
        self.net_reason = service._net_reason
        self.safety = (
            SafetyMonitor(SafetyConfig.from_limits(self.model.limits), self.n)
            if est_cfg.safety
            else None
        )
        self.soh = (
            SohEstimator(self.n, self.model.capacity_ah, cell=self.model) if est_cfg.soh else None
        )
        self.est = self._estimator(initial_soc=cfg.initial_soc)
        self.last_seq: int | None = None
        self.last_ts: float | None = None
        self.sop: dict[str, Any] | None = None
        self.sop_ts: float | None = None
        # SOP is due once per interval slot; packs publishing on the same tick get slots
        # shifted by a phase of their id, so their ~20 ms SOPs do not all land together
        self.sop_phase = (zlib.crc32(self.id.encode()) % 1000) / 1000 * est_cfg.sop_interval_s
        self.dirty = False
        base = f"{service.config.prefix}/{self.id}"
        self.state_topic = f"{base}/state"
        self.alarms_topic = f"{base}/alarms"
        self.ack_topic = f"{base}/cmd_ack"

    def _estimator(self, initial_soc: float | None) -> PackEstimator:
        return PackEstimator(
            self.model,
            self.n,
            method=self.method,
            initial_soc=initial_soc,
            correction=self.net,
            correction_fallback=self.net_reason,
            health=self.soh,
            safety=self.safety,
        )

    def rebuild(self, state: Mapping[str, Any]) -> None:
        """The estimator from a state_dict, with this pack's hooks."""
        self.est = PackEstimator.from_state_dict(
            self.model,
            state,
            correction=self.net,
            correction_fallback=self.net_reason,
            health=self.soh,
            safety=self.safety,
        )

    def temperatures(self, temp_c: FloatArray) -> FloatArray:
        """Sensor temperatures [k] as [n]: sensor j covers cells j*k .. j*k+k-1."""
        if self.cells_per_temp == 1:
            return temp_c
        return np.repeat(temp_c, self.cells_per_temp)[: self.n]

    def snapshot(self) -> dict[str, Any]:
        return {
            "format": PACK_FORMAT,
            "seq": self.last_seq,
            "ts": self.last_ts,
            "n_cells": self.n,
            "cells_per_temp_sensor": self.cells_per_temp,
            "cell": self.model.name,
            "dynamic": self.dynamic,
            "estimator": self.est.state_dict(),
            "safety": None if self.safety is None else self.safety.state_dict(),
            "soh": None if self.soh is None else self.soh.state_dict(),
            "correction": None if self.net is None else self.net.state_dict(),
            "sop": self.sop,
            "sop_ts": self.sop_ts,
        }

    def restore(self, st: Mapping[str, Any]) -> None:
        """Resume from :meth:`snapshot` (raises CheckpointError; the pack is then as new)."""
        if st.get("format") != PACK_FORMAT:
            raise CheckpointError(f"format {st.get('format')!r}, expected {PACK_FORMAT!r}")
        for key, mine in (
            ("n_cells", self.n),
            ("cells_per_temp_sensor", self.cells_per_temp),
            ("cell", self.model.name),
        ):
            if st.get(key) != mine:
                raise CheckpointError(f"{key} is {st.get(key)!r}, the config says {mine!r}")
        if st["estimator"].get("method") != self.method:
            raise CheckpointError(
                f"method is {st['estimator'].get('method')!r}, the config says {self.method!r}"
            )
        try:
            if self.safety is not None and st.get("safety") is not None:
                self.safety = SafetyMonitor.from_state_dict(st["safety"])
            if self.soh is not None and st.get("soh") is not None:
                self.soh = SohEstimator.from_state_dict(st["soh"], cell=self.model)
            if self.net is not None and st.get("correction") is not None:
                self.net.load_state_dict(st["correction"])
            self.rebuild(st["estimator"])
            seq, ts = st.get("seq"), st.get("ts")
            self.last_seq = None if seq is None else int(seq)
            self.last_ts = None if ts is None else float(ts)
            self.sop = st.get("sop")
            self.sop_ts = st.get("sop_ts")
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(str(exc)) from exc


class PackService:
    """Every pack of ``config``: estimates, alarms, commands and checkpoints.

    ``now`` is the service clock (errors' ``ts``, the future-``ts`` check, the
    checkpoint interval); tests pass a fake one. ``counters`` counts ``accepted``,
    ``rejected`` and ``rejected.<code>``, ``outgoing`` (messages made; the MQTT layer
    counts ``published``), ``commands``, ``seq_reset``, ``checkpoints``, ...
    """

    def __init__(self, config: ServiceConfig, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = now
        self.counters: dict[str, int] = {}
        self._qos = config.broker.qos
        self._prefix = config.prefix
        self._models: dict[tuple[str | None, float | None], CellModel] = {}
        self._net: VoltageCorrectionNet | None = None
        self._net_reason = "none"
        corr = config.estimator.correction
        if corr != "none":
            net, reason, message = try_load_correction(None if corr == "default" else corr)
            self._net, self._net_reason = net, reason
            if net is None:
                log.warning("correction network not used (%s): %s", reason, message)
        self._packs: dict[str, _Pack] = {p.id: _Pack(self, p, dynamic=False) for p in config.packs}
        self._dynamic = 0
        self._store: CheckpointStore | None = None
        self._last_checkpoint = now()
        if config.checkpoint.path is not None:
            self._store = CheckpointStore(config.checkpoint.path)
            self._restore()

    # -- topics ----------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        """Topic filters: telemetry and commands of every pack (unknown ids are refused
        and reported, which needs the wildcard)."""
        return [f"{self._prefix}/+/telemetry", f"{self._prefix}/+/cmd/#"]

    def status_topic(self) -> str:
        return f"{self._prefix}/status/{self.config.instance}"

    def service_errors_topic(self) -> str:
        """Where rejections go that name no valid pack."""
        return f"{self.status_topic()}/errors"

    def status_payload(self, online: bool) -> bytes:
        from edge_bms.service.codec import dumps

        return dumps(
            {
                "instance": self.config.instance,
                "state": "online" if online else "offline",
                "ts": self._now(),
                "packs": sorted(self._packs),
            }
        )

    @property
    def pack_ids(self) -> list[str]:
        return list(self._packs)

    def estimator(self, pack_id: str) -> PackEstimator:
        """The pack's estimator (read it; feeding it directly bypasses the checks)."""
        return self._packs[pack_id].est

    def pack_state(self, pack_id: str) -> dict[str, Any]:
        """Everything of a pack that a checkpoint saves (JSON-able)."""
        return self._packs[pack_id].snapshot()

    # -- the message handler -------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Outgoing messages for one received message; never raises."""
        now = self._now()
        pack_id: str | None = None
        try:
            pack_id, kind, command = self._route(topic)
            if kind == "telemetry":
                out = self._telemetry(pack_id, payload, now)
            else:
                out = self._command(pack_id, command, payload, now)
        except Rejected as rej:
            out = [self._rejection(pack_id, topic, rej, now)]
        # The last line of defence of "bad input never crashes the service": a bug in a
        # hook must cost one message, not the gateway (state is only committed at the end
        # of a step, so the pack stays as it was).
        except Exception as exc:
            log.exception("internal error on %s", topic)
            internal = Rejected("internal", f"{type(exc).__name__}: {exc}")
            out = [self._rejection(pack_id, topic, internal, now)]
        self._count("outgoing", len(out))
        return out

    def _route(self, topic: str) -> tuple[str, str, str]:
        """(pack, "telemetry" | "cmd", command name) of a topic (raises Rejected)."""
        head = self._prefix + "/"
        if not topic.startswith(head):
            raise Rejected("topic", f"not under {self._prefix}/")
        levels = topic[len(head) :].split("/")
        if len(levels) >= 2 and TOPIC_SAFE.match(levels[0]) and levels[0] not in RESERVED_IDS:
            if len(levels) == 2 and levels[1] == "telemetry":
                return levels[0], "telemetry", ""
            if levels[1] == "cmd":
                return levels[0], "cmd", "/".join(levels[2:])
        raise Rejected("topic", f"expected {head}<pack>/telemetry or {head}<pack>/cmd/<name>")

    def _rejection(self, pack_id: str | None, topic: str, rej: Rejected, now: float) -> Outgoing:
        self._count("rejected")
        self._count(f"rejected.{rej.code}")
        log.debug("rejected %s: %s: %s", topic, rej.code, rej.detail)
        where = (
            self.service_errors_topic() if pack_id is None else f"{self._prefix}/{pack_id}/errors"
        )
        payload = encode_error(
            ts=now, pack=pack_id, topic=topic, code=rej.code, detail=rej.detail, seq=rej.seq
        )
        return Outgoing(where, payload, self._qos, False, now)

    # -- telemetry ------------------------------------------------------------------------
    def _telemetry(self, pack_id: str, payload: bytes, now: float) -> list[Outgoing]:
        limits = self.config.limits
        pack = self._packs.get(pack_id)
        if pack is None and not self.config.accept_unknown_packs:
            raise Rejected(
                "unknown_pack", f"pack {pack_id!r} is not served by {self.config.instance}"
            )
        data = loads(payload, max_bytes=limits.max_payload_bytes)
        if pack is None:
            tel = telemetry_from_obj(data, n_cells=None, n_temp=None, limits=limits)
        else:
            tel = telemetry_from_obj(data, n_cells=pack.n, n_temp=pack.n_temp, limits=limits)
            self._check_order(pack, tel)
        if limits.max_future_s is not None and tel.ts > now + limits.max_future_s:
            raise Rejected(
                "future",
                f"ts {tel.ts!r} is {tel.ts - now:.0f} s ahead of the service clock "
                f"(limit {limits.max_future_s:g} s)",
                seq=tel.seq,
            )
        if pack is None:
            pack = self._new_pack(pack_id, tel)
        try:
            e = pack.est.step(tel.ts, tel.current_a, tel.cell_v, pack.temperatures(tel.temp_c))
        except InputError as exc:  # the codec should have caught it; state is unchanged
            raise Rejected("range", str(exc), seq=tel.seq) from None
        pack.last_seq, pack.last_ts = tel.seq, tel.ts
        pack.dirty = True
        self._count("accepted")
        out = [self._state_message(pack, e, tel, now)]
        if e.alarms:
            out.append(self._alarms_message(pack, e.alarms, e.ts, now))
        return out

    def _check_order(self, pack: _Pack, tel: Telemetry) -> None:
        if pack.last_seq is None or pack.last_ts is None:
            return
        if tel.seq == pack.last_seq:
            raise Rejected("duplicate", f"seq {tel.seq} was accepted already", seq=tel.seq)
        if tel.ts <= pack.last_ts:
            raise Rejected(
                "out_of_order",
                f"ts {tel.ts!r} is not after the last accepted ts {pack.last_ts!r}",
                seq=tel.seq,
            )
        if tel.seq < pack.last_seq:
            if tel.seq != 0:
                raise Rejected(
                    "out_of_order",
                    f"seq {tel.seq} is below the last accepted seq {pack.last_seq}",
                    seq=tel.seq,
                )
            self._count("seq_reset")  # a restarted publisher (see the module docstring)
            log.info("pack %s: seq reset to 0 (publisher restarted)", pack.id)

    def _new_pack(self, pack_id: str, tel: Telemetry) -> _Pack:
        limits = self.config.limits
        n, k = tel.cell_v.size, tel.temp_c.size
        if n > limits.max_cells:
            raise Rejected(
                "cell_count", f"{n} cells, more than max_cells {limits.max_cells}", seq=tel.seq
            )
        per = -(-n // k)
        if k > n or -(-n // per) != k:
            raise Rejected(
                "cell_count",
                f"{k} temperatures do not cover {n} cells in equal groups",
                seq=tel.seq,
            )
        if self._dynamic >= limits.max_unknown_packs:
            raise Rejected(
                "too_many_packs",
                f"already {self._dynamic} packs taken from telemetry (max_unknown_packs)",
                seq=tel.seq,
            )
        pack = _Pack(
            self, PackConfig(id=pack_id, n_cells=n, cells_per_temp_sensor=per), dynamic=True
        )
        self._packs[pack_id] = pack
        self._dynamic += 1
        self._count("packs_created")
        log.info("pack %s: %d cells, taken from its first telemetry", pack_id, n)
        return pack

    def _state_message(self, pack: _Pack, e: PackEstimate, tel: Telemetry, now: float) -> Outgoing:
        interval = self.config.estimator.sop_interval_s
        if interval == 0:
            pack.sop, pack.sop_ts = self._sop(pack, e), e.ts
        elif pack.sop_ts is None:
            # the first SOP waits for the pack's own slot (sop null until then): on a cold
            # start every pack's first message arrives on one tick, and SOPs for all of
            # them back to back (~20 ms each) would stall the loop for seconds
            pack.sop_ts = e.ts
        elif (e.ts + pack.sop_phase) // interval != (pack.sop_ts + pack.sop_phase) // interval:
            pack.sop, pack.sop_ts = self._sop(pack, e), e.ts
        payload = encode_state(
            pack=pack.id,
            ts=e.ts,
            seq=tel.seq,
            soc=e.soc,
            soc_sigma=e.soc_sigma,
            pack_soc=e.pack_soc,
            capacity_ah=e.capacity_ah,
            sop=pack.sop,
            model={
                "cell": pack.model.name,
                "correction": None if pack.net is None else pack.net.version,
                "correction_used": e.flags.correction_used,
                "method": pack.method,
            },
            instance=self.config.instance,
            alarms_active=0 if pack.safety is None else len(pack.safety.active()),
            dropout=e.flags.dropout,
        )
        return Outgoing(pack.state_topic, payload, self._qos, False, now)

    def _sop(self, pack: _Pack, e: PackEstimate) -> dict[str, Any] | None:
        try:
            lim = pack_power_limits(
                pack.model,
                e.soc,
                e.temp_c,
                self.config.estimator.sop_horizon_s,
                v1=e.v_rc[0],
                v2=e.v_rc[1],
                r0_scale=e.r0_scale,
                capacity_ah=e.capacity_ah,
            )
        except (BmsError, ValueError, ArithmeticError) as exc:  # SOP is advice, SOC goes on
            log.warning("pack %s: SOP failed: %s", pack.id, exc)
            return None
        self._count("sop")
        values = (lim.i_discharge_a, lim.i_charge_a, lim.p_discharge_w, lim.p_charge_w)
        i_d, i_c, p_d, p_c = rounded(values, 3)
        return {
            "ts": e.ts,
            "horizon_s": lim.horizon_s,
            "i_discharge_a": i_d,
            "i_charge_a": i_c,
            "p_discharge_w": p_d,
            "p_charge_w": p_c,
            "weakest_discharge": lim.weakest_discharge,
            "weakest_charge": lim.weakest_charge,
        }

    def _alarms_message(self, pack: _Pack, events: Any, ts: float, now: float) -> Outgoing:
        active = [] if pack.safety is None else pack.safety.active()
        payload = encode_alarms(
            pack=pack.id,
            ts=ts,
            events=[_alarm(a) for a in events],
            active=[_alarm(a) for a in active],
        )
        # retained: a late subscriber (an HMI) sees what is active now
        return Outgoing(pack.alarms_topic, payload, self._qos, True, now)

    # -- commands ---------------------------------------------------------------------------
    def _command(self, pack_id: str, name: str, payload: bytes, now: float) -> list[Outgoing]:
        pack = self._packs.get(pack_id)
        if pack is None:
            raise Rejected(
                "unknown_pack", f"pack {pack_id!r} is not served by {self.config.instance}"
            )
        if name not in COMMANDS:
            raise Rejected("unknown_command", f"{name!r} is not one of {list(COMMANDS)}")
        data = loads(payload, max_bytes=self.config.limits.max_payload_bytes)
        if type(data) is not dict:
            raise Rejected("bad_command", f"{name} takes a JSON object, got {type(data).__name__}")
        request_id = data.get("id")
        if request_id is not None and type(request_id) not in (str, int):
            raise Rejected("bad_command", "id must be a string or an integer")
        out: list[Outgoing] = []
        if name == "reset_soc":
            ok, result = self._reset_soc(pack, data)
        elif name == "set_capacity":
            ok, result = self._set_capacity(pack, data)
        else:
            ok, result, cleared = self._clear_alarm(pack, data)
            if cleared:
                out.append(self._alarms_message(pack, cleared, now, now))
        pack.dirty = True
        self._count("commands")
        self._count(f"commands.{name}")
        ack = encode_ack(
            ts=now, pack=pack.id, command=name, ok=ok, result=result, request_id=request_id
        )
        return [Outgoing(pack.ack_topic, ack, self._qos, False, now), *out]

    def _reset_soc(self, pack: _Pack, data: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        _keys("reset_soc", data, required=("soc",), optional=("sigma", "id"))
        soc = _per_cell("soc", data["soc"], pack.n, 0.0, 1.0)
        sigma = RESET_SIGMA
        if "sigma" in data:
            sigma = _scalar("sigma", data["sigma"], 1e-6, 0.5)
        pack.est.reset_soc(soc, sigma)
        return True, {"soc": rounded(soc, 6), "sigma": sigma}

    def _set_capacity(self, pack: _Pack, data: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        _keys("set_capacity", data, required=("capacity_ah",), optional=("id",))
        cap = _per_cell("capacity_ah", data["capacity_ah"], pack.n, 1e-3, 1e4)
        pack.est.set_scales(capacity_ah=cap)
        if pack.soh is not None:
            # the operator's capacity is the new prior; the SOH history was about the old
            pack.soh = SohEstimator(pack.n, cap, cell=pack.model)
            pack.est.health = pack.soh
        return True, {"capacity_ah": rounded(cap, 4)}

    def _clear_alarm(
        self, pack: _Pack, data: dict[str, Any]
    ) -> tuple[bool, dict[str, Any], list[Alarm]]:
        _keys("clear_alarm", data, required=("alarm",), optional=("cell", "id"))
        if pack.safety is None:
            raise Rejected("bad_command", "the safety checks are off (estimator.safety = false)")
        kind = data["alarm"]
        if kind != "all" and kind not in KINDS:
            raise Rejected("bad_command", f"alarm must be 'all' or one of {list(KINDS)}")
        cell = data.get("cell")
        if cell is not None and (type(cell) is not int or not 0 <= cell < pack.n):
            raise Rejected("bad_command", f"cell must be an integer in 0..{pack.n - 1}")
        try:
            res = pack.safety.clear(None if kind == "all" else kind, cell)
        except InputError as exc:
            raise Rejected("bad_command", str(exc)) from None
        result = {
            "cleared": [_alarm(a) for a in res.cleared],
            "refused": [{**_alarm(a), "reason": why} for a, why in res.refused],
        }
        return not res.refused, result, res.cleared

    # -- checkpoints --------------------------------------------------------------------------
    def snapshot(self, *, only_dirty: bool = False) -> dict[str, dict[str, Any]]:
        """Pack states for :meth:`CheckpointStore.save` (take it on the handling thread;
        the save may run elsewhere)."""
        return {pid: p.snapshot() for pid, p in self._packs.items() if p.dirty or not only_dirty}

    def maybe_checkpoint(self) -> bool:
        """Save the packs changed since the last save if ``checkpoint.interval_s`` has
        passed; True when something was written. Never raises (a failed save is logged
        and counted, and retried at the next interval)."""
        if (
            self._store is None
            or self._now() - self._last_checkpoint < self.config.checkpoint.interval_s
        ):
            return False
        return self.checkpoint_now()

    def checkpoint_now(self) -> bool:
        """Save the changed packs now (on shutdown); True when something was written."""
        self._last_checkpoint = self._now()
        if self._store is None:
            return False
        snap = self.snapshot(only_dirty=True)
        if not snap:
            return False
        try:
            self._store.save(snap)
        except CheckpointError as exc:
            log.error("checkpoint failed: %s", exc)
            self._count("checkpoint_failed")
            return False
        for pid in snap:
            self._packs[pid].dirty = False
        self._count("checkpoints")
        return True

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _restore(self) -> None:
        assert self._store is not None
        for pid, st in self._store.load().items():
            pack = self._packs.get(pid)
            if pack is None:
                if not (st.get("dynamic") and self.config.accept_unknown_packs):
                    log.warning("checkpoint of pack %s ignored: not in the config", pid)
                    continue
                try:
                    cfg = PackConfig(
                        id=pid,
                        n_cells=st["n_cells"],
                        cells_per_temp_sensor=st["cells_per_temp_sensor"],
                    )
                except (KeyError, ValueError) as exc:
                    log.warning("checkpoint of pack %s ignored: %s", pid, exc)
                    continue
                pack = _Pack(self, cfg, dynamic=True)
                self._packs[pid] = pack
                self._dynamic += 1
            try:
                pack.restore(st)
            except CheckpointError as exc:
                log.warning("checkpoint of pack %s ignored, starting fresh: %s", pid, exc)
                self._packs[pid] = _Pack(self, pack.cfg, dynamic=pack.dynamic)
                self._count("checkpoint_skipped")
                continue
            self._count("restored")

    # -- helpers ------------------------------------------------------------------------------
    def _model(self, cfg: PackConfig) -> CellModel:
        key = (cfg.cell, cfg.capacity_ah)
        if key not in self._models:
            model = load_cell(cfg.cell)
            self._models[key] = (
                model if cfg.capacity_ah is None else model.with_capacity(cfg.capacity_ah)
            )
        return self._models[key]

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


def _alarm(a: Alarm) -> dict[str, Any]:
    d = a.to_dict()
    for k in ("value", "limit", "ts"):
        if not math.isfinite(d[k]):
            d[k] = None
    return d


def _keys(
    name: str, data: dict[str, Any], *, required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise Rejected("bad_command", f"{name} needs {', '.join(missing)}")
    extra = sorted(set(data) - set(required) - set(optional))
    if extra:
        raise Rejected("bad_command", f"{name} does not take {', '.join(extra)}")


def _scalar(name: str, value: Any, lo: float, hi: float) -> float:
    if type(value) not in (int, float) or not lo <= value <= hi:  # False for NaN too
        raise Rejected(
            "bad_command", f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}"[:200]
        )
    return float(value)


def _per_cell(name: str, value: Any, n: int, lo: float, hi: float) -> FloatArray:
    """A scalar (every cell) or a list of ``n`` numbers, each in [lo, hi]."""
    if type(value) is list:
        if len(value) != n:
            raise Rejected("bad_command", f"{name} has {len(value)} values, the pack has {n} cells")
        return np.array([_scalar(f"{name}[{j}]", x, lo, hi) for j, x in enumerate(value)])
    return np.full(n, _scalar(name, value, lo, hi))
