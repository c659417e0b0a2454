"""Screenshots of a run report and a comparison report for the README: `python -m simulations.screenshots --run DIR --compare DIR --out docs/`.

Rebuilds both pages from their folders, renders them in headless Chromium (offline, see
simulations.browser) and writes small PNGs (palette-reduced, scaled down until under --max-kb).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from simulations.browser import check_page, screenshot
from simulations.compare_report import build_compare_report
from simulations.run_report import build_report

RUN_PNG = "report-screenshot.png"
COMPARE_PNG = "compare-screenshot.png"


def shrink(raw: Path, out: Path, *, width: int, max_height: int, max_kb: int) -> Path:
    """The top max_height CSS pixels of a screenshot, scaled to `width` and palette-reduced until under max_kb."""
    with Image.open(raw) as img:
        page = img.convert("RGB").crop((0, 0, img.width, min(img.height, max_height)))
    scale = width / page.width
    while True:
        small = page.resize((max(1, round(page.width * scale)), max(1, round(page.height * scale))), Image.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(out, optimize=True)
        if out.stat().st_size <= max_kb * 1024 or scale < 0.3:
            return out
        scale *= 0.9


def take(page: Path, out: Path, *, css_width: int, width: int, max_height: int, max_kb: int, until: str = "") -> Path:
    """Render one page at css_width CSS pixels and write its shrunk screenshot (cut above section `until` if given)."""
    if until:
        tops = check_page(page, width=css_width).section_tops
        max_height = min(max_height, int(tops[until]) - 8) if until in tops else max_height
    with tempfile.TemporaryDirectory() as tmp:
        raw = screenshot(page, Path(tmp) / "full.png", width=css_width)
        return shrink(raw, out, width=width, max_height=max_height, max_kb=max_kb)


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild both reports, then write docs/report-screenshot.png and docs/compare-screenshot.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory (flower-sim run)")
    parser.add_argument("--compare", type=Path, required=True, help="a comparison folder (flower-sim compare)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs")
    parser.add_argument("--css-width", type=int, default=1220, help="browser window width in CSS pixels")
    parser.add_argument("--width", type=int, default=900, help="PNG width in pixels")
    parser.add_argument("--max-height", type=int, default=3000, help="keep the top N CSS pixels of each page")
    parser.add_argument("--max-kb", type=int, default=200, help="size limit of each PNG")
    parser.add_argument("--run-until", default="curves", help="cut the run report above this section")
    parser.add_argument("--compare-until", default="provenance", help="cut the comparison above this section")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for page, name, until in ((build_report(args.run), RUN_PNG, args.run_until),
                              (build_compare_report(args.compare), COMPARE_PNG, args.compare_until)):
        png = take(page, args.out / name, css_width=args.css_width, width=args.width, max_height=args.max_height,
                   max_kb=args.max_kb, until=until)
        print(f"{png} ({png.stat().st_size // 1024} kB) from {page}")


if __name__ == "__main__":
    main()
