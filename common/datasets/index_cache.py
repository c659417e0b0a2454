"""On-disk caches: a dataset's file index (no re-walk on restart) and generated arrays (no re-render per message)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def cached_arrays(
    name: str, key: dict[str, Any], build: Callable[[], dict[str, np.ndarray]], *, cache_dir: Path,
    code: Path | Sequence[Path] | None = None,
) -> dict[str, np.ndarray]:
    """Return build()'s arrays, reusing an .npz file keyed by `key` and the generating module's source.

    Deployment starts a fresh ClientApp process for every message, so a per-process cache does not
    survive a round; this one does. Loading never unpickles (allow_pickle=False). `code`: the generator's
    source file(s); editing any of them changes the key.
    """
    files = [code] if isinstance(code, Path) else list(code or ())
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.read_bytes())
    stamp = {**key, "version": INDEX_VERSION, "code": digest.hexdigest() if files else ""}
    path = cache_dir / f"{name}-{hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:
                return {k: saved[k] for k in saved.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # a damaged cache is rebuilt
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)  # atomic: concurrent sites never read a half-written file
    except OSError:
        pass  # a read-only cache location only costs speed
    return arrays
