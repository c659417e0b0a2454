"""Cache of a dataset's file index on disk, so a restart does not re-walk hundreds of thousands of files."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

INDEX_VERSION = 1


def default_cache_dir(configured: str = "") -> Path:
    """data.cache-dir, else $HISTOFED_CACHE, else ~/.cache/histofed."""
    return Path(configured or os.environ.get("HISTOFED_CACHE") or Path.home() / ".cache" / "histofed")


def cached_index(
    root: Path, dataset: str, build: Callable[[], list[dict[str, Any]]], *, cache_dir: Path,
    stamp_files: tuple[Path, ...] = (),
) -> list[dict[str, Any]]:
    """Return build()'s records, reusing a JSON cache while root and stamp files are unchanged."""
    root = root.resolve()
    stamp = [str(root), dataset, INDEX_VERSION] + [
        (str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (root, *stamp_files) if p.exists()
    ]
    key = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:16]
    path = cache_dir / f"{dataset}-index-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt
    records = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache location only costs speed
    return records
