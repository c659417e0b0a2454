"""Which hospital this node is: from its node config (deployment) or its partition id (simulation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig
from common.datasets.registry import data_kind, get_dataset


class SiteRefused(RuntimeError):
    """The server's key binding names another site than this node's --site."""


@dataclass(frozen=True)
class Site:
    """A site's index in the dataset's site list and its name."""

    index: int
    name: str
    data_kind: str = "real"  # "synthetic" for generated data; sent to the server so every result says so


def resolve_site(node_config: Mapping[str, Any], names: list[str], training: list[int] | None = None) -> Site:
    """Map node config to a site: 'site' (name) if given, else Flower's 'partition-id' over the training sites."""
    training = list(range(len(names))) if training is None else training
    if "site" in node_config:
        name = str(node_config["site"])
        if name not in names:
            raise ValueError(f"node config site '{name}' is not one of: {', '.join(names)}")
        return Site(names.index(name), name)
    if "partition-id" not in node_config:
        raise ValueError("node config has neither 'site' nor 'partition-id'")
    index, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(training)))
    if parts != len(training):
        raise ValueError(
            f"the federation has {parts} nodes but {len(training)} training sites are configured "
            f"(federation.num-sites {len(names)}, minus any holdout)"
        )
    if not 0 <= index < len(training):
        raise ValueError(f"partition-id {index} is outside 0..{len(training) - 1}")
    return Site(training[index], names[training[index]])


def node_view(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[RunConfig, Site]:
    """This node's config and site: node-config `data.*` keys override the run's.

    A node that names its own `data.root` is one whole hospital (deployment): its data is split into
    train/val/test on its own and it is site 0 of its own view, named by the node config's 'site'.
    Otherwise the node is one site of the shared partition (simulation: Flower's partition-id).
    """
    local = {str(k): v for k, v in node_config.items() if str(k).startswith("data.")}
    if local:
        cfg = cfg.override(local)
    entry = get_dataset(cfg.data.dataset)
    kind = data_kind(cfg.data.dataset, cfg.data.root)
    if "data.root" in local:
        cfg = cfg.with_sites(entry.default_num_sites(cfg) if entry.default_num_sites else 1)
        return cfg, Site(0, str(node_config.get("site", entry.site_names(cfg)[0])), kind)
    site = resolve_site(node_config, entry.site_names(cfg), cfg.federation.training_sites)
    return cfg, Site(site.index, site.name, kind)
