"""A campaign's report: PNG plots and one self-contained HTML page.

* ``trace.png``: every measured conductivity in measurement order, coloured by batch,
  with the best so far as a step line;
* ``landscape.png``: the measured points over (cyclic fraction EC+PC, salt molality)
  and over (linear-carbonate fraction, molality), coloured by conductivity;
* ``report.html``: both plots embedded (base64), the best formulation, the table of
  experiments (target, measured composition, result, attempts, failures).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from labctl.campaign.runner import CampaignState


def _plots(state: CampaignState, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = state.trace()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if trace:
        n = [t["n"] for t in trace]
        y = [t["conductivity_mS_cm"] for t in trace]
        best = [max(y[: i + 1]) for i in range(len(y))]
        sc = ax.scatter(n, y, c=[t["batch"] for t in trace], cmap="viridis", zorder=3)
        ax.step(n, best, where="post", color="k", lw=1.2, label="best so far")
        fig.colorbar(sc, ax=ax, label="batch")
        ax.legend(loc="lower right")
    ax.set_xlabel("experiment (measurement order)")
    ax.set_ylabel("conductivity at 25 C (mS/cm)")
    ax.set_title(f"{state.campaign_id}: optimization trace")
    fig.tight_layout()
    paths.append(out / "trace.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    if trace:
        m = [t["salt_molality"] for t in trace]
        y = [t["conductivity_mS_cm"] for t in trace]
        cyc = [t["fractions"].get("EC", 0) + t["fractions"].get("PC", 0) for t in trace]
        lin = [sum(v for k, v in t["fractions"].items() if k in ("EMC", "DMC", "DEC"))
               for t in trace]  # fmt: skip
        for ax, xs, label in ((axes[0], cyc, "EC + PC mass fraction"),
                              (axes[1], lin, "EMC + DMC + DEC mass fraction")):  # fmt: skip
            sc = ax.scatter(xs, m, c=y, cmap="plasma", s=50, edgecolor="k", lw=0.4)
            ax.set_xlabel(label)
        axes[0].set_ylabel("LiPF6 (mol/kg)")
        fig.colorbar(sc, ax=axes, label="conductivity (mS/cm)")
    fig.suptitle(f"{state.campaign_id}: measured landscape")
    paths.append(out / "landscape.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _dry_tests_html(state: CampaignState) -> str:
    """The campaign's sim_backend dry tests (labctl.campaign.dry_test), as text lines."""
    from labctl.campaign.dry_test import describe

    if not state.dry_tests:
        return ""
    blocks = "".join(
        f"<pre>{html.escape(chr(10).join(describe(t)))}</pre>" for t in state.dry_tests
    )
    return f"<h2>Dry tests (sim_backend MD; not seen by the optimizer)</h2>{blocks}"


def write_report(state: CampaignState, out: Path) -> list[Path]:
    """Write the plots and ``report.html`` into ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(state, out)
    best = state.best()
    rows = []
    for e in state.experiments:
        m = e.measured or {}
        target = ", ".join(f"{k} {v:.3f}" for k, v in e.target.fractions.items())
        got = ", ".join(f"{k} {v:.3f}" for k, v in m.get("fractions", {}).items())
        reasons = "; ".join(
            f"{a.exit_status}: {a.reason}" for a in e.attempts if a.exit_status != "success"
        )
        value = f"{m['conductivity_mS_cm']:.3f}" if m else "-"
        rows.append(
            f"<tr><td>{html.escape(e.id)}</td><td>{e.batch + 1}</td>"
            f"<td>{html.escape(e.source)}</td>"
            f"<td>{target}; {e.target.salt_molality:.3f} m</td>"
            f"<td>{got}{'; ' + format(m['salt_molality'], '.3f') + ' m' if m else ''}</td>"
            f"<td>{value}</td><td>{len(e.attempts)}</td><td>{html.escape(reasons)}</td></tr>"
        )
    images = "".join(
        f'<p><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></p>'
        for p in pngs
    )
    headline = "no measurement yet"
    if best is not None and best.measured:
        fr = ", ".join(f"{k} {v:.3f}" for k, v in best.measured["fractions"].items())
        kappa, molality = best.measured["conductivity_mS_cm"], best.measured["salt_molality"]
        headline = (
            f"best {kappa:.3f} mS/cm: {fr}; LiPF6 {molality:.3f} mol/kg ({html.escape(best.id)})"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(state.campaign_id)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
td,th{{border-bottom:1px solid #ddd;padding:3px 8px;font-size:90%}}</style></head><body>
<h1>Campaign {html.escape(state.campaign_id)}</h1>
<p>{len(state.done())} experiments measured in {state.batches} batches; {headline}</p>
{images}
<table><tr><th>experiment</th><th>batch</th><th>source</th><th>target</th><th>measured</th>
<th>mS/cm</th><th>runs</th><th>failures</th></tr>
{"".join(rows)}</table>{_dry_tests_html(state)}</body></html>
"""
    page_path = out / "report.html"
    page_path.write_text(page)
    return [*pngs, page_path]
