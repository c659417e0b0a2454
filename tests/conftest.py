"""Shared fixtures: tiny configs so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from common.config import RunConfig

TINY = {
    "model.backbone": "test_efficientnet", "model.image-size": 32, "model.token-dim": 8,
    "model.hidden-size": 8, "data.train-per-site": 16, "data.test-per-site": 8,
    "train.batch-size": 8, "federation.num-sites": 2,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg() -> RunConfig:
    return RunConfig().override(TINY)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower Messages built outside a running task need a task identity (a ServerApp process has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Dataset caches of the whole session (and the Flower processes it starts) stay out of ~/.cache."""
    import os

    os.environ.setdefault("HISTOFED_CACHE", str(tmp_path_factory.mktemp("histofed-cache")))


@pytest.fixture
def ray_cluster():
    """A local Ray head on loopback (its own temp dir: no other ray.init on this machine finds it); stopped at the end."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import psutil

    from common.ports import free_port
    from server.launch import processes_naming

    port, temp = free_port(), Path(tempfile.mkdtemp(prefix="hfray-"))  # short: Ray's socket paths are limited
    with (temp / "head.log").open("wb") as log:
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
                                 "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats",
                                 "--block"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end runs go first, the deployment test (the longest) leading.

    `--dist worksteal` hands the first half to one worker (the Flower runs, which mostly wait) and the rest,
    the CPU-bound unit tests, to the other, which then steals from the first's tail: the two end together.
    """
    def cost(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.nodeid.startswith("tests/test_deploy.py") else 1

    items.sort(key=cost)
