"""ROC points from score histograms match scikit-learn; patient recognition rate from per-site sums, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from common import protocol as P
from common.config import RunConfig
from common.datasets.splits import ArraySplit, FileSplit
from common.metrics import (
    PATIENT_BINS, EvalResult, auc_from_histogram, patient_summary, pooled_report, roc_from_histograms,
    score_histograms,
)
from common.model import build_model
from common.training import evaluate, to_input


def _scores(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_roc_points_match_sklearn_on_binned_scores(seed: int) -> None:
    y, s = _scores(seed)
    binned = np.clip((s * 32).astype(np.int64), 0, 31)  # 32 linear bins
    neg, pos = np.bincount(binned[y == 0], minlength=32), np.bincount(binned[y == 1], minlength=32)
    fpr, tpr = roc_from_histograms(neg, pos)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, binned, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.auc(sk_fpr, sk_tpr))
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc_from_histogram(neg, pos))


def test_roc_is_generic_over_any_ascending_binning() -> None:
    y, s = _scores(7)
    logit = np.log(np.clip(s, 1e-6, 1 - 1e-6) / np.clip(1 - s, 1e-6, 1))
    edges = np.sort(np.random.default_rng(1).normal(0, 2, 40))  # uneven bins, in ascending score order
    which = np.searchsorted(edges, logit)
    neg = np.bincount(which[y == 0], minlength=edges.size + 1)
    pos = np.bincount(which[y == 1], minlength=edges.size + 1)
    fpr, tpr = roc_from_histograms(neg, pos)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, which, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_one_tie_bin_is_one_straight_segment_and_empty_sides_are_nan() -> None:
    fpr, tpr = roc_from_histograms(np.array([0, 5, 0]), np.array([0, 3, 0]))
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    fpr, tpr = roc_from_histograms(np.array([0, 0]), np.array([2, 1]))
    assert np.isnan(fpr).all() and tpr[-1] == 1.0


def test_patient_summary_is_the_mean_of_per_patient_accuracies() -> None:
    patients = np.array(["a"] * 10 + ["b"] * 4 + ["c"] * 2)
    correct = np.array([1] * 3 + [0] * 7 + [1, 1, 1, 0] + [1, 1], dtype=bool)
    count, score_sum, hist = patient_summary(patients, correct)
    assert count == 3 and score_sum == pytest.approx(0.3 + 0.75 + 1.0)
    assert hist.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1]  # 3/10 is bin 3 exactly, 1.0 the last bin
    assert patient_summary(np.array([], dtype=str), np.array([], dtype=bool))[0] == 0


def test_pooled_rate_weights_patients_not_images_nor_sites() -> None:
    rng = np.random.default_rng(0)
    sites, every = {}, []
    for name, n_patients in (("a", 2), ("b", 6)):
        patients = rng.integers(0, n_patients, 60).astype(str)
        correct = rng.random(60) < 0.7
        every += [correct[patients == p].mean() for p in np.unique(patients)]
        count, score_sum, hist = patient_summary(patients, correct)
        y = rng.integers(0, 2, 60)
        cm = np.bincount(y * 2 + (y ^ ~correct), minlength=4).reshape(2, 2)
        result = EvalResult(0.1, 60, cm, score_histograms(y, rng.normal(size=(60, 2))), 0, count, score_sum, hist)
        wire = P.encode_eval(result)  # what leaves the site: three numbers and ten counts, no identifier
        assert not any(isinstance(v, str) for v in wire.values())
        sites[name] = EvalResult(0.1, 60, cm, result.histograms, 0, **P.decode_patients(wire))
    report = pooled_report(sites)
    assert report["global"]["patient-recognition-rate"] == pytest.approx(np.mean(every))
    assert report["global"]["patients"] == 8 and len(report["sites"]["b"]["patient-accuracy-hist"]) == PATIENT_BINS
    site_mean = np.mean([report["sites"][s]["patient-recognition-rate"] for s in "ab"])
    assert report["global"]["patient-recognition-rate"] != pytest.approx(site_mean)


def test_inconsistent_patient_sums_are_rejected() -> None:
    good = {P.PATIENTS: 2, P.PATIENT_SCORE_SUM: 1.5, P.PATIENT_HIST: [0] * 5 + [1] + [0] * 3 + [1]}
    assert P.decode_patients(good)["patients"] == 2 and P.decode_patients({}) == {}
    for bad in ({P.PATIENT_SCORE_SUM: 2.5}, {P.PATIENT_HIST: [1] * 10}, {P.PATIENT_HIST: [2]}):
        with pytest.raises(ValueError, match="patient sums"):
            P.decode_patients({**good, **bad})


def test_evaluate_returns_patient_sums_of_the_images_it_read(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 12)
    patients = [f"p{i % 5}" for i in range(12)]
    result = evaluate(model, ArraySplit(images, labels, patients=patients), torch.device("cpu"), batch_size=5)
    with torch.no_grad():
        correct = model(to_input(images, torch.device("cpu"))).argmax(1).numpy() == labels
    expected = patient_summary(np.array(patients), correct)
    assert (result.patients, result.patient_hist.tolist()) == (5, expected[2].tolist())
    assert result.patient_score_sum == pytest.approx(expected[1])
    # an unreadable image is not counted; a patient whose only image is unreadable is no patient
    for i, img in enumerate(images[:3]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not a png")
    files = FileSplit(tmp_path, [f"{i}.png" for i in range(4)], labels[:4], 32, patients=["x", "x", "y", "z"])
    read = evaluate(model, files, torch.device("cpu"), batch_size=2)
    assert read.skipped == 1 and read.patients == 2
    assert evaluate(model, ArraySplit(images, labels), torch.device("cpu")).patients == 0  # no identifiers
