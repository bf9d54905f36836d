"""The closed loop: suggest a batch, make and measure it on the lab, learn, repeat.

Every decision and every result lives in Tiled, so the loop can die at any point and
``run_campaign`` with the same campaign id goes on where it stopped:

* a **batch** is a Bluesky run of its own (``plan_name`` ``campaign_batch``) whose
  start document holds the suggested formulations with their experiment ids
  (``<campaign>-E007``), written *before* any of them is made;
* an **experiment** is a ``prepare_and_measure`` run whose ``sample_id`` is the
  experiment id (``-r2`` appended for a retry), ``campaign_id`` the campaign's.

On start the loop reads both back: an experiment with a successful run is done (never
repeated), one whose runs all failed is retried or skipped per ``on_failure``, and one
with no run or an incomplete run (the process was killed during it) is made again in a
fresh vial. Only then does it ask the optimizer for more. The measured composition
(not the target) and the conductivity at the objective temperature are what the
optimizer sees; after each batch the property model (labctl.models) is retrained on
the lab's measurements and, once it exists, serves as the GP's prior mean.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labctl.campaign.dry_test import DRY_TEST_PLAN, DryTestConfig
from labctl.campaign.space import SOLVENTS, DesignSpace, Formulation

if TYPE_CHECKING:
    from bluesky import RunEngine
    from bluesky.utils import Msg

    from labctl.data import Store
    from labctl.plans.session import LabSession

BATCH_PLAN = "campaign_batch"
EXPERIMENT_PLAN = "prepare_and_measure"


class CampaignConfigError(ValueError):
    """A campaign setting is invalid; the message names the file, line, field and value."""


class CampaignConfig(BaseModel):
    """A campaign (campaign.toml; every field optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    campaign_id: str | None = Field(
        default=None, description="id in Tiled; default derived from name, optimizer, seed"
    )
    name: str = Field(default="campaign", min_length=1, max_length=40)
    budget: int = Field(default=12, ge=1, le=1000, description="experiments to measure")
    batch_size: int = Field(default=4, ge=1, le=48)
    seed: int = Field(default=0, ge=0)
    optimizer: Literal["bo", "random"] = "bo"
    use_prior: bool = Field(default=True, description="property model as the GP prior mean")
    update_models: bool = Field(default=True, description="retrain it after each batch")
    model_epochs: int = Field(default=400, ge=10, le=100_000)
    space: DesignSpace = Field(default_factory=DesignSpace)
    # 4 g of solvent (+ salt) is ~3.4 mL: the conductivity cell needs 3 mL to be wetted.
    solvent_g: float = Field(default=4.0, ge=3.5, le=10.0, description="solvent per vial, g")
    readings: int = Field(default=3, ge=2, le=20, description="meter readings per point")
    on_failure: Literal["retry", "skip"] = "retry"
    max_retries: int = Field(default=1, ge=0, le=5)
    max_skipped: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="stop the campaign after this many given-up experiments",
    )
    speed: float = Field(default=500.0, gt=0, le=10_000, description="simulated lab speed")
    dry_test: DryTestConfig = Field(
        default_factory=DryTestConfig, description="sim_backend dry tests (off by default)"
    )

    @field_validator("campaign_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError(f"must be letters, digits, _ . - (at most 64), got {v!r}")
        return v

    @property
    def id(self) -> str:
        return self.campaign_id or f"{self.name}-{self.optimizer}-s{self.seed}"


def load_campaign_config(path: Path | None = None, **overrides: Any) -> CampaignConfig:
    """``path`` (TOML) with ``overrides`` (not None) on top; errors name file:line."""
    values: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
            values = tomllib.loads(text)
        except OSError as exc:
            raise CampaignConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CampaignConfigError(f"{path}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CampaignConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            line = _line_of(text, str(err["loc"][0])) if text and err["loc"] else None
            where = f"{path}:{line}: " if line else (f"{path}: " if path else "")
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}{loc} = {err.get('input')!r}: {msg}")
        raise CampaignConfigError("invalid campaign:\n  " + "\n  ".join(problems)) from None


def _line_of(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*(\[{re.escape(key)}\]|{re.escape(key)}\s*=)", line):
            return number
    return None


# -- state, read back from Tiled -----------------------------------------------------------


@dataclass
class Attempt:
    run_uid: str
    sample_id: str
    exit_status: str
    reason: str


@dataclass
class Experiment:
    """One suggested formulation and what became of it."""

    id: str
    batch: int
    target: Formulation
    source: str
    attempts: list[Attempt] = field(default_factory=list)
    measured: dict[str, Any] | None = None
    """fractions, salt_molality, conductivity_mS_cm, temperature_c, run_uid (success)."""

    @property
    def done(self) -> bool:
        return self.measured is not None

    def failures(self) -> int:
        return sum(a.exit_status in ("fail", "abort") for a in self.attempts)

    def state(self, config: CampaignConfig) -> str:
        """done | skipped (failed, no retries left) | todo."""
        if self.done:
            return "done"
        limit = 1 + (config.max_retries if config.on_failure == "retry" else 0)
        return "skipped" if self.failures() >= limit else "todo"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "batch": self.batch,
            "source": self.source,
            "target": self.target.model_dump(),
            "attempts": [a.__dict__ for a in self.attempts],
            "measured": self.measured,
        }


@dataclass
class CampaignState:
    campaign_id: str
    experiments: list[Experiment]
    batches: int
    config: dict[str, Any] | None  # as the first batch recorded it
    dry_tests: list[dict[str, Any]] = field(default_factory=list)
    """sim_backend dry tests, oldest first: uid, experiment, exit_status, reason,
    formulation, result (None when it failed or is incomplete)."""

    def done(self) -> list[Experiment]:
        return [e for e in self.experiments if e.done]

    def best(self) -> Experiment | None:
        done = self.done()
        return max(done, key=lambda e: e.measured["conductivity_mS_cm"]) if done else None  # type: ignore[index]

    def trace(self) -> list[dict[str, Any]]:
        """Measured experiments in the order they were measured (run time)."""
        done = sorted(self.done(), key=lambda e: e.measured["time"])  # type: ignore[index]
        out = []
        for n, e in enumerate(done, 1):
            m = e.measured or {}
            out.append({"n": n, "experiment": e.id, "batch": e.batch, "source": e.source,
                        "fractions": m["fractions"], "salt_molality": m["salt_molality"],
                        "conductivity_mS_cm": m["conductivity_mS_cm"],
                        "run_uid": m["run_uid"]})  # fmt: skip
        return out


def read_state(
    store: Store,
    campaign_id: str,
    objective_c: float = 25.0,
    cache: dict[str, Any] | None = None,
) -> CampaignState:
    """The campaign's batches and experiments as Tiled holds them.

    ``cache`` (kept by a caller that reads the state again and again, as the loop does
    after every experiment) holds what a finished run said (a batch's start document,
    an experiment's measurement): those never change, so only new runs are read."""
    cache = cache if cache is not None else {}
    experiments: dict[str, Experiment] = {}
    batches = 0
    config = None
    summaries = store.runs(campaign=campaign_id)
    for s in sorted(summaries, key=lambda s: s.time):
        if s.plan_name != BATCH_PLAN or s.exit_status != "success":
            continue
        if s.uid not in cache:
            cache[s.uid] = store.run(s.uid).start
        start = cache[s.uid]
        batches = max(batches, int(start["batch"]) + 1)
        config = config or start.get("campaign_config")
        for item in start["suggestions"]:
            experiments[item["id"]] = Experiment(
                id=item["id"], batch=int(start["batch"]), source=item.get("source", "?"),
                target=Formulation(fractions=item["fractions"],
                                   salt_molality=item["salt_molality"]),
            )  # fmt: skip
    for s in sorted(summaries, key=lambda s: s.time):
        if s.plan_name != EXPERIMENT_PLAN or not s.sample_id:
            continue
        exp = experiments.get(re.sub(r"-r\d+$", "", s.sample_id))
        if exp is None:
            continue
        exp.attempts.append(Attempt(s.uid, s.sample_id, s.exit_status, s.reason or ""))
        if s.exit_status == "success" and exp.measured is None:
            if s.uid not in cache:
                cache[s.uid] = _measured(store, s.uid, objective_c) | {"time": s.time}
            exp.measured = dict(cache[s.uid])
    dry_tests = []
    for s in sorted(summaries, key=lambda s: s.time):
        if s.plan_name != DRY_TEST_PLAN:
            continue
        if s.uid not in cache or s.exit_status == "incomplete":
            cache[s.uid] = store.run(s.uid).start
        start = cache[s.uid]
        dry_tests.append({"uid": s.uid, "experiment": s.sample_id, "exit_status": s.exit_status,
                          "reason": s.reason, "formulation": start.get("formulation"),
                          "result": start.get("result")})  # fmt: skip
    ordered = sorted(experiments.values(), key=lambda e: e.id)
    return CampaignState(campaign_id, ordered, batches, config, dry_tests)


def _measured(store: Store, uid: str, objective_c: float) -> dict[str, Any]:
    comp = store.read(uid, "composition").iloc[-1]
    fractions = {s: float(comp[f"fraction_{s}"]) for s in SOLVENTS if comp[f"fraction_{s}"] > 0}
    points = store.read(uid, "conductivity")
    row = points.iloc[int(np.argmin(np.abs(points["setpoint_c"].to_numpy() - objective_c)))]
    return {
        "fractions": fractions,
        "salt_molality": float(comp["salt_molality"]),
        "conductivity_mS_cm": float(row["conductivity_mS_cm"]),
        "temperature_c": float(row["temperature_c"]),
        "run_uid": uid,
    }


# -- the loop ------------------------------------------------------------------------------


def record_batch(md: dict[str, Any]) -> Generator[Msg, Any, str]:
    """A run with no events: the batch's suggestions in its start document."""
    import bluesky.plan_stubs as bps

    uid: str = yield from bps.open_run(md={"plan_name": BATCH_PLAN, **md})
    yield from bps.close_run()
    return uid


@dataclass
class CampaignResult:
    state: CampaignState
    new_runs: int
    models: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """Contract 3's JSON: best, n_experiments, trace (and more)."""
        best = self.state.best()
        skipped = [e.id for e in self.state.experiments if e.attempts and not e.done]
        return {
            "campaign_id": self.state.campaign_id,
            "best": None if best is None else {
                "experiment": best.id, **{k: best.measured[k] for k in (  # type: ignore[index]
                    "fractions", "salt_molality", "conductivity_mS_cm")}},
            "n_experiments": len(self.state.done()),
            "trace": self.state.trace(),
            "failed": skipped,
            "batches": self.state.batches,
            "models": self.models,
            "dry_tests": self.state.dry_tests,
        }  # fmt: skip


Say = Callable[[str], None]


class Campaign:
    """Runs :class:`CampaignConfig` against a lab session, its data in ``store``."""

    def __init__(
        self,
        config: CampaignConfig,
        session: LabSession,
        store: Store,
        *,
        models_dir: Path | None = None,
        say: Say = print,
    ) -> None:
        self.config = config
        self.session = session
        self.store = store
        self.RE: RunEngine = session.RE
        self.models_dir = models_dir or store.config.directory.resolve() / "models"
        self.say = say
        self.model_log: list[dict[str, Any]] = []
        self.new_runs = 0
        self._seen: dict[str, Any] = {}  # finished runs already read (see read_state)

    # -- pieces ------------------------------------------------------------------------

    def state(self) -> CampaignState:
        return read_state(self.store, self.config.id, self.config.space.temperature_c, self._seen)

    def _prior(self) -> Any:
        if not (self.config.use_prior and self.config.optimizer == "bo"):
            return None
        from labctl.models.property import PropertyPredictor
        from labctl.models.registry import Registry, RegistryError

        try:
            if not Registry(self.models_dir).promoted("conductivity"):
                return None
            predictor = PropertyPredictor.load(self.models_dir, "conductivity")
        except (RegistryError, KeyError, FileNotFoundError):
            return None
        return predictor.predict

    def suggest(self, state: CampaignState, n: int) -> list[dict[str, Any]]:
        from labctl.campaign.optimizer import BayesianOptimizer, RandomSearch

        space = self.config.space
        done = state.done()
        measured = [e.measured for e in done if e.measured is not None]
        x = np.array([space.encode_measured(m["fractions"], m["salt_molality"]) for m in measured])
        x = x.reshape(-1, space.dim)
        y = np.array([m["conductivity_mS_cm"] for m in measured])
        opt = BayesianOptimizer(space) if self.config.optimizer == "bo" else RandomSearch(space)
        prior = self._prior()
        seed = self.config.seed * 1000 + state.batches
        cands = opt.suggest(x, y, None, n, seed, prior)
        start = len(state.experiments) + 1
        tag = "+prior" if prior is not None else ""
        return [
            {"id": f"{self.config.id}-E{start + i:03d}", "fractions": c.fractions,
             "salt_molality": c.salt_molality,
             "source": c.source + (tag if c.source == "bo" else "")}
            for i, c in enumerate(cands)
        ]  # fmt: skip

    def _empty_station(self) -> str:
        """A rack slot with an empty vial; asks the (simulated) operator for a fresh rack."""
        control = self.session.control
        if control is None:
            raise RuntimeError("campaigns need a simulated lab (its control port) for vials")
        for attempt in range(2):
            state = control({"op": "state"})["state"]
            for station, vid in sorted(
                state["stations"].items(),
                key=lambda kv: int(kv[0].split("/")[1]) if kv[0].startswith("rack/") else 0,
            ):
                if station.startswith("rack/") and vid and not state["vials"][vid]["contents_g"]:
                    return str(station)
            if attempt == 0:
                self.say("  rack used up: the operator loads fresh vials")
                control({"op": "fresh_rack"})
        raise RuntimeError("no empty vial in the rack, even after a fresh rack")

    def make_and_measure(self, exp: Experiment) -> str:
        from labctl.plans.electrolyte import prepare_and_measure
        from labctl.recipes import Recipe

        sample = exp.id if not exp.attempts else f"{exp.id}-r{len(exp.attempts) + 1}"
        station = self._empty_station()
        recipe = Recipe(
            fractions={k: v for k, v in exp.target.fractions.items() if v > 0},
            salt_molality=exp.target.salt_molality,
            solvent_g=self.config.solvent_g,
        )
        self.say(f"  {sample}: {recipe.name} in {station}")
        result: dict[str, Any] = {}
        try:
            outcome = self.RE(
                prepare_and_measure(
                    self.session.devices,
                    recipe,
                    self.session.reagents,
                    vial_station=station,
                    temperature_c=self.config.space.temperature_c,
                    readings=self.config.readings,
                    mix_time_s=60.0,
                    equilibrate_s=120.0,
                    sample_id=sample,
                    campaign_id=self.config.id,
                    time_scale=self.session.time_scale,
                    results=result,
                )
            )
            status = str(getattr(outcome, "exit_status", "?"))
        except Exception as exc:  # a failed run: the stop document has the reason
            status = f"fail ({type(exc).__name__}: {exc})"
        self.new_runs += 1
        if status == "success":
            self.say(f"    {result['conductivity_mS_cm']:.3f} mS/cm")
        else:
            self.say(f"    {status}")
            self.clear_deck()
        return status

    def clear_deck(self) -> None:
        """After a failed experiment: put every vial left on a working station (balance,
        stirrer, meter, cell) back into an empty rack slot, so the next one can run."""
        from labctl.plans.electrolyte import move_vial

        control = self.session.control
        assert control is not None
        state = control({"op": "state"})["state"]
        empty = [st for st, v in state["stations"].items() if st.startswith("rack/") and not v]
        for station, vid in state["stations"].items():
            if station.startswith("rack/") or not vid:
                continue
            if not empty:
                raise RuntimeError(f"vial {vid} left at {station} and no empty rack slot")
            target = empty.pop(0)
            self.say(f"    clearing {vid}: {station} -> {target}")
            try:
                self.RE(move_vial(self.session.devices, station, target))
            except Exception as exc:
                raise RuntimeError(f"cannot clear {vid} from {station}: {exc}") from exc

    def dry_test(self, exp: Experiment, formulation: dict[str, Any]) -> None:
        """Run sim_backend's dry test of ``formulation`` (fractions, salt_molality) and
        record it as a run of its own; a failure is recorded, never raised."""
        from labctl.campaign.dry_test import record_dry_test, run_dry_test

        cfg = self.config.dry_test
        fr = {k: float(v) for k, v in formulation["fractions"].items() if v > 0}
        molality = float(formulation["salt_molality"])
        self.say(f"  dry test of {exp.id} (sim_backend, {cfg.replicas} x {cfg.steps} steps)")
        result, error = None, None
        try:
            result = run_dry_test(fr, molality, cfg, self.config.space.temperature_c)
        except ImportError as exc:
            error = f"sim_backend is not installed (pip install -e '.[sim]'): {exc}"
        except Exception as exc:  # a cheap extra: recorded, the campaign goes on
            error = f"{type(exc).__name__}: {exc}"
        md = {"campaign_id": self.config.id, "sample_id": exp.id, "batch": exp.batch,
              "formulation": {"fractions": fr, "salt_molality": molality},
              "dry_test_config": cfg.model_dump(mode="json")}  # fmt: skip
        self.RE(record_dry_test(md, result, error))
        self.new_runs += 1
        if result is None:
            self.say(f"    failed: {error}")
        else:
            self.say(f"    {result['n_stable']}/{result['n_replicas']} replicas stable, "
                     f"{result['wall_s']:.1f} s")  # fmt: skip

    def dry_tests(self, state: CampaignState) -> CampaignState:
        """The dry tests ``config.dry_test.on`` asks for and Tiled does not hold yet (an
        experiment with a finished dry test run, even a failed one, is not tested again;
        one whose run was cut short is)."""
        cfg = self.config.dry_test
        if not cfg.enabled:
            return state
        have = {t["experiment"] for t in state.dry_tests if t["exit_status"] != "incomplete"}
        if cfg.on == "best":
            best = state.best()
            todo = [(best, best.measured)] if best is not None and best.measured else []
        else:
            todo = [(e, e.target.model_dump()) for e in state.experiments]
        ran = False
        for exp, formulation in todo:
            if exp.id not in have:
                self.dry_test(exp, formulation)
                ran = True
        return self.state() if ran else state

    def update_models(self) -> None:
        if not (self.config.update_models and self.config.optimizer == "bo"):
            return
        from labctl.models.property import PropertyConfig
        from labctl.models.training_data import conductivity_table
        from labctl.models.update import update_property_model

        table = conductivity_table(self.store, equilibrated_only=False)
        if len(table.frame) < 6:
            return
        space = self.config.space
        cfg = PropertyConfig(
            epochs=self.config.model_epochs, seed=self.config.seed,
            # Wider than the design space: measured compositions land a hair outside it.
            molality_range=(0.0, max(3.0, space.molality_max * 1.5)),
            temperature_range=(-30.0, 80.0),
        )  # fmt: skip
        t = time.monotonic()
        decision = update_property_model(
            self.models_dir, table.frame, config=cfg, data_query=table.query,
            data_sha256=table.sha256,
        )  # fmt: skip
        info = {"rows": len(table.frame), "seconds": round(time.monotonic() - t, 1),
                **_decision_dict(decision)}  # fmt: skip
        self.model_log.append(info)
        self.say(f"  property model: {json.dumps(info, default=str)}")

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> CampaignResult:
        cfg = self.config
        state = self.state()
        if state.experiments:
            self.say(
                f"resuming {cfg.id}: {len(state.done())} measured, "
                f"{sum(e.state(cfg) == 'skipped' for e in state.experiments)} skipped, "
                f"{state.batches} batches so far"
            )
        while True:
            todo = [e for e in state.experiments if e.state(cfg) == "todo"]
            remaining = cfg.budget - len(state.done())
            if remaining <= 0:
                break
            skipped = [e.id for e in state.experiments if e.state(cfg) == "skipped"]
            if len(skipped) >= cfg.max_skipped:
                raise RuntimeError(
                    f"{len(skipped)} experiments failed for good (max_skipped = "
                    f"{cfg.max_skipped}): {', '.join(skipped)}; "
                    f"see `labctl campaign status {cfg.id}`"
                )
            if not todo:
                n = min(cfg.batch_size, remaining)
                self.say(
                    f"batch {state.batches + 1}: asking the optimizer ({cfg.optimizer}) for {n}"
                )
                suggestions = self.suggest(state, n)
                md = {"campaign_id": cfg.id, "batch": state.batches, "suggestions": suggestions,
                      "campaign_config": cfg.model_dump(mode="json")}  # fmt: skip
                self.RE(record_batch(md))
                state = self.state()
                continue
            if cfg.dry_test.on == "suggestions":
                state = self.dry_tests(state)
            for exp in todo[:remaining]:
                self.make_and_measure(exp)
            state = self.state()
            if not [e for e in state.experiments if e.state(cfg) == "todo"]:
                self.update_models()
        state = self.dry_tests(state)
        return CampaignResult(state, self.new_runs, self.model_log)


def _decision_dict(decision: Any) -> dict[str, Any]:
    keep = ("candidate_version", "incumbent_version", "promoted", "promoted_version", "metric",
            "candidate_score", "incumbent_score", "reason")  # fmt: skip
    dumped = decision.model_dump() if hasattr(decision, "model_dump") else dict(decision)
    return {k: dumped[k] for k in keep if k in dumped}


@contextmanager
def campaign_session(
    config: CampaignConfig, *, lab_config: Path | None = None, say: Say = print
) -> Iterator[LabSession]:
    """The simulated lab of ``lab_config`` (default lab if None) at ``config.speed``."""
    from labctl.plans.session import open_lab

    with open_lab(
        str(lab_config) if lab_config else None, speed=config.speed, transport="tcp",
        progress=lambda text: say(f"  {text}"),
    ) as session:  # fmt: skip
        yield session


def run_campaign(
    config: CampaignConfig,
    *,
    lab_config: Path | None = None,
    store: Store | None = None,
    say: Say = print,
) -> CampaignResult:
    """Start the lab, connect the store, run (or resume) the campaign, return its result."""
    from labctl.data import open_store

    own = store is None
    store = store or open_store()
    try:
        with campaign_session(config, lab_config=lab_config, say=say) as session:
            store.subscribe(session.RE)
            return Campaign(config, session, store, say=say).run()
    finally:
        if own:
            store.close()
