"""GPU benchmark (item 1e): hybrid vs backbone-alone training img/s at 224 px, bf16 autocast + channels_last; predict img/s.

Usage: python -m simulations.bench_gpu [--backbone efficientnetv2_rw_t] [--batch-size 256] [--out FILE.json]
       python -m simulations.bench_gpu --tiny      # CPU-sized smoke run (tests use it; no GPU needed)
Needs no network (random weights, random batch) and finishes in a few minutes on one H100/H200. Prints
the GPU's name (torch.cuda.get_device_name) and img/s of: hybrid and backbone alone with bf16 autocast
+ channels_last (the a/b), and the hybrid with channels_last off and with AMP off (fp32). The batch
halves until it fits. Prediction row: the eval forward alone vs `common.inference.predict` (uint8 batches →
device → softmax on the CPU) at the same batch. Goal (issue 7): >= 2,000 img/s for the efficientnetv2_rw_t hybrid on one H100.
Without CUDA (and without --tiny) it says so and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from simulations.bench_train import Trainer, build, interleaved, random_batch, summarize
from simulations.figures import emit

TINY = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8, "model.hidden-size": 8}
NO_CUDA = "CUDA is not available on this machine: no GPU figures measured (use --tiny for a CPU smoke run)"


def variants(cfg: RunConfig, device: torch.device, batch_size: int, amp: torch.dtype | None) -> dict[str, Trainer]:
    """The a/b pair with AMP + channels_last, then the hybrid without channels_last and without AMP."""
    x, y = random_batch(cfg, batch_size)
    return {
        "hybrid amp+channels_last": Trainer(build(cfg, "hybrid"), device, x, y, autocast=amp),
        "backbone amp+channels_last": Trainer(build(cfg, "backbone"), device, x, y, autocast=amp),
        "hybrid amp+nchw": Trainer(build(cfg, "hybrid"), device, x, y, channels_last=False, autocast=amp),
        "hybrid fp32+channels_last": Trainer(build(cfg, "hybrid"), device, x, y),
    }


def measure(cfg: RunConfig, device: torch.device, batch_size: int, *, warmup: int, steps: int, repeats: int,
            amp: torch.dtype | None) -> dict[str, Any]:
    """Interleaved timing of every variant; on CUDA out-of-memory the batch halves and it retries."""
    while True:
        try:
            rates = interleaved(variants(cfg, device, batch_size, amp), warmup=warmup, steps=steps, repeats=repeats)
            break
        except torch.OutOfMemoryError:
            if batch_size <= 8:
                raise
        batch_size //= 2  # out of the except block: the failed models are garbage now
        gc.collect()
        torch.cuda.empty_cache()
    return {"batch-size": batch_size, **summarize(rates, {
        "hybrid/backbone (amp+channels_last)": ("hybrid amp+channels_last", "backbone amp+channels_last"),
        "channels_last/nchw (hybrid, amp)": ("hybrid amp+channels_last", "hybrid amp+nchw"),
        "amp/fp32 (hybrid, channels_last)": ("hybrid amp+channels_last", "hybrid fp32+channels_last"),
    })}


def predict_throughput(cfg: RunConfig, device: torch.device, batch_size: int, *, batches: int, amp: bool) -> dict[str, Any]:
    """Inference img/s: the bare eval forward on one batch vs `common.inference.predict` over in-memory uint8 batches."""
    import time

    import numpy as np

    from common.datasets.splits import ArraySplit
    from common.inference import loader_for, predict
    from common.training import _autocast, prepare, to_input

    model = prepare(build(cfg, "hybrid"), device).eval()
    size = cfg.model.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size * batches, size, size, 3), dtype=np.uint8)
    x = to_input(torch.from_numpy(images[:batch_size]), device)

    def forward() -> float:
        with torch.no_grad(), _autocast(device, amp):
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(batches):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return batches * batch_size / (time.perf_counter() - start)

    def pipeline() -> float:
        data = ArraySplit(images, np.arange(len(images)))
        start, seen = time.perf_counter(), 0
        for out in predict(model, loader_for(data, batch_size, device), device, amp=amp):
            seen += len(out.index)  # probabilities are on the CPU: the device work is finished
        return seen / (time.perf_counter() - start)

    bare, piped = forward(), pipeline()
    return {"img/s predict: bare eval forward": round(bare, 1), "img/s predict: pipeline (uint8 batches)": round(piped, 1),
            "predict pipeline/bare forward": round(piped / bare, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the GPU a/b (or the --tiny CPU smoke run), print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and size, runs on CPU (smoke test)")
    parser.add_argument("--backbone", default="efficientnetv2_rw_t")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="starting batch; halves until it fits")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(NO_CUDA)
        sys.exit(1)
    if args.tiny:
        cfg, batch, warmup, steps, repeats = RunConfig().override(TINY), 4, 1, 1, 2
    else:
        cfg = RunConfig().override({"model.backbone": args.backbone, "model.image-size": args.image_size})
        batch, warmup, steps, repeats = args.batch_size, 3, args.steps, args.repeats
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else None)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (CUDA not available)",
        "backbone": cfg.model.backbone, "image-size": cfg.model.image_size,
        "amp": str(amp).removeprefix("torch.") if amp else "none (CPU)", "torch": torch.__version__,
        **measure(cfg, device, batch, warmup=warmup, steps=steps, repeats=repeats, amp=amp),
        **predict_throughput(cfg, device, batch, batches=2 if args.tiny else 20, amp=amp is not None),
    }
    if not cuda:
        print(NO_CUDA.split(":")[0] + ": tiny CPU smoke run, not a GPU figure")
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
