"""Run report: one self-contained report.html (+ its PNGs in report/) that a pathologist and a reviewer can read.

Sections: headline (image-level accuracy beside the patient recognition rate), per-site table,
metrics, figures (curves, confusion with class names, ROC from the sites' score histograms,
per-patient accuracy, ε, attention contours) and the run's provenance. Everything is read through
common.rundir.RunDirectory; every image is embedded (data: URI), nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.classes import class_names
from common.config import RunConfig
from common.datasets.registry import get_dataset
from common.metrics import auc_from_histogram
from common.rundir import RunDirectory
from simulations import report_figures as F
from simulations.html_page import esc, figure, fmt, natural_key, page, row, table
from simulations.provenance import provenance_html

HEADLINE = (("accuracy", "image-level accuracy", "support", "images"),
            ("patient-recognition-rate", "patient recognition rate", "patients", "patients"),
            ("auc", "AUC", None, ""), ("f1", "F1", None, ""))
SITE_METRICS = ("accuracy", "patient-recognition-rate", "f1", "auc", "specificity", "loss")
PER_CLASS = ("precision", "recall", "f1", "specificity", "iou", "auc")


def site_order(cfg: RunConfig, present: list[str]) -> list[str]:
    """Sites in the dataset's site order (site 0 first), any others after them in natural order."""
    try:
        known = get_dataset(cfg.data.dataset).site_names(cfg)
    except Exception:  # noqa: BLE001 - an old or foreign config: fall back to the names alone
        known = []
    rank = {name: i for i, name in enumerate(known)}
    return sorted(present, key=lambda s: (rank.get(s, len(rank)), natural_key(s)))


def build_report(run_dir: Path) -> Path:
    """Write the PNGs and the HTML page into run_dir; returns the HTML path."""
    run = RunDirectory(Path(run_dir))
    flat, kind = run.read_config()
    cfg = RunConfig.from_flat(flat)
    history = run.history()
    if not history:
        raise ValueError(f"{run.path} has no rounds in {RunDirectory.METRICS}")
    final = history[-1]
    names = class_names(cfg.model.num_classes, cfg.data.dataset)
    sites = site_order(cfg, list(final["sites"]))
    out = run.file(RunDirectory.REPORT_DIR)
    out.mkdir(exist_ok=True)
    scores = run.read_scores()
    plots = {
        "curves": F.plot_curves(history, sites, out / "curves.png", kind),
        "confusion": F.plot_confusion(final["confusion"], names, out / "confusion.png", kind),
        "roc": F.plot_roc(scores, names, sites, out / "roc.png", kind) if scores else None,
        "sites": F.plot_sites(final, sites, out / "sites.png", kind),
        "patients": F.plot_patients(final, sites, out / "patients.png", kind),
        "epsilon": F.plot_epsilon(history, sites, out / "epsilon.png", kind),
        "attention": _attention(run, cfg, names, out / "attention.png", kind),
    }
    fig = lambda key, caption: figure(plots[key], run.path, caption) if plots[key] else ""  # noqa: E731
    sections = [
        ("summary", "Summary", _headline(final["global"]) + _global_table(final["global"], names)),
        ("sites", "Per site", _site_table(final, history, sites, names, run.read_partition())
         + _class_table(final, sites, names) + fig("sites", "Final-round metrics per site.")),
        ("confusion", "Confusion and ROC", _roc_section(fig, scores, names, sites)),
        ("patients", "Patients", _patient_section(final, fig)),
        ("curves", "Per round", fig("curves", "Round 0 is the initial model, before any training.")),
        *([("privacy", "Privacy", fig("epsilon", "ε(δ) after each round, per site."))] if plots["epsilon"] else []),
        *([("attention", "Attention", fig("attention", "Test patches of the first training site."))]
          if plots["attention"] else []),
        ("provenance", "Provenance", provenance_html(run, cfg, flat, kind, history)),
    ]
    meta = (f"run directory <code>{esc(run.path)}</code> · {len(history) - 1} round(s) after round 0 · "
            f"{esc(cfg.data.dataset)} data · classes: {esc(', '.join(map(F.pretty, names)))}")
    path = run.file(RunDirectory.REPORT_HTML)
    path.write_text(page("histofed run report", kind, meta, sections))
    return path


def _headline(glob: dict[str, Any]) -> str:
    boxes = []
    for key, title, count_key, unit in HEADLINE:
        if glob.get(key) is None:
            continue
        extra = f"{fmt(count_key, glob.get(count_key))} {unit}" if count_key else "pooled over sites"
        boxes.append(f"<div><span>{esc(title)}</span><b>{esc(fmt(key, glob[key]))}</b><span>{esc(extra)}</span></div>")
    note = ("" if glob.get("patient-recognition-rate") is not None else
            '<p class="note">No patient-level figures: this data has no patient identifiers.</p>')
    return f'<div class="headline">{"".join(boxes)}</div>{note}'


def _global_table(glob: dict[str, Any], names: tuple[str, ...]) -> str:
    keys = [k for k, v in glob.items() if "/" not in k and not isinstance(v, (list, dict))]
    out = ("<h3>Final global metrics (pooled counts over sites)</h3>"
           + table([F.label(k) for k in keys], [[fmt(k, glob[k]) for k in keys]], numeric_from=0))
    if len(names) > 2:
        body = [(F.pretty(n), *(fmt(m, glob.get(f"{m}/{c}")) for m in PER_CLASS)) for c, n in enumerate(names)]
        out += "<h3>Per class (one vs rest)</h3>" + table(("class", *map(F.label, PER_CLASS)), body)
    return out


def _latest_train(history: list[dict[str, Any]], site: str) -> dict[str, Any]:
    return next((h["train"][site] for h in reversed(history) if site in h.get("train", {})), {})


def _site_table(final: dict[str, Any], history: list[dict[str, Any]], sites: list[str], names: tuple[str, ...],
                partition: dict[str, Any]) -> str:
    rows = []
    for site in sites:
        values, train = final["sites"][site], _latest_train(history, site)
        cm = np.asarray(values.get("confusion", []))
        rows.append((
            site, fmt("images", values.get("support")), fmt("images", train.get("examples")),
            fmt("patients", values.get("patients", _partition_patients(partition, site))),
            _balance(cm, names), f"{fmt('images', values.get('skipped-images'))} / {fmt('images', train.get('skipped-images'))}",
            *(fmt(m, values.get(m)) for m in SITE_METRICS),
        ))
    header = ("site", "test images", "train images", "test patients", "class balance (test)",
              "skipped (test / train)", *map(F.label, SITE_METRICS))
    return table(header, rows)


def _partition_patients(partition: dict[str, Any], site: str) -> int | None:
    test = partition.get("sites", {}).get(site, {}).get("test")
    return len(test) if isinstance(test, list) else None


def _balance(cm: np.ndarray, names: tuple[str, ...]) -> str:
    if cm.size == 0 or cm.sum() == 0:
        return "—"
    share = cm.sum(axis=1) / cm.sum()
    if len(names) == 2:
        return f"{share[1]:.3f} {names[1]}"
    top = int(share.argmax())
    return f"{len(np.flatnonzero(share))} classes; most: {F.pretty(names[top])} {share[top]:.3f}"


def _class_table(final: dict[str, Any], sites: list[str], names: tuple[str, ...]) -> str:
    rows = []
    for scope, cm in [("global (pooled)", np.asarray(final["confusion"]))] + [
            (s, np.asarray(final["sites"][s].get("confusion", []))) for s in sites]:
        if cm.size == 0:
            continue
        counts = cm.sum(axis=1)
        rows.append((scope, *(f"{int(c):,} ({c / max(counts.sum(), 1):.3f})" for c in counts)))
    return "<h3>Test images per true class (count and share)</h3>" + table(("scope", *map(F.pretty, names)), rows)


def _roc_section(fig: Any, scores: dict[str, Any], names: tuple[str, ...], sites: list[str]) -> str:
    confusion = fig("confusion", "Rows: true class; columns: predicted class; pooled counts over all sites' test splits.")
    roc = fig("roc", "From the score histograms the sites send (counts per score bin, never single scores); "
                     "AUC exact on the binned scores.")
    if not roc:
        return confusion + ('<p class="note">No score histograms in this run directory (runs write them to '
                            f"{RunDirectory.SCORES} since the ROC report), so no ROC.</p>")
    text = row(confusion, roc)
    if len(names) > 2:
        hists = {"global (pooled)": scores.get("global"), **{s: scores.get("sites", {}).get(s) for s in sites}}
        rows = [(F.pretty(n), *(fmt("auc", _auc(h, c)) for h in hists.values())) for c, n in enumerate(names)]
        text += "<h3>AUC per class and site</h3>" + table(("class", *hists), rows)
    return text


def _auc(hist: Any, c: int) -> float | None:
    if hist is None:
        return None
    h = np.asarray(hist)
    return auc_from_histogram(h[c, 0], h[c, 1])


def _patient_section(final: dict[str, Any], fig: Any) -> str:
    glob = final["global"]
    if glob.get("patient-recognition-rate") is None:
        return ('<p class="note">This data has no patient identifiers, so there is no patient recognition rate '
                "(BreakHis and Camelyon17 splits carry them).</p>")
    intro = (f"<p>Patient recognition rate (Spanhol et al. 2016: the mean over patients of the share of their "
             f"images classified correctly) <b>{fmt('ratio', glob['patient-recognition-rate'])}</b> over "
             f"{fmt('patients', glob.get('patients'))} patients, beside the image-level accuracy "
             f"<b>{fmt('ratio', glob.get('accuracy'))}</b>. Each site sends only sums (patients, the sum of their "
             "accuracies, a 10-bin histogram); no patient identifier leaves a site.</p>")
    return intro + fig("patients", "Patients per bin of per-patient accuracy; the last bin holds 1.0.")


def _attention(run: RunDirectory, cfg: RunConfig, names: tuple[str, ...], path: Path, kind: str, count: int = 6) -> Path | None:
    """Attention of the final global model on the first test patches of the first training site."""
    if cfg.model.architecture != "hybrid" or not run.model_file.is_file():
        return None
    from common.attention import attention_maps
    from common.datasets.registry import load_site
    from common.model import build_model_for  # the run's model (DP-compatible when privacy is on)
    from common.weights import load_weights

    model = build_model_for(cfg.model, cfg.privacy, load_pretrained=False)
    load_weights(model, run.load_model())
    try:
        split = load_site(cfg, cfg.federation.training_sites[0], "test")
    except (ValueError, OSError):  # a deployment's server holds no site's images: no attention figure
        return None
    picks = [split[i] for i in _mixed_classes(split.labels, count)]
    picks = [(img, lab) for img, lab in picks if img is not None]
    if not picks:
        return None
    images = np.stack([img for img, _ in picks])
    heat, probs = attention_maps(model, images)
    return F.plot_attention(images, [lab for _, lab in picks], heat, probs, names, path, kind)


def _mixed_classes(labels: np.ndarray, count: int) -> list[int]:
    """Up to `count` item indices taking each class in turn (the first items of a split are often one class)."""
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(int(queue.pop(0)))
    return sorted(out, key=lambda i: (labels[i], i))
