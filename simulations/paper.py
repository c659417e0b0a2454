"""The seed paper's reported figures, printed beside what histofed measured (never mixed up with them)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

PAPER = "Sci. Rep. 2025, EfficientNetV2 + GRU + attention (BreakHis)"
PAPER_FIGURES = {"precision": 0.9815, "recall": 0.9568, "f1": 0.9682, "specificity": 0.96, "iou": 0.9399,
                 "accuracy": 0.9572}
SPLIT_PROTOCOL = (
    "histofed: patient-disjoint, class-stratified split of each site's patients into train/val/test "
    "(data.val-fraction / data.test-fraction, seeded); the paper does not state its split protocol, and "
    "image-level splits are known to inflate accuracy by 1-12 % (Bussola et al.)"
)


def paper_table(measured: dict[str, dict[str, Any]], data_kind: str) -> Table:
    """Rows: the paper's figures, then each measured scope (e.g. federated global, pooled)."""
    table = Table(title=f"paper vs measured — measured on {data_kind.upper()} data", title_justify="left",
                  caption=SPLIT_PROTOCOL, caption_justify="left")
    table.add_column("source", no_wrap=True)
    for name in PAPER_FIGURES:
        table.add_column(name, justify="right")
    table.add_row(f"paper ({PAPER})", *(f"{v:.4f}" for v in PAPER_FIGURES.values()))
    for label, values in measured.items():
        table.add_row(label, *("—" if values.get(n) is None else f"{values[n]:.4f}" for n in PAPER_FIGURES))
    return table
