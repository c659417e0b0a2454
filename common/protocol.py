"""Record keys and the count encoding that server and clients share (plain Python; no Flower import)."""

from __future__ import annotations

import numpy as np

from common.metrics import PATIENT_BINS, EvalResult

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# Metric / config keys
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # FedProx's config key (flwr.serverapp.strategy.FedProx)
SITE_NAME = "name"
DATA_KIND = "data-kind"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
CONFUSION = "confusion"
SCORE_HIST = "score-hist"
SKIPPED = "skipped-images"
PATIENTS = "patients"  # patient-level sums (no identifiers): count, sum of per-patient accuracies, histogram
PATIENT_SCORE_SUM = "patient-score-sum"
PATIENT_HIST = "patient-accuracy-hist"


def encode_eval(result: EvalResult) -> dict[str, int | float | list[int]]:
    """Flatten an evaluation into MetricRecord-compatible values (counts only; patient sums when the split had patients)."""
    out: dict[str, int | float | list[int]] = {
        EVAL_LOSS: float(result.loss),
        NUM_EXAMPLES: int(result.num_examples),
        CONFUSION: [int(v) for v in result.confusion.ravel()],
        SCORE_HIST: [int(v) for v in result.histograms.ravel()],
        SKIPPED: int(result.skipped),
    }
    if result.patients:
        hist = result.patient_hist if result.patient_hist is not None else np.zeros(PATIENT_BINS, dtype=np.int64)
        out.update({PATIENTS: int(result.patients), PATIENT_SCORE_SUM: float(result.patient_score_sum),
                    PATIENT_HIST: [int(v) for v in np.asarray(hist).ravel()]})
    return out


def decode_patients(metrics: dict) -> dict[str, int | float | np.ndarray]:
    """EvalResult's patient fields from a reply ({} when it has none); reject sums that cannot be."""
    if PATIENTS not in metrics:
        return {}
    count, score_sum = int(metrics[PATIENTS]), float(metrics[PATIENT_SCORE_SUM])
    hist = np.asarray(metrics.get(PATIENT_HIST, []), dtype=np.int64)
    if count < 0 or not 0.0 <= score_sum <= count + 1e-6 or hist.size != PATIENT_BINS or (hist < 0).any() \
            or int(hist.sum()) != count:
        raise ValueError(f"reply patient sums are inconsistent ({count} patients, score sum {score_sum}, "
                         f"histogram of {hist.size} bins summing to {int(hist.sum())})")
    return {"patients": count, "patient_score_sum": score_sum, "patient_hist": hist}


def decode_counts(metrics: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild the K x K confusion matrix and K x 2 x bins histograms; reject malformed replies."""
    confusion = np.asarray(metrics[CONFUSION], dtype=np.int64)
    hist = np.asarray(metrics[SCORE_HIST], dtype=np.int64)
    if confusion.size != num_classes**2 or hist.size % (2 * num_classes):
        raise ValueError(
            f"reply counts do not fit {num_classes} classes "
            f"(confusion {confusion.size} values, histogram {hist.size})"
        )
    if (confusion < 0).any() or (hist < 0).any():
        raise ValueError("reply counts must be non-negative")
    return confusion.reshape(num_classes, num_classes), hist.reshape(num_classes, 2, -1)
