"""The calibration benchmark runs end to end at its tiny size (so it cannot rot) and reports every figure."""

from __future__ import annotations

import json
import math

from simulations import bench_calibration


def test_tiny_calibration_reports_every_figure(tmp_path, capsys) -> None:
    out = tmp_path / "calibration.json"
    result = bench_calibration.main(["--size", "tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["data-kind"] == "synthetic" and saved["figures"] == result["figures"]
    names = list(saved["figures"])
    for needle in ("mean RGB", "16-bin RGB histogram", "dark-pixel share", "nuclear-area fraction", "untrained",
                   "patch-level", "leakage", "outlier", "hospital shift"):
        assert any(needle in n for n in names), needle
    assert all(math.isfinite(v) for v in saved["figures"].values())
    assert set(saved["holds"]) == set(saved["targets"]) and all(isinstance(v, bool) for v in saved["holds"].values())
    assert "SYNTHETIC" in capsys.readouterr().out
