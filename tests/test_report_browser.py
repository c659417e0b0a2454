"""report.html and compare.html in a real browser (headless Chromium, offline) and parsed: sections, class names, order, formats."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.classes import BINARY, SUBTYPES
from common.config import RunConfig
from common.metrics import EvalResult, pooled_report, score_histograms
from common.rundir import RunDirectory
from simulations.browser import check_page
from simulations.compare import CompareOptions, summarise
from simulations.compare_report import build_compare_report
from simulations.planning import RunOptions
from simulations.run_report import build_report
from conftest import TINY
from test_report import _fake_run

SITES = ["synthetic-hospital-0", "synthetic-hospital-1", "synthetic-hospital-2"]


class _Page(HTMLParser):
    """Sections, their headings, table rows (cell texts) and image sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(str(a.get("id")))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h2", "h3"):
            self._heading, self._text = True, []
        elif tag == "img":
            self.images.append(str(a.get("src")))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("h2", "h3"):
            self.headings.append("".join(self._text).strip())
            self._heading = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._heading:
            self._text.append(data)

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


def _parse(path: Path) -> _Page:
    parser = _Page()
    parser.feed(path.read_text())
    return parser


def _fake_compare(tmp_path: Path, tiny_cfg: RunConfig) -> Path:
    """compare.json as `flower-sim compare` writes it (through its own summarise), from made-up evaluation counts."""
    cfg = tiny_cfg.override({"federation.num-sites": 3, "federation.holdout-site": 2})
    rng = np.random.default_rng(1)

    def evaluation(names: list[str], skill: float) -> dict:
        per_site = {}
        for name in names:
            y = rng.integers(0, 2, 50)
            p = rng.random((50, 2)) + skill * np.eye(2)[y]
            p /= p.sum(1, keepdims=True)
            cm = np.bincount(y * 2 + p.argmax(1), minlength=4).reshape(2, 2)
            per_site[name] = EvalResult(0.4, 50, cm, score_histograms(y, np.log(p)))
        return pooled_report(per_site)

    raw: dict = {"hybrid": {}}
    for mode, skill in (("pooled", 0.9), ("local", 0.6), ("federated", 0.7)):
        for _ in range(2):
            run = {"train-sites": evaluation(SITES[:2], skill), "holdout": evaluation(SITES[2:], skill / 2)["global"]}
            if mode == "local":
                run["cross-site-accuracy"] = {a: {b: float(rng.random()) for b in SITES[:2]} for a in SITES[:2]}
            raw["hybrid"].setdefault(mode, []).append(run)
    opts = CompareOptions(RunOptions("synthetic-tiny"), seeds=(0, 1), holdout=2, out_dir=tmp_path / "cmp")
    out = tmp_path / "cmp"
    out.mkdir()
    import json

    (out / "compare.json").write_text(json.dumps({"summary": summarise(raw, cfg, opts), "config": cfg.to_flat(), "runs": raw}))
    return out


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both run reports (2 classes with patients, 8 without) and a comparison, built once for this module."""
    tmp_path, tiny_cfg = tmp_path_factory.mktemp("pages"), RunConfig().override(TINY)
    return {
        "binary": build_report(_fake_run(tmp_path, tiny_cfg, sites=3, name="binary")),
        "subtypes": build_report(_fake_run(tmp_path, tiny_cfg, num_classes=8, sites=3, patients=False, name="subtypes")),
        "compare": build_compare_report(_fake_compare(tmp_path, tiny_cfg)),
    }


def test_reports_render_offline_in_chromium_with_every_image_decoded(pages: dict[str, Path]) -> None:
    for name, page in pages.items():
        seen = check_page(page)
        pngs = sorted(page.parent.glob("*/*.png"))
        assert len(seen.images) == len([p for p in pngs if p.parent.name in ("report", "compare-report")]) > 0, name
        assert seen.undecoded == [], name
        widths = {i["alt"]: i["width"] for i in seen.images}
        for png in pngs:  # the browser decoded each embedded PNG at its real size
            assert widths[png.relative_to(page.parent).as_posix()] == Image.open(png).size[0]
        assert seen.fetched == [] and seen.blocked == [], name
        assert seen.sections == _parse(page).sections and seen.sections[-1] == "provenance"
        tops = list(seen.section_tops.values())
        assert tops == sorted(tops) and seen.height > tops[-1]  # laid out top to bottom, none collapsed


def test_the_offline_check_sees_fetches_and_broken_images(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "beside.png")
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.com/x.css">'
                    "<style>@font-face{font-family:F;src:url(https://fonts.example.com/f.woff2)}body{font-family:F}</style>"
                    '</head><body>x<img alt="remote" src="http://example.com/a.png"><img alt="file" src="beside.png">'
                    '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    seen = check_page(page)
    assert sorted(seen.undecoded) == ["broken", "file", "remote"]
    assert not seen.self_contained
    assert any("cdn.example.com" in u for u in seen.blocked) and any("fonts.example.com" in u for u in seen.blocked)


def test_run_report_sections_class_names_site_order_and_formats(pages: dict[str, Path]) -> None:
    binary, subtypes = _parse(pages["binary"]), _parse(pages["subtypes"])
    assert binary.sections == ["summary", "sites", "confusion", "patients", "curves", "attention", "provenance"]
    assert all(src.startswith("data:image/png;base64,") for src in binary.images)
    text = pages["binary"].read_text()
    assert "SYNTHETIC DATA" in text and all(name in text for name in BINARY)
    site_rows = [r[0] for r in binary.rows if r and r[0] in SITES]
    assert site_rows[:3] == SITES  # per-site table in site order although replies came in reverse
    header = binary.row("accuracy")  # the global metrics table: one column per metric
    final = dict(zip(header, binary.rows[binary.rows.index(header) + 1]))
    logged = RunDirectory(pages["binary"].parent).history()[-1]["global"]
    assert final["images"] == "120" and final["patients"] == str(logged["patients"])  # counts, not 120.0000
    assert final["accuracy"] == f"{logged['accuracy']:.3f}"
    assert all(re.fullmatch(r"\d\.\d{3}", final[k]) for k in ("accuracy", "AUC", "patient rec. rate", "loss"))
    assert binary.row("histofed")[1] == metadata.version("histofed") and binary.row("flwr")[1] == metadata.version("flwr")
    assert binary.row("model.backbone")[1:] == ["tf_efficientnetv2_b0", "test_efficientnet"]  # config diff
    assert binary.row("strategy")[1].startswith("fedavg, 2 of 5 round(s), 3 site(s)")
    # 8 classes: every subtype names a row of the per-class tables and a column of the class table
    assert all(subtypes.row(name.replace("_", " ")) for name in SUBTYPES)
    assert "patients" in subtypes.sections and "no patient identifiers" in pages["subtypes"].read_text()
    assert "AUC per class and site" in subtypes.headings


def test_compare_report_has_the_figure_the_cross_site_matrix_and_the_table(pages: dict[str, Path]) -> None:
    parsed = _parse(pages["compare"])
    assert parsed.sections == ["figure", "cross-site", "table", "provenance"]
    regimes = {(r[1], r[2]) for r in parsed.rows if len(r) > 3 and r[0] == "hybrid"}
    for mode in ("pooled", "local only", "federated"):
        for scope in ("training hospitals (pooled test)", "held-out hospital (synthetic-hospital-2)", *SITES[:2]):
            assert (mode, scope) in regimes
    cell = next(r for r in parsed.rows if r and r[0] == "hybrid")[4]
    assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cell)
    assert "held-out hospital: synthetic-hospital-2" in pages["compare"].read_text()
    assert len(parsed.images) == 2


def test_flower_sim_report_rebuilds_either_page_and_refuses_other_folders(pages: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    for name in ("binary", "compare"):
        page = pages[name]
        page.unlink()
        result = CliRunner().invoke(app, ["report", str(page.parent)])
        assert result.exit_code == 0 and page.is_file(), result.stdout + result.stderr
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a histofed run directory" in result.stderr


def test_a_private_run_reports_its_mode_and_epsilon_per_site(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    run = _fake_run(tmp_path, tiny_cfg.override({"privacy.mode": "local"}), sites=3, patients=False, privacy=True)
    page = build_report(run)
    parsed = _parse(page)
    assert "privacy" in parsed.sections and (run / "report" / "epsilon.png").is_file()
    logged = RunDirectory(run).read_privacy()["sites"]
    header = next(r for r in parsed.rows if r[:2] == ["site", "ε spent"])
    table_rows = parsed.rows[parsed.rows.index(header) + 1:][: len(SITES)]
    assert [r[0] for r in table_rows] == SITES
    assert [r[1] for r in table_rows] == [f"{logged[s]['epsilon']:.3f}" for s in SITES]  # ε per site, 3 decimals
    assert "DP-SGD" in page.read_text()
