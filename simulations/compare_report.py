"""`compare.html`: pooled vs local vs federated as bars with ± sd (training hospitals vs the held-out one), the cross-site heatmap, the table.

Reads only compare.json (written by simulations.compare), so `flower-sim report COMPARE_DIR` can
rebuild it; the page is self-contained (images as data: URIs) and printable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.html_page import esc, figure, fmt, natural_key, page, table  # noqa: E402
from simulations.provenance import config_diff, versions  # noqa: E402
from simulations.report_figures import label  # noqa: E402

COMPARE_JSON = "compare.json"
COMPARE_CSV = "compare.csv"
COMPARE_HTML = "compare.html"
FIGURE_DIR = "compare-report"
BAR_METRICS = ("accuracy", "f1", "auc", "specificity")
TABLE_METRICS = ("accuracy", "f1", "auc", "specificity", "recall", "precision")
REGIME_COLOURS = {"pooled": "#4c72b0", "local": "#dd8452", "federated": "#55a868"}
REGIME_TEXT = {"pooled": "pooled (data in one place)", "local": "local only (mean of the site models)",
               "federated": "federated"}
REGIME_SHORT = {"pooled": "pooled", "local": "local only", "federated": "federated"}


def _scope_groups(summary: dict[str, Any]) -> list[tuple[str, str]]:
    groups = [("global", "training hospitals (pooled test)")]
    if summary.get("holdout"):
        groups.append(("held-out", f"held-out hospital ({summary['holdout']})"))
    return groups


def _row(summary: dict[str, Any], model: str, mode: str, scope: str) -> dict[str, Any] | None:
    return next((r for r in summary["rows"] if (r["model"], r["mode"], r["scope"]) == (model, mode, scope)), None)


def plot_bars(summary: dict[str, Any], model: str, path: Path) -> Path:
    """Mean ± sd over seeds per regime, training hospitals beside the held-out hospital, one panel per metric."""
    modes = [m for m in REGIME_COLOURS if _row(summary, model, m, "global")]
    groups = _scope_groups(summary)
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(3.3 * len(BAR_METRICS), 3.3), squeeze=False, sharey=True)
    width = 0.8 / max(len(modes), 1)
    for ax, metric in zip(axes[0], BAR_METRICS):
        for k, mode in enumerate(modes):
            stats = [(_row(summary, model, mode, scope) or {}).get(metric) or {} for scope, _ in groups]
            means = [s.get("mean") if s.get("mean") is not None else np.nan for s in stats]
            sds = [s.get("sd") or 0.0 for s in stats]
            x = np.arange(len(groups)) + (k - (len(modes) - 1) / 2) * width
            ax.bar(x, means, width * 0.95, yerr=sds, capsize=3, color=REGIME_COLOURS[mode], label=REGIME_TEXT[mode],
                   error_kw={"elinewidth": 1, "ecolor": "0.2"})
            for xi, m in zip(x, means):
                if np.isfinite(m):
                    ax.text(xi, 0.02, f"{m:.3f}", rotation=90, ha="center", va="bottom", fontsize=7, color="white")
        ax.set_xticks(range(len(groups)), [g.replace(" (", "\n(") for _, g in groups], fontsize=8)
        ax.set(title=label(metric), ylim=(0, 1.05))
        ax.spines[["top", "right"]].set_visible(False)
    axes[0, 0].set_ylabel(f"mean ± sd over {len(summary.get('seeds', []))} seed(s)")
    fig.suptitle(f"{model}: pooled vs local vs federated ({summary['data-kind']} data)")
    fig.tight_layout()
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(names), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def cross_site(runs: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Local models' accuracy matrix (row: site the model trained at, column: site it is tested on), mean and sd over seeds."""
    mats = [r["cross-site-accuracy"] for r in runs if r.get("cross-site-accuracy")]
    if not mats:
        return [], np.zeros((0, 0)), np.zeros((0, 0))
    sites = sorted(mats[0], key=natural_key)
    stack = np.array([[[m.get(a, {}).get(b, np.nan) for b in sites] for a in sites] for m in mats], dtype=float)
    sd = np.nanstd(stack, axis=0, ddof=1) if len(mats) > 1 else np.zeros(stack.shape[1:])
    return sites, np.nanmean(stack, axis=0), sd


def plot_cross_site(sites: list[str], mean: np.ndarray, sd: np.ndarray, model: str, kind: str, path: Path) -> Path:
    """Heatmap of the cross-site matrix with mean ± sd in every cell."""
    n = len(sites)
    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * n, 1.8 + 1.0 * n))
    shown = ax.imshow(mean, cmap="viridis", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(mean):
        ax.text(j, i, f"{v:.3f}\n± {sd[i, j]:.3f}", ha="center", va="center", fontsize=8,
                color="black" if v > 0.6 else "white")
    ax.set_xticks(range(n), sites, rotation=30, ha="right")
    ax.set_yticks(range(n), sites)
    ax.set(xlabel="tested on the test split of", ylabel="local model trained at",
           title=f"{model}: local models across sites, accuracy\n({kind} data; diagonal = own site)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _pm(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{fmt('ratio', stat['mean'])} ± {fmt('ratio', stat['sd'])}"


def build_compare_report(out_dir: Path) -> Path:
    """Write compare.html (and its PNGs under compare-report/) from out_dir/compare.json; returns the HTML path."""
    out_dir = Path(out_dir)
    saved = json.loads((out_dir / COMPARE_JSON).read_text())
    summary, runs = saved["summary"], saved.get("runs", {})
    kind = summary.get("data-kind", "unknown")
    figs = out_dir / FIGURE_DIR
    figs.mkdir(exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    bars, heat = "", ""
    for model in models:
        bars += figure(plot_bars(summary, model, figs / f"bars-{model}.png"), out_dir,
                       "Bars: mean over seeds; whiskers: ± one standard deviation. Every regime had the same budget.")
        sites, mean, sd = cross_site(runs.get(model, {}).get("local", []))
        if sites:
            heat += figure(plot_cross_site(sites, mean, sd, model, kind, figs / f"cross-site-{model}.png"), out_dir,
                           "Local-only models: each trained at one hospital, tested at every hospital.")
    scopes = dict(_scope_groups(summary))
    rows = [(r["model"], REGIME_SHORT.get(r["mode"], r["mode"]), scopes.get(r["scope"], r["scope"]),
             fmt("seeds", r["seeds"]), *(_pm(r.get(m)) for m in TABLE_METRICS)) for r in summary["rows"]]
    legend = ('<p class="note">Mean ± sd over seeds. pooled: one model on the union of the training sites\' data; '
              "local only: one model per site on its own data (mean over those models); federated: through Flower. "
              "Scopes: the training sites' test splits pooled, each site's, and the hospital no model trained on.</p>")
    sections = [
        ("figure", "Regimes", bars),
        *([("cross-site", "Cross-site matrix", heat)] if heat else []),
        ("table", "Table", legend + table(("model", "regime", "scope", "seeds", *map(label, TABLE_METRICS)), rows,
                                           numeric_from=3)),
        ("provenance", "Provenance", _provenance(summary, saved.get("config"), out_dir)),
    ]
    held = f" · held-out hospital: {esc(summary['holdout'])}" if summary.get("holdout") else ""
    meta = (f"{esc(out_dir)} · {len(summary.get('seeds', []))} seed(s) {esc(summary.get('seeds'))} · "
            f"models: {esc(', '.join(models))}{held}")
    path = out_dir / COMPARE_HTML
    path.write_text(page("histofed comparison: pooled vs local vs federated", kind, meta, sections))
    return path


def _provenance(summary: dict[str, Any], flat: dict[str, Any] | None, out_dir: Path) -> str:
    facts = [("data", summary.get("data-kind", "unknown").upper()), ("seeds", ", ".join(map(str, summary.get("seeds", [])))),
             ("files", f"{COMPARE_JSON}, {COMPARE_CSV} in {out_dir}"), *versions().items()]
    out = table(("item", "value"), facts, numeric_from=9)
    if flat:
        diff = config_diff(flat)
        out += "<h3>Configuration: differences from the defaults</h3>"
        out += table(("key", "default", "this comparison"), [(k, str(d), str(v)) for k, d, v in diff], numeric_from=9) \
            if diff else '<p class="note">Every key at its default.</p>'
    return out
