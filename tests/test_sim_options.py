"""Through Flower's simulation engine: evaluate-with-train keeps today's metrics (also across a resume, tracked in MLflow); --ray-address joins a Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from common.ports import free_port
from common.rundir import RunDirectory
from server.launch import processes_naming

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _sim(run_dir: Path, *args: str) -> list[dict]:
    done = subprocess.run([str(BIN / "flower-sim"), "run", "synthetic-tiny", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, cwd=run_dir.parent, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return RunDirectory(run_dir).history()


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A local Ray head on loopback (its own temp dir: no other ray.init on this machine finds it); stopped at the end."""
    port, temp = free_port(), Path(tempfile.mkdtemp(prefix="hfray-"))  # short: Ray's socket paths are limited
    with (temp / "head.log").open("wb") as log:
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp), "--include-dashboard",
                                 "false", "--disable-usage-stats", "--block"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").is_file() and time.monotonic() < deadline and head.poll() is None:
            time.sleep(0.5)
        assert (temp / "ray_current_cluster").is_file(), (temp / "head.log").read_text()
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        leftovers = processes_naming(str(temp))  # raylet, gcs_server, workers of this cluster only
        for proc in leftovers:
            proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_evaluate_with_train_same_metrics_fewer_messages_across_a_resume_in_mlflow_and_on_a_ray_cluster(
    tmp_path: Path, ray_cluster: tuple[str, Path],
) -> None:
    from mlflow.tracking import MlflowClient

    address, cluster_dir = ray_cluster
    plain = _sim(tmp_path / "plain", "--rounds", "2", "--ray-address", address, "--no-report")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = ["--set", "federation.evaluate-with-train=true", "--set", f"output.mlflow-uri={uri}"]
    _sim(tmp_path / "fast", "--rounds", "1", *options, "--no-report")
    fast = _sim(tmp_path / "fast", "--rounds", "2", "--resume", *options)  # the resume continues the pipeline

    assert [ln["round"] for ln in plain] == [ln["round"] for ln in fast] == [0, 1, 2]
    for a, b in zip(plain, fast):  # the same models evaluated on the same data, the same training
        assert a["global"] == b["global"] and a["sites"] == b["sites"], a["round"]
        assert {s: t["loss"] for s, t in a["train"].items()} == {s: t["loss"] for s, t in b["train"].items()}
    models = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "fast")]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    sent = {name: {(r["phase"], r["round"]) for r in RunDirectory(tmp_path / name).timing()} for name in ("plain", "fast")}
    assert ("evaluate", 0) in sent["plain"] and ("evaluate", 0) not in sent["fast"]  # round 0 rode with round 1's training
    assert {r["client"]["path"] for r in RunDirectory(tmp_path / "fast").timing()} == {"in-process"}  # no worker here

    client = MlflowClient(tracking_uri=uri)
    (tracked,) = client.search_runs([client.get_experiment_by_name("histofed").experiment_id])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "global.accuracy")] == [0, 1, 2]
    assert tracked.data.tags["data-kind"] == "synthetic" and tracked.info.status == "FINISHED"
    assert {"model.safetensors", "report.html"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert json.loads((tmp_path / "fast" / "mlflow.json").read_text())["run-id"] == tracked.info.run_id
    drivers = list((cluster_dir / "session_latest" / "logs").glob("python-core-driver-*"))
    assert drivers, "no Flower simulation joined the Ray cluster"
