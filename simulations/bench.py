"""The benchmark suite (issue 7): training img/s, federation vs pooled wall time, bytes per round, memory per client.

Usage: python -m simulations.bench [--size default|tiny] [--out FILE.json] [--no-compile] [--cold-compile]
       [--transfer-seeds N]
Prints one table and writes JSON. Ratios are measured inside one process or one run (machines are
noisy); absolute CPU times are context only. Every figure is on SYNTHETIC data. The GPU figures come
from `python -m simulations.bench_gpu` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simulations import bench_federation as fed
from simulations import bench_train as tr
from simulations.figures import emit


@dataclass(frozen=True)
class Size:
    """How big each benchmark runs: (a) throughput settings, (b)-(d) federation scales (flat overrides)."""

    train: dict[str, Any]
    batch: int
    warmup: int
    steps: int
    repeats: int
    compile_backend: str
    compile_timeout_s: float
    demo: dict[str, Any] = field(default_factory=dict)  # on top of the default scenario synthetic-3sites
    compute: dict[str, Any] = field(default_factory=dict)


_TINY_MODEL = {"model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8,
               "model.hidden-size": 8}
SIZES: dict[str, Size] = {
    "default": Size(
        train={"model.image-size": 96}, batch=32, warmup=2, steps=2, repeats=5,
        compile_backend="inductor", compile_timeout_s=240.0,
        demo={},  # the Quickstart scenario as it ships: 5 rounds x 1 local epoch, 64 px
        compute={"train.local-epochs": 6, "federation.rounds": 2},  # same data/model, 6x the compute per round: pooled > 60 s
    ),
    "tiny": Size(
        train=_TINY_MODEL, batch=4, warmup=1, steps=1, repeats=2, compile_backend="eager", compile_timeout_s=120.0,
        demo={**_TINY_MODEL, "data.train-per-site": 16, "data.test-per-site": 8, "train.batch-size": 8,
              "federation.rounds": 1},
        compute={**_TINY_MODEL, "data.train-per-site": 16, "data.test-per-site": 8, "train.batch-size": 8,
                 "federation.rounds": 1, "train.local-epochs": 2},
    ),
}
GOALS = {  # issue 7, reported not asserted
    "hybrid/backbone img/s (CPU, channels_last)": (">=", 0.85),
    "federated/pooled wall (compute scale)": ("<=", 1.15),
    "float16/float32 bytes per round": ("<=", 0.5),
    "accuracy float16 - float32 (pt)": ("abs<=", 0.5),
}


def scale(name: str, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """One scale: the federated run through flower-sim, then pooled training on the same cores.

    Pooled gets the federation's total threads, but never more than the machine's cores: oversubscribed
    intra-op threads slow one process down, which would flatter the federation.
    """
    federated = fed.federated(overrides, work / f"{name}-float32")
    threads = min(federated["threads-total"], os.cpu_count() or 1)
    pooled = fed.pooled(fed.scenario_config(overrides), threads=threads)
    return {"overrides": overrides, "federated": federated, "pooled": pooled,
            "federated/pooled wall": round(federated["wall-s"] / pooled["wall-s"], 3),
            "serverapp/pooled wall": round(float(federated["serverapp-s"]) / pooled["wall-s"], 3),
            "federated/pooled cpu-s": round(federated["cpu-s (flower+ray processes, sampled)"] / pooled["cpu-s"], 3)}


def transfer(size: Size, probe: dict[str, Any], demo: dict[str, Any], work: Path, seeds: int = 1) -> dict[str, Any]:
    """Bytes per client and round for both dtypes (from the probe); the demo scenario's accuracy per dtype and seed."""
    runs: dict[str, list[dict[str, Any]]] = {"float32": [demo["federated"]], "float16": []}
    for seed in range(seeds):  # seed 0's float32 run is the demo run itself
        for dtype in ("float32", "float16") if seed else ("float16",):
            runs[dtype].append(fed.federated({**size.demo, "federation.transfer-dtype": dtype, "train.seed": seed},
                                             work / f"demo-{dtype}-seed{seed}"))
    accuracy = {d: [r["accuracy"] for r in rs] for d, rs in runs.items()}
    walls = [r["wall-s"] for r in runs["float16"]]
    total = {d: probe[d]["down-bytes (train + evaluate)"] + probe[d]["up-bytes"] for d in ("float32", "float16")}
    mean = {d: sum(v) / len(v) for d, v in accuracy.items()}
    return {
        "model-fp32-bytes": probe["model-fp32-bytes"], "float32": probe["float32"], "float16": probe["float16"],
        "up-bytes float32/model": round(probe["float32"]["up-bytes"] / probe["model-fp32-bytes"], 4),
        "float16/float32 bytes per round": round(total["float16"] / total["float32"], 4),
        "float16 up-bytes/fp32 model": round(probe["float16"]["up-bytes"] / probe["model-fp32-bytes"], 4),
        "seeds": seeds, "accuracy float32 per seed": accuracy["float32"], "accuracy float16 per seed": accuracy["float16"],
        "accuracy float32": round(mean["float32"], 4), "accuracy float16": round(mean["float16"], 4),
        "accuracy float16 - float32 (pt)": round(100 * (mean["float16"] - mean["float32"]), 2),
        "federated float16 wall-s": round(sum(walls) / len(walls), 1),
    }


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the issue with its measured value and whether it was met."""
    values = {
        "hybrid/backbone img/s (CPU, channels_last)": result["train"]["hybrid/backbone (channels_last)"],
        "federated/pooled wall (compute scale)": result["federation"]["compute"]["federated/pooled wall"],
        "float16/float32 bytes per round": result["transfer"]["float16/float32 bytes per round"],
        "accuracy float16 - float32 (pt)": result["transfer"]["accuracy float16 - float32 (pt)"],
    }
    out = {}
    for name, (op, target) in GOALS.items():
        v = values[name]
        met = v >= target if op == ">=" else (v <= target if op == "<=" else abs(v) <= target)
        out[name] = {"value": v, "goal": f"{op.replace('abs', '|x| ')} {target}", "met": bool(met)}
    return out


def run(size_name: str, *, compile_: bool, cold_compile: bool, threads: int, work: Path, seeds: int = 1,
        save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Every benchmark at one size; `save` gets the partial result after each stage; returns the nested result."""
    size, start = SIZES[size_name], time.perf_counter()
    torch.set_num_threads(threads)
    train_cfg = fed.scenario_config(size.train)
    result: dict[str, Any] = {
        "data-kind": "synthetic", "size": size_name,
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(), "torch": torch.__version__,
        "train": tr.train_throughput(train_cfg, batch_size=size.batch, warmup=size.warmup, steps=size.steps,
                                     repeats=size.repeats),
    }
    result["compile"] = (tr.compile_throughput(size.train, batch_size=size.batch, steps=size.steps,
                                               repeats=size.repeats, timeout_s=size.compile_timeout_s,
                                               backend=size.compile_backend, cold=cold_compile)
                         if compile_ else {"compile": "skipped (--no-compile)"})
    save(result)
    probe = fed.client_probe(size.demo)
    result["memory"] = {k: v for k, v in probe.items() if "rss" in k}
    result["federation"] = {"demo": scale("demo", size.demo, work)}
    save(result)
    result["transfer"] = transfer(size, probe, result["federation"]["demo"], work, seeds)
    save(result)
    result["federation"]["compute"] = scale("compute", size.compute, work)
    demo = result["federation"]["demo"]
    for key in ("peak-rss-mib (largest ray client worker)", "peak-uss-mib (largest ray client worker)"):
        result["memory"][f"{key[:-1]}, demo run)"] = demo["federated"][key]
    result["goals"] = goals(result)
    result["elapsed-s"] = round(time.perf_counter() - start, 1)
    return result


def table(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The flat rows printed: every leaf value under its dotted path."""
    rows: list[tuple[str, Any]] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and not (prefix.endswith("overrides")):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            rows.append((prefix, node))

    walk("", result)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, run the suite, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (a cold compile takes minutes)")
    parser.add_argument("--cold-compile", action="store_true", help="compile into an empty inductor cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the img/s figures (default 1)")
    parser.add_argument("--transfer-seeds", type=int, default=1,
                        help="seeds for the float16-vs-float32 accuracy (each adds two demo runs, ~70 s each here)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the federated run directories here")
    args = parser.parse_args(argv)
    if args.transfer_seeds < 1:
        parser.error(f"--transfer-seeds must be at least 1 (got {args.transfer_seeds})")
    command = shlex.join(["python", "-m", "simulations.bench", *(sys.argv[1:] if argv is None else argv)])

    def save(partial: dict[str, Any]) -> None:
        if args.out:  # written after every stage, so a later failure keeps the figures already measured
            args.out.write_text(json.dumps({**partial, "command": command, "partial": True}, indent=1))

    with tempfile.TemporaryDirectory(prefix="histofed-bench-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        result = run(args.size, compile_=not args.no_compile, cold_compile=args.cold_compile,
                     threads=args.threads, work=work, seeds=args.transfer_seeds, save=save)
    result["command"] = command
    print("histofed benchmark (SYNTHETIC data)")
    return emit(table(result), result, args.out)


if __name__ == "__main__":
    main()
