"""What was run: versions, run time, strategy, model, data kind and partition, privacy (ε per site), config diff from defaults."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from common.config import RunConfig
from common.privacy.modes import privacy_mode
from common.rundir import RunDirectory
from simulations.html_page import esc, fmt, natural_key, table

PACKAGES = ("histofed", "flwr", "torch", "timm")


def versions() -> dict[str, str]:
    """Installed versions of histofed, Flower and the ML stack (as importlib.metadata reports them)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def config_diff(flat: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, default, this run) for every key whose value differs from RunConfig's default."""
    defaults = RunConfig().to_flat()
    shown = lambda v: "(empty)" if v == "" else v  # noqa: E731
    return [(k, shown(defaults.get(k, "—")), shown(v)) for k, v in sorted(flat.items()) if defaults.get(k) != v]


def _stamp(run: RunDirectory, name: str) -> str:
    path = run.file(name)
    if not path.is_file():
        return "—"
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def partition_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The partition record per site as table rows: patient lists become counts, other fields their value."""
    sites = record.get("sites", {})
    keys: list[str] = []
    for fields in sites.values():
        keys += [k for k in fields if k not in keys]
    rows = []
    for site in sorted(sites, key=natural_key):
        fields = sites[site]
        rows.append([site, *(_cell(k, fields.get(k)) for k in keys)])
    header = [f"{k} patients" if any(isinstance(s.get(k), list) for s in sites.values()) else k for k in keys]
    return ["site", *header], rows


def _cell(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value):,}"
    return fmt(key, value) if value is not None else "—"


def privacy_rows(cfg: RunConfig, report: dict[str, Any]) -> tuple[str, list[tuple[str, str, str, str]]]:
    """A sentence on the privacy mode, and (site, ε, δ, note) per site from the privacy report."""
    spec = privacy_mode(cfg.privacy.mode)
    if not spec.private:
        return "off: no differential privacy (the weights the sites send are not noised).", []
    budget = report.get("budget-epsilon", cfg.privacy.target_epsilon)
    text = (f"<b>{esc(spec.name)}</b>: {esc(spec.mechanism)}; unit: {esc(report.get('unit', '—'))}; "
            f"budget ε = {esc(fmt('epsilon', budget))}; accountant {esc(report.get('accountant', '—'))}"
            + (f"; stopped: {esc(report['stopped'])}" if report.get("stopped") else ""))
    rows = [(site, fmt("epsilon", v.get("epsilon")), fmt("delta", v.get("delta")),
             "; ".join(str(r["declined"]) for r in v.get("rounds", []) if r.get("declined")) or "—")
            for site, v in sorted(report.get("sites", {}).items(), key=lambda kv: natural_key(kv[0]))]
    return text, rows


def provenance_html(run: RunDirectory, cfg: RunConfig, flat: dict[str, Any], kind: str,
                    history: list[dict[str, Any]]) -> str:
    """The provenance section: what ran, on which data, with which privacy, by which versions, for how long."""
    status = run.read_status()
    fed, model, train = cfg.federation, cfg.model, cfg.train
    holdout = f", site {fed.holdout_site} held out" if fed.holdout_site >= 0 else ""
    facts = [
        ("status", f"{status.get('status', 'unknown')}" + (f": {status['error']}" if status.get("error") else "")),
        ("run time", f"{fmt('elapsed-s', status.get('elapsed-s'))} s (started {_stamp(run, RunDirectory.CONFIG)}, "
                     f"last written {_stamp(run, RunDirectory.STATUS)})"),
        ("strategy", f"{fed.strategy}, {len(history) - 1} of {fed.rounds} round(s), {fed.num_sites} site(s){holdout}"
                     + (", FedBN (local normalisation)" if fed.local_norm else "")),
        ("model", f"{model.architecture} · backbone {model.backbone} · {model.image_size} px · {model.num_classes} classes"),
        ("training", f"{train.local_epochs} local epoch(s) · {train.optimizer} lr {train.lr:g} · batch {train.batch_size}"),
        ("data", f"{kind.upper()} · dataset {cfg.data.dataset}" + (f" · root {cfg.data.root}" if cfg.data.root else "")),
        *((name, version) for name, version in versions().items()),
    ]
    out = table(("item", "value"), facts, numeric_from=9)
    partition = run.read_partition()
    if partition.get("sites"):
        top = ", ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in partition.items()
                        if k != "sites" and not isinstance(v, dict))
        header, rows = partition_rows(partition)
        out += f"<h3>Partition</h3><p class=\"note\">{esc(top)}</p>" + table(header, rows)
    text, rows = privacy_rows(cfg, run.read_privacy())
    out += f"<h3>Privacy</h3><p>{text}</p>"
    if rows:
        out += table(("site", "ε spent", "δ", "declined"), rows)
    diff = config_diff(flat)
    out += "<h3>Configuration: differences from the defaults</h3>"
    out += table(("key", "default", "this run"), [(k, str(d), str(v)) for k, d, v in diff], numeric_from=9) \
        if diff else '<p class="note">Every key at its default.</p>'
    return out
