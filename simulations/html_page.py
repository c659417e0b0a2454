"""Self-contained HTML for the reports: one page skeleton (screen + print CSS, no external file), tables, figures, number formats."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

COUNT_KEYS = frozenset({"support", "patients", "skipped-images", "images", "examples", "rounds", "seeds", "steps"})
CSS = """
:root{--ink:#1d2329;--muted:#5b6670;--line:#d5dbe0;--band:#f3f5f7;--warn:#8a4b00;--warnbg:#fff4e0}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
 max-width:1180px;margin:0 auto;padding:0 24px 48px}
h1{font-size:26px;margin:24px 0 4px}h2{font-size:19px;margin:30px 0 8px;border-bottom:1px solid var(--line);
 padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.kind{display:inline-block;background:var(--warnbg);color:var(--warn);border:1px solid #e7c48a;border-radius:4px;
 padding:2px 10px;font-weight:700;letter-spacing:.04em}
.meta{color:var(--muted);margin:6px 0 14px}nav{margin:10px 0 0;font-size:14px}nav a{margin-right:14px;color:#0b5cad}
table{border-collapse:collapse;margin:6px 0 12px;font-size:14px}th,td{border-bottom:1px solid var(--line);
 padding:4px 10px;text-align:left;vertical-align:top}th{background:var(--band);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.num,td:first-child{white-space:nowrap}
.headline{display:flex;gap:18px;flex-wrap:wrap;margin:8px 0 4px}.headline div{border:1px solid var(--line);
 border-radius:6px;padding:8px 16px;min-width:190px}.headline b{display:block;font-size:26px}
.headline span{color:var(--muted);font-size:13px}
.row{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}.row figure{max-width:100%}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}.note{color:var(--muted);font-size:13px}
code{background:var(--band);padding:0 3px;border-radius:3px}
@media print{
 body{max-width:none;padding:0;font-size:10.5pt}nav,figcaption a{display:none}
 h2{break-after:avoid}section,figure,table,.headline{break-inside:avoid}
 figure img{max-height:23cm;border:none}a{color:inherit;text-decoration:none}
 .kind{border:1px solid #000;color:#000;background:none}
}
@page{size:A4;margin:14mm}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def fmt(name: str, value: Any) -> str:
    """A metric printed by its kind: counts as integers, seconds with one decimal, ratios and losses with 3."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    base = name.split("/")[0]
    if base in COUNT_KEYS or isinstance(value, int):
        return f"{int(round(value)):,}"
    if base.endswith("seconds") or base.endswith("-s"):
        return f"{value:,.1f}"
    return f"{value:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric_from: int = 1) -> str:
    """An HTML table; cells from column `numeric_from` on are right-aligned (already formatted text)."""
    head = "".join(f'<th class="num">{esc(h)}</th>' if i >= numeric_from else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i >= numeric_from else f"<td>{esc(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: Path, base: Path, caption: str) -> str:
    """A figure with the PNG embedded as a data: URI (nothing is fetched) and a link to the file beside the page."""
    rel = png.relative_to(base).as_posix()
    data = base64.b64encode(png.read_bytes()).decode()
    with Image.open(png) as img:
        width, height = img.size
    return (f'<figure><img alt="{esc(rel)}" width="{width}" height="{height}" src="data:image/png;base64,{data}">'
            f'<figcaption style="max-width:{width}px">{esc(caption)} <a href="{esc(rel)}">{esc(rel)}</a></figcaption></figure>')


def row(*blocks: str) -> str:
    """Blocks side by side while the page is wide enough (they wrap below each other otherwise)."""
    return f'<div class="row">{"".join(blocks)}</div>'


def section(anchor: str, title: str, content: str) -> str:
    """A titled section that the page's table of contents links to."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{content}</section>'


def page(title: str, kind: str, meta: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole page: title, the data kind in a banner, a contents line, then the (anchor, title, html) sections."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, c) for a, t, c in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
        f'<h1>{esc(title)}</h1><p><span class="kind">{esc(kind.upper())} DATA</span></p>'
        f'<p class="meta">{meta}</p><nav>{nav}</nav>{body}</body></html>'
    )


def natural_key(name: str) -> list[Any]:
    """Sort key that puts site-2 before site-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
