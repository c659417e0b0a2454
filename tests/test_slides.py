"""Whole slides: tiles map back to level-0 pixels, background and pen are skipped, no whole level is read, GeoJSON."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from client.predict import SlideOptions, predict_slide
from common.card import card_for_run
from common.config import RunConfig
from common.datasets.images import to_square
from common.slide_fixture import REGION, SlideSpec, render, write_slide
from common.slide_outputs import trace
from common.slides import (
    THUMBNAIL_CHUNK, SlideError, SlideTiles, open_slide, plan_tiles, thumbnail, tissue_mask, tissue_tiles,
)

SPEC = SlideSpec(4096, 3072, tissue=(512, 512, 3584, 2560), region=(1024, 1024, 2048, 1536),
                 pen=(2560, 768, 3072, 1280), mpp=0.25, levels=3)
SIZE = 32  # model input side


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    return {"mpp": write_slide(root / "with-mpp.tif", SPEC),
            "plain": write_slide(root / "no-mpp.tif", SlideSpec(**{**SPEC.__dict__, "mpp": None}))}


def _grid(path: Path, **how):
    slide = open_slide(path)
    plan = plan_tiles(slide, path, image_size=SIZE, model_mpp=None, **how)
    thumb, scale = thumbnail(slide, 2048)
    return plan, tissue_tiles(tissue_mask(thumb), scale, slide.dimensions, plan.tile)


@pytest.mark.parametrize(("how", "level", "tile"), [
    ({"level": 0}, 0, 32), ({"level": 1}, 1, 64), ({"level": 2}, 2, 128),
    ({"mpp": 0.5}, 1, 64), ({"mpp": 0.6}, 1, 76), ({"mpp": 0.75}, 1, 96), ({"mpp": 1.0}, 2, 128),
])
def test_tiles_are_the_slide_pixels_at_their_level_0_coordinates(slides: dict[str, Path], how: dict, level: int,
                                                                tile: int) -> None:
    # Prepare
    plan, grid = _grid(slides["mpp"], **how)
    tiles = SlideTiles(slides["mpp"], grid.xy, plan)
    assert (plan.level, plan.tile) == (level, tile)
    assert plan.mpp == pytest.approx(0.25 * tile / SIZE)

    # Execute / Assert: every tile is exactly the generated pixels there, resized to the model's input
    ds = 2**level
    for i in np.linspace(0, len(grid.xy) - 1, 7).astype(int):
        image, index = tiles[int(i)]
        x, y = grid.xy[i]
        want = to_square(render(SPEC, level, x // ds, y // ds, plan.read_size, plan.read_size), SIZE)
        assert index == i and np.array_equal(image, want), (x, y)
    batch = tiles.__getitems__(list(range(len(grid.xy))))  # how a DataLoader fetches: rows read as strips
    assert all(np.array_equal(batch[i][0], tiles[i][0]) and batch[i][1] == i for i in range(0, len(batch), 5))
    inside = [i for i, (x, y) in enumerate(grid.xy)
              if 1024 <= x and x + tile <= 2048 and 1024 <= y and y + tile <= 1536]
    assert inside and all(np.array_equal(tiles[i][0].reshape(-1, 3).mean(0), REGION) for i in inside)


def test_background_and_pen_are_skipped_and_every_tissue_tile_is_kept(slides: dict[str, Path]) -> None:
    plan, grid = _grid(slides["mpp"], mpp=1.0)  # 128 px tiles at level 0: the boxes fall on tile edges
    xs, ys = np.meshgrid(np.arange(0, 4096, 128), np.arange(0, 3072, 128))
    in_tissue = (xs >= 512) & (xs + 128 <= 3584) & (ys >= 512) & (ys + 128 <= 2560)
    in_pen = (xs >= 2560) & (xs + 128 <= 3072) & (ys >= 768) & (ys + 128 <= 1280)
    want = {(int(x), int(y)) for x, y in zip(xs[in_tissue & ~in_pen], ys[in_tissue & ~in_pen])}
    assert {(int(x), int(y)) for x, y in grid.xy} == want
    assert grid.shape == (3072 // 128, 4096 // 128) and len(want) == 16 * 24 - 16


def test_the_slide_scale_is_read_from_the_file_or_given(slides: dict[str, Path]) -> None:
    slide = open_slide(slides["plain"])
    with pytest.raises(SlideError, match="no-mpp.tif: the slide states no µm/px"):
        plan_tiles(slide, slides["plain"], image_size=SIZE, model_mpp=0.5)
    assert plan_tiles(slide, slides["plain"], image_size=SIZE, model_mpp=0.5, base_mpp=0.25).tile == 64
    assert plan_tiles(slide, slides["plain"], image_size=SIZE, model_mpp=None, level=1).mpp is None
    with pytest.raises(SlideError, match="model card states no µm/px"):
        plan_tiles(open_slide(slides["mpp"]), slides["mpp"], image_size=SIZE, model_mpp=None)
    with pytest.raises(SlideError, match=r"needs 0\.1 µm/px but the slide's finest level is 0\.25 .*cannot provide"):
        plan_tiles(open_slide(slides["mpp"]), slides["mpp"], image_size=SIZE, model_mpp=0.1)
    with pytest.raises(SlideError, match=r"level 3 does not exist \(the slide has levels 0\.\.2\)"):
        plan_tiles(slide, slides["plain"], image_size=SIZE, model_mpp=None, level=3)


def test_a_file_openslide_cannot_read_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "scan.svs"
    bad.write_text("not a slide")
    for path, words in ((bad, "OpenSlide cannot open"), (tmp_path / "gone.svs", "not found")):
        with pytest.raises(SlideError, match=words) as err:
            open_slide(path)
        assert str(path) in str(err.value)


class _Recorder:
    """An OpenSlide handle that records the size of every region read."""

    def __init__(self, slide) -> None:
        self.slide, self.areas = slide, []

    def __getattr__(self, name: str):
        return getattr(self.slide, name)

    def read_region(self, location, level, size):
        self.areas.append(size[0] * size[1])
        return self.slide.read_region(location, level, size)


def test_the_thumbnail_of_a_slide_without_pyramid_is_read_in_chunks(tmp_path: Path) -> None:
    spec = SlideSpec(8192, 8192, tissue=(2048, 2048, 4096, 6144), mpp=0.5, levels=1, tile=512)
    slide = _Recorder(open_slide(write_slide(tmp_path / "flat.tif", spec)))
    thumb, scale = thumbnail(slide, 512)
    assert thumb.shape == (512, 512, 3) and scale == (16.0, 16.0)
    assert max(slide.areas) <= THUMBNAIL_CHUNK**2 < 8192 * 8192 and len(slide.areas) == (8192 // THUMBNAIL_CHUNK) ** 2
    assert tissue_mask(thumb).mean() == pytest.approx(2048 * 4096 / 8192**2, abs=0.01)


class _Probe(nn.Module):
    """P(malignant) high where the tile is purple (mean red below 160 in 0..255), low on pink tissue."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = (x[:, 0] * 0.229 + 0.485).mean(dim=(1, 2)) * 255.0  # undo the ImageNet normalisation
        score = (160.0 - red) / 5.0
        return torch.stack([torch.zeros_like(score), score], dim=1) + 0 * self.dummy


def test_slide_outputs_put_the_different_tissue_where_it_is(tmp_path: Path, slides: dict[str, Path],
                                                             tiny_cfg: RunConfig) -> None:
    # Prepare
    card = card_for_run(tiny_cfg, data_kind="synthetic")
    out = tmp_path / "out"

    # Execute
    summary = predict_slide(_Probe(), card, slides["mpp"], out, SlideOptions(mpp=1.0, batch_size=16),
                            device=torch.device("cpu"))

    # Assert: rows = tissue tiles; the region's 8 x 4 tiles are the only ones above threshold, merged into its box
    rows = (out / "tiles.csv").read_text().splitlines()
    assert rows[0].startswith("x,y,width,height,p_benign,p_malignant") and len(rows) - 1 == summary["tiles"] == 368
    assert all(r.endswith(",synthetic") for r in rows[1:])
    body = json.loads((out / "tiles.geojson").read_text())
    assert body["type"] == "FeatureCollection" and body["properties"]["model-data"] == "synthetic"
    tiles = [f for f in body["features"] if f["properties"]["objectType"] == "detection"]
    merged = [f for f in body["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == 32 == summary["above-threshold"]
    for f in tiles:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        (x0, y0), (x1, y1) = np.min(ring, axis=0), np.max(ring, axis=0)
        assert 1024 <= x0 and x1 <= 2048 and 1024 <= y0 and y1 <= 1536 and x1 - x0 == 128
        assert f["properties"]["classification"] == {"name": "malignant", "color": [200, 0, 0], "colorRGB": -3670016}
        assert f["properties"]["measurements"]["P(malignant)"] > 0.99
    assert len(merged) == 1 and merged[0]["geometry"] == {
        "type": "MultiPolygon", "coordinates": [[[[1024, 1024], [2048, 1024], [2048, 1536], [1024, 1536], [1024, 1024]]]]}
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SYNTHETIC" in summary["line"] and "368 tissue tile(s) at 1 µm/px (level 2)" in summary["line"]


def test_merged_regions_keep_holes_and_separate_diagonal_neighbours() -> None:
    mask = np.zeros((6, 7), bool)
    mask[1:5, 1:6] = True
    mask[2, 2:4] = False  # a hole
    mask[5, 6] = True  # touches the block at one corner only
    polygons = trace(mask)
    assert len(polygons) == 2
    block, corner = sorted(polygons, key=len, reverse=True)
    assert block[0] == [(1, 1), (6, 1), (6, 5), (1, 5), (1, 1)] and len(block) == 2
    assert sorted(block[1][:-1]) == [(2, 2), (2, 3), (4, 2), (4, 3)]
    assert corner == [[(6, 5), (7, 5), (7, 6), (6, 6), (6, 5)]]


def _peak_rss_growth_mib(action) -> float:
    process, peak, done = psutil.Process(), [0], threading.Event()
    base = peak[0] = process.memory_info().rss

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        action()
    finally:
        done.set()
        watcher.join()
    return (peak[0] - base) / 2**20


def test_memory_stays_bounded_on_a_large_sparse_slide(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    # Prepare: the same 2048 px square of tissue on a 4,096 px and on a 32,768 px slide (a whole level 0 of
    # the large one is 4 GiB as RGBA, its level 2 256 MiB)
    def spec(side: int) -> SlideSpec:
        at = side // 2
        return SlideSpec(side, side, tissue=(at, at, at + 2048, at + 2048), region=(at, at, at + 1024, at + 1024),
                         mpp=0.25, levels=6, tile=1024)

    small, big = write_slide(tmp_path / "small.tif", spec(4096)), write_slide(tmp_path / "big.tif", spec(32768))
    card = card_for_run(tiny_cfg, data_kind="synthetic")
    runs: list[dict] = []

    def run(path: Path, name: str) -> None:
        runs.append(predict_slide(_Probe(), card, path, tmp_path / name, SlideOptions(level=2, batch_size=32),
                                  device=torch.device("cpu")))

    run(small, "warm-up")  # one-time allocations (fonts, thread pools) out of the comparison

    # Execute
    grew_small = _peak_rss_growth_mib(lambda: run(small, "small"))
    grew_big = _peak_rss_growth_mib(lambda: run(big, "big"))

    # Assert: every tissue tile predicted on both; memory does not grow with the slide (reading the large
    # slide's level 2 whole would take 256 MiB)
    assert [r["tiles"] for r in runs] == [256, 256, 256]
    assert grew_big < min(grew_small + 64, 128), f"peak RSS +{grew_big:.0f} MiB (4,096 px slide: +{grew_small:.0f})"


def test_missing_optional_packages_say_how_to_install_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from common.onnx_export import ExportError, _onnx

    for name in ("openslide", "onnx"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(SlideError, match=r"pip install 'histofed\[slides\]'"):
        open_slide(tmp_path / "any.svs")
    with pytest.raises(ExportError, match=r"pip install 'histofed\[onnx\]'"):
        _onnx()


def test_tiles_read_in_dataloader_workers_match_the_main_process(slides: dict[str, Path]) -> None:
    from common.training import make_loader

    plan, grid = _grid(slides["mpp"], mpp=1.0)
    tiles = SlideTiles(slides["mpp"], grid.xy[:40], plan)
    tiles[0]  # opens the slide here: the handle must not travel to the worker
    here = [(img, idx) for img, idx, _ in make_loader(tiles, 16, seed=None, num_workers=0)]
    there = [(img, idx) for img, idx, _ in make_loader(tiles, 16, seed=None, num_workers=1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(here, there)) and len(there) == 3
