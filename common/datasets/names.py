"""Names of the registered datasets (names only: the configuration validates against them without importing readers)."""

from __future__ import annotations

DATASET_NAMES: tuple[str, ...] = ("synthetic", "breakhis", "camelyon17")
