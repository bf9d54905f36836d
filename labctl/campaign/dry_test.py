"""Dry tests from sim_backend: a cheap computational opinion on a candidate formulation.

A dry test is batched MD of a small box of the formulation with the shipped machine-learned
potential (``sim_backend.api.formulation_dry_test``): self-diffusion per species, Li-O
coordination, Nernst-Einstein conductivity, each with an error, and how many replicas
stayed stable. It is an *extra* record, not an input of the optimizer (a few hundred
femtoseconds of MD with a small potential has error bars far wider than the lab's 1 %).

Each dry test is a Bluesky run of its own (``plan_name`` ``sim_dry_test``, ``sample_id``
the experiment id, ``campaign_id`` the campaign's), so ``labctl runs list --campaign ID``
lists it beside the batches and experiments. Its start document holds the formulation,
the settings and the whole JSON result; stream ``dry_test`` holds one row of headline
numbers, stream ``diffusion`` one row per species. sim_backend (torch) is imported only
when a dry test runs: without it the run is recorded as failed, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from bluesky.utils import Msg

DRY_TEST_PLAN = "sim_dry_test"


class DryTestConfig(BaseModel):
    """``[dry_test]`` of campaign.toml; off unless ``enabled``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    on: Literal["best", "suggestions"] = Field(
        default="best",
        description="best: the best measured formulation, once the budget is spent; "
        "suggestions: every suggested formulation, before it is made",
    )
    replicas: int = Field(default=2, ge=1, le=256)
    steps: int = Field(default=300, ge=50, le=10_000_000, description="CSVR production")
    equil_steps: int = Field(default=100, ge=0, le=10_000_000, description="Langevin")
    timestep_fs: float = Field(default=1.0, ge=0.1, le=4.0)
    sample_every: int = Field(default=5, ge=1, le=10_000)
    temperature_c: float | None = Field(
        default=None, ge=-60.0, le=200.0, description="default: the objective temperature"
    )
    n_solvent: tuple[int, int] = Field(default=(24, 32), description="solvent molecules")
    model: str | None = Field(default=None, description="sim_backend model (default: shipped)")
    device: str | None = Field(default=None, description="cpu or cuda (default: cuda if any)")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DryTestConfig:
        if self.steps < 50 * self.sample_every:
            raise ValueError(
                f"steps = {self.steps} must be >= 50 x sample_every ({50 * self.sample_every})"
            )
        lo, hi = self.n_solvent
        if not 2 <= lo <= hi <= 200:
            raise ValueError(f"n_solvent = {list(self.n_solvent)}: need 2 <= lo <= hi <= 200")
        return self


def run_dry_test(
    fractions: Mapping[str, float], salt_molality: float, cfg: DryTestConfig, temperature_c: float
) -> dict[str, Any]:
    """The JSON-able result of ``sim_backend.api.formulation_dry_test``. Raises
    ImportError when sim_backend (the ``sim`` extra) is not installed."""
    from sim_backend.api import formulation_dry_test

    t = cfg.temperature_c if cfg.temperature_c is not None else temperature_c
    return formulation_dry_test(
        {k: v for k, v in fractions.items() if v > 0}, salt_molality, temperature_c=t,
        replicas=cfg.replicas, steps=cfg.steps, equil_steps=cfg.equil_steps,
        timestep_fs=cfg.timestep_fs, sample_every=cfg.sample_every,
        n_solvent=cfg.n_solvent, device=cfg.device, seed=cfg.seed, model=cfg.model,
    )  # fmt: skip


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The one row of stream ``dry_test`` (NaN where a property could not be computed)."""
    li_o = result.get("li_o_coordination") or {}
    sigma = result.get("conductivity_ms_cm") or {}
    comp = result.get("formulation") or {}
    return {
        "temperature_k": _num(result.get("temperature_k")),
        "mean_temperature_k": _num(result.get("mean_temperature_k")),
        "n_replicas": int(result.get("n_replicas", 0)),
        "n_stable": int(result.get("n_stable", 0)),
        "production_ps": _num(result.get("production_ps")),
        "n_atoms": int(comp.get("n_atoms", 0)),
        "density_g_cm3": _num((result.get("density_g_cm3") or {}).get("value")),
        "salt_molality": _num(comp.get("salt_molality")),
        "li_o_coordination": _num(li_o.get("value")),
        "li_o_coordination_error": _num(li_o.get("error")),
        "conductivity_ne_mS_cm": _num(sigma.get("value")),
        "conductivity_ne_error_mS_cm": _num(sigma.get("error")),
        "wall_s": _num(result.get("wall_s")),
        "model_sha256": str((result.get("model") or {}).get("sha256", "")),
    }


HEADLINE_FIELDS: dict[str, tuple[Any, str]] = {
    "temperature_k": ("number", "K"), "mean_temperature_k": ("number", "K"),
    "n_replicas": ("integer", ""), "n_stable": ("integer", ""),
    "production_ps": ("number", "ps"), "n_atoms": ("integer", ""),
    "density_g_cm3": ("number", "g/cm^3"), "salt_molality": ("number", "mol/kg"),
    "li_o_coordination": ("number", ""), "li_o_coordination_error": ("number", ""),
    "conductivity_ne_mS_cm": ("number", "mS/cm"),
    "conductivity_ne_error_mS_cm": ("number", "mS/cm"),
    "wall_s": ("number", "s"), "model_sha256": ("string", ""),
}  # fmt: skip
DIFFUSION_FIELDS: dict[str, tuple[Any, str]] = {
    "species": ("string", ""), "D_m2_s": ("number", "m^2/s"),
    "D_error_m2_s": ("number", "m^2/s"), "n_molecules": ("integer", ""),
}  # fmt: skip


def record_dry_test(
    md: dict[str, Any], result: dict[str, Any] | None, error: str | None = None
) -> Generator[Msg, Any, str]:
    """A run holding one dry test (``result``), or a failed run saying why (``error``)."""
    import bluesky.plan_stubs as bps

    from labctl.plans.common import Record, emit

    start = {"plan_name": DRY_TEST_PLAN, **md, "result": result}
    uid: str = yield from bps.open_run(md=start)
    if result is None:
        yield from bps.close_run(exit_status="fail", reason=error or "no result")
        return uid
    yield from emit(Record("dry_test", HEADLINE_FIELDS), "dry_test", **headline(result))
    rec = Record("diffusion", DIFFUSION_FIELDS)
    for name, d in (result.get("diffusion_by_species") or {}).items():
        yield from emit(rec, "diffusion", species=name, D_m2_s=_num(d.get("value_m2_s")),
                        D_error_m2_s=_num(d.get("error_m2_s")),
                        n_molecules=int(d.get("n_molecules", 0)))  # fmt: skip
    yield from bps.close_run()
    return uid


def describe(test: Mapping[str, Any]) -> list[str]:
    """Report lines for one dry test as read back (see ``CampaignState.dry_tests``)."""
    r = test.get("result")
    f = test.get("formulation") or {}
    fr = ", ".join(f"{k} {v:.3f}" for k, v in (f.get("fractions") or {}).items())
    head = f"dry test of {test['experiment']} ({fr}; LiPF6 {f.get('salt_molality', 0):.3f} mol/kg)"
    if not r:
        return [f"{head}: {test['exit_status']} ({test.get('reason') or '?'})"]
    comp = r["formulation"]
    counts = ", ".join(f"{k} {v}" for k, v in comp["counts"].items())
    s = r["settings"]
    lines = [f"{head}: box {counts} ({comp['n_atoms']} atoms, {comp['density_g_cm3']:.3f} g/cm3, "
             f"LiPF6 {comp['salt_molality']:.3f} mol/kg); {s['replicas']} x {s['steps']} steps "
             f"at {s['temperature_k']:.2f} K, {r['wall_s']:.1f} s"]  # fmt: skip
    for name, d in (r.get("diffusion_by_species") or {}).items():
        lines.append(f"  D {name:6s} {d['value_m2_s']:.3e} +- {d['error_m2_s']:.2e} m2/s")
    li_o = r.get("li_o_coordination")
    if li_o:
        lines.append(f"  Li-O coordination {li_o['value']:.2f} +- {li_o['error']:.2f} "
                     f"(r < {li_o['r_cut_A']:.2f} A)")  # fmt: skip
    sigma = r.get("conductivity_ms_cm")
    if sigma:
        lines.append(f"  Nernst-Einstein conductivity {sigma['value']:.3g} +- "
                     f"{sigma['error']:.2g} mS/cm")  # fmt: skip
    mean_t = r.get("mean_temperature_k")
    lines.append(f"  stable replicas {r['n_stable']}/{r['n_replicas']} (mean T "
                 f"{'-' if mean_t is None else format(mean_t, '.0f')} K)")  # fmt: skip
    return lines
