"""User-facing errors shared by every room: each message names the key, file or column at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key."""


class DatasetLayoutError(ValueError):
    """The data root does not have the expected layout; the message names the file or column."""
