"""The per-site AUC summary (logit histograms): pooled AUC within 0.005 of scikit-learn's exact AUC, ROC from counts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MetricRecord
from flwr.common.serde import metric_record_to_proto
from sklearn import metrics as skm

from common import protocol as P
from common.metrics import (
    HIST_BINS, auc_from_histogram, bin_edges, compute_metrics, confusion_matrix, one_vs_rest_logits, roc_from_histograms,
    score_histograms,
)
from common.metrics import EvalResult

TOLERANCE = 0.005  # issue 13: pooled AUC within 0.005 of exact


def _binary_logits(log_odds: np.ndarray) -> np.ndarray:
    """Two-class logits whose class-1 log-odds are the given values."""
    return np.stack([np.zeros_like(log_odds), log_odds], axis=1)


def _auc(y: np.ndarray, logits: np.ndarray, c: int = 1) -> float:
    hist = score_histograms(y, logits)
    return auc_from_histogram(hist[c, 0], hist[c, 1])


def test_separable_confident_scores_give_auc_one_not_one_half() -> None:
    # The case the old 256 linear probability bins got wrong: every score in [0.996, 0.9999], perfectly separated.
    rng = np.random.default_rng(0)
    p = np.sort(rng.uniform(0.996, 0.9999, 400))
    y = (np.arange(400) >= 200).astype(int)
    logits = _binary_logits(np.log(p) - np.log1p(-p))
    assert skm.roc_auc_score(y, p) == 1.0
    assert _auc(y, logits) == pytest.approx(1.0, abs=TOLERANCE)


def test_saturated_softmax_is_still_ranked() -> None:
    # float32 softmax is exactly 1.0 for both examples; their logits still order them.
    logits = np.array([[0.0, 40.0], [0.0, 45.0], [0.0, 60.0], [0.0, 80.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    import torch

    assert (torch.softmax(torch.from_numpy(logits), 1)[:, 1] == 1.0).all()
    assert _auc(y, logits) == pytest.approx(skm.roc_auc_score(y, logits[:, 1]))  # 0.75, not 0.5


@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0, 20.0, 100.0])
@pytest.mark.parametrize("signal", [0.0, 0.5, 3.0])  # random, overlapping, nearly separable
def test_binary_auc_within_tolerance_from_unconfident_to_saturated(scale: float, signal: float) -> None:
    rng = np.random.default_rng(int(scale * 10 + signal))
    y = rng.integers(0, 2, 1500)
    log_odds = scale * (rng.normal(size=1500) + signal * y)
    exact = skm.roc_auc_score(y, log_odds)
    assert _auc(y, _binary_logits(log_odds)) == pytest.approx(exact, abs=TOLERANCE)


@pytest.mark.parametrize("scale", [0.3, 2.0, 15.0, 60.0])
def test_eight_class_per_class_and_macro_auc_within_tolerance(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 7))
    n = 2000
    y = rng.integers(0, 8, n)
    logits = scale * rng.normal(size=(n, 8))
    logits[np.arange(n), y] += scale * 0.8
    ours = compute_metrics(confusion_matrix(y, logits.argmax(1), 8), score_histograms(y, logits))
    z = one_vs_rest_logits(logits)  # exact one-vs-rest scores: log p_k - log(1 - p_k), monotone in p_k
    exact = [skm.roc_auc_score(y == c, z[:, c]) for c in range(8)]
    for c in range(8):
        assert ours[f"auc/{c}"] == pytest.approx(exact[c], abs=TOLERANCE)
    assert ours["auc"] == pytest.approx(np.mean(exact), abs=TOLERANCE)  # macro one-vs-rest


def test_one_vs_rest_log_odds_equal_the_probability_definition() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 8)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(one_vs_rest_logits(logits), np.log(p) - np.log1p(-p), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(one_vs_rest_logits(np.array([[1.0, 3.5]])), [[-2.5, 2.5]])


def test_pooled_histograms_of_sites_give_the_union_auc() -> None:
    rng = np.random.default_rng(4)
    sites = []
    for shift in (0.0, 4.0, 9.0):  # confident at different levels per hospital
        y = rng.integers(0, 2, 300)
        sites.append((y, _binary_logits(shift + 3 * rng.normal(size=300) + 2 * y)))
    pooled = sum(score_histograms(y, lg) for y, lg in sites)
    y_all = np.concatenate([y for y, _ in sites])
    s_all = np.concatenate([lg[:, 1] for _, lg in sites])
    assert auc_from_histogram(pooled[1, 0], pooled[1, 1]) == pytest.approx(skm.roc_auc_score(y_all, s_all), abs=TOLERANCE)


def test_roc_from_histograms_matches_sklearn_curve_and_area() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 800)
    log_odds = 4 * rng.normal(size=800) + 3 * y
    hist = score_histograms(y, _binary_logits(log_odds))
    fpr, tpr = roc_from_histograms(hist[1, 0], hist[1, 1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc_from_histogram(hist[1, 0], hist[1, 1]), abs=1e-12)
    # every point is a point of the exact ROC curve: thresholds at bin edges lose no count
    exact = {(0.0, 0.0)} | {(float(np.mean(log_odds[y == 0] >= e)), float(np.mean(log_odds[y == 1] >= e)))
                            for e in bin_edges()}
    assert all((float(f), float(t)) in exact for f, t in zip(fpr, tpr))
    assert len(fpr) > 50  # the curve has its shape, not a few steps
    assert np.isnan(roc_from_histograms(np.zeros(HIST_BINS), hist[1, 1])[0]).all()


@pytest.mark.parametrize("num_classes", [2, 8])
def test_evaluation_message_stays_small(num_classes: int) -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, num_classes, 500)
    logits = 10 * rng.normal(size=(500, num_classes))
    result = EvalResult(0.3, 500, confusion_matrix(y, logits.argmax(1), num_classes), score_histograms(y, logits))
    size = len(metric_record_to_proto(MetricRecord(P.encode_eval(result))).SerializeToString())
    # dense counts as packed varints: ~1 byte per bin (K x 2 x 2,050 bins), ~8 KB binary, ~33 KB 8-class
    assert size < 1.1 * num_classes * 2 * HIST_BINS + 1000


def test_evaluate_sends_logit_counts_of_a_confident_model() -> None:
    import torch
    from torch import nn

    from common.datasets.splits import ArraySplit
    from common.training import evaluate

    class Confident(nn.Module):
        """Class-1 logit 30 + 5 x (mean pixel): softmax is 1.0 for every image, the logits still rank them."""

        num_classes = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            score = 30 + 5 * x.mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(score), score], dim=1)

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 64)
    images = (rng.integers(0, 120, (64, 8, 8, 3)) + 100 * labels[:, None, None, None]).astype(np.uint8)
    result = evaluate(Confident(), ArraySplit(images, labels), torch.device("cpu"), num_workers=0, channels_last=False)
    assert result.histograms.shape == (2, 2, HIST_BINS) and result.histograms.sum() == 2 * 64
    auc = compute_metrics(result.confusion, result.histograms)["auc"]
    assert auc == pytest.approx(skm.roc_auc_score(labels, images.mean(axis=(1, 2, 3))), abs=TOLERANCE)
    assert auc > 0.9  # the old probability bins put every image in the top bin: AUC 0.5
