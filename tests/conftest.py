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
