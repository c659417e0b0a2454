"""Classification metrics from pooled confusion counts and logit histograms (sum over sites, never average ratios).

Sites send counts, not ratios: a K x K confusion matrix (rows true, columns predicted) and, for
AUC, per-class histograms of the one-vs-rest log-odds of positives and negatives. Counts add up
exactly across hospitals, so global metrics equal those on the union of all test sets (with
scores binned for AUC; see `logit_bins`). Undefined ratios (0/0) are 0, as scikit-learn's
`zero_division=0`; AUC is NaN when a class has no positives or no negatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# The AUC score summary. Scores are one-vs-rest log-odds z_k = log p_k - log(1 - p_k), computed from the
# logits (never from rounded probabilities: softmax saturates at exactly 0/1 for confident models). Bins are
# uniform in asinh(z): ~0.01 wide around z = 0, 0.7 % of |z| in the tails, covering |z| <= 1e4, plus an
# underflow and an overflow bin. tests/test_metrics.py holds it within 0.005 of scikit-learn's exact AUC on
# confident, separable and random sets (binary, 8-class macro and per class).
LOGIT_BINS = 2048  # interior bins
LOGIT_LIMIT = 1e4  # |log-odds| covered by the interior bins
HIST_BINS = LOGIT_BINS + 2  # + underflow (index 0) and overflow (index -1)
_ASINH_LIMIT = float(np.arcsinh(LOGIT_LIMIT))
PATIENT_BINS = 10  # per-patient accuracy histogram: [0, 0.1), ..., [0.9, 1.0]
METRIC_NAMES = ("precision", "recall", "f1", "specificity", "iou", "accuracy", "auc")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K int64 counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def one_vs_rest_logits(logits: np.ndarray) -> np.ndarray:
    """N x K log-odds log p_k - log(1 - p_k) = l_k - logsumexp_{j != k} l_j, in float64 (stable for any logits)."""
    z = np.asarray(logits, dtype=np.float64)
    k = z.shape[1]
    others = np.where(np.eye(k, dtype=bool)[None], -np.inf, z[:, None, :])  # N x K x K, row k without class k
    top = others.max(axis=2, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    lse = top[..., 0] + np.log(np.exp(others - top).sum(axis=2))
    return z - lse


def logit_bins(log_odds: np.ndarray) -> np.ndarray:
    """Histogram bin of each log-odds value (0 = underflow, HIST_BINS - 1 = overflow); monotone in the score."""
    z = np.nan_to_num(np.asarray(log_odds, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)  # NaN: middle
    u = (np.arcsinh(z) + _ASINH_LIMIT) / (2 * _ASINH_LIMIT) * LOGIT_BINS
    return np.clip(np.floor(u), -1, LOGIT_BINS).astype(np.int64) + 1


def bin_edges() -> np.ndarray:
    """The LOGIT_BINS + 1 log-odds edges of the interior bins (bin i + 1 holds edges[i] <= z < edges[i + 1])."""
    return np.sinh(np.linspace(-_ASINH_LIMIT, _ASINH_LIMIT, LOGIT_BINS + 1))


def score_histograms(y_true: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """K x 2 x HIST_BINS counts of one-vs-rest log-odds: [k, 1] positives of class k, [k, 0] negatives."""
    y_true = np.asarray(y_true, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    num_classes = logits.shape[1]
    out = np.zeros((num_classes, 2, HIST_BINS), dtype=np.int64)
    if not len(y_true):
        return out
    bins = logit_bins(one_vs_rest_logits(logits))
    for k in range(num_classes):
        pos = y_true == k
        out[k, 1] = np.bincount(bins[pos, k], minlength=HIST_BINS)
        out[k, 0] = np.bincount(bins[~pos, k], minlength=HIST_BINS)
    return out


def auc_from_histogram(neg: np.ndarray, pos: np.ndarray) -> float:
    """ROC-AUC = P(score_pos > score_neg) + ½ P(tie) over binned scores; NaN if a side is empty."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])  # negatives in strictly lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def roc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr) from binned scores, bins in ascending score order (any binning).

    The threshold sweeps from the top bin down; a bin's negatives and positives enter together, so
    tied scores give one straight segment (scikit-learn's roc_curve with drop_intermediate=False on the
    binned scores). Starts at (0, 0), ends at (1, 1); empty bins add no point. A side without samples is NaN.
    """
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    keep = (neg + pos)[::-1] > 0
    cum_neg = np.concatenate([[0.0], np.cumsum(neg[::-1])[keep]])
    cum_pos = np.concatenate([[0.0], np.cumsum(pos[::-1])[keep]])
    n_neg, n_pos = neg.sum(), pos.sum()
    fpr = cum_neg / n_neg if n_neg > 0 else np.full_like(cum_neg, np.nan)
    tpr = cum_pos / n_pos if n_pos > 0 else np.full_like(cum_pos, np.nan)
    return fpr, tpr


def patient_summary(patients: np.ndarray, correct: np.ndarray, bins: int = PATIENT_BINS) -> tuple[int, float, np.ndarray]:
    """Per-patient sums of one site: (patients, sum over patients of their share of correct images, histogram).

    The patient recognition rate (Spanhol et al. 2016) is the sum divided by the patients, pooled over
    sites; only these counts leave a site, never a patient identifier. The histogram counts patients per
    accuracy bin [i/bins, (i+1)/bins), the last bin closed (accuracy 1.0).
    """
    ids, inverse = np.unique(np.asarray(patients), return_inverse=True)
    if ids.size == 0:
        return 0, 0.0, np.zeros(bins, dtype=np.int64)
    images = np.bincount(inverse)
    right = np.bincount(inverse, weights=np.asarray(correct, dtype=np.int64)).astype(np.int64)
    which = np.minimum(right * bins // images, bins - 1)  # integer arithmetic: 3/10 lands in bin 3, not 2
    return int(ids.size), float((right / images).sum()), np.bincount(which, minlength=bins).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest precision, recall, F1, specificity and IoU (Jaccard) for every class."""
    cm = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "specificity": _ratio(tn, tn + fp),
        "iou": _ratio(tp, tp + fp + fn),
        "support": tp + fn,
    }


def compute_metrics(confusion: np.ndarray, histograms: np.ndarray | None = None) -> dict[str, float]:
    """Global metrics: positive class 1 for 2 classes; macro one-vs-rest averages for more.

    With more than two classes the result also holds '<metric>/<class index>' entries.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    k = cm.shape[0]
    total = cm.sum()
    pc = per_class(cm)
    aucs = (
        np.array([auc_from_histogram(histograms[c, 0], histograms[c, 1]) for c in range(k)])
        if histograms is not None
        else np.full(k, np.nan)
    )
    out: dict[str, float] = {"accuracy": float(np.trace(cm) / total) if total else 0.0}
    if k == 2:
        out.update({name: float(pc[name][1]) for name in ("precision", "recall", "f1", "specificity", "iou")})
        out["auc"] = float(aucs[1])
    else:
        out.update({name: float(pc[name].mean()) for name in ("precision", "recall", "f1", "specificity", "iou")})
        defined = aucs[~np.isnan(aucs)]
        out["auc"] = float(defined.mean()) if defined.size else float("nan")
        for name in ("precision", "recall", "f1", "specificity", "iou"):
            out.update({f"{name}/{c}": float(pc[name][c]) for c in range(k)})
        out.update({f"auc/{c}": float(aucs[c]) for c in range(k)})
    out["support"] = float(total)
    return out


@dataclass(frozen=True)
class EvalResult:
    """What one site contributes to pooled metrics: loss, confusion counts and score histograms (never ratios)."""

    loss: float
    num_examples: int
    confusion: np.ndarray  # K x K
    histograms: np.ndarray  # K x 2 x bins
    skipped: int = 0
    patients: int = 0  # patient-level sums (patient_summary); 0 when the split has no patient identifiers
    patient_score_sum: float = 0.0
    patient_hist: np.ndarray | None = None  # PATIENT_BINS counts of per-patient accuracy


def pooled_report(per_site: Mapping[str, EvalResult]) -> dict[str, Any]:
    """Global metrics from counts SUMMED over sites (never averaged ratios), plus each site's own.

    Sites also keep their confusion counts; with patient identifiers, global and site records gain the
    patient recognition rate and `patients`, and each site its per-patient accuracy histogram.
    """
    sites: dict[str, Any] = {}
    total_cm = total_hist = None
    loss_sum, n_sum, patients, patient_sum = 0.0, 0, 0, 0.0
    for name, counts in per_site.items():
        sites[name] = {**compute_metrics(counts.confusion, counts.histograms), "loss": float(counts.loss),
                       "skipped-images": int(counts.skipped), "confusion": np.asarray(counts.confusion).tolist(),
                       **_patient_fields(counts)}
        patients += counts.patients
        patient_sum += counts.patient_score_sum
        total_cm = counts.confusion if total_cm is None else total_cm + counts.confusion
        total_hist = counts.histograms if total_hist is None else total_hist + counts.histograms
        loss_sum += float(counts.loss) * counts.num_examples
        n_sum += counts.num_examples
    if total_cm is None:
        raise ValueError("no site results to pool")
    glob = {**compute_metrics(total_cm, total_hist), "loss": loss_sum / max(n_sum, 1)}
    if patients:
        glob.update({"patient-recognition-rate": patient_sum / patients, "patients": patients})
    return {"global": glob, "sites": sites, "confusion": np.asarray(total_cm).tolist()}


def _patient_fields(counts: EvalResult) -> dict[str, Any]:
    if not counts.patients:
        return {}
    hist = counts.patient_hist if counts.patient_hist is not None else np.zeros(PATIENT_BINS, dtype=np.int64)
    return {"patient-recognition-rate": counts.patient_score_sum / counts.patients, "patients": int(counts.patients),
            "patient-accuracy-hist": np.asarray(hist).tolist()}


def pooled_scores(per_site: Mapping[str, EvalResult]) -> dict[str, Any]:
    """The score histograms of a round (K x 2 x bins, ascending score order): summed over sites, and each site's."""
    sites = {name: np.asarray(counts.histograms) for name, counts in per_site.items()}
    total = sum(sites.values()) if sites else np.zeros((0, 2, 0), dtype=np.int64)
    return {"global": np.asarray(total).tolist(), "sites": {name: h.tolist() for name, h in sites.items()}}
