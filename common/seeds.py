"""Training seeds derived from the public train.seed: one per site and round, one per pooled/local baseline."""

from __future__ import annotations

from collections.abc import Sequence


def site_seed(train_seed: int, server_round: int, site: int) -> int:
    """The seed of one site's local training in one round (the true round, also after a resume)."""
    return train_seed * 1_000_003 + server_round * 1009 + site


def pooled_seed(train_seed: int, sites: Sequence[int]) -> int:
    """The seed of a non-federated model trained on these sites (pooled, or one site alone)."""
    return train_seed * 1_000_003 + 7919 * (1 + min(sites))
