"""The prediction benchmark runs at a tiny size so it cannot rot (its figures come from the full run, not from here)."""

from __future__ import annotations

from simulations import bench_predict


def test_prediction_benchmark_reports_rates_ratios_and_memory(tmp_path, capsys) -> None:
    result = bench_predict.main(["--tiny", "--out", str(tmp_path / "bench.json")])
    for key in ("img/s bare forward (median)", "img/s predict patches (16 PNG, 32 px)",
                "img/s predict slide, tissue tiles (end to end)", "patches/bare forward (img/s)",
                "slide/bare forward (img/cpu-s)", "slide tissue tiles"):
        assert result[key] > 0, key
    assert result["peak RSS growth MiB (slide predict, max)"] >= 0 and "SYNTHETIC" in result["data"]
    assert (tmp_path / "bench.json").is_file() and "goal (>= 0.9 x bare forward img/s)" in capsys.readouterr().out
