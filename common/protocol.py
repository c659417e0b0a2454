"""Record keys and the count encoding that server and clients share (plain Python; no Flower import)."""

from __future__ import annotations

import numpy as np

from common.metrics import HIST_BINS, PATIENT_BINS, EvalResult

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SCAFFOLD_C = "scaffold-c"  # train message: the server control variate c (ArrayRecord, parameters only)
SCAFFOLD_DELTA = "scaffold-delta-c"  # train reply: the site's dc_i (ArrayRecord)
TIMING = "timing"  # ConfigRecord of wall-clock stamps of the message's way through the site (client.timing)
EVALUATION = "evaluation"  # MetricRecord in a train reply: the evaluation of the model the site received
FROZEN = "frozen"  # fine-tuning recipes: the frozen part of the global model, sent to sites, never sent back or averaged

# Metric / config keys
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
EVALUATE_RECEIVED = "evaluate-received"  # train config: evaluate the received model before training
PROXIMAL_MU = "proximal-mu"  # FedProx's config key (flwr.serverapp.strategy.FedProx)
SCAFFOLD_FEDERATION = "scaffold-federation"  # id of the federation the control variates belong to
SITE_NAME = "name"
DATA_KIND = "data-kind"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
CONFUSION = "confusion"
SCORE_HIST = "logit-hist"  # renamed from "score-hist" (256 linear probability bins): an older site is refused
SKIPPED = "skipped-images"
PERSONALISED = "personalised/"  # prefix of the evaluation counts of a site's personalised model (FedBN)
PATIENTS = "patients"  # patient-level sums (no identifiers): count, sum of per-patient accuracies, histogram
PATIENT_SCORE_SUM = "patient-score-sum"
PATIENT_HIST = "patient-accuracy-hist"
TRAIN_EXAMPLES = "train-examples"  # a site's training-split size, declared with its round-0 evaluation
EXPECTED_SITE = "expected-site"  # the site the node's key is registered for (sent when the server knows it)

# Markers in error text that server and site both recognise
STRICT_FAILURE = "(data.strict=true)"  # ends a ClientApp's data error in strict mode: the server fails the run
REFUSED = "histofed refused this node:"  # starts a ClientApp's identity refusal: `flower-client start` stops on it


def encode_eval(result: EvalResult, prefix: str = "") -> dict[str, int | float | list[int]]:
    """Flatten an evaluation into MetricRecord values (counts only; patient sums when the split had patients), keys prefixed."""
    out: dict[str, int | float | list[int]] = {
        prefix + EVAL_LOSS: float(result.loss),
        prefix + NUM_EXAMPLES: int(result.num_examples),
        prefix + CONFUSION: [int(v) for v in result.confusion.ravel()],
        prefix + SCORE_HIST: [int(v) for v in result.histograms.ravel()],
        prefix + SKIPPED: int(result.skipped),
    }
    if result.patients:
        hist = result.patient_hist if result.patient_hist is not None else np.zeros(PATIENT_BINS, dtype=np.int64)
        out.update({prefix + PATIENTS: int(result.patients), prefix + PATIENT_SCORE_SUM: float(result.patient_score_sum),
                    prefix + PATIENT_HIST: [int(v) for v in np.asarray(hist).ravel()]})
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


def decode_eval(metrics: dict, num_classes: int, prefix: str = "") -> EvalResult:
    """The EvalResult a site encoded with encode_eval (same prefix); malformed counts raise ValueError."""
    counts = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    confusion, hist = decode_counts(counts, num_classes)
    return EvalResult(loss=float(counts[EVAL_LOSS]), num_examples=int(counts[NUM_EXAMPLES]), confusion=confusion,
                      histograms=hist, skipped=int(counts.get(SKIPPED, 0)), **decode_patients(counts))


def decode_counts(metrics: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild the K x K confusion matrix and K x 2 x HIST_BINS logit histograms; reject malformed replies."""
    if CONFUSION not in metrics or SCORE_HIST not in metrics:
        raise ValueError(f"reply lacks '{CONFUSION}' or '{SCORE_HIST}' counts (a site running an older histofed?)")
    confusion = np.asarray(metrics[CONFUSION], dtype=np.int64)
    hist = np.asarray(metrics[SCORE_HIST], dtype=np.int64)
    if confusion.size != num_classes**2 or hist.size != num_classes * 2 * HIST_BINS:
        raise ValueError(
            f"reply counts do not fit {num_classes} classes "
            f"(confusion {confusion.size} values, histogram {hist.size}, expected {num_classes * 2 * HIST_BINS})"
        )
    if (confusion < 0).any() or (hist < 0).any():
        raise ValueError("reply counts must be non-negative")
    return confusion.reshape(num_classes, num_classes), hist.reshape(num_classes, 2, HIST_BINS)
