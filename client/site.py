"""Which hospital this node is: from its node config (deployment) or its partition id (simulation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Site:
    """A site's index in the dataset's site list and its name."""

    index: int
    name: str


def resolve_site(node_config: Mapping[str, Any], names: list[str]) -> Site:
    """Map node config to a site: 'site' (name) if given, else Flower's 'partition-id'."""
    if "site" in node_config:
        name = str(node_config["site"])
        if name not in names:
            raise ValueError(f"node config site '{name}' is not one of: {', '.join(names)}")
        return Site(names.index(name), name)
    if "partition-id" not in node_config:
        raise ValueError("node config has neither 'site' nor 'partition-id'")
    index, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(names)))
    if parts != len(names):
        raise ValueError(
            f"the federation has {parts} nodes but federation.num-sites is {len(names)}"
        )
    if not 0 <= index < len(names):
        raise ValueError(f"partition-id {index} is outside 0..{len(names) - 1}")
    return Site(index, names[index])
