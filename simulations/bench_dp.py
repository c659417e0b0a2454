"""Benchmark of differential privacy that learns: pretrained fine-tuning vs training from scratch, local vs central DP.

Usage: python -m simulations.bench_dp [--tiny] [--no-accuracy] [--seeds N] [--groups pretrained,central,scratch]
                                     [--threads N] [--out FILE.json] [--resume FILE.json]

(a) Throughput, one process, variants interleaved (A B C A B C ...), medians of per-repeat ratios:
    the whole hybrid as before (`normal` BatchNorm training, `gn-no-dp` the DP-compatible model without
    DP, `dp-fast` / `dp-stock` DP-SGD with histofed's or Opacus's grouped-conv sampler), and the
    recommended recipe (simulations.scenarios.DP_RECIPE) with and without DP-SGD, from images (the frozen
    prefix run live) and from the per-site feature cache.
(b) Accuracy through `flower-sim run` on the `synthetic-dp` scenario, train.seed 0..N-1: the recipe
    without DP and with local DP-SGD at ε = 8, 3, 1; training from scratch (today's recipe: the whole
    hybrid, batch 32) without DP and at ε = 8, 3; central DP (Flower's wrapper) with many hospitals at
    ε = 8 beside the same run without DP. Final global accuracy, each site's final ε (δ = 1e-5), σ.
(c) The goals of issue 14, each with its measured margin.
With --out the JSON is rewritten after every run ("complete": false until the end); --resume FILE reuses the
runs FILE already holds (same group, variant and seed) and its throughput part, so an interrupted benchmark
loses nothing. Every figure is on SYNTHETIC data.
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
from common.feature_cache import VIEWS
from common.finetune import train_step, trainable_optimizer
from common.model import build_model, build_model_for
from common.privacy.trainer import dp_input
from common.rundir import RunDirectory
from common.trainable import make_split
from common.training import OPTIMIZERS, augment, prepare, to_input
from simulations.bench_dp_report import print_result
from simulations.scenarios import DP_RECIPE

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
GOALS = {"ε=8 gap": -0.03, "ε=3 gap": -0.06, "pretrained − scratch (no DP)": 0.0, "recipe DP/no-DP img/s": 0.6}
SCRATCH = {"model.pretrained-path": "", "model.trainable": "all", "train.batch-size": 32, "train.lr": 0.001,
           "train.augment-multiplicity": 1, "train.ema-decay": 0.0}  # today's from-scratch recipe


@dataclass(frozen=True)
class Size:
    """How big the benchmark runs."""

    model: dict[str, Any]  # the whole hybrid's throughput (issue 5's setting)
    batch: int
    recipe_model: dict[str, Any]  # the recipe's throughput (the scenario's image size)
    recipe_batch: int
    warmup: int
    steps: int
    repeats: int
    scenario: str
    accuracy: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    scratch_dp_seeds: int = 1  # DP-SGD of the whole model costs ~20 min a run on 2 cores (and learns nothing)
    epsilons: tuple[float, ...] = (8.0, 3.0, 1.0)
    scratch_epsilons: tuple[float, ...] = (8.0, 3.0)
    central_sites: int = 20
    central: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)  # recipe variants at ε = ablation_epsilon
    ablation_epsilon: float = 3.0


_TINY = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8, "model.hidden-size": 8}
_TINY_RUN = {**_TINY, "data.train-per-site": 16, "data.test-per-site": 8, "train.batch-size": 8, "federation.rounds": 1,
             "federation.num-sites": 2, "pretrain.corpus-size": 24, "pretrain.epochs": 1, "pretrain.batch-size": 8}
SIZES = {
    "default": Size({"model.image-size": 96}, batch=16, recipe_model={"model.image-size": 64}, recipe_batch=64,
                    warmup=1, steps=3, repeats=3, scenario="synthetic-dp",
                    central={"data.train-per-site": 400, "data.test-per-site": 200, "privacy.mode": "central-fixed-server",
                             "model.trainable": "classifier", "train.local-epochs": 5, "train.lr": 0.01,
                             "privacy.clipping-norm": 1.0},  # C: the measured update norm of one such round
                    ablations={"K=4": {"train.augment-multiplicity": 4}, "EMA 0.9": {"train.ema-decay": 0.9},
                               "classifier": {"model.trainable": "classifier"}}),
    "tiny": Size(_TINY, batch=4, recipe_model=_TINY, recipe_batch=4, warmup=1, steps=1, repeats=1, scenario="synthetic-dp", accuracy=_TINY_RUN, seeds=1,
                 epsilons=(8.0,), scratch_epsilons=(8.0,), central_sites=3,
                 central={"privacy.mode": "central-fixed-server", "model.trainable": "classifier"},
                 ablations={"K=2": {"train.augment-multiplicity": 2}}),
}


class _Stepper:
    """One model + optimizer (+ Opacus for DP) on a fixed batch: `step()` is one training step."""

    def __init__(self, cfg: RunConfig, kind: str, batch: torch.Tensor, labels: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.batch, self.labels, self.gen = batch, labels, torch.Generator().manual_seed(0)
        self.dp = kind.startswith("dp") or kind.endswith("-dp")
        self.recipe = kind.startswith("recipe")
        self.cached = "cached" in kind
        if self.recipe:
            cfg = cfg.override({"privacy.mode": "local" if self.dp else "off"})
        if kind == "normal" or (self.recipe and not self.dp):
            model = build_model(cfg.model, load_pretrained=False)
        else:
            fast = kind != "dp-stock"
            model = build_model_for(cfg.model, cfg.privacy.model_copy(update={"mode": "local", "fast_depthwise": fast}),
                                    load_pretrained=False)
        self.cfg = cfg
        # DP-SGD through hooked convolutions runs in NCHW (common.privacy.trainer.dp_input); a frozen prefix need not
        nchw = self.dp and (not self.recipe or cfg.model.trainable in ("all", "head+norm"))
        self.model = prepare(model, self.device, channels_last=cfg.train.channels_last and not nchw)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = (trainable_optimizer(self.model, cfg) if self.recipe else
                    OPTIMIZERS[cfg.train.optimizer](params, cfg.train.lr, cfg.train.weight_decay))
        self.k = min(cfg.train.augment_multiplicity, VIEWS) if self.recipe else 1
        self.split = make_split(self.model, cfg.model.trainable, cfg.model.image_size) if self.recipe else None
        if self.cached:  # what the per-site cache holds: V views of N images' prefix features
            self.features = torch.randn(VIEWS, len(labels), self.split.width).half()
        self.hooks = None
        if self.dp:
            from opacus import PrivacyEngine

            loader = DataLoader(TensorDataset(batch, labels), batch_size=len(labels))
            self.hooks, self.opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=self.model, optimizer=self.opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False, wrap_model=False)

    def _rows(self) -> torch.Tensor:
        if self.cached:  # as common.finetune._cached_rows: K distinct views per image, gathered
            views = torch.rand(len(self.labels), VIEWS, generator=self.gen).argsort(dim=1)[:, :self.k]
            idx = torch.arange(len(self.labels)).view(-1, 1)
            return self.features[views, idx].reshape(len(self.labels) * self.k, -1).float()
        x = augment(to_input(self.batch, self.device, self.cfg.train.channels_last).repeat_interleave(self.k, 0), self.gen)
        with torch.no_grad():
            return self.split.prefix(x) if self.split.cacheable else x.contiguous()

    def step(self) -> None:
        """One training step."""
        self.opt.zero_grad(set_to_none=True)
        if self.recipe:
            train_step(self.split, self._rows(), self.labels, self.opt, self.params, k=self.k, dp=self.dp)
            return
        x = augment(to_input(self.batch, self.device), self.gen)
        x = dp_input(x) if self.dp else x
        F.cross_entropy(self.model(x), self.labels).backward()
        self.opt.step()


def _interleaved(cfg: RunConfig, size: Size, n: int, kinds: tuple[str, ...], log: Any) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    s = cfg.model.image_size
    batch = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, cfg.model.num_classes, (n,), generator=gen)
    steppers = {kind: _Stepper(cfg, kind, batch, labels) for kind in kinds}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for stepper in steppers.values():
        for _ in range(size.warmup):
            stepper.step()
    for rep in range(size.repeats):
        for kind, stepper in steppers.items():
            start = time.perf_counter()
            for _ in range(size.steps):
                stepper.step()
            rates[kind].append(size.steps * n / (time.perf_counter() - start))
        log(f"  repeat {rep + 1}/{size.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()))
    return rates


def _ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    return round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 3)


def throughput(size: Size, log: Any = print) -> dict[str, Any]:
    """img/s of the whole hybrid (normal vs DP-SGD) and of the recipe (no DP vs DP-SGD, live prefix and cached)."""
    cfg = RunConfig().override(size.model)
    whole = _interleaved(cfg, size, size.batch, ("normal", "gn-no-dp", "dp-fast", "dp-stock"), log)
    recipe_cfg = RunConfig().override(size.recipe_model).override(
        {k: v for k, v in DP_RECIPE.items() if k.startswith(("model.trainable", "train.augment", "train.ema", "train.lr",
                                                             "train.optimizer"))})
    recipe = _interleaved(recipe_cfg, size, size.recipe_batch, ("recipe", "recipe-dp", "recipe-cached", "recipe-cached-dp"),
                          log)
    return {"image-size": cfg.model.image_size, "batch": size.batch, "threads": torch.get_num_threads(),
            "recipe": recipe_cfg.model.trainable, "multiplicity": recipe_cfg.train.augment_multiplicity,
            "recipe-image-size": recipe_cfg.model.image_size, "recipe-batch": size.recipe_batch,
            "img-s": {k: round(statistics.median(v), 2) for k, v in {**whole, **recipe}.items()},
            "dp-fast/normal": _ratio(whole, "dp-fast", "normal"), "dp-stock/normal": _ratio(whole, "dp-stock", "normal"),
            "gn-no-dp/normal": _ratio(whole, "gn-no-dp", "normal"), "dp-fast/dp-stock": _ratio(whole, "dp-fast", "dp-stock"),
            "recipe-dp/recipe": _ratio(recipe, "recipe-dp", "recipe"),
            "recipe-cached-dp/recipe-cached": _ratio(recipe, "recipe-cached-dp", "recipe-cached")}


@dataclass(frozen=True)
class Run:
    """One flower-sim run of the benchmark."""

    group: str  # pretrained / scratch / central-N
    variant: str  # non-DP / ε=8 / ...
    seed: int
    sets: dict[str, Any]
    args: tuple[str, ...] = ()


def plan_runs(size: Size, seeds: int) -> list[Run]:
    """Every run of the accuracy part, cheapest first."""
    runs: list[Run] = []
    dp = lambda e: {"privacy.mode": "local", "privacy.target-epsilon": e}  # noqa: E731
    off = {"privacy.mode": "off"}
    for seed in range(seeds):
        runs.append(Run("pretrained", "non-DP", seed, off))
        runs += [Run("pretrained", f"ε={e:g}", seed, dp(e)) for e in size.epsilons]
        runs += [Run("pretrained", f"ε={size.ablation_epsilon:g} {name}", seed, {**dp(size.ablation_epsilon), **sets})
                 for name, sets in size.ablations.items()]
    central = ("--sites", str(size.central_sites), "--cpus-per-site", "1")  # 2 Ray actors serve all sites (memory)
    name = f"central-{size.central_sites}"
    for seed in range(seeds):
        runs.append(Run(name, "non-DP", seed, {**size.central, "privacy.mode": "off"}, central))
        runs.append(Run(name, "ε=8", seed, {**size.central, "privacy.target-epsilon": 8.0}, central))
    for seed in range(seeds):
        runs.append(Run("scratch", "non-DP", seed, {**SCRATCH, **off}))
    for seed in range(min(seeds, size.scratch_dp_seeds)):
        runs += [Run("scratch", f"ε={e:g}", seed, {**SCRATCH, **dp(e)}) for e in size.scratch_epsilons]
    return runs


def federated(size: Size, run: Run, run_dir: Path) -> dict[str, Any]:
    """One `flower-sim run`; final global accuracy, each site's final ε and σ, and the training img/s of its rounds."""
    values = {**size.accuracy, **run.sets, "train.seed": run.seed}
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    proc = subprocess.run([FLOWER_SIM, "run", size.scenario, "--run-dir", str(run_dir), "--no-report", *run.args, *sets],
                          capture_output=True, text=True, timeout=4 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"flower-sim failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-600:]}")
    lines = RunDirectory(run_dir).history()
    trained = [site for line in lines[1:] for site in line.get("train", {}).values()]
    examples, seconds = sum(s["examples"] for s in trained), sum(s["seconds"] for s in trained)
    out: dict[str, Any] = {"accuracy": lines[-1]["global"]["accuracy"], "f1": lines[-1]["global"]["f1"],
                           "auc": lines[-1]["global"]["auc"], "rounds": lines[-1]["round"],
                           "wall-s": round(time.perf_counter() - start, 1),
                           "train-img-s": round(examples / seconds, 1) if seconds else 0.0}
    report = RunDirectory(run_dir).read_privacy()
    if report:
        out["epsilon"] = max(v["epsilon"] for v in report["sites"].values())
        out["delta"] = max(v["delta"] for v in report["sites"].values())
        out["noise-multiplier"] = round(min(v["noise-multiplier"] for v in report["sites"].values()), 4)
    return out


def summarise(results: list[tuple[Run, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± sd of the final accuracy per (group, variant), the largest ε of any site, seeds used."""
    rows: dict[str, dict[str, Any]] = {}
    for run, res in results:
        row = rows.setdefault(f"{run.group} {run.variant}", {"group": run.group, "variant": run.variant, "acc": [],
                                                             "epsilon": 0.0, "img-s": []})
        row["acc"].append(res["accuracy"])
        row["img-s"].append(res["train-img-s"])
        row["epsilon"] = max(row["epsilon"], res.get("epsilon", 0.0))
        row["delta"] = res.get("delta")
        row["noise-multiplier"] = res.get("noise-multiplier")
    for row in rows.values():
        acc = row.pop("acc")
        row.update(mean=round(statistics.fmean(acc), 4), sd=round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
                   seeds=len(acc), accuracies=acc, **{"img-s": round(statistics.fmean(row.pop("img-s")), 1)})
    return rows


def goals(rows: dict[str, dict[str, Any]], tput: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each goal of issue 14: the measured value, the target and whether it is met."""
    mean = lambda key: rows[key]["mean"] if key in rows else None  # noqa: E731
    base, scratch = mean("pretrained non-DP"), mean("scratch non-DP")
    measured = {
        "ε=8 gap": None if base is None or mean("pretrained ε=8") is None else mean("pretrained ε=8") - base,
        "ε=3 gap": None if base is None or mean("pretrained ε=3") is None else mean("pretrained ε=3") - base,
        "pretrained − scratch (no DP)": None if base is None or scratch is None else base - scratch,
        "recipe DP/no-DP img/s": tput["recipe-dp/recipe"] if tput else None,
    }
    return {name: {"value": None if v is None else round(v, 4), "target": GOALS[name],
                   "met": None if v is None else v >= GOALS[name] - 1e-12} for name, v in measured.items()}


GROUPS = ("pretrained", "central", "scratch")


def _run_key(group: str, variant: str, seed: int) -> tuple[str, str, int]:
    return group, variant, int(seed)


def accuracy(size: Size, seeds: int, work: Path, log: Any = print, *, groups: tuple[str, ...] = GROUPS,
             done: dict[tuple[str, str, int], dict[str, Any]] | None = None,
             save: Any = None) -> tuple[list[tuple[Run, dict[str, Any]]], dict]:
    """Every planned run of these groups, in order (reusing `done`; `save(results)` after each); raw results and summary rows."""
    done = done or {}
    results = []
    plan = [r for r in plan_runs(size, seeds) if r.group.split("-")[0] in groups]
    for i, run in enumerate(plan):
        res = done.get(_run_key(run.group, run.variant, run.seed))
        state = "reused"
        if res is None:
            res = federated(size, run, work / f"{i:02d}-{run.group}-{run.variant.replace('=', '')}-s{run.seed}")
            state = f"{res['wall-s']} s"
        log(f"  [{i + 1}/{len(plan)}] {run.group} {run.variant} seed {run.seed}: accuracy {res['accuracy']:.4f}, "
            f"ε {res.get('epsilon', '-')}, {state}")
        results.append((run, res))
        if save is not None:
            save(results)
    return results, summarise(results)


def _previous(path: Path | None) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[str, Any] | None]:
    """The runs and the throughput part of an earlier --out file (nothing when there is none)."""
    if path is None:
        return {}, None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--resume {path}: cannot read it ({exc})") from exc
    runs = {_run_key(r["group"], r["variant"], r["seed"]): {k: v for k, v in r.items() if k not in ("group", "variant", "seed")}
            for r in old.get("runs", [])}
    return runs, old.get("throughput")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the figures and tables, optionally write JSON; returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long sizes (tests)")
    parser.add_argument("--no-accuracy", action="store_true", help="throughput only (no flower-sim runs)")
    parser.add_argument("--no-throughput", action="store_true", help="accuracy only")
    parser.add_argument("--seeds", type=int, default=None, help="train.seed 0..N-1 (default 3; tiny 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the throughput part (1: steadiest)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"accuracy groups to run (of {', '.join(GROUPS)})")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON (rewritten after every run)")
    parser.add_argument("--resume", type=Path, default=None, help="reuse the runs (and throughput) of an earlier --out file")
    args = parser.parse_args(argv)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        parser.error(f"--groups: unknown group {', '.join(unknown) or '(none)'} (choose from {', '.join(GROUPS)})")
    done, old_throughput = _previous(args.resume)
    torch.set_num_threads(max(1, args.threads))
    size = SIZES["tiny" if args.tiny else "default"]
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook")
    print(f"DP benchmark ({'tiny' if args.tiny else 'default'} size; SYNTHETIC data; CPU)")
    result: dict[str, Any] = {"data": "synthetic", "complete": False}

    def save(runs: list[tuple[Run, dict[str, Any]]] | None = None) -> None:
        if runs is not None:
            result["runs"] = [{"group": r.group, "variant": r.variant, "seed": r.seed, **res} for r, res in runs]
        if args.out:
            tmp = args.out.with_name(f".{args.out.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(args.out)

    if old_throughput is not None:
        result["throughput"] = old_throughput
    elif not args.no_throughput:
        result["throughput"] = throughput(size)
    save()
    if not args.no_accuracy:
        with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
            runs, rows = accuracy(size, args.seeds or size.seeds, Path(tmp), groups=groups, done=done, save=save)
        save(runs)
        result["accuracy"] = rows
    result["goals"] = goals(result.get("accuracy", {}), result.get("throughput"))
    result["complete"] = True
    print_result(result)
    save()
    return result


if __name__ == "__main__":
    main()
