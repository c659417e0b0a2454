"""End to end through Flower's simulation engine (`flwr run`, local SuperLink, Ray): slow, run in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from common.config import RunConfig
from common.metrics import METRIC_NAMES
from common.model import build_model
from common.weights import load_weights

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
pytestmark = pytest.mark.slow


def _sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLOWER_SIM, "run", "synthetic-tiny", "--run-dir", str(tmp_path / "run"), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=400,
    )


def _leftovers(marker: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(marker) in part for part in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_two_sites_one_round_writes_the_run_directory(tmp_path: Path) -> None:
    result = _sim(tmp_path, "--sites", "2", "--rounds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    assert "SYNTHETIC data" in result.stdout and "global (pooled)" in result.stdout

    saved = json.loads((run / "config.json").read_text())
    assert saved["data-kind"] == "synthetic"
    cfg = RunConfig.from_flat(saved["config"])
    assert cfg.federation.num_sites == 2 and cfg.federation.rounds == 1 and cfg.output.run_dir == str(run)

    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1]
    for line in lines:
        assert line["data-kind"] == "synthetic"
        assert set(METRIC_NAMES) <= set(line["global"])
        assert sorted(line["sites"]) == ["synthetic-hospital-0", "synthetic-hospital-1"]
        assert sum(map(sum, line["confusion"])) == 2 * cfg.data.test_per_site
    assert sorted(lines[1]["train"]) == ["synthetic-hospital-0", "synthetic-hospital-1"]

    model = build_model(cfg.model, load_pretrained=False)
    load_weights(model, load_file(str(run / "model.safetensors")))  # strict, by key

    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["data-kind"] == "synthetic"
    assert (run / "report.html").is_file() and (run / "report" / "curves.png").is_file()
    assert not _leftovers(run), "Flower processes left running"


def test_failed_run_exits_non_zero_with_the_cause(tmp_path: Path) -> None:
    # An update bound no update can meet: accepted by the CLI, every update refused by the ServerApp.
    # (A weights file that does not fit is refused before Flower starts: tests/test_pretrain.py.)
    result = _sim(tmp_path, "--set", "federation.max-update-norm=1e-12")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "valid model update" in result.stderr and "min-train-sites" in result.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    assert not _leftovers(tmp_path / "run")


@pytest.mark.parametrize(
    ("scenario", "dataset", "extra"),
    [("reproduce-paper", "breakhis", ["--sites", "2"]), ("camelyon17-5centers", "camelyon17", [])],
)
def test_real_layout_scenarios_complete_one_round(tmp_path: Path, scenario: str, dataset: str, extra: list[str]) -> None:
    """A BreakHis scenario (the paper's: it also prints the paper's figures beside the measured) and Camelyon17."""
    from common.datasets.registry import get_dataset

    small = {"size": (70, 46)} if dataset == "breakhis" else {}  # the layout is what counts; decoding 700x460 is slow
    root = get_dataset(dataset).write_fixture(tmp_path / "data", seed=0, **small)
    tiny = ["model.backbone=test_efficientnet", "model.image-size=32", "model.token-dim=8", "model.hidden-size=8",
            "train.num-workers=0", "train.batch-size=8", f"data.cache-dir={tmp_path / 'cache'}"]
    args = [a for kv in tiny for a in ("--set", kv)]
    result = subprocess.run(
        [FLOWER_SIM, "run", scenario, "--data-root", str(root), "--rounds", "1", "--run-dir", str(tmp_path / "run"),
         *args, *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if scenario == "reproduce-paper":
        assert "paper vs measured — measured on SYNTHETIC data" in result.stdout
        assert "0.9572" in result.stdout and "patient-disjoint" in result.stdout
    run = tmp_path / "run"
    partition = json.loads((run / "partition.json").read_text())
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1] and lines[-1]["data-kind"] == "synthetic"  # fixture tree
    assert sorted(lines[-1]["sites"]) == sorted(partition["sites"])
    owners: dict[str, str] = {}  # no patient in two sites or two splits, read from the saved partition
    for site, splits in partition["sites"].items():
        for split in ("train", "val", "test"):
            for patient in splits[split]:
                assert patient not in owners, f"{patient} in {owners.get(patient)} and {site}/{split}"
                owners[patient] = f"{site}/{split}"
    assert not _leftovers(run)


def test_fedadam_checkpoints_its_moments_and_a_resumed_run_ends_on_the_same_weights(tmp_path: Path, ray_cluster) -> None:
    address, cluster_dir = ray_cluster  # issue 18: the reference run joins an existing Ray cluster (--ray-address)
    result = _sim(tmp_path, "--rounds", "2", "--set", "federation.strategy=fedadam", "--ray-address", address)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 2
    moments = load_file(str(run / "checkpoint-strategy.safetensors"))
    assert any(k.startswith("m_t/") for k in moments) and any(k.startswith("v_t/") for k in moments)

    # Stopped after round 1, then resumed to round 2: the model, Adam moments and client seeds carry over.
    part = tmp_path / "part"
    part.mkdir()
    # issue 18: this run sends one message per site and round (evaluate-with-train) and is tracked in MLflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fast = ["--set", "federation.evaluate-with-train=true", "--set", f"output.mlflow-uri={uri}", "--ray-address", address]
    first = _sim(part, "--rounds", "1", "--set", "federation.strategy=fedadam", *fast)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = _sim(part, "--rounds", "2", "--set", "federation.strategy=fedadam", "--resume", *fast)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = [json.loads(ln) for ln in (part / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1, 2]
    reference, continued = load_file(str(run / "model.safetensors")), load_file(str(part / "run" / "model.safetensors"))
    assert reference.keys() == continued.keys()
    assert all(torch.equal(reference[k], continued[k]) for k in reference)
    _same_metrics_fewer_messages_one_mlflow_run(run, part / "run", uri)
    assert list((cluster_dir / "session_latest" / "logs").glob("python-core-driver-*")), "no driver joined the cluster"


def _same_metrics_fewer_messages_one_mlflow_run(plain: Path, fast: Path, uri: str) -> None:
    """evaluate-with-train: today's metrics (the same models on the same data), round 0 rode with round 1's training."""
    from mlflow.tracking import MlflowClient

    from common.rundir import RunDirectory

    for a, b in zip(RunDirectory(plain).history(), RunDirectory(fast).history(), strict=True):
        assert a["global"] == b["global"] and a["sites"] == b["sites"], a["round"]
        assert {s: t["loss"] for s, t in a["train"].items()} == {s: t["loss"] for s, t in b["train"].items()}
    sent = {p: {(r["phase"], r["round"]) for r in RunDirectory(p).timing()} for p in (plain, fast)}
    assert ("evaluate", 0) in sent[plain] and ("evaluate", 0) not in sent[fast]
    client = MlflowClient(tracking_uri=uri)
    (tracked,) = client.search_runs([client.get_experiment_by_name("histofed").experiment_id])  # one, resume included
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "global.accuracy")] == [0, 1, 2]
    assert tracked.data.tags["data-kind"] == "synthetic" and tracked.info.status == "FINISHED"
    assert {"model.safetensors", "report.html"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}
