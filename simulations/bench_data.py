"""Benchmark: input-pipeline img/s (per DataLoader worker) vs the CPU training step, on Camelyon17-layout PNGs.

Usage: python -m simulations.bench_data [--patches 1536] [--image-size 96] [--workers 0,1,2] [--synthetic-train N]
Also: one synthetic site rendered vs loaded from its disk cache (what a deployed ClientApp pays per message).
Prints a table and writes JSON (--out). Images are SYNTHETIC patches in the real on-disk layout.
Loading is not the bottleneck when one worker delivers more img/s than a training step consumes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common.config import RunConfig
from common.datasets.fixtures import write_camelyon17
from common.datasets.registry import load_site
from common.datasets.synthetic import generate
from common.model import build_model
from common.training import OPTIMIZERS, make_loader, prepare, to_input
from simulations.figures import emit
from simulations.scenarios import DEFAULT_SCENARIO, get_scenario


def loader_rate(cfg: RunConfig, workers: int, batch_size: int) -> float:
    """Images per second a DataLoader with `workers` processes delivers (one full pass, warm cache)."""
    split = load_site(cfg, 0, "train")
    loader = make_loader(split, batch_size, seed=0, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for images, _, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def train_rate(cfg: RunConfig, batch_size: int, steps: int = 6) -> float:
    """Images per second of the hybrid's CPU training step (forward, backward, AdamW)."""
    model = prepare(build_model(cfg.model), torch.device("cpu"))
    opt = OPTIMIZERS["adamw"](model.parameters(), 1e-3, 0.0)
    x = torch.randint(0, 255, (batch_size, cfg.model.image_size, cfg.model.image_size, 3), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch_size,))
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(to_input(x, torch.device("cpu"))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def synthetic_site_seconds(cfg: RunConfig, cache_dir: Path) -> dict[str, float]:
    """Seconds to get one synthetic site's train + test splits: rendered (a cold cache) vs read from the disk cache.

    A deployed ClientApp is a fresh process per message, so without the disk cache it renders every time.
    """
    def one_site() -> float:
        start = time.perf_counter()
        for split, n in (("train", cfg.data.train_per_site), ("test", cfg.data.test_per_site)):
            generate.__wrapped__(site=0, num_sites=cfg.federation.num_sites, split=split, n=n,  # no in-process cache
                                 image_size=cfg.model.image_size, num_classes=cfg.model.num_classes,
                                 seed=cfg.data.seed, cache_dir=str(cache_dir))
        return time.perf_counter() - start

    rendered, cached = one_site(), one_site()
    return {"synthetic site rendered-s (cold cache)": round(rendered, 4),
            "synthetic site from-disk-cache-s": round(cached, 4),
            "synthetic site rendered/cached": round(rendered / cached, 1)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=1536, help="patches in the fixture (all in site 0)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--synthetic-train", type=int, default=RunConfig().data.train_per_site,
                        help="training patches of the synthetic site timed rendered vs cached")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_camelyon17(
            Path(tmp), patients_per_center=2, nodes_per_patient=1, patches_per_node=max(1, args.patches // 2)
        )
        cfg = RunConfig().override({
            "data.root": str(root), "data.centers": "0", "federation.num-sites": 1,
            "federation.min-train-sites": 1, "federation.min-evaluate-sites": 1, "federation.min-available-sites": 1,
            "data.val-fraction": 0.0, "data.test-fraction": 0.5, "model.image-size": args.image_size,
            "data.cache-dir": str(Path(tmp) / "cache"),
        })
        result = {"image-size": args.image_size, "batch-size": args.batch_size, "data-kind": "synthetic",
                  "train-step-img-s (1 thread)": round(train_rate(cfg, args.batch_size), 1)}
        for w in (int(v) for v in args.workers.split(",")):
            result[f"loader-img-s ({w} workers)"] = round(loader_rate(cfg, w, args.batch_size), 1)
        synthetic = get_scenario(DEFAULT_SCENARIO).config().override({  # a site of the default scenario
            "data.train-per-site": args.synthetic_train, "data.test-per-site": max(1, args.synthetic_train // 2)})
        result.update(synthetic_site_seconds(synthetic, Path(tmp) / "synthetic-cache"))
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
