"""`flower-sim compare`: pooled vs local-only vs federated over seeds, on the training sites and a held-out hospital.

Federated runs go through Flower (the same `flwr run` path as `flower-sim run`); pooled and local
runs use common.nonfederated, i.e. the clients' own training loop, with the same model, data and
budget (federation.rounds x train.local-epochs passes over each site's data). Every model is then
evaluated by the same code on the same test splits, so the three columns are comparable.
Writes compare.json, compare.csv and compare.html (simulations.compare_report).
"""

from __future__ import annotations

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

from common.config import RunConfig
from common.datasets.registry import data_kind, get_dataset
from common.jsonsafe import json_safe
from common.metrics import METRIC_NAMES
from common.model import build_model
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


def _evaluate(model: torch.nn.Module, cfg: RunConfig) -> dict[str, Any]:
    """Metrics on the training sites' test splits (pooled + per site) and on the held-out site's."""
    out = {"train-sites": evaluate_on_sites(model, cfg, cfg.federation.training_sites)}
    if cfg.federation.holdout_site >= 0:
        out["holdout"] = evaluate_on_sites(model, cfg, [cfg.federation.holdout_site])["global"]
    return out


def _pooled(cfg: RunConfig, _: Path) -> dict[str, Any]:
    return _evaluate(train_on_sites(cfg, cfg.federation.training_sites), cfg)


def _local(cfg: RunConfig, _: Path) -> dict[str, Any]:
    """One model per site on its own data; averaged metrics and the cross-site matrix."""
    names = get_dataset(cfg.data.dataset).site_names(cfg)
    per_model, cross = [], {}
    for site in cfg.federation.training_sites:
        result = _evaluate(train_on_sites(cfg, [site]), cfg)
        per_model.append(result)
        cross[names[site]] = {n: s["accuracy"] for n, s in result["train-sites"]["sites"].items()}
    own = {names[s]: r["train-sites"]["sites"][names[s]] for s, r in zip(cfg.federation.training_sites, per_model)}
    mean_global = _mean_dicts([r["train-sites"]["global"] for r in per_model])  # mean over the local models
    out = {"train-sites": {"global": mean_global, "sites": own}, "cross-site-accuracy": cross}
    if "holdout" in per_model[0]:
        out["holdout"] = _mean_dicts([r["holdout"] for r in per_model])
    return out


def _federated(cfg: RunConfig, run_dir: Path, run_opts: RunOptions) -> dict[str, Any]:
    plan = make_plan(replace(run_opts, run_dir=run_dir), cfg)
    status = run_simulation(plan)
    if status.get("status") != "completed":
        raise FlowerRunError(f"federated run in {run_dir} failed: {status.get('error', 'unknown error')}")
    model = build_model(cfg.model, load_pretrained=False)
    load_weights(model, RunDirectory(run_dir).load_model())
    return _evaluate(model, cfg)


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
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = (opts.out_dir or Path("runs") / f"compare-{opts.run.scenario}-{stamp}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runners = {"pooled": _pooled, "local": _local,
               "federated": lambda cfg, d: _federated(cfg, d, opts.run)}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in opts.models:
        for mode in opts.modes:
            for seed in opts.seeds:
                cfg = base.override({"model.architecture": model, "train.seed": seed})
                if mode != "federated":  # the comparing process has every core to itself
                    cfg = cfg.override({"train.num-threads": os.cpu_count() or 1})
                log(f"{model} · {mode} · seed {seed}")
                raw.setdefault(model, {}).setdefault(mode, []).append(
                    runners[mode](cfg, out_dir / f"{model}-{mode}-seed{seed}")
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
            scopes = {"global": [r["train-sites"]["global"] for r in runs]}
            for site in runs[0]["train-sites"]["sites"]:
                scopes[site] = [r["train-sites"]["sites"][site] for r in runs]
            if "holdout" in runs[0]:
                scopes["held-out"] = [r["holdout"] for r in runs]
            for scope, values in scopes.items():
                stats = {}
                for name in METRIC_NAMES:
                    col = np.array([np.nan if v.get(name) is None else v[name] for v in values], dtype=float)
                    stats[name] = {"mean": float(np.nanmean(col)) if np.isfinite(col).any() else None,
                                   "sd": float(np.nanstd(col, ddof=1)) if np.isfinite(col).sum() > 1 else 0.0}
                rows.append({"model": model, "mode": mode, "scope": scope, "seeds": len(values), **stats})
    names = get_dataset(cfg.data.dataset).site_names(cfg)
    holdout = names[cfg.federation.holdout_site] if cfg.federation.holdout_site >= 0 else None
    return {"data-kind": data_kind(cfg.data.dataset, cfg.data.root), "seeds": list(opts.seeds),
            "holdout": holdout, "rows": rows}


def write_csv(summary: dict[str, Any], path: Path) -> None:
    """One row per model/mode/scope with mean and sd columns per metric."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["data-kind", "model", "mode", "scope", "seeds"]
                        + [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "sd")])
        for row in summary["rows"]:
            writer.writerow([summary["data-kind"], row["model"], row["mode"], row["scope"], row["seeds"]]
                            + [row[m][s] for m in METRIC_NAMES for s in ("mean", "sd")])
