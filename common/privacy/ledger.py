"""A site's privacy ledger: its accountant history on disk, read before and written after every round (and across runs).

Flower starts a fresh ClientApp process per message in deployment, so nothing in memory survives a
round. The ledger is one small JSON file per site; the history is Opacus's own format
[(noise multiplier, sample rate, steps), ...], so restoring it into a new accountant gives exactly the ε
of one long-lived engine. Steps are written BEFORE training (write-ahead) and confirmed after it: a
crash can only over-count ε, never under-count it. An unreadable ledger is an error, never a reset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.privacy.accounting import History
from common.site_state import state_path

if TYPE_CHECKING:
    from common.config import RunConfig

LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (unreadable or malformed): the site refuses to train."""


def ledger_path(cfg: RunConfig, site: str, node_config: Mapping[str, Any] | None = None) -> Path:
    """The JSON file of one site's ledger (in the site's state folder)."""
    return state_path(cfg, site, "ledger", node_config)


class PrivacyLedger:
    """One site's spent privacy: accountant history plus one entry per round it trained."""

    def __init__(self, path: Path, *, site: str, history: History | None = None,
                 rounds: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.site = site
        self.history: History = list(history or [])
        self.rounds: list[dict[str, Any]] = list(rounds or [])

    @classmethod
    def open(cls, path: Path, *, site: str) -> PrivacyLedger:
        """Read the ledger (an absent file is an empty ledger; a damaged one raises LedgerError)."""
        if not path.exists():
            return cls(path, site=site)
        try:
            data = json.loads(path.read_text())
            history = [_entry(h) for h in data["history"]]
            rounds = [dict(r) for r in data.get("rounds", [])]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({type(err).__name__}: {err}); the site refuses to train "
                "rather than forget the privacy it has spent"
            ) from None
        return cls(path, site=str(data.get("site", site)), history=history, rounds=rounds)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far."""
        return sum(n for _, _, n in self.history)

    def save(self) -> None:
        """Write atomically (temporary file + rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": LEDGER_VERSION, "site": self.site, "history": [list(h) for h in self.history],
                "rounds": self.rounds}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(self.path)


def _entry(item: Any) -> tuple[float, float, int]:
    noise, rate, steps = item
    out = (float(noise), float(rate), int(steps))
    if not (out[0] > 0 and 0 < out[1] <= 1 and out[2] >= 0):
        raise ValueError(f"bad history entry {item!r}")
    return out
