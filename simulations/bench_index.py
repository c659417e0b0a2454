"""Benchmark: what the BreakHis index cache key costs when it stamps every folder down to the magnification folders.

Usage: python -m simulations.bench_index [--patients-per-subtype 10] [--images 24] [--out index.json]
Writes a SYNTHETIC tree in BreakHis's layout (default 80 patients × 4 magnifications × 24 images ≈ the real
7,909 images), then times: the cache key over the folders stamped before (down to subtypes) and now (down to
magnifications), a scan answered from the cache, and a full walk (the cold index build).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common.datasets import breakhis
from common.datasets.fixtures import write_breakhis
from simulations.figures import emit


def _best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _key_seconds(breast: Path, depth: int) -> tuple[int, float]:
    """Folders stamped and seconds to list + stat them (what every scan pays before reading the cache)."""
    def stamp() -> list:
        dirs = [breast, *sorted(p for d in range(1, depth + 1) for p in breast.glob("/".join("*" * d)) if p.is_dir())]
        return [(str(p), p.stat().st_mtime_ns) for p in dirs]

    return len(stamp()), _best_of(stamp)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients-per-subtype", type=int, default=10)
    parser.add_argument("--images", type=int, default=24, help="images per patient and magnification")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="histofed-index-"))
    try:
        root = write_breakhis(tmp / "data", patients_per_subtype=args.patients_per_subtype,
                              images_per_magnification=args.images, size=(14, 10))
        breast = breakhis._breast_dir(root)
        before_n, before_s = _key_seconds(breast, 3)
        now_n, now_s = _key_seconds(breast, breakhis.STAMP_DEPTH)
        start = time.perf_counter()
        records = breakhis.scan(root, tmp / "cache")  # cold: walks and validates every file
        cold = time.perf_counter() - start
        warm = _best_of(lambda: breakhis.scan(root, tmp / "cache"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "images": len(records), "data-kind": "synthetic",
        "folders stamped (down to subtype, before)": before_n, "cache key-ms (before)": round(before_s * 1e3, 2),
        "folders stamped (down to magnification, now)": now_n, "cache key-ms (now)": round(now_s * 1e3, 2),
        "scan from cache-ms (now, key included)": round(warm * 1e3, 1),
        "full walk-s (cold index)": round(cold, 2),
        "cache key now / cold walk": round(now_s / cold, 4),
    }
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
