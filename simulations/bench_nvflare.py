"""Benchmark: NVIDIA FLARE 2.9's per-round overhead in its local POC mode, for a job like histofed's synthetic-tiny.

Usage: python -m simulations.bench_nvflare [--rounds 3] [--sites 3] [--python /work/nvflare-venv/bin/python] [--out FILE.json]

NVFlare is NOT a dependency of histofed: it runs from its own virtual environment, e.g.
    python3.11 -m venv /work/nvflare-venv && /work/nvflare-venv/bin/pip install 'nvflare>=2.9,<2.10' torch
(found through --python, $NVFLARE_PYTHON or that default path). Without it the benchmark says so
and is skipped. The job (simulations/nvflare_job/) is FedAvg over N local client processes
on loopback, a ~90 k-parameter CNN, 32 random 32 x 32 training images per site (SYNTHETIC).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from simulations.figures import emit

DEFAULT_PYTHON = Path("/work/nvflare-venv/bin/python")
DRIVER = Path(__file__).resolve().parent / "nvflare_job" / "driver.py"
INSTALL = ("python3.11 -m venv /work/nvflare-venv && "
           "/work/nvflare-venv/bin/pip install 'nvflare>=2.9,<2.10' torch (then --python or NVFLARE_PYTHON)")


def nvflare_python(explicit: Path | None = None) -> Path | None:
    """A Python that can import nvflare (2.9), or None."""
    for candidate in (explicit, os.environ.get("NVFLARE_PYTHON"), DEFAULT_PYTHON):
        if not candidate or not Path(candidate).is_file():
            continue
        probe = subprocess.run([str(candidate), "-c", "import nvflare, sys; sys.exit(nvflare.__version__[:4] != '2.9.')"],
                               capture_output=True, timeout=120)
        if probe.returncode == 0:
            return Path(candidate)
    return None


def measure_poc(*, rounds: int = 3, sites: int = 3, python: Path | None = None) -> dict[str, Any]:
    """NVFlare POC's per-round time, slowest compute and overhead; {'skipped': why} when NVFlare is not installed."""
    found = nvflare_python(python)
    if found is None:
        return {"skipped": f"NVFlare 2.9 is not installed (it is not a histofed dependency): {INSTALL}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nvflare.json"
        done = subprocess.run([str(found), str(DRIVER), "--rounds", str(rounds), "--sites", str(sites), "--out", str(out)],
                              capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0 or not out.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return {"error": f"NVFlare POC run failed (exit {done.returncode}): {' | '.join(tail)}"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    """Run the POC job and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--python", type=Path, default=None, help="a Python with NVFlare 2.9 installed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure_poc(rounds=args.rounds, sites=args.sites, python=args.python)
    if "skipped" in result:
        print(f"skipped: {result['skipped']}")
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
