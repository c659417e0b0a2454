"""Benchmark (a): training img/s of the hybrid vs its backbone alone, channels_last on/off, torch.compile on/off.

Every figure is a training step as common.training.train_local takes it (uint8 batch → to_input →
augment → forward → cross-entropy → backward → optimizer step) on a random batch. Variants are
timed interleaved (A B A B ...) in one process so machine noise hits them alike; ratios are
medians of per-repeat ratios. On CPU the clock is the process's CPU time (img/cpu-s): on a shared
machine it does not count the time other processes hold the core (with 1 thread it equals img/s on
an idle core). torch.compile runs in a child process with a time limit (its first step compiles;
steady state is timed after warm-up, interleaved with an eager twin).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import RunConfig
from common.model import HybridEffNetGRU, build_model
from common.training import OPTIMIZERS, augment, prepare, to_input

CPU_UNIT = "img/cpu-s"  # images per second of this process's CPU time


class BackboneOnly(nn.Module):
    """The a/b baseline: the hybrid's own feature backbone + a linear head over its pooled deepest features."""

    def __init__(self, hybrid: HybridEffNetGRU, num_classes: int) -> None:
        super().__init__()
        self.backbone = hybrid.backbone
        self.classifier = nn.Linear(hybrid.backbone.feature_info.channels()[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B x K from the globally average-pooled deepest feature map."""
        return self.classifier(F.adaptive_avg_pool2d(self.backbone(x)[-1], 1).flatten(1))  # timm's avg head


def build(cfg: RunConfig, kind: str) -> nn.Module:
    """`hybrid` (the product model) or `backbone` (BackboneOnly of a fresh hybrid), seeded alike."""
    torch.manual_seed(0)
    hybrid = build_model(cfg.model, load_pretrained=False)
    return hybrid if kind == "hybrid" else BackboneOnly(hybrid, cfg.model.num_classes)


@dataclass
class Trainer:
    """One model, its optimizer and a fixed random batch: `step()` is one training step."""

    model: nn.Module
    device: torch.device
    batch: torch.Tensor  # uint8 B x H x W x 3
    labels: torch.Tensor
    channels_last: bool = True
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.model = prepare(self.model, self.device, channels_last=self.channels_last).train()
        self.opt = OPTIMIZERS["adamw"](self.model.parameters(), 1e-3, 1e-4)
        self.gen = torch.Generator().manual_seed(0)
        self.labels = self.labels.to(self.device)
        if self.device.type == "cuda":  # as train_local's DataLoader does (pin_memory on CUDA)
            self.batch = self.batch.pin_memory()

    def step(self) -> None:
        """uint8 batch → normalised input → augment → forward/backward → AdamW step."""
        x = augment(to_input(self.batch, self.device), self.gen)
        if not self.channels_last:  # to_input always returns channels_last strides: undo for the NCHW variant
            x = x.contiguous()
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.model(x), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def random_batch(cfg: RunConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded uint8 image batch at the config's image size and its labels."""
    gen = torch.Generator().manual_seed(1)
    size = cfg.model.image_size
    x = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, cfg.model.num_classes, (batch_size,), generator=gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: Trainer, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Images per second of `clock` over `steps` training steps (CUDA synchronised)."""
    _sync(trainer.device)
    start = clock()
    for _ in range(steps):
        trainer.step()
    _sync(trainer.device)
    return steps * trainer.batch.shape[0] / (clock() - start)


def interleaved(trainers: dict[str, Trainer], *, warmup: int, steps: int, repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Warm every variant up, then time `steps` steps of each in turn, `repeats` times: rate per repeat."""
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step()
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            rates[name].append(timed_steps(trainer, steps, clock))
    return rates


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repeat ratios (robust to a noisy repeat hitting both variants)."""
    return statistics.median(a / b for a, b in zip(num, den))


def summarize(
    rates: dict[str, list[float]], pairs: dict[str, tuple[str, str]], unit: str = "img/s"
) -> dict[str, float]:
    """Median rate of every variant (keys '<unit> <variant>') and the requested median ratios."""
    out = {f"{unit} {name}": round(statistics.median(values), 2) for name, values in rates.items()}
    out.update({label: round(median_ratio(rates[a], rates[b]), 3) for label, (a, b) in pairs.items()})
    return out


def train_throughput(cfg: RunConfig, *, batch_size: int, warmup: int, steps: int, repeats: int) -> dict[str, float]:
    """Hybrid vs backbone alone, channels_last on/off, on CPU in this process (AMP is CUDA-only)."""
    device = torch.device("cpu")
    x, y = random_batch(cfg, batch_size)
    trainers = {
        f"{kind} {fmt}": Trainer(build(cfg, kind), device, x, y, channels_last=fmt == "channels_last")
        for kind in ("hybrid", "backbone") for fmt in ("channels_last", "nchw")
    }
    rates = interleaved(trainers, warmup=warmup, steps=steps, repeats=repeats, clock=time.process_time)
    return {
        "device": "cpu", "threads": torch.get_num_threads(), "image-size": cfg.model.image_size,
        "batch-size": batch_size, "backbone": cfg.model.backbone,
        **summarize(rates, {
            "hybrid/backbone (channels_last)": ("hybrid channels_last", "backbone channels_last"),
            "hybrid/backbone (nchw)": ("hybrid nchw", "backbone nchw"),
            "channels_last/nchw (hybrid)": ("hybrid channels_last", "hybrid nchw"),
            "channels_last/nchw (backbone)": ("backbone channels_last", "backbone nchw"),
        }, unit=CPU_UNIT),
    }


def compile_probe(cfg: RunConfig, *, batch_size: int, steps: int, repeats: int,
                  backend: str = "inductor") -> dict[str, float]:
    """In this process: compile the hybrid (first step = compile), then time it against an eager twin."""
    device = torch.device("cpu")
    x, y = random_batch(cfg, batch_size)
    eager = Trainer(build(cfg, "hybrid"), device, x, y)
    compiled = Trainer(build(cfg, "hybrid"), device, x, y)
    compiled.model = torch.compile(compiled.model, backend=backend)
    start = time.perf_counter()
    compiled.step()
    first = time.perf_counter() - start
    rates = interleaved({"hybrid eager": eager, "hybrid compiled": compiled}, warmup=2, steps=steps, repeats=repeats,
                        clock=time.process_time)
    return {"compile-s (first step)": round(first, 1),
            **summarize(rates, {"compiled/eager (hybrid)": ("hybrid compiled", "hybrid eager")}, unit=CPU_UNIT)}


def compile_throughput(
    overrides: dict[str, object], *, batch_size: int, steps: int, repeats: int, timeout_s: float,
    backend: str = "inductor", cold: bool = False,
) -> dict[str, object]:
    """torch.compile on/off in a child process; past `timeout_s` it is reported as skipped.

    `cold` compiles into an empty inductor cache (the first-ever compile on a machine); otherwise
    torch's default cache is used, which an earlier run may have warmed.
    """
    args = [sys.executable, "-m", "simulations.bench_train", json.dumps(overrides),
            str(batch_size), str(steps), str(repeats), str(torch.get_num_threads()), backend]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # no compile-worker pool left behind on timeout
    with tempfile.TemporaryDirectory(prefix="histofed-inductor-") as cache:
        if cold:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group, started above
            proc.communicate()
            return {"compile": f"skipped: compile + timing exceeded {timeout_s:g} s", "backend": backend}
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"compile": f"failed: {last[:200]}", "backend": backend}
    return {"compile": "ok", "backend": backend, "inductor-cache": "cold" if cold else "default (may be warm)",
            **json.loads(out.strip().splitlines()[-1])}


if __name__ == "__main__":  # child of compile_throughput: overrides-json batch steps repeats threads backend
    _overrides, _batch, _steps, _repeats, _threads = sys.argv[1], *map(int, sys.argv[2:6])
    torch.set_num_threads(_threads)
    _cfg = RunConfig().override(json.loads(_overrides))
    print(json.dumps(compile_probe(_cfg, batch_size=_batch, steps=_steps, repeats=_repeats, backend=sys.argv[6])))
