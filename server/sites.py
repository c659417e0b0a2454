"""What the server knows about each site during a run: node ↔ site (from the site keys), declared split sizes, failures and rejections per round."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from common import protocol as P
from common.config import PrivacyConfig, RunConfig
from common.jsonsafe import json_safe
from common.rundir import RunDirectory
from server.updates import PRIVACY_METRICS, Declared, claimed_site, error_text

CLIENT_APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def extra_train_metrics(privacy: PrivacyConfig) -> frozenset[str]:
    """Metric keys an honest train reply carries besides TRAIN_METRICS under this privacy mode."""
    spec = privacy.spec
    if spec.local:
        return PRIVACY_METRICS  # the DP-SGD fields of the site's ledger
    if spec.adaptive and spec.client_mod:
        return frozenset({KEY_NORM_BIT})  # Flower's adaptive clipping mod reports whether the update was clipped
    return frozenset()


class SiteFailure(RuntimeError):
    """A site failure that ends the run (data.strict=true), or too few valid replies; the message names the sites."""


def problem_text(record: dict[str, Any]) -> str:
    """' · failed: site (why) · rejected: site (why)' for a metrics.jsonl round record, '' when no site had trouble."""
    return "".join(f" · {kind}: " + ", ".join(f"{site} ({why})" for site, why in record[kind].items())
                   for kind in ("failed", "rejected") if record.get(kind))


def write_node_sites(run: RunDirectory, node_sites: dict[int, str]) -> Path:
    """Record which Flower node id holds which site's key (node ids come from `flwr supernode register`)."""
    path = run.file(RunDirectory.NODE_SITES)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe({"nodes": {str(k): v for k, v in sorted(node_sites.items())}}), indent=1))
    tmp.replace(path)
    return path


def read_node_sites(run: RunDirectory) -> dict[int, str]:
    """The node ↔ site bindings of this run ({} without site keys: simulation or --insecure)."""
    path = run.file(RunDirectory.NODE_SITES)
    if not path.is_file():
        return {}
    return {int(k): str(v) for k, v in json.loads(path.read_text())["nodes"].items()}


def key_site(public_key: Path) -> str:
    """The site a public key belongs to: its file name as `flower-server keys` writes it (<site>.pub)."""
    return public_key.name[:-4] if public_key.name.endswith(".pub") else public_key.stem


def _declared_before(run: RunDirectory) -> dict[str, Declared]:
    """A resumed deployment keeps what its sites declared when they joined (the partition record the ServerApp wrote)."""
    return {site: Declared(train=v.get("train"), test=v.get("test")) for site, v in run.read_declared_partition().items()
            if isinstance(v, dict) and isinstance(v.get("train"), int)}


def _no_problems() -> dict[str, dict[str, dict[str, Any]]]:
    return {"failed": {}, "rejected": {}}


def _problems_before(run: RunDirectory) -> dict[str, dict[str, dict[str, Any]]]:
    """A resumed run's final status still lists the sites that failed or were rejected before the resume."""
    history = _no_problems()
    for record in run.history():
        for kind, sites in history.items():
            for site, why in record.get(kind, {}).items():
                entry = sites.setdefault(site, {"rounds": [], "last": ""})
                entry["rounds"].append(record.get("round"))
                entry["last"] = why
    return history


@dataclass
class SiteRegistry:
    """Shared by the strategy (which screens replies) and the round recorder (which writes them down)."""

    node_sites: dict[int, str] = field(default_factory=dict)  # authoritative when not empty (deployment with keys)
    strict: bool = False  # data.strict: a site's data error fails the run
    extra_metrics: frozenset[str] = frozenset()  # train-reply keys the privacy mode adds (DP-SGD fields, norm bit)
    num_classes: int = 2
    declared: dict[str, Declared] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)  # node id → site of its last valid reply (names errors)
    round: dict[str, dict[str, str]] = field(default_factory=lambda: {"failed": {}, "rejected": {}})
    history: dict[str, dict[str, dict[str, Any]]] = field(default_factory=_no_problems)

    @classmethod
    def for_config(cls, cfg: RunConfig, run: RunDirectory | None = None) -> SiteRegistry:
        """The registry of one run: the key bindings in its run directory, the run's strictness and DP mode."""
        return cls(node_sites=read_node_sites(run) if run else {}, strict=cfg.data.strict,
                   extra_metrics=extra_train_metrics(cfg.privacy),
                   num_classes=cfg.model.num_classes, declared=_declared_before(run) if run else {},
                   history=_problems_before(run) if run and cfg.output.resume else _no_problems())

    def name_of(self, node_id: int) -> str:
        """The best name for a node: its key's site, else the site it last replied as, else node-<id>."""
        return self.node_sites.get(node_id) or self.seen.get(node_id) or f"node-{node_id}"

    def identify(self, replies: list[Message]) -> dict[int, tuple[str, str]]:
        """Per reply (by index): its site and a refusal reason ('' when the reply may be screened).

        With site keys the node's key decides the site and the claim must match it; without, the claim
        stands unless two replies of one round claim the same site.
        """
        out: dict[int, tuple[str, str]] = {}
        claims = Counter(claimed_site(m.content) for m in replies if not m.has_error())
        for i, msg in enumerate(replies):
            if msg.has_error():
                continue
            node, claim = msg.metadata.src_node_id, claimed_site(msg.content)
            if self.node_sites:
                bound = self.node_sites.get(node)
                if bound is None:
                    out[i] = (f"node-{node}", f"node {node} holds no registered site key")
                elif claim != bound:
                    out[i] = (bound, f"node {node} holds the key of site '{bound}' but calls itself '{claim or '?'}'")
                else:
                    out[i] = (bound, "")
            elif not claim:
                out[i] = (f"node-{node}", "the reply names no valid site")
            elif claims[claim] > 1:
                out[i] = (f"{claim}@node-{node}", f"{claims[claim]} replies of this round claim site '{claim}'")
            else:
                out[i] = (claim, "")
        return out

    def failed(self, phase: str, msg: Message, node_id: int | None = None) -> str:
        """Record an error reply (Flower's msg.error text) of node_id; raise SiteFailure for a strict-mode data error."""
        site = self.name_of(msg.metadata.src_node_id if node_id is None else node_id)
        reason = error_text(msg.error.reason) or f"error code {msg.error.code}"
        log(ERROR, "Site %s failed to %s: %s", site, phase, reason)
        if self.strict and msg.error.code == CLIENT_APP_RAISED and P.STRICT_FAILURE in reason:
            raise SiteFailure(f"site {site} failed ({phase}) with data.strict=true: {reason}")
        self._note("failed", phase, site, reason)
        return site

    def rejected(self, phase: str, site: str, reason: str) -> None:
        """Record a reply the server will not use."""
        log(ERROR, "Rejected %s reply from site %s: %s", phase, site, reason)
        self._note("rejected", phase, site, reason)

    def _note(self, kind: str, phase: str, site: str, reason: str) -> None:
        entry = f"{phase}: {reason}"
        previous = self.round[kind].get(site)
        self.round[kind][site] = f"{previous}; {entry}" if previous else entry

    def describe(self) -> str:
        """This round's failed and rejected sites with their reasons, for an error message."""
        parts = [f"{kind}: " + ", ".join(f"{site} ({why})" for site, why in sorted(sites.items()))
                 for kind, sites in self.round.items() if sites]
        return "; ".join(parts) or "no site failed or was rejected"

    def end_round(self, server_round: int) -> dict[str, dict[str, str]]:
        """This round's failures and rejections (only the non-empty kinds), kept for the final status, then reset."""
        out = {kind: dict(sorted(sites.items())) for kind, sites in self.round.items() if sites}
        for kind, sites in out.items():
            for site, why in sites.items():
                entry = self.history[kind].setdefault(site, {"rounds": [], "last": ""})
                entry["rounds"].append(server_round)
                entry["last"] = why
        if out:
            log(WARNING, "round %d: %s", server_round, self.describe())
        self.round = {"failed": {}, "rejected": {}}
        return out

    def declarations(self) -> dict[str, dict[str, Any]]:
        """Per site: its node (with site keys) and the split sizes it declared when it joined (partition.json)."""
        nodes = {site: node for node, site in self.node_sites.items()}
        names = sorted(set(self.declared) | set(nodes))
        return {site: {"node": nodes.get(site), "train": self.declared.get(site, Declared()).train,
                       "test": self.declared.get(site, Declared()).test} for site in names}

    def summary(self) -> dict[str, Any]:
        """For status.json: every site that failed or was rejected during the run, in which rounds, the last reason."""
        pending = {kind: sites for kind, sites in self.round.items() if sites}  # a round that never ended (failure)
        out = {f"sites-{kind}": {site: dict(e) for site, e in sites.items()} for kind, sites in self.history.items() if sites}
        for kind, sites in pending.items():
            for site, why in sites.items():
                entry = out.setdefault(f"sites-{kind}", {}).setdefault(site, {"rounds": [], "last": ""})
                entry.update(rounds=[*entry["rounds"], "unfinished"], last=why)
        return out
