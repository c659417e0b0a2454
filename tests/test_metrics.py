"""Metrics from pooled counts agree with scikit-learn; pooling is not averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from common import protocol as P
from common.metrics import (
    HIST_BINS, EvalResult, compute_metrics, confusion_matrix, logit_bins, one_vs_rest_logits, score_histograms,
)


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    raw = rng.random((n, k)) + 1e-3
    return raw / raw.sum(axis=1, keepdims=True)


def _ours(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Metrics of probabilities p, sent as logits log p (softmax(log p) = p)."""
    k = p.shape[1]
    return compute_metrics(confusion_matrix(y, p.argmax(1), k), score_histograms(y, np.log(p)))


def _binned(p: np.ndarray, c: int) -> np.ndarray:
    """The histogram bin of every example's class-c score: what the server sees."""
    return logit_bins(one_vs_rest_logits(np.log(p))[:, c])


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = _probs(rng, 300, 2)
    pred = p.argmax(1)
    ours = _ours(y, p)
    assert ours["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert ours["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    assert ours["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0, zero_division=0))
    assert ours["iou"] == pytest.approx(skm.jaccard_score(y, pred, zero_division=0))
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    # AUC is exact on the binned scores and close to the unbinned value
    assert ours["auc"] == pytest.approx(skm.roc_auc_score(y, _binned(p, 1)))
    assert ours["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=0.005)


@pytest.mark.parametrize("seed", range(3))
def test_eight_class_macro_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, 500)
    p = _probs(rng, 500, 8)
    pred = p.argmax(1)
    ours = _ours(y, p)
    labels = list(range(8))
    kw = {"labels": labels, "zero_division": 0}
    assert ours["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", **kw))
    assert ours["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro", **kw))
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", **kw))
    assert ours["iou"] == pytest.approx(skm.jaccard_score(y, pred, average="macro", **kw))
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    per_recall = skm.recall_score(y, pred, average=None, **kw)
    for c in labels:
        assert ours[f"recall/{c}"] == pytest.approx(per_recall[c])
        assert ours[f"auc/{c}"] == pytest.approx(skm.roc_auc_score(y == c, _binned(p, c)))
    spec = [skm.recall_score(y != c, pred != c, zero_division=0) for c in labels]
    assert ours["specificity"] == pytest.approx(np.mean(spec))
    assert ours["auc"] == pytest.approx(np.mean([ours[f"auc/{c}"] for c in labels]))


def test_no_positives_gives_defined_values() -> None:
    y = np.zeros(20, dtype=int)
    p = np.tile([0.3, 0.7], (20, 1))  # all predicted malignant, none are
    ours = _ours(y, p)
    pred = p.argmax(1)
    assert ours["precision"] == skm.precision_score(y, pred, zero_division=0) == 0.0
    assert ours["recall"] == 0.0 and ours["f1"] == 0.0 and ours["iou"] == 0.0
    assert ours["specificity"] == 0.0 and ours["accuracy"] == 0.0
    assert math.isnan(ours["auc"])  # undefined without positives, reported as NaN (null in JSON)


def test_one_class_only_and_perfect() -> None:
    y = np.ones(10, dtype=int)
    p = np.tile([0.1, 0.9], (10, 1))
    ours = _ours(y, p)
    assert ours["precision"] == ours["recall"] == ours["f1"] == ours["iou"] == ours["accuracy"] == 1.0
    assert ours["specificity"] == 0.0


def test_empty_counts_do_not_crash() -> None:
    ours = compute_metrics(np.zeros((2, 2), dtype=int), np.zeros((2, 2, HIST_BINS), dtype=int))
    assert ours["accuracy"] == 0.0 and ours["support"] == 0.0 and math.isnan(ours["auc"])


def test_pooled_counts_differ_from_averaged_ratios_and_server_uses_pooled() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from server.rounds import pool_replies

    # Site A: 10 images, precision 1/2; site B: 1000 images, precision 900/1000.
    cm_a = np.array([[4, 1], [4, 1]])
    cm_b = np.array([[0, 100], [0, 900]])
    records = []
    for name, cm in (("a", cm_a), ("b", cm_b)):
        n = int(cm.sum())
        y = np.repeat([0, 0, 1, 1], [cm[0, 0], cm[0, 1], cm[1, 0], cm[1, 1]])
        p = np.repeat(np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]]),
                      [cm[0, 0], cm[0, 1], cm[1, 0], cm[1, 1]], axis=0)
        result = EvalResult(loss=0.5, num_examples=n, confusion=cm, histograms=score_histograms(y, np.log(p)))
        records.append(RecordDict({P.METRICS: MetricRecord(P.encode_eval(result)),
                                   P.SITE: ConfigRecord({P.SITE_NAME: name})}))
    report = pool_replies(records, num_classes=2)
    averaged = (compute_metrics(cm_a)["precision"] + compute_metrics(cm_b)["precision"]) / 2
    pooled = compute_metrics(cm_a + cm_b)["precision"]
    assert averaged == pytest.approx(0.7) and pooled == pytest.approx(901 / 1002)
    assert report["global"]["precision"] == pytest.approx(pooled)
    assert report["global"]["precision"] != pytest.approx(averaged)
    assert report["sites"]["a"]["precision"] == pytest.approx(0.5)
    assert report["confusion"] == (cm_a + cm_b).tolist()


def test_malformed_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        P.decode_counts({P.CONFUSION: [1, 2, 3], P.SCORE_HIST: [0] * 4}, num_classes=2)
    with pytest.raises(ValueError, match="do not fit"):  # the old 256-bin encoding, or any other bin count
        P.decode_counts({P.CONFUSION: [1, 2, 3, 4], P.SCORE_HIST: [0] * (2 * 2 * 256)}, num_classes=2)
    with pytest.raises(ValueError, match="non-negative"):
        P.decode_counts({P.CONFUSION: [1, -2, 3, 4], P.SCORE_HIST: [0] * (2 * 2 * HIST_BINS)}, num_classes=2)
    with pytest.raises(ValueError, match="older histofed"):
        P.decode_counts({P.CONFUSION: [1, 2, 3, 4], "score-hist": [0] * 1024}, num_classes=2)
