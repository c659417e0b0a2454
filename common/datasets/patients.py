"""Patients, the leakage unit of every dataset: dealing them to sites, splitting them train/val/test, subsampling.

Two split rules, for the two kinds of patient: `split_patients` for patients with one class
(BreakHis, synthetic: records carry "patient" and "binary"; a patient is malignant if any of its
images is), stratified by that class; `split_by_ratio` for patients whose patches mix both labels
(Camelyon17: records carry "patient" and a 0/1 label), balancing the label ratio across splits.
Everything is seeded (numpy Generator) and independent of record order; a patient is never in two
splits or two sites.

Small groups (per class, within one site): 1 patient → train; 2 → one to test; ≥3 → at least one
to test and, when val_fraction > 0, one to val; train always keeps one. A split that is still empty
then borrows one train patient from the largest class while train keeps at least one. A patient is
never in two splits; a site too small for a split simply has none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
_CANDIDATES = 256  # seeded patient permutations scored for label-ratio stratification
Groups = dict[int, list[str]]  # class -> patients, in seeded random order
Dealer = Callable[[Groups, int, float, np.random.Generator], list[list[str]]]


def patient_classes(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Patient id → stratification class (1 if any of its images is malignant), sorted by id."""
    out: dict[str, int] = {}
    for rec in records:
        out[rec["patient"]] = max(out.get(rec["patient"], 0), int(rec["binary"]))
    return dict(sorted(out.items()))


def shuffled_groups(classes: Mapping[str, int], rng: np.random.Generator) -> Groups:
    """Patients per class in a seeded random order (input order does not matter)."""
    groups: Groups = {}
    for patient, cls in sorted(classes.items()):
        groups.setdefault(cls, []).append(patient)
    return {cls: [groups[cls][i] for i in rng.permutation(len(groups[cls]))] for cls in sorted(groups)}


def split_patients(
    records: Iterable[Mapping[str, Any]], *, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Patient-disjoint train/val/test (sorted ids), stratified by binary class, deterministic from seed."""
    groups = shuffled_groups(patient_classes(records), np.random.default_rng([seed, 104729]))
    parts: dict[str, Groups] = {split: {} for split in SPLITS}
    for cls, patients in groups.items():
        n_val, n_test = _split_counts(len(patients), val_fraction, test_fraction)
        parts["test"][cls] = patients[:n_test]
        parts["val"][cls] = patients[n_test : n_test + n_val]
        parts["train"][cls] = patients[n_test + n_val :]
    _borrow_for_empty(parts, {"test": test_fraction, "val": val_fraction})
    return {split: sorted(p for group in parts[split].values() for p in group) for split in SPLITS}


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) patient counts for one class of n patients; train keeps at least one."""
    test = min(max(_round(n * test_fraction), int(n >= 2)), max(n - 1, 0))
    val = min(max(_round(n * val_fraction), int(n >= 3 and val_fraction > 0)), max(n - 1 - test, 0))
    return val, test


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _borrow_for_empty(parts: dict[str, Groups], fractions: Mapping[str, float]) -> None:
    train = parts["train"]
    for split, fraction in fractions.items():
        if fraction > 0 and not any(parts[split].values()) and sum(map(len, train.values())) > 1:
            cls = max(train, key=lambda c: len(train[c]))
            parts[split].setdefault(cls, []).append(train[cls].pop())


def deal(classes: Mapping[str, int], scheme: str, num_sites: int, alpha: float, seed: int) -> list[list[str]]:
    """Deal patients (never images) to num_sites sites; every site gets at least one patient."""
    if num_sites > len(classes):
        raise ValueError(
            f"num-sites ({num_sites}) exceeds the number of patients ({len(classes)}): "
            "every site needs at least one patient"
        )
    if scheme not in DEALERS:
        raise ValueError(f"unknown partition '{scheme}' (choose from {', '.join(DEALERS)})")
    rng = np.random.default_rng([seed, 2019])
    sites = DEALERS[scheme](shuffled_groups(classes, rng), num_sites, alpha, rng)
    return [sorted(site) for site in _fill_empty_sites(sites)]


def _deal_iid(groups: Groups, num_sites: int, alpha: float, rng: np.random.Generator) -> list[list[str]]:
    """Stratified round robin: classes one after another, patient k to site k mod num_sites."""
    order = [p for cls in sorted(groups) for p in groups[cls]]
    return [order[i::num_sites] for i in range(num_sites)]


def _deal_label_skew(groups: Groups, num_sites: int, alpha: float, rng: np.random.Generator) -> list[list[str]]:
    """Per class, site shares ~ Dirichlet(alpha) (Hsu et al. 2019)."""
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for cls in sorted(groups):
        patients = groups[cls]
        cuts = (np.cumsum(_dirichlet(rng, alpha, num_sites))[:-1] * len(patients)).astype(int)
        bounds = [0, *cuts.tolist(), len(patients)]
        for site, (lo, hi) in zip(sites, zip(bounds[:-1], bounds[1:])):
            site.extend(patients[lo:hi])
    return sites


def _deal_quantity_skew(groups: Groups, num_sites: int, alpha: float, rng: np.random.Generator) -> list[list[str]]:
    """Site sizes 1 + Multinomial(n - num_sites, Dirichlet(alpha)); patients in random order."""
    pooled = [p for cls in sorted(groups) for p in groups[cls]]
    order = [pooled[i] for i in rng.permutation(len(pooled))]
    sizes = 1 + rng.multinomial(len(order) - num_sites, _dirichlet(rng, alpha, num_sites))
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Dirichlet(alpha * 1_k) draw; a degenerate draw (tiny alpha underflow) becomes one-hot."""
    shares = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(shares)) or shares.sum() <= 0:
        shares = np.eye(k)[rng.integers(k)]
    return shares


def _fill_empty_sites(sites: list[list[str]]) -> list[list[str]]:
    """A site the draw left empty takes the last patient of the currently largest site."""
    for site in sites:
        if not site:
            site.append(max(sites, key=len).pop())
    return sites


def subsample(labels: Sequence[int], limit: int, rng: np.random.Generator) -> list[int]:
    """Sorted indices of at most limit items, spread over labels in proportion (systematic per label)."""
    if not limit or len(labels) <= limit:
        return list(range(len(labels)))
    arr = np.asarray(labels)
    keys = np.empty(len(arr))
    for label in np.unique(arr):
        idx = np.flatnonzero(arr == label)
        keys[idx] = (rng.permutation(len(idx)) + rng.random(len(idx))) / len(idx)
    return sorted(np.argsort(keys, kind="stable")[:limit].tolist())


DEALERS: dict[str, Dealer] = {
    "iid": _deal_iid,
    "label-skew": _deal_label_skew,
    "quantity-skew": _deal_quantity_skew,
}


def split_by_ratio(
    records: Iterable[Mapping[str, Any]], *, seed: int | Sequence[int], val_fraction: float, test_fraction: float,
    label: str = "tumor",
) -> dict[str, list[str]]:
    """Deal patients with mixed labels to train/val/test, seeded, balancing the label ratio, never overlapping."""
    positives: dict[str, list[int]] = {}
    for r in records:
        positives.setdefault(r["patient"], [0, 0])
        positives[r["patient"]][0] += int(r[label])
        positives[r["patient"]][1] += 1
    patients = sorted(positives)
    n_test, n_val = ratio_split_sizes(len(patients), val_fraction, test_fraction)
    counts = np.array([positives[p] for p in patients], dtype=np.float64).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    order = min((rng.permutation(len(patients)) for _ in range(_CANDIDATES)),
                key=lambda perm: _imbalance(counts, perm, n_test, n_val))
    bounds = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: sorted(patients[i] for i in bounds[split]) for split in SPLITS}


def ratio_split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) patient counts: test >= 1 and val >= 1 (when asked) only while train keeps >= 1."""
    if n < 2:
        return 0, 0
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    if val_fraction <= 0 or n - n_test < 2:
        return n_test, 0
    return n_test, min(max(1, round(n * val_fraction)), n - n_test - 1)


def _imbalance(counts: np.ndarray, perm: np.ndarray, n_test: int, n_val: int) -> float:
    overall = counts[:, 0].sum() / max(counts[:, 1].sum(), 1.0)
    parts = (perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:])
    ratios = [counts[p, 0].sum() / counts[p, 1].sum() for p in parts if len(p) and counts[p, 1].sum()]
    return float(sum(abs(r - overall) for r in ratios))

