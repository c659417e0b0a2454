"""Benchmark of differential privacy: DP-SGD img/s ÷ normal img/s (fast vs stock grouped-conv sampler), accuracy at ε = 8 and 3.

Usage: python -m simulations.bench_dp [--tiny] [--no-accuracy] [--threads N] [--out FILE.json]

(a) Throughput, in one process on a fixed random batch, variants interleaved (A B C A B C ...) so
    machine noise hits them alike: `normal` is a training step as common.training.train_local takes it
    (the BatchNorm hybrid, channels_last); `dp-fast` / `dp-stock` are DP-SGD steps (Opacus hooks,
    per-sample clipping, noise) of the DP-compatible hybrid with histofed's grouped-conv sampler or
    Opacus's own; `gn-no-dp` is the DP-compatible model trained normally (the cost of the
    architecture alone). Ratios are medians of per-repeat ratios.
(b) Accuracy: the synthetic scenario through `flower-sim run` without DP and with local DP-SGD at
    privacy.target-epsilon = 8 and 3 (σ calibrated by histofed), final global accuracy and each site's ε.
Every figure is on SYNTHETIC data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.model import build_model, build_model_for
from common.rundir import RunDirectory
from common.privacy.trainer import dp_input
from common.training import OPTIMIZERS, augment, prepare, to_input

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
GOAL = 0.4  # issue 5: DP-SGD img/s ÷ non-DP img/s (literature: 2.6–8× slower)


@dataclass(frozen=True)
class Size:
    """How big the benchmark runs."""

    model: dict[str, Any]
    batch: int
    warmup: int
    steps: int
    repeats: int
    scenario: str
    accuracy: dict[str, Any] = field(default_factory=dict)
    epsilons: tuple[float, ...] = (8.0, 3.0)


_TINY = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8, "model.hidden-size": 8}
SIZES = {
    "default": Size({"model.image-size": 96}, batch=16, warmup=1, steps=3, repeats=3, scenario="synthetic-3sites"),
    "tiny": Size(_TINY, batch=4, warmup=1, steps=1, repeats=1, scenario="synthetic-tiny",
                 accuracy={"data.train-per-site": 16, "data.test-per-site": 8, "train.batch-size": 8}),
}


class _Stepper:
    """One model + optimizer (+ Opacus for DP) on a fixed batch: `step()` is one training step."""

    def __init__(self, cfg: RunConfig, kind: str, batch: torch.Tensor, labels: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.batch, self.labels, self.gen = batch, labels, torch.Generator().manual_seed(0)
        if kind == "normal":
            model = build_model(cfg.model, load_pretrained=False)
        else:
            fast = kind != "dp-stock"
            model = build_model_for(cfg.model, cfg.privacy.model_copy(update={"mode": "local", "fast_depthwise": fast}),
                                    load_pretrained=False)
        self.dp = kind != "normal"  # DP-SGD runs in NCHW (common.privacy.trainer.dp_input); normal as histofed trains
        self.model = prepare(model, self.device, channels_last=cfg.train.channels_last and not self.dp)
        self.model.train()
        self.opt = OPTIMIZERS[cfg.train.optimizer](self.model.parameters(), cfg.train.lr, cfg.train.weight_decay)
        self.hooks = None
        if kind.startswith("dp"):
            from opacus import PrivacyEngine

            loader = DataLoader(TensorDataset(batch, labels), batch_size=len(labels))
            self.hooks, self.opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=self.model, optimizer=self.opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False, wrap_model=False)

    def step(self) -> None:
        x = augment(to_input(self.batch, self.device), self.gen)
        x = dp_input(x) if self.dp else x
        loss = F.cross_entropy(self.model(x), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def throughput(size: Size, log: Any = print) -> dict[str, Any]:
    """img/s of each variant, interleaved, and the DP ÷ normal ratios (medians over repeats)."""
    cfg = RunConfig().override(size.model)
    gen = torch.Generator().manual_seed(0)
    s = cfg.model.image_size
    batch = torch.randint(0, 256, (size.batch, s, s, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, cfg.model.num_classes, (size.batch,), generator=gen)
    kinds = ("normal", "gn-no-dp", "dp-fast", "dp-stock")
    steppers = {kind: _Stepper(cfg, kind, batch, labels) for kind in kinds}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind, stepper in steppers.items():
        for _ in range(size.warmup):
            stepper.step()
    for rep in range(size.repeats):
        for kind, stepper in steppers.items():
            start = time.perf_counter()
            for _ in range(size.steps):
                stepper.step()
            rates[kind].append(size.steps * size.batch / (time.perf_counter() - start))
        log(f"  repeat {rep + 1}/{size.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()))
    ratio = {k: statistics.median(a / b for a, b in zip(rates[k], rates["normal"])) for k in kinds[1:]}
    return {"image-size": s, "batch": size.batch, "threads": torch.get_num_threads(),
            "img-s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
            "dp-fast/normal": round(ratio["dp-fast"], 3), "dp-stock/normal": round(ratio["dp-stock"], 3),
            "gn-no-dp/normal": round(ratio["gn-no-dp"], 3),
            "dp-fast/dp-stock": round(statistics.median(a / b for a, b in zip(rates["dp-fast"], rates["dp-stock"])), 2)}


def _federated(size: Size, extra: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One `flower-sim run` of the scenario; final global accuracy and each site's final ε."""
    sets = [a for k, v in {**size.accuracy, **extra}.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    proc = subprocess.run([FLOWER_SIM, "run", size.scenario, "--run-dir", str(run_dir), *sets],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"flower-sim failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}")
    run = RunDirectory(run_dir)
    lines = run.history()
    out: dict[str, Any] = {"accuracy": lines[-1]["global"]["accuracy"], "f1": lines[-1]["global"]["f1"],
                           "wall-s": round(time.perf_counter() - start, 1), "rounds": lines[-1]["round"]}
    report = run.read_privacy()
    if report:
        out["epsilon"] = {site: round(v["epsilon"], 3) for site, v in report["sites"].items()}
        out["noise-multiplier"] = {site: round(v["noise-multiplier"], 4) for site, v in report["sites"].items()}
    return out


def accuracy(size: Size, work: Path, log: Any = print) -> dict[str, Any]:
    """Non-DP vs local DP-SGD at each target ε on the synthetic scenario."""
    runs = {"non-DP": {}}
    runs.update({f"ε={e:g}": {"privacy.mode": "local", "privacy.target-epsilon": e} for e in size.epsilons})
    out = {}
    for name, extra in runs.items():
        out[name] = _federated(size, extra, work / name.replace("=", "-"))
        log(f"  {name}: {out[name]}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print one table, optionally write JSON; returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long sizes (tests)")
    parser.add_argument("--no-accuracy", action="store_true", help="throughput only (no flower-sim runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the throughput part (1: steadiest)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    size = SIZES["tiny" if args.tiny else "default"]
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook")
    print(f"DP benchmark ({'tiny' if args.tiny else 'default'} size; SYNTHETIC data; CPU)")
    result: dict[str, Any] = {"data": "synthetic", "throughput": throughput(size)}
    if not args.no_accuracy:
        with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
            result["accuracy"] = accuracy(size, Path(tmp))
    _print(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict[str, Any]) -> None:
    t = result["throughput"]
    print(f"\nthroughput at {t['image-size']} px, batch {t['batch']}, {t['threads']} threads (img/s): "
          + ", ".join(f"{k} {v}" for k, v in t["img-s"].items()))
    print(f"DP-SGD/normal img/s, fast grouped-conv sampler: {t['dp-fast/normal']} (goal >= {GOAL})")
    print(f"DP-SGD/normal img/s, Opacus's stock sampler:    {t['dp-stock/normal']}")
    print(f"DP-compatible model without DP/normal:         {t['gn-no-dp/normal']}")
    print(f"fast/stock sampler speed-up:                   {t['dp-fast/dp-stock']}x")
    for name, row in result.get("accuracy", {}).items():
        eps = ", ".join(f"{s} {e}" for s, e in row.get("epsilon", {}).items()) or "-"
        print(f"accuracy {name}: {row['accuracy']:.4f} (F1 {row['f1']:.4f}, {row['rounds']} rounds, "
              f"{row['wall-s']} s); final ε per site: {eps}")


if __name__ == "__main__":
    main()
