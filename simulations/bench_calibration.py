"""Calibration benchmark of the synthetic H&E generator: can trivial baselines solve it, does a model learn it, do leakage and shift show?

SYNTHETIC data. Prints one table (figure, measured, target, whether it holds) and writes JSON with
--out. Not a timed test; `--size tiny` runs in seconds (tests/test_bench_calibration.py).

    python -m simulations.bench_calibration --size default --out calibration-default.json
    python -m simulations.bench_calibration --size large --out calibration-large.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from simulations import calibration
from simulations.figures import emit
from simulations.scenarios import DEFAULT_SCENARIO, get_scenario

BASELINES = ("alexnet", "densenet121", "mobilenetv3", "efficientnet_b0")
_TINY_MODEL = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8,
               "model.hidden-size": 8, "train.batch-size": 8}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"overrides": {**_TINY_MODEL, "federation.num-sites": 2, "data.patients-per-site": 8,
                           "data.train-per-site": 24, "data.test-per-site": 12},
             "epochs": 1, "baseline-epochs": 0},
    # synthetic-3sites' data and training settings, the learning rate decayed (cosine) over the whole budget
    "default": {"overrides": {"train.lr-schedule": "cosine"}, "epochs": 24, "baseline-epochs": 10},
    "large": {"overrides": {"train.lr-schedule": "cosine", "data.patients-per-site": 120, "data.train-per-site": 1200,
                            "data.test-per-site": 600}, "epochs": 12, "baseline-epochs": 6},  # 3x the patches per epoch
}
TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "binary": ("<= 0.65", lambda v: v <= 0.65),
    "8-class": ("<= 0.35", lambda v: v <= 0.35),
    "untrained-auc": ("<= 0.65", lambda v: v <= 0.65),
    "trained": ("0.85 - 0.95", lambda v: 0.85 <= v <= 0.95),
    "leakage": (">= 2 pt", lambda v: v >= 2.0),
    "shift": ("5 - 20 pt", lambda v: 5.0 <= v <= 20.0),
}


def size_config(size: str, epochs: int | None = None, seed: int = 0) -> tuple[RunConfig, int]:
    """The default scenario with the size's overrides, federation.rounds = the hybrid's epochs; and those epochs.

    `seed` sets both data.seed (other patients, labs and patches) and train.seed (initial weights, shuffling).
    """
    spec = SIZES[size]
    epochs = spec["epochs"] if epochs is None else epochs
    cfg = get_scenario(DEFAULT_SCENARIO).config().override(
        {**spec["overrides"], "federation.rounds": epochs, "data.seed": seed, "train.seed": seed})
    return cfg, epochs


def run(size: str, *, epochs: int | None = None, baseline_epochs: int | None = None,
        baselines: tuple[str, ...] = BASELINES, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every calibration figure at one size; returns {figures, targets, holds, ...}."""
    cfg, epochs = size_config(size, epochs, seed)
    baseline_epochs = SIZES[size]["baseline-epochs"] if baseline_epochs is None else baseline_epochs
    middle = cfg.federation.num_sites // 2  # the outlier hospital: the one with a balanced case mix
    figures: dict[str, float] = {}
    checks: dict[str, str] = {}
    start = time.perf_counter()

    def put(name: str, value: float, target: str) -> None:
        figures[name] = value
        checks[name] = target
        log(f"  {name}: {value}  ({time.perf_counter() - start:.0f} s)")

    for feature, scores in calibration.trivial_baselines(cfg).items():
        put(f"logistic on {feature}: pooled test accuracy", round(scores["pooled"], 3), "binary")
        put(f"logistic on {feature}: unseen hospital (leave one out) accuracy", round(scores["unseen-hospital"], 3), "binary")
        put(f"logistic on {feature}: pooled 8-class accuracy", round(scores["pooled-8-class"], 3), "8-class")
    put("untrained hybrid: pooled test AUC", calibration.untrained(cfg)["auc"], "untrained-auc")
    model = calibration.fit(cfg)
    hybrid = calibration.trained(cfg, model=model)
    put(f"hybrid, {epochs} epochs: pooled test accuracy", hybrid["accuracy"], "trained")
    put(f"hybrid, {epochs} epochs: pooled test AUC", hybrid["auc"], "")
    leak = calibration.leakage(cfg, model)
    put("leakage, scored on half of each test patient's patches: patient-level split accuracy", leak["patient-level"], "")
    put("leakage: patch-level split (the other half of those patients' patches in training) accuracy", leak["patch-level"], "")
    put("leakage: patch-level minus patient-level split (pt)", leak["leakage-pt"], "leakage")
    shift = calibration.hospital_shift(cfg, middle)
    put(f"hospital {middle} an outlier lab, trained on the others: in-distribution accuracy", shift["in-distribution"], "")
    put(f"hospital {middle} an outlier lab: its accuracy", shift["outlier-hospital"], "")
    put("hospital shift: accuracy drop on the outlier lab (pt)", shift["drop-pt"], "shift")
    if baseline_epochs > 0:
        for arch in baselines:
            arch_cfg = cfg.override({"model.architecture": arch, "federation.rounds": baseline_epochs})
            put(f"{arch}, {baseline_epochs} epochs: pooled test accuracy", calibration.trained(arch_cfg)["accuracy"], "")
    holds = {name: TARGETS[t][1](figures[name]) for name, t in checks.items() if t}
    return {"size": size, "seed": seed, "data-kind": "synthetic", "epochs": epochs, "baseline-epochs": baseline_epochs,
            "overrides": SIZES[size]["overrides"], "figures": figures,
            "targets": {name: TARGETS[t][0] for name, t in checks.items() if t}, "holds": holds,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the calibration at one size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--epochs", type=int, default=None, help="hybrid training epochs (default: the size's)")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="epochs of each paper baseline (0 = skip)")
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument("--seed", type=int, default=0, help="data.seed and train.seed (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.size, epochs=args.epochs, baseline_epochs=args.baseline_epochs,
                 baselines=tuple(b for b in args.baselines.split(",") if b), seed=args.seed)
    rows = [("SYNTHETIC data, size", f"{args.size}, seed {args.seed} ({result['seconds']} s)")]
    for name, value in result["figures"].items():
        target = result["targets"].get(name)
        verdict = "" if target is None else f"   target {target}: {'holds' if result['holds'][name] else 'MISSED'}"
        rows.append((name, f"{value}{verdict}"))
    return emit(rows, result, args.out)


if __name__ == "__main__":
    main()
