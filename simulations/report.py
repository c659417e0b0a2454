"""Run report: metric curves, confusion matrix, per-site bars, ε (when DP) and attention overlays, as PNGs + one HTML."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.attention import attention_maps, overlay  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.datasets import get_dataset  # noqa: E402
from common.privacy import build_model_for  # noqa: E402 - the run's model (DP-compatible when privacy is on)
from common.weights import load_weights, read_state_dict  # noqa: E402
from simulations.runner import read_history  # noqa: E402

CURVE_METRICS = ("accuracy", "f1", "auc", "specificity")
BAR_METRICS = ("precision", "recall", "f1", "specificity", "iou", "accuracy")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, Any]], path: Path, kind: str) -> Path:
    """Metrics per round, global (pooled) in black and each site in colour."""
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.2))
    rounds = [h["round"] for h in history]
    sites = sorted(history[-1]["sites"])
    for ax, metric in zip(axes, CURVE_METRICS):
        ax.plot(rounds, [h["global"].get(metric) for h in history], "k-o", label="global (pooled)")
        for site in sites:
            ax.plot(rounds, [h["sites"].get(site, {}).get(metric) for h in history], "--", label=site)
        ax.set(title=metric, xlabel="round", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"metrics per round ({kind} data)")
    return _save(fig, path)


def plot_confusion(confusion: list[list[int]], path: Path, kind: str) -> Path:
    """Final pooled confusion matrix (rows true, columns predicted)."""
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.2 + 0.3 * len(cm), 3 + 0.3 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xlabel="predicted", ylabel="true", title=f"final confusion ({kind})")
    return _save(fig, path)


def plot_sites(record: dict[str, Any], path: Path, kind: str) -> Path:
    """Final-round metrics per site as grouped bars, global beside them."""
    scopes = {"global": record["global"], **record["sites"]}
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / len(scopes)
    for k, (name, values) in enumerate(scopes.items()):
        ax.bar(np.arange(len(BAR_METRICS)) + k * width, [values.get(m) or 0 for m in BAR_METRICS], width, label=name)
    ax.set_xticks(np.arange(len(BAR_METRICS)) + 0.4 - width / 2, BAR_METRICS)
    ax.set(ylim=(0, 1.05), title=f"final round per site ({kind} data)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_epsilon(history: list[dict[str, Any]], path: Path) -> Path | None:
    """ε per round and site when differential privacy reported it."""
    rows = [(h["round"], site, v["epsilon"]) for h in history for site, v in h.get("privacy", {}).items()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for site in sorted({r[1] for r in rows}):
        pts = [(r, e) for r, s, e in rows if s == site]
        ax.plot(*zip(*pts), "-o", label=site)
    ax.set(xlabel="round", ylabel="ε", title="privacy budget spent")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_attention(run_dir: Path, cfg: RunConfig, path: Path, count: int = 6) -> Path | None:
    """Attention overlays of the final global model on the first test patches of site 0."""
    weights = run_dir / "model.safetensors"
    entry = get_dataset(cfg.data.dataset)
    if cfg.model.architecture != "hybrid" or not weights.is_file() or not (entry.synthetic or cfg.data.root):
        return None  # a deployment's server holds no images: the sites' data never leaves them
    model = build_model_for(cfg.model, cfg.privacy, load_pretrained=False)
    load_weights(model, read_state_dict(weights))
    split = entry.load_split(cfg, cfg.federation.training_sites[0], "test")
    picks = [split[i] for i in range(min(count, len(split)))]
    images = np.stack([img for img, _ in picks if img is not None])
    heat, probs = attention_maps(model, images)
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6), squeeze=False)
    for k, (img, (_, label)) in enumerate(zip(images, picks)):
        axes[0, k].imshow(img)
        axes[0, k].set_title(f"label {label}", fontsize=8)
        axes[1, k].imshow(overlay(img, heat[k]))
        axes[1, k].set_title(f"P(malignant)={probs[k, -1]:.2f}" if probs.shape[1] == 2 else f"pred {probs[k].argmax()}", fontsize=8)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle("attention of the global model (top: patch, bottom: attention in red)")
    return _save(fig, path)


def build_report(run_dir: Path) -> Path:
    """Write the PNGs and report.html into run_dir; returns the HTML path."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    cfg, kind = RunConfig.from_flat(saved["config"]), saved.get("data-kind", "unknown")
    history = read_history(run_dir)
    if not history:
        raise ValueError(f"{run_dir} has no rounds in metrics.jsonl")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    figures = [
        ("Metrics per round", plot_curves(history, out / "curves.png", kind)),
        ("Final confusion matrix (pooled over sites)", plot_confusion(history[-1]["confusion"], out / "confusion.png", kind)),
        ("Final metrics per site", plot_sites(history[-1], out / "sites.png", kind)),
        ("Privacy budget (ε) per round", plot_epsilon(history, out / "epsilon.png")),
        ("Attention overlays", plot_attention(run_dir, cfg, out / "attention.png")),
    ]
    return _write_html(run_dir, history, [(t, p) for t, p in figures if p is not None], kind)


def _write_html(run_dir: Path, history: list[dict[str, Any]], figures: list[tuple[str, Path]], kind: str) -> Path:
    final = history[-1]["global"]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{'—' if v is None else f'{v:.4f}'}</td></tr>"
                   for k, v in final.items() if not isinstance(v, dict))
    blocks = []
    for title, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        rel = path.relative_to(run_dir).as_posix()
        blocks.append(f'<h2>{html.escape(title)}</h2><img alt="{rel}" src="data:image/png;base64,{data}">'
                      f'<p><a href="{rel}">{rel}</a></p>')
    page = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>histofed report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "td{padding:2px 10px}</style></head><body>"
        f"<h1>histofed run report</h1><p><b>Data: {html.escape(kind.upper())}</b> · run directory "
        f"{html.escape(str(run_dir))} · {len(history) - 1} rounds</p>"
        f"<h2>Final global metrics (pooled counts)</h2><table>{rows}</table>{''.join(blocks)}</body></html>"
    )
    path = run_dir / "report.html"
    path.write_text(page)
    return path
