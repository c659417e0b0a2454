"""Record keys and the count encoding that server and clients share (plain Python; no Flower import)."""

from __future__ import annotations

import numpy as np

from common.metrics import EvalResult

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
FROZEN = "frozen"  # fine-tuning recipes: the frozen part of the global model, sent to sites, never sent back or averaged

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


def encode_eval(result: EvalResult) -> dict[str, int | float | list[int]]:
    """Flatten an evaluation into MetricRecord-compatible values (counts only)."""
    return {
        EVAL_LOSS: float(result.loss),
        NUM_EXAMPLES: int(result.num_examples),
        CONFUSION: [int(v) for v in result.confusion.ravel()],
        SCORE_HIST: [int(v) for v in result.histograms.ravel()],
        SKIPPED: int(result.skipped),
    }


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
