"""`flower-sim compare`: pooled vs local-only vs federated over seeds, on the training sites and a held-out hospital.

Federated runs go through Flower (the same `flwr run` path as `flower-sim run`); pooled and local
runs use common.nonfederated, i.e. the clients' own training loop, with the same model, data and
budget (federation.rounds x train.local-epochs passes over each site's data). Every model is then
evaluated by the same code on the same test splits, so the three columns are comparable.

With --adabn every model is also evaluated at the held-out hospital after AdaBN (its BatchNorm statistics
re-estimated on that hospital's unlabeled training images): rows "<mode> + AdaBN". With FedBN
(federation.local-norm) the federated run also reports each site's personalised model: rows
"federated (personalised)", read from the server's last round in the metrics log.
Writes compare.json, compare.csv and compare.html (simulations.compare_report).
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.adabn import adapt_batchnorm, has_norm_statistics
from common.config import RunConfig
from common.datasets.registry import data_kind, get_dataset, load_site
from common.errors import ConfigError
from common.jsonsafe import json_safe
from common.metrics import METRIC_NAMES
from common.model import build_model, build_model_for
from common.nonfederated import evaluate_on_sites, train_on_sites
from common.rundir import RunDirectory
from common.weights import load_weights
from server.launch import FlowerRunError
from simulations.compare_report import COMPARE_CSV, COMPARE_HTML, COMPARE_JSON, build_compare_report
from simulations.planning import RunOptions, make_plan, resolve_config
from simulations.runner import run_simulation

MODES = ("pooled", "local", "federated")


@dataclass(frozen=True)
class CompareOptions:
    """What to compare: seeds, model architectures, regimes, and an optional held-out site."""

    run: RunOptions
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = ("hybrid",)
    modes: tuple[str, ...] = MODES
    holdout: int | None = None
    out_dir: Path | None = None
    adabn: bool = False  # also evaluate at the held-out hospital after AdaBN


def _evaluate(model: torch.nn.Module, cfg: RunConfig, adabn: bool = False) -> dict[str, Any]:
    """Metrics on the training sites' test splits (pooled + per site) and on the held-out site's (+ after AdaBN)."""
    out = {"train-sites": evaluate_on_sites(model, cfg, cfg.federation.training_sites)}
    holdout = cfg.federation.holdout_site
    if holdout >= 0:
        out["holdout"] = evaluate_on_sites(model, cfg, [holdout])["global"]
    if holdout >= 0 and adabn:  # the hospital's own unlabeled training images; its test split is scored
        adapted = copy.deepcopy(model)
        images = load_site(cfg, holdout, "train", augment=False)
        adapt_batchnorm(adapted, images, batch_size=cfg.train.batch_size, channels_last=cfg.train.channels_last)
        out["holdout-adabn"] = evaluate_on_sites(adapted, cfg, [holdout])["global"]
    return out


def _pooled(cfg: RunConfig, _: Path, adabn: bool = False) -> dict[str, Any]:
    return _evaluate(train_on_sites(cfg, cfg.federation.training_sites), cfg, adabn)


def _local(cfg: RunConfig, _: Path, adabn: bool = False) -> dict[str, Any]:
    """One model per site on its own data; averaged metrics and the cross-site matrix."""
    names = get_dataset(cfg.data.dataset).site_names(cfg)
    per_model, cross = [], {}
    for site in cfg.federation.training_sites:
        result = _evaluate(train_on_sites(cfg, [site]), cfg, adabn)
        per_model.append(result)
        cross[names[site]] = {n: s["accuracy"] for n, s in result["train-sites"]["sites"].items()}
    own = {names[s]: r["train-sites"]["sites"][names[s]] for s, r in zip(cfg.federation.training_sites, per_model)}
    mean_global = _mean_dicts([r["train-sites"]["global"] for r in per_model])  # mean over the local models
    out = {"train-sites": {"global": mean_global, "sites": own}, "cross-site-accuracy": cross}
    for key in ("holdout", "holdout-adabn"):
        if key in per_model[0]:
            out[key] = _mean_dicts([r[key] for r in per_model])
    return out


def _federated(cfg: RunConfig, run_dir: Path, run_opts: RunOptions, adabn: bool = False) -> dict[str, Any]:
    plan = make_plan(replace(run_opts, run_dir=run_dir), cfg)
    status = run_simulation(plan)
    if status.get("status") != "completed":
        raise FlowerRunError(f"federated run in {run_dir} failed: {status.get('error', 'unknown error')}")
    model = build_model(cfg.model, load_pretrained=False)
    run = RunDirectory(run_dir)
    load_weights(model, run.load_model())
    out = _evaluate(model, cfg, adabn)
    last = (run.history() or [{}])[-1]
    if "personalised" in last:  # FedBN: each site's own norm layers over the final global model, as its server saw
        out["personalised"] = {"global": last["personalised"]["global"], "sites": last["personalised"]["sites"]}
    return out


def _check_adabn(opts: CompareOptions, base: RunConfig) -> None:
    """--adabn needs a held-out hospital and BatchNorm statistics in every compared model (ConfigError otherwise)."""
    if not opts.adabn:
        return
    if opts.holdout is None:
        raise ConfigError("--adabn adapts the model at the held-out hospital: pass --holdout SITE")
    for name in opts.models:
        cfg = base.override({"model.architecture": name})
        if not has_norm_statistics(build_model_for(cfg.model, cfg.privacy, load_pretrained=False)):
            culprit = (f"privacy.mode='{cfg.privacy.mode}' (GroupNorm model)" if cfg.privacy.spec.private
                       else "model.norm='group'" if cfg.model.norm == "group" else f"model.architecture='{name}'")
            raise ConfigError(f"--adabn needs BatchNorm running statistics, and {culprit} has none")


def _mean_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in items[0] if all(isinstance(i.get(k), (int, float)) for i in items)]
    return {k: float(np.nanmean([i[k] if i[k] is not None else np.nan for i in items])) for k in keys}


def run_compare(opts: CompareOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (model, mode, seed), then summarise as mean ± sd; writes compare.json/.csv."""
    base = resolve_config(opts.run)
    if opts.holdout is not None:
        base = base.with_sites(base.federation.num_sites, holdout=opts.holdout)
    for model in opts.models:  # every architecture must be valid before hours of training start
        base.override({"model.architecture": model})
    _check_adabn(opts, base)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = (opts.out_dir or Path("runs") / f"compare-{opts.run.scenario}-{stamp}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runners = {"pooled": _pooled, "local": _local,
               "federated": lambda cfg, d, adabn: _federated(cfg, d, opts.run, adabn)}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in opts.models:
        for mode in opts.modes:
            for seed in opts.seeds:
                cfg = base.override({"model.architecture": model, "train.seed": seed})
                if mode != "federated":  # the comparing process has every core to itself
                    cfg = cfg.override({"train.num-threads": os.cpu_count() or 1})
                log(f"{model} · {mode} · seed {seed}")
                raw.setdefault(model, {}).setdefault(mode, []).append(
                    runners[mode](cfg, out_dir / f"{model}-{mode}-seed{seed}", opts.adabn)
                )
    summary = summarise(raw, base, opts)
    saved = {"summary": summary, "config": base.to_flat(), "runs": raw}
    (out_dir / COMPARE_JSON).write_text(json.dumps(json_safe(saved), indent=1))
    write_csv(summary, out_dir / COMPARE_CSV)
    try:
        build_compare_report(out_dir)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not lose hours of results (json/csv are written)
        log(f"warning: {COMPARE_HTML} not written: {err}")
    summary["out-dir"] = str(out_dir)
    return summary


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]], cfg: RunConfig, opts: CompareOptions) -> dict[str, Any]:
    """Mean and sd over seeds of every metric, for each model, mode and scope."""
    rows = []
    for model, modes in raw.items():
        for mode, runs in modes.items():
            views = {mode: _scopes(runs, "train-sites")}
            if "holdout" in runs[0]:
                views[mode]["held-out"] = [r["holdout"] for r in runs]
            if "personalised" in runs[0]:
                views[f"{mode} (personalised)"] = _scopes(runs, "personalised")
            if "holdout-adabn" in runs[0]:
                views[f"{mode} + AdaBN"] = {"held-out": [r["holdout-adabn"] for r in runs]}
            for label, scopes in views.items():
                for scope, values in scopes.items():
                    rows.append({"model": model, "mode": label, "scope": scope, "seeds": len(values), **_stats(values)})
    names = get_dataset(cfg.data.dataset).site_names(cfg)
    holdout = names[cfg.federation.holdout_site] if cfg.federation.holdout_site >= 0 else None
    return {"data-kind": data_kind(cfg.data.dataset, cfg.data.root), "seeds": list(opts.seeds),
            "holdout": holdout, "rows": rows}


def _scopes(runs: list[dict[str, Any]], part: str) -> dict[str, list[dict[str, Any]]]:
    """Per scope (pooled 'global', then each site) the metrics of every seed's run."""
    scopes = {"global": [r[part]["global"] for r in runs]}
    for site in runs[0][part]["sites"]:
        scopes[site] = [r[part]["sites"][site] for r in runs]
    return scopes


def _stats(values: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and sd (ddof 1) over seeds of every metric; NaN/None left out."""
    stats = {}
    for name in METRIC_NAMES:
        col = np.array([np.nan if v.get(name) is None else v[name] for v in values], dtype=float)
        stats[name] = {"mean": float(np.nanmean(col)) if np.isfinite(col).any() else None,
                       "sd": float(np.nanstd(col, ddof=1)) if np.isfinite(col).sum() > 1 else 0.0}
    return stats


def write_csv(summary: dict[str, Any], path: Path) -> None:
    """One row per model/mode/scope with mean and sd columns per metric."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["data-kind", "model", "mode", "scope", "seeds"]
                        + [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "sd")])
        for row in summary["rows"]:
            writer.writerow([summary["data-kind"], row["model"], row["mode"], row["scope"], row["seeds"]]
                            + [row[m][s] for m in METRIC_NAMES for s in ("mean", "sd")])
