"""Terminal output for simulations: live round progress and the final metrics table (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.sites import problem_text

COLUMNS = ("precision", "recall", "f1", "specificity", "iou", "accuracy", "auc", "loss")


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One-line summary of a finished round for the progress display (failed and rejected sites named)."""
    g = record["global"]
    return (
        f"round {record['round']}/{rounds}: global accuracy {_fmt(g.get('accuracy'))}, "
        f"F1 {_fmt(g.get('f1'))}, AUC {_fmt(g.get('auc'))} ({record.get('data-kind', '?')} data)" + problem_text(record)
    )


def metrics_table(history: list[dict[str, Any]], title: str) -> Table:
    """Global (pooled counts) and per-site metrics for every round."""
    table = Table(title=title, title_justify="left")
    table.add_column("round", justify="right")
    table.add_column("scope")
    for name in COLUMNS:
        table.add_column(name, justify="right")
    for record in history:
        rows = [("global (pooled)", record["global"]), *sorted(record.get("sites", {}).items()),
                *((escape(f"{site}: {kind[:-2]} ({why[:70]})"), {}) for kind in ("failed", "rejected")
                  for site, why in record.get(kind, {}).items())]
        for i, (scope, values) in enumerate(rows):
            table.add_row(
                str(record["round"]) if i == 0 else "",
                scope,
                *(_fmt(values.get(name)) for name in COLUMNS),
                end_section=i == len(rows) - 1,
            )
    return table


def print_table(console: Console, history: list[dict[str, Any]]) -> None:
    """Print the final table, labelled with the kind of data (synthetic or real)."""
    if not history:
        console.print("[yellow]no rounds were recorded[/yellow]")
        return
    kind = history[-1].get("data-kind", "unknown")
    console.print(metrics_table(history, f"histofed metrics per round — {kind.upper()} data"))


def _pm(stat: dict[str, float | None]) -> str:
    return "—" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def compare_table(summary: dict[str, Any]) -> Table:
    """mean ± sd over seeds for every model, regime and scope."""
    kind = summary["data-kind"].upper()
    title = f"pooled vs local vs federated — {kind} data, {len(summary['seeds'])} seed(s)"
    if summary.get("holdout"):
        title += f", held-out hospital: {summary['holdout']}"
    table = Table(title=title, title_justify="left")
    for name in ("model", "mode", "scope"):
        table.add_column(name, no_wrap=True)
    for name in COLUMNS[:-1]:
        table.add_column(name, justify="right")
    previous = None
    for row in summary["rows"]:
        key = (row["model"], row["mode"])
        table.add_row(*(key if key != previous else ("", "")), row["scope"],
                      *(_pm(row[name]) for name in COLUMNS[:-1]))
        previous = key
    return table
