"""Benchmarks (b)-(d): federated (`flower-sim run`) vs pooled wall time, bytes per client and round, client memory.

Federated runs go through the real command (`flower-sim run` as a subprocess: SuperLink, Ray, the
ServerApp and ClientApps); pooled runs train the same model on the sites' training splits
concatenated with the same loop (common.training.train_local) for the same rounds x local epochs,
and evaluate every site's test split as often as the federation does. Bytes are the serialised size
of the ArrayRecords Flower pushes (every unique object of the record's tree, as Flower 1.42 sends
them). Peak memory: the peak RSS of a fresh process that runs the ClientApp's own train and
evaluate functions for one site (VmHWM), and sampled RSS/USS of the Ray worker processes during the simulations.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch.utils.data import ConcatDataset

from common.config import RunConfig
from common.datasets import synthetic
from common.datasets.registry import data_kind, get_dataset, load_site
from common.metrics import pooled_report
from common.model import build_model
from common.training import evaluate, prepare, select_device, train_local
from common.rundir import RunDirectory
from server.launch import processes_naming
from simulations.scenarios import DEFAULT_SCENARIO, get_scenario

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
MIB = 1024 * 1024


def wire_bytes(record: ArrayRecord) -> int:
    """Serialised bytes Flower pushes for an ArrayRecord: the record, its Arrays and their unique chunks."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def tensor_bytes(record: ArrayRecord) -> int:
    """Raw bytes of the arrays themselves (no headers): the model size in its dtypes."""
    return sum(record[k].numpy().nbytes for k in record.keys())


def scenario_config(overrides: dict[str, Any], scenario: str = DEFAULT_SCENARIO) -> RunConfig:
    """The scenario's config with flat overrides, as `flower-sim run SCENARIO --set k=v` resolves it."""
    return get_scenario(scenario).config().override(overrides)


def _is_client_worker(name: str) -> bool:
    return name.startswith("ray::ClientAppActor")


def _rss_sample(marker: str, peaks: dict[int, tuple[str, int]], uss: dict[int, int], cpu: dict[int, float]) -> int:
    """Record the RSS and CPU seconds of each Flower/Ray process of a run (command line names it, or a descendant).

    For Ray's ClientApp workers also the USS (memory no other process shares: what one more client costs).
    Returns the summed RSS of this sample (shared library pages counted once per process).
    """
    roots = processes_naming(marker)
    seen, total = set(), 0
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in family:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                rss, name, times = proc.memory_info().rss, proc.name(), proc.cpu_times()
                cpu[proc.pid] = times.user + times.system
                if _is_client_worker(name):
                    uss[proc.pid] = max(uss.get(proc.pid, 0), proc.memory_full_info().uss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            if rss > peaks.get(proc.pid, ("", 0))[1]:
                peaks[proc.pid] = (name, rss)
    return total


def federated(overrides: dict[str, Any], run_dir: Path, *, timeout_s: float = 900.0, start_timeout_s: float = 240.0,
              scenario: str = DEFAULT_SCENARIO) -> dict[str, Any]:
    """`flower-sim run SCENARIO --set ...` as a subprocess: wall time, ServerApp time, accuracy, sampled RSS.

    A run whose ServerApp has not started after `start_timeout_s` (a Flower start-up hang, seen on a
    busy shared machine) is stopped and started once more in a fresh run directory.
    """
    for attempt in range(2):
        attempt_dir = run_dir if attempt == 0 else run_dir.with_name(f"{run_dir.name}-retry")
        measured = _federated_once(overrides, attempt_dir, scenario, timeout_s, start_timeout_s)
        if measured is not None:
            return {**measured, "attempts": attempt + 1}
    raise RuntimeError(f"flower-sim did not start the ServerApp within {start_timeout_s:g} s, twice ({run_dir})")


def _federated_once(overrides: dict[str, Any], run_dir: Path, scenario: str, timeout_s: float,
                    start_timeout_s: float) -> dict[str, Any] | None:
    cmd = [FLOWER_SIM, "run", scenario, "--run-dir", str(run_dir), "--no-report"]  # pooled renders no report either
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    peaks: dict[int, tuple[str, int]] = {}
    uss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    peak_total = 0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.stdout").open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        while proc.poll() is None:
            elapsed = time.perf_counter() - start
            hung = elapsed > start_timeout_s and not RunDirectory(run_dir).read_status()
            if hung or elapsed > timeout_s:
                os.killpg(proc.pid, signal.SIGTERM)  # flower-sim stops its Flower processes on SIGTERM
                proc.wait(timeout=60)
                if hung:
                    return None
                break
            peak_total = max(peak_total, _rss_sample(str(RunDirectory(run_dir).flwr_home), peaks, uss, cpu))
            time.sleep(0.5)
        wall = time.perf_counter() - start
    run = RunDirectory(run_dir)
    status, history = run.read_status(), run.history()
    if proc.returncode != 0 or status.get("status") != "completed":
        raise RuntimeError(f"flower-sim run failed (exit {proc.returncode}): {status.get('error', 'no status')}; "
                           f"see {run_dir.parent / (run_dir.name + '.stdout')}")
    config, _ = run.read_config()
    workers = [rss for name, rss in peaks.values() if _is_client_worker(name)]
    train_s = [max((site["seconds"] for site in rec["train"].values()), default=0.0) for rec in history
               if rec.get("train")]  # per round, the slowest site: the training span of the round
    return {
        "wall-s": round(wall, 1),
        "serverapp-s": status.get("elapsed-s"),
        "start-up-and-teardown-s": round(wall - float(status.get("elapsed-s", 0.0)), 1),
        "round-0-evaluation-done-s": history[0]["elapsed-s"] if history else None,
        "train-s (slowest site per round, summed)": round(sum(train_s), 1),
        "cpu-s (flower+ray processes, sampled)": round(sum(cpu.values()), 1),
        "threads-total": int(config["train.num-threads"]) * int(config["federation.num-sites"]),
        "accuracy": status.get("final", {}).get("accuracy"),
        "peak-rss-mib (largest ray client worker)": round(max(workers) / MIB, 1) if workers else None,
        "peak-uss-mib (largest ray client worker)": round(max(uss.values()) / MIB, 1) if uss else None,
        "mean-rss-mib (ray client workers)": round(sum(workers) / len(workers) / MIB, 1) if workers else None,
        "mean-uss-mib (ray client workers)": round(sum(uss.values()) / len(uss) / MIB, 1) if uss else None,
        "ray-client-workers": len(workers),
        "peak-rss-mib (all flower+ray processes)": round(peak_total / MIB, 1),
        "data-kind": status.get("data-kind"),
    }


def pooled(cfg: RunConfig, *, threads: int) -> dict[str, Any]:
    """Centralised training of the same model, data, rounds x epochs and evaluations, with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    synthetic.generate.cache_clear()  # pay data generation like the federated run does
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        entry, device = get_dataset(cfg.data.dataset), select_device(cfg.train.device)
        sites, names = range(cfg.federation.num_sites), entry.site_names(cfg)
        train = ConcatDataset([load_site(cfg, i, "train") for i in sites])
        tests = {names[i]: load_site(cfg, i, "test") for i in sites}
        torch.manual_seed(cfg.train.seed)
        model = prepare(build_model(cfg.model), device, channels_last=cfg.train.channels_last)

        def evaluate_all() -> dict[str, Any]:
            return pooled_report({n: evaluate(model, d, device, amp=cfg.train.amp) for n, d in tests.items()})

        report, train_s = evaluate_all(), 0.0
        for server_round in range(1, cfg.federation.rounds + 1):
            seed = cfg.train.seed * 1_000_003 + server_round * 1009
            train_s += train_local(model, train, cfg.train, device, seed=seed).seconds  # type: ignore[arg-type]
            report = evaluate_all()
        wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(before)
    return {"wall-s": round(wall, 2), "train-s": round(train_s, 2), "cpu-s": round(cpu_s, 2), "threads": threads,
            "accuracy": report["global"]["accuracy"], "data-kind": data_kind(cfg.data.dataset, cfg.data.root)}


def client_probe(overrides: dict[str, Any], *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run `_probe` in a fresh process (so getrusage's peak is one client's): peak RSS and bytes per round."""
    out = subprocess.run([sys.executable, "-m", "simulations.bench_federation", json.dumps(overrides)],
                         capture_output=True, text=True, timeout=timeout_s, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client probe failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _maxrss_mib() -> float:
    """Peak RSS of this process image: VmHWM (reset by exec), not ru_maxrss (Linux keeps the parent's across exec)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB on Linux, bytes on macOS


def _probe(overrides: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one site's train + evaluate messages through the ClientApp, per transfer dtype."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import evaluate_site, train
    from common import protocol as P
    from server.strategy import build_strategy

    for attr in ("_run_id", "_node_id", "_task_id"):  # Messages built outside a Flower task need an identity
        setattr(TaskIdentity, attr, 1)
    result: dict[str, Any] = {"rss-mib after imports": round(_maxrss_mib(), 1)}
    for dtype in ("float32", "float16"):
        cfg = scenario_config({**overrides, "federation.transfer-dtype": dtype, "train.num-threads": 1})
        strategy = build_strategy(cfg.federation, train_metrics=dict, evaluate_metrics=dict)
        torch.manual_seed(cfg.train.seed)
        master = ArrayRecord(build_model(cfg.model).state_dict())
        down = strategy.wire_arrays(master)  # what the ServerApp sends (train and evaluate instructions)
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": cfg.federation.num_sites},
                      state=RecordDict(), run_config=cfg.to_flat())
        replies = [fn(Message(RecordDict({P.ARRAYS: down, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
                              dst_node_id=1, message_type=kind), ctx)
                   for fn, kind in ((train, MessageType.TRAIN), (evaluate_site, MessageType.EVALUATE))]
        if dtype == "float32":
            result["peak-rss-mib (one client: train + evaluate)"] = round(_maxrss_mib(), 1)
            result["model-fp32-bytes"] = tensor_bytes(master)
        up = replies[0].content[P.ARRAYS]
        result[dtype] = {"down-bytes (train + evaluate)": 2 * wire_bytes(down), "up-bytes": wire_bytes(up),
                         "dtypes-on-wire": sorted({up[k].dtype for k in up.keys()})}
    return result


if __name__ == "__main__":  # child of client_probe: one JSON object of flat config overrides
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
