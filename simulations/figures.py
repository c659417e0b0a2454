"""Shared output of the benchmark commands: an aligned two-column table on stdout and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def emit(rows: Iterable[tuple[str, Any]], result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print `key  value` rows aligned, write `result` as JSON to `out` (if given), return `result`."""
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if out:
        out.write_text(json.dumps(result, indent=1))
    return result
