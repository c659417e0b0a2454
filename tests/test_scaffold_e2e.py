"""SCAFFOLD through Flower's simulation engine: c travels, is checkpointed, and a resumed run ends on the same tensors (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
SCAFFOLD = ("--set", "federation.strategy=scaffold", "--set", "train.optimizer=sgd", "--set", "train.momentum=0",
            "--set", "train.lr=0.05", "--no-report")
pytestmark = pytest.mark.slow


def _sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLOWER_SIM, "run", "synthetic-tiny", "--run-dir", str(tmp_path / "run"), *SCAFFOLD, *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=400,
    )


def test_scaffold_resumed_run_ends_on_the_same_weights_and_control_variate(tmp_path: Path, ray_cluster) -> None:
    join = ("--ray-address", ray_cluster[0])  # all three runs join one Ray cluster (suite time)
    result = _sim(tmp_path, "--rounds", "2", *join)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    state = load_file(str(run / "checkpoint-strategy.safetensors"))
    c = {k: v for k, v in state.items() if k.startswith("c_global/")}
    assert c and any(v.abs().max() > 0 for v in c.values()) and "federation_id/id" in state
    sites = sorted((run / "privacy-ledger").glob("*.scaffold.safetensors"))
    assert [p.name for p in sites] == ["synthetic-hospital-0.scaffold.safetensors",
                                       "synthetic-hospital-1.scaffold.safetensors"]

    # Stopped after round 1, then resumed to round 2: model, c, the federation id and each site's c_i carry over.
    part = tmp_path / "part"
    part.mkdir()
    first = _sim(part, "--rounds", "1", *join)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = _sim(part, "--rounds", "2", "--resume", *join)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = [json.loads(ln) for ln in (part / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1, 2]
    reference, continued = load_file(str(run / "model.safetensors")), load_file(str(part / "run" / "model.safetensors"))
    assert reference.keys() == continued.keys()
    assert all(torch.equal(reference[k], continued[k]) for k in reference)
    other = load_file(str(part / "run" / "checkpoint-strategy.safetensors"))
    assert all(torch.equal(c[k], other[k]) for k in c)
