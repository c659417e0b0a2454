"""Benchmark: prediction img/s on patches and tiles/s on a generated whole slide vs the bare model forward, peak RSS.

Usage: python -m simulations.bench_predict [--batch-size 64] [--patches 2048] [--patch-side 64] [--slide-side 20000]
                                           [--mpp 1.0] [--repeats 3] [--out FILE.json] [--tiny]
Measures, on this machine's CPU (CUDA when present) and in one process, with the default model config
(random weights: speed does not depend on them):
- the bare forward (eval, no grad, channels_last) on a normalised batch already in memory: img/s;
- `flower-client predict --images` end to end (PNG decode + resize via FileSplit/make_loader, forward,
  predictions.csv): img/s, and its ratio to the bare forward (goal >= 0.9);
- `flower-client predict --slide` end to end on a GENERATED pyramidal TIFF (slide-side² px at 0.25 µm/px,
  deflate tiles of 256 px; tissue: a pink rectangle over 60 % of the area with a purple region), tiled at
  --mpp: tiles/s including thumbnail, tissue detection and every output file, the ratio to the bare
  forward, and the peak RSS growth while predicting (memory must not grow with the slide).
Everything is SYNTHETIC: a generated slide and random weights; the figures are throughput, not accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from common.card import card_for_run
from common.config import RunConfig
from common.model import build_model
from common.slide_fixture import SlideSpec, write_slide
from common.training import prepare, select_device, to_input
from simulations.figures import emit

TINY = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8, "model.hidden-size": 8}


def forward_rate(model: torch.nn.Module, cfg: RunConfig, device: torch.device, batch: int,
                 seconds: float) -> tuple[float, float]:
    """img/s and img/cpu-s of the bare forward on one normalised in-memory batch (>= 3 batches, about `seconds`)."""
    size = cfg.model.image_size
    x = to_input(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8), device)
    with torch.no_grad():
        model(x)  # warm-up
        _sync(device)
        wall, cpu, n = time.perf_counter(), time.process_time(), 0
        while n < 3 or time.perf_counter() - wall < seconds:
            model(x)
            n += 1
        _sync(device)
    return n * batch / (time.perf_counter() - wall), n * batch / (time.process_time() - cpu)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(action: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """Run `action`: its result, wall seconds, process CPU seconds and peak RSS growth in MiB (sampled every 5 ms)."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    base = peak[0] = process.memory_info().rss

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result = action()
    finally:
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done.set()
        watcher.join()
    return result, wall, cpu, (peak[0] - base) / 2**20


def write_patches(root: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    """`count` random RGB PNGs of side x side px (decoding cost is what matters here)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"patch-{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


def slide_spec(side: int) -> SlideSpec:
    """Tissue over 60 % of the slide (a centred rectangle), a purple region in it, 0.25 µm/px, 256 px tiles."""
    margin_x, margin_y = round(side * 0.1), round(side * 0.125)
    levels = max(1, min(6, int(np.log2(side / 1024)) + 1))
    side -= side % 2 ** (levels - 1)  # every level exactly half the one above
    tissue = (margin_x, margin_y, side - margin_x, side - margin_y)
    region = (margin_x, margin_y, side // 2, side // 2)
    return SlideSpec(side, side, tissue=tissue, region=region, mpp=0.25, levels=levels, tile=256)


def run(cfg: RunConfig, *, batch: int, patches: int, patch_side: int, slide_side: int, mpp: float,
        seconds: float, repeats: int) -> dict[str, Any]:
    """Every figure of the module docstring, measured in this process; bare forward and predictions interleaved."""
    from client.predict import SlideOptions, predict_patches, predict_slide

    device = select_device("auto")
    torch.manual_seed(0)
    model = prepare(build_model(cfg.model, load_pretrained=False), device).eval()
    card = card_for_run(cfg, data_kind="synthetic")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "backbone": cfg.model.backbone, "image-size": cfg.model.image_size,
        "batch-size": batch, "repeats": repeats,
        "data": "SYNTHETIC (generated slide, random patches, random weights)",
    }
    rates: dict[str, list[tuple[float, float]]] = {"bare": [], "patches": [], "slide": []}
    with tempfile.TemporaryDirectory(prefix="histofed-bench-predict-") as tmp:
        root = Path(tmp)
        files = write_patches(root / "patches", patches, patch_side)
        spec = slide_spec(slide_side)
        _, wall, _, _ = measured(lambda: write_slide(root / "slide.tif", spec))
        result["slide"] = f"{spec.width} x {spec.height} px, {spec.levels} levels, 0.25 µm/px, tiled at {mpp:g} µm/px"
        result["slide-write-s"] = round(wall, 1)
        growth, slide_wall = [], []
        rates["bare"].append(forward_rate(model, cfg, device, batch, seconds))
        for k in range(repeats):  # bare, patches, bare, slide, bare, ...: every prediction between two bare runs
            done, wall, cpu, _ = measured(lambda: predict_patches(model, card, files, root / f"patches-{k}",
                                                                  device=device, batch_size=batch))
            rates["patches"].append((done["predicted"] / wall, done["predicted"] / cpu))
            rates["bare"].append(forward_rate(model, cfg, device, batch, seconds))
            summary, wall, cpu, grew = measured(lambda: predict_slide(
                model, card, root / "slide.tif", root / f"slide-{k}", SlideOptions(mpp=mpp, batch_size=batch),
                device=device))
            rates["slide"].append((summary["tiles"] / wall, summary["tiles"] / cpu))
            rates["bare"].append(forward_rate(model, cfg, device, batch, seconds))
            growth.append(grew)
            slide_wall.append(wall)
    bare_wall = float(np.median([r[0] for r in rates["bare"]]))
    bare_cpu = float(np.median([r[1] for r in rates["bare"]]))
    for offset, (name, label) in enumerate((("patches", f"predict patches ({patches} PNG, {patch_side} px)"),
                                            ("slide", "predict slide, tissue tiles (end to end)"))):
        # each prediction against the mean of the bare forwards measured just before and after it
        around = [[(a + b) / 2 for a, b in zip(rates["bare"][2 * k + offset], rates["bare"][2 * k + offset + 1])]
                  for k in range(repeats)]
        ratios = [[r / b for r, b in zip(rate, bare)] for rate, bare in zip(rates[name], around)]
        result.update({
            f"img/s {label}": round(float(np.median([r[0] for r in rates[name]])), 1),
            f"img/cpu-s {label}": round(float(np.median([r[1] for r in rates[name]])), 1),
            f"{name}/bare forward (img/s)": round(float(np.median([r[0] for r in ratios])), 3),
            f"{name}/bare forward (img/cpu-s)": round(float(np.median([r[1] for r in ratios])), 3),
        })
    result.update({
        "img/s bare forward (median)": round(bare_wall, 1), "img/cpu-s bare forward (median)": round(bare_cpu, 1),
        "ratios": "median over repeats of each prediction / the mean of the bare forwards just before and after it",
        "slide tissue tiles": summary["tiles"], "slide tiling": summary["plan"]["how"],
        "slide predict wall-s (median)": round(float(np.median(slide_wall)), 2),
        "peak RSS growth MiB (slide predict, max)": round(max(growth), 1),
        "RSS MiB (process, end)": round(psutil.Process().memory_info().rss / 2**20, 1),
    })
    ratios = [result[f"{n}/bare forward (img/s)"] for n in ("patches", "slide")]
    result["goal (>= 0.9 x bare forward img/s)"] = "met" if min(ratios) >= 0.9 else f"missed (lowest {min(ratios):.2f})"
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, measure, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patches", type=int, default=2048)
    parser.add_argument("--patch-side", type=int, default=64, help="PNG side in px (64 = the model's input)")
    parser.add_argument("--slide-side", type=int, default=20000)
    parser.add_argument("--mpp", type=float, default=1.0, help="µm/px to tile the 0.25 µm/px slide at")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing of each bare-forward measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are reported)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = RunConfig().override(TINY) if args.tiny else RunConfig()
    sizes = dict(batch=8, patches=16, patch_side=32, slide_side=2048, mpp=1.0, seconds=0.2, repeats=1) if args.tiny \
        else dict(batch=args.batch_size, patches=args.patches, patch_side=args.patch_side, slide_side=args.slide_side,
                  mpp=args.mpp, seconds=args.seconds, repeats=args.repeats)
    result = run(cfg, **sizes)
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
