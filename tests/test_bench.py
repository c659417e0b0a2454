"""The benchmark suite at tiny size, so it cannot rot: keys, structure and positivity are asserted, never speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from simulations import bench, bench_federation, bench_gpu, bench_train

TINY = bench.SIZES["tiny"]


def _positive(result: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in result, key
        assert result[key] > 0, key


def test_training_throughput_reports_every_variant_and_ratio() -> None:
    cfg = bench_federation.scenario_config(TINY.train)
    result = bench_train.train_throughput(cfg, batch_size=TINY.batch, warmup=1, steps=1, repeats=2)
    variants = [f"{kind} {fmt}" for kind in ("hybrid", "backbone") for fmt in ("channels_last", "nchw")]
    _positive(result, [f"img/cpu-s {variant}" for variant in variants])
    _positive(result, ["hybrid/backbone (channels_last)", "hybrid/backbone (nchw)", "channels_last/nchw (hybrid)",
                       "channels_last/nchw (backbone)"])
    assert result["device"] == "cpu" and result["image-size"] == 32


def test_backbone_alone_shares_the_hybrids_backbone_and_classifies() -> None:
    cfg = bench_federation.scenario_config(TINY.train)
    model = bench_train.build(cfg, "backbone")
    assert isinstance(model, bench_train.BackboneOnly)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, cfg.model.num_classes)


def test_compile_runs_in_a_child_and_a_timeout_is_reported_not_raised() -> None:
    ok = bench_train.compile_throughput(TINY.train, batch_size=2, steps=1, repeats=1, timeout_s=120, backend="eager")
    assert ok["compile"] == "ok", ok
    _positive(ok, ["compile-s (first step)", "img/cpu-s hybrid compiled", "img/cpu-s hybrid eager",
                   "compiled/eager (hybrid)"])
    slow = bench_train.compile_throughput(TINY.train, batch_size=2, steps=1, repeats=1, timeout_s=0.2)
    assert slow["compile"].startswith("skipped")


def test_gpu_script_runs_tiny_on_cpu_and_names_the_device(capsys) -> None:
    result = bench_gpu.main(["--tiny"])
    out = capsys.readouterr().out
    _positive(result, ["img/s hybrid amp+channels_last", "img/s backbone amp+channels_last", "img/s hybrid amp+nchw",
                       "img/s hybrid fp32+channels_last", "hybrid/backbone (amp+channels_last)", "batch-size",
                       "img/s predict: bare eval forward", "img/s predict: pipeline (uint8 batches)"])
    assert result["device"] in out
    if not torch.cuda.is_available():
        assert "CUDA is not available" in out and result["device"].startswith("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_script_without_cuda_says_so_and_exits_1(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main([])
    assert exit_.value.code == 1 and "CUDA is not available" in capsys.readouterr().out


def test_client_probe_measures_memory_and_bytes_for_both_dtypes() -> None:
    probe = bench_federation.client_probe(TINY.demo)
    _positive(probe, ["rss-mib after imports", "peak-rss-mib (one client: train + evaluate)", "model-fp32-bytes"])
    for dtype in ("float32", "float16"):
        _positive(probe[dtype], ["down-bytes (train + evaluate)", "up-bytes"])
        assert dtype in probe[dtype]["dtypes-on-wire"]
    assert probe["float16"]["up-bytes"] < probe["float32"]["up-bytes"]


def test_pooled_training_reports_wall_time_and_accuracy() -> None:
    result = bench_federation.pooled(bench_federation.scenario_config(TINY.demo), threads=1)
    _positive(result, ["wall-s", "train-s", "threads"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["data-kind"] == "synthetic"


@pytest.mark.slow
def test_whole_suite_at_tiny_size_prints_and_writes_every_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "tiny", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["goals"] == result["goals"]
    assert result["data-kind"] == "synthetic" and "SYNTHETIC" in printed
    assert set(result) >= {"train", "compile", "memory", "transfer", "federation", "goals", "command", "elapsed-s"}
    for name in ("demo", "compute"):
        scale = result["federation"][name]
        _positive(scale["federated"], ["wall-s", "serverapp-s", "threads-total", "ray-client-workers",
                                       "peak-rss-mib (largest ray client worker)"])
        _positive(scale["pooled"], ["wall-s", "train-s"])
        assert scale["pooled"]["threads"] == min(scale["federated"]["threads-total"], os.cpu_count() or 1)
        _positive(scale, ["federated/pooled wall"])
    assert result["transfer"]["float16"]["up-bytes"] < result["transfer"]["float32"]["up-bytes"]
    assert set(result["goals"]) == set(bench.GOALS)
    runs = list((tmp_path / "work").glob("*/status.json"))
    assert len(runs) == 3 and all(json.loads(s.read_text())["status"] == "completed" for s in runs)
    assert not list((tmp_path / "work").rglob("report.html"))  # --no-report: pooled renders none either
    assert all(isinstance(goal["met"], bool) for goal in result["goals"].values())
    for key, value in bench.table(result):
        assert key in printed


def test_float16_accuracy_is_compared_over_seeds(monkeypatch, tmp_path: Path) -> None:
    runs = []

    def fake(overrides, work):
        runs.append((overrides["federation.transfer-dtype"], overrides["train.seed"]))
        acc = 0.9 + 0.01 * overrides["train.seed"] - (0.02 if overrides["federation.transfer-dtype"] == "float16" else 0)
        return {"accuracy": acc, "wall-s": 10.0}

    monkeypatch.setattr(bench.fed, "federated", fake)
    probe = {"model-fp32-bytes": 100, **{d: {"down-bytes (train + evaluate)": n, "up-bytes": n // 2}
                                         for d, n in (("float32", 200), ("float16", 100))}}
    out = bench.transfer(bench.SIZES["tiny"], probe, {"federated": {"accuracy": 0.9}}, tmp_path, seeds=3)
    assert runs == [("float16", 0), ("float32", 1), ("float16", 1), ("float32", 2), ("float16", 2)]
    assert out["accuracy float32 per seed"] == pytest.approx([0.90, 0.91, 0.92])
    assert out["accuracy float16 - float32 (pt)"] == pytest.approx(-2.0)
    assert out["float16/float32 bytes per round"] == 0.5
    with pytest.raises(SystemExit):
        bench.main(["--transfer-seeds", "0"])
