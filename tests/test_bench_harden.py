"""The hardening benchmarks that need no Flower process run at a tiny size and print their figures."""

from __future__ import annotations

import json
from pathlib import Path


def test_fuzz_benchmark_reports_cases_per_second_and_the_property(capsys, tmp_path: Path) -> None:
    from simulations import bench_fuzz

    result = bench_fuzz.main(["--cases", "25", "--out", str(tmp_path / "fuzz.json")])
    out = capsys.readouterr().out
    assert result["property held"] and result["cases"] == 25 and "cases-per-s" in out
    assert json.loads((tmp_path / "fuzz.json").read_text())["crafted replies"] == result["crafted replies"]


def test_index_benchmark_times_the_cache_key_before_and_now(capsys) -> None:
    from simulations import bench_index

    result = bench_index.main(["--patients-per-subtype", "1", "--images", "1"])
    assert result["folders stamped (down to magnification, now)"] > result["folders stamped (down to subtype, before)"]
    assert result["images"] == 8 * 4 and "cache key-ms (now)" in capsys.readouterr().out
