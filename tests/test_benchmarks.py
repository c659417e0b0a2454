"""Benchmarks run at a tiny size so they cannot rot (their numbers are printed, never asserted)."""

from __future__ import annotations

from simulations import bench_data


def test_data_pipeline_benchmark_prints_every_figure(capsys) -> None:
    result = bench_data.main(["--patches", "16", "--image-size", "32", "--workers", "0,1", "--batch-size", "4",
                              "--synthetic-train", "8"])
    out = capsys.readouterr().out
    for key in ("train-step-img-s (1 thread)", "loader-img-s (0 workers)", "loader-img-s (1 workers)",
                "synthetic site rendered-s (cold cache)", "synthetic site from-disk-cache-s"):
        assert key in result and key in out and result[key] > 0
