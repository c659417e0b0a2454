"""A site's own state on its own disk: privacy ledger, FedBN normalization layers, SCAFFOLD control variates.

Flower starts a fresh ClientApp process for every message in deployment, so whatever a site must keep
between rounds lives in files. They share one folder: the node config's `privacy.ledger-dir`, else
`privacy.ledger-dir`, else the run directory's ledger folder (simulation), else the user's state folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.rundir import RunDirectory

if TYPE_CHECKING:
    from common.config import RunConfig

NODE_CONFIG_KEY = "privacy.ledger-dir"  # a hospital's node config may name its own state folder
STATE_FILES: dict[str, str] = {  # kind of state → file suffix after the site's name
    "ledger": ".json",
    "fedbn-norm": ".norm.safetensors",
    "scaffold": ".scaffold.safetensors",  # SCAFFOLD's client control variate c_i (common.scaffold)
}


def state_dir(cfg: RunConfig, node_config: Mapping[str, Any] | None = None) -> Path:
    """Node config `privacy.ledger-dir`, else privacy.ledger-dir, else <run-dir>'s ledger folder, else the user's state dir."""
    node_config = node_config or {}
    if node_config.get(NODE_CONFIG_KEY):
        return Path(str(node_config[NODE_CONFIG_KEY])).expanduser()
    if cfg.privacy.ledger_dir:
        return Path(cfg.privacy.ledger_dir).expanduser()
    if cfg.output.run_dir:
        return RunDirectory(Path(cfg.output.run_dir)).site_state_dir
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "histofed" / RunDirectory.SITE_STATE


def state_path(cfg: RunConfig, site: str, kind: str, node_config: Mapping[str, Any] | None = None) -> Path:
    """The file of one kind of state (see STATE_FILES) for one site."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", site).strip("._") or "site"
    return state_dir(cfg, node_config) / f"{safe}{STATE_FILES[kind]}"
