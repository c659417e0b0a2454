"""The run report's figures (matplotlib, PNG): curves, confusion, ROC, per-site bars, patient accuracy, ε, attention.

Conventions: class names on every class axis, sites in the caller's order, legends outside the axes
(never over data), the data kind in every title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.metrics import auc_from_histogram, roc_from_histograms  # noqa: E402

CURVE_METRICS = ("accuracy", "f1", "auc", "specificity", "patient-recognition-rate")
BAR_METRICS = ("precision", "recall", "f1", "specificity", "iou", "accuracy", "patient-recognition-rate")
LABELS = {"f1": "F1", "auc": "AUC", "iou": "IoU", "patient-recognition-rate": "patient rec. rate", "support": "images"}
GLOBAL = "global (pooled)"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False})


def label(metric: str) -> str:
    """Display name of a metric key."""
    return LABELS.get(metric, metric)


def pretty(name: str) -> str:
    """A class name for an axis (ductal_carcinoma → ductal carcinoma)."""
    return name.replace("_", " ")


def _colours(sites: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {site: cmap(i % 10) for i, site in enumerate(sites)}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight" keeps the legends placed outside the axes
    plt.close(fig)
    return path


def _legend_right(ax: plt.Axes, **kw: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=8, **kw)


def plot_curves(history: list[dict[str, Any]], sites: Sequence[str], path: Path, kind: str) -> Path:
    """Metrics per round (round 0 = the initial model): global in black, each site in its colour; legend in a panel of its own."""
    metrics = [m for m in CURVE_METRICS if any(h["global"].get(m) is not None for h in history)]
    cols = 3
    rows = -(-(len(metrics) + 1) // cols)  # one panel more than metrics: the legend's
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    flat = axes.ravel()
    rounds = [h["round"] for h in history]
    colours = _colours(sites)
    for ax, metric in zip(flat, metrics):
        ax.plot(rounds, [h["global"].get(metric) for h in history], "k-o", ms=3, lw=2, label=GLOBAL)
        for site in sites:
            ax.plot(rounds, [h["sites"].get(site, {}).get(metric) for h in history], "--", color=colours[site],
                    lw=1.2, label=site)
        ax.set(title=label(metric), xlabel="round", ylim=(-0.02, 1.02))
        ax.set_xticks(rounds if len(rounds) <= 12 else rounds[:: max(1, len(rounds) // 10)])
    for ax in flat[len(metrics):]:
        ax.axis("off")
    handles, names = flat[0].get_legend_handles_labels()
    flat[len(metrics)].legend(handles, names, loc="center left", frameon=False, fontsize=8,
                              title="round 0 = initial model")
    fig.suptitle(f"metrics per round ({kind} data)")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Path, kind: str) -> Path:
    """Pooled confusion matrix, counts and row-normalised (each true class sums to 1), class names on both axes."""
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(cm)
    side = 2.0 + 0.5 * k
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.0, side + 0.4))
    ticks = [pretty(n) for n in names]
    for ax, values, title, text in (
        (axes[0], cm, "counts", lambda v: f"{int(v):,}"),
        (axes[1], norm, "row-normalised (share of each true class)", lambda v: f"{v:.3f}"),
    ):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, text(v), ha="center", va="center", fontsize=8 if k <= 4 else 6.5,
                    color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), ticks, rotation=0 if k <= 2 else 40, ha="center" if k <= 2 else "right")
        ax.set_yticks(range(k), ticks)
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
        ax.spines[:].set_visible(False)
    fig.suptitle(f"final confusion matrix, pooled over sites ({kind} data)", y=1.03)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(scores: Mapping[str, Any], names: Sequence[str], sites: Sequence[str], path: Path, kind: str) -> Path | None:
    """ROC from the score histograms: binary: pooled + every site; more classes: pooled one-vs-rest per class."""
    pooled = np.asarray(scores.get("global", []), dtype=np.int64)
    if pooled.ndim != 3 or pooled.shape[0] != len(names):
        return None
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.plot([0, 1], [0, 1], ":", color="0.6", lw=1, label="chance (AUC 0.500)")
    if len(names) == 2:
        curves = [(f"{GLOBAL}", pooled, "k", 2.2, "-")]
        colours = _colours(sites)
        site_hist = scores.get("sites", {})
        curves += [(s, np.asarray(site_hist[s]), colours[s], 1.3, "--") for s in sites if s in site_hist]
        for name, hist, colour, width, style in curves:
            _roc_line(ax, hist[1], f"{name} (AUC {auc_from_histogram(hist[1, 0], hist[1, 1]):.3f})", colour, width, style)
        title = f"ROC: {pretty(names[1])} vs {pretty(names[0])}"
    else:
        cmap = plt.get_cmap("tab10")
        for c, name in enumerate(names):
            auc = auc_from_histogram(pooled[c, 0], pooled[c, 1])
            _roc_line(ax, pooled[c], f"{pretty(name)} (AUC {auc:.3f})", cmap(c % 10), 1.4, "-")
        title = "ROC per class, one vs rest (pooled over sites)"
    ax.set(xlabel="false positive rate (1 − specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=f"{title}\n({kind} data, round {scores.get('round', '?')})")
    ax.set_aspect("equal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, fontsize=8, ncol=1 if len(names) == 2 else 2)
    return _save(fig, path)


def _roc_line(ax: plt.Axes, hist: np.ndarray, text: str, colour: Any, width: float, style: str) -> None:
    fpr, tpr = roc_from_histograms(hist[0], hist[1])
    if np.isfinite(fpr).all() and np.isfinite(tpr).all():
        ax.plot(fpr, tpr, style, color=colour, lw=width, label=text)


def plot_sites(record: dict[str, Any], sites: Sequence[str], path: Path, kind: str) -> Path:
    """Final-round metrics per site as grouped bars, the pooled global value first."""
    metrics = [m for m in BAR_METRICS if record["global"].get(m) is not None]
    scopes = [(GLOBAL, record["global"], "0.25")] + [
        (s, record["sites"].get(s, {}), c) for s, c in _colours(sites).items()]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.15 * len(metrics) * max(1, len(scopes)) / 3), 2.7))
    width = 0.8 / len(scopes)
    for k, (name, values, colour) in enumerate(scopes):
        ax.bar(np.arange(len(metrics)) + k * width, [values.get(m) or 0 for m in metrics], width, label=name,
               color=colour)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, [label(m) for m in metrics])
    ax.set(ylim=(0, 1.0), title=f"final round per site ({kind} data)")
    _legend_right(ax)
    return _save(fig, path)


def plot_patients(record: dict[str, Any], sites: Sequence[str], path: Path, kind: str) -> Path | None:
    """Per site: how many patients had which share of their images classified correctly (BreakHis convention)."""
    shown = [s for s in sites if record["sites"].get(s, {}).get("patient-accuracy-hist")]
    if not shown:
        return None
    hists = [np.asarray(record["sites"][s]["patient-accuracy-hist"]) for s in shown]
    panels = [(GLOBAL, np.sum(hists, axis=0), record["global"], "0.25")]
    panels += [(s, h, record["sites"][s], c) for (s, c), h in zip(_colours(shown).items(), hists)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 2.7), squeeze=False, sharey=True)
    for ax, (name, hist, values, colour) in zip(axes[0], panels):
        bins = len(hist)
        ax.bar((np.arange(bins) + 0.5) / bins, hist, width=0.9 / bins, color=colour)
        ax.set(xlim=(0, 1), xlabel="share of the patient's\nimages correct",
               title=f"{name}\n{int(hist.sum())} patients · rate {values.get('patient-recognition-rate', 0):.3f}")
    axes[0, 0].set_ylabel("patients")
    fig.suptitle(f"per-patient accuracy, final round ({kind} data)", y=1.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_epsilon(history: list[dict[str, Any]], sites: Sequence[str], path: Path, kind: str) -> Path | None:
    """ε per round and site when differential privacy reported it."""
    rows = [(h["round"], site, v["epsilon"]) for h in history for site, v in h.get("privacy", {}).items()
            if v.get("epsilon") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.4, 3.2))
    reported = {r[1] for r in rows}
    order = [s for s in sites if s in reported] + sorted(reported - set(sites))
    for site, colour in _colours(order).items():
        pts = [(r, e) for r, s, e in rows if s == site]
        ax.plot(*zip(*pts), "-o", ms=3, color=colour, label=site)
    ax.set(xlabel="round", ylabel="ε (spent so far)", title=f"privacy budget spent per site ({kind} data)")
    _legend_right(ax)
    return _save(fig, path)


def plot_attention(images: np.ndarray, labels: Sequence[int], heat: np.ndarray, probs: np.ndarray,
                   names: Sequence[str], path: Path, kind: str) -> Path:
    """Per patch: the tissue, the tissue with attention contours, and the attention map beside it (tissue stays visible)."""
    from common.attention import contour_levels

    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.6), squeeze=False)
    for k in range(n):
        pred = int(probs[k].argmax())
        axes[0, k].imshow(images[k])
        axes[0, k].set_title(f"true: {pretty(names[labels[k]])}", fontsize=8)
        axes[1, k].imshow(images[k])
        levels = contour_levels(heat[k])
        if levels:
            axes[1, k].contour(heat[k], levels=levels, colors=["#00e5ff", "#ffea00", "#ff1744"][-len(levels):],
                               linewidths=[0.8, 1.1, 1.5][-len(levels):])
        axes[1, k].set_title(f"pred: {pretty(names[pred])} ({probs[k, pred]:.2f})", fontsize=8)
        span = float(heat[k].max() - heat[k].min())
        relative = (heat[k] - heat[k].min()) / span if span > 0 else np.zeros_like(heat[k])
        shown = axes[2, k].imshow(relative, cmap="magma", vmin=0.0, vmax=1.0)
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(True)
            ax.spines[:].set_color("0.7")
    axes[0, 0].set_ylabel("test patch")
    axes[1, 0].set_ylabel("attention contours")
    axes[2, 0].set_ylabel("attention map")
    fig.colorbar(shown, ax=axes.ravel().tolist(), location="bottom", shrink=0.45, fraction=0.03, pad=0.03,
                 label="attention map, relative to the patch's own min .. max")
    fig.suptitle(f"attention of the final global model ({kind} data); contours (cyan, yellow, red) enclose the 50 / 20 / 5 % most-attended pixels")
    return _save(fig, path)
