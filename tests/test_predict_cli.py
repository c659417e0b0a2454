"""`flower-client predict` and `export` in process (typer's CliRunner): outputs, and bad input named in one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from client.cli import app
from common.card import card_for_run, write_model
from common.config import RunConfig
from common.model import build_model_for
from common.slide_fixture import SlideSpec, write_slide

SPEC = SlideSpec(2048, 2048, tissue=(512, 512, 1536, 1536), region=(512, 512, 1024, 1024), mpp=0.25, levels=3)
TINY = {"model.backbone": "test_efficientnet", "model.token-dim": 8, "model.hidden-size": 8}
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    cfg = RunConfig().override({**TINY, "model.image-size": 64})  # 64 px: a 2 x 2 attention grid
    torch.manual_seed(0)
    model = build_model_for(cfg.model, cfg.privacy)
    carded = write_model(root / "run" / "model.safetensors", model.state_dict(), card_for_run(cfg, data_kind="synthetic"))
    plain = root / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, where in enumerate(["a.png", "b.jpg", "nested/c.png", "nested/a.png"]):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8)).save(images / where)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    bad_slide = root / "scan.svs"
    bad_slide.write_text("not a slide")
    return {"model": carded, "run": carded.parent, "plain": plain, "images": images,
            "slide": write_slide(root / "slide.tif", SPEC), "blank": write_slide(root / "blank.tif", SlideSpec(
                2048, 2048, tissue=(0, 0, 0, 0), mpp=0.25, levels=3)), "bad-slide": bad_slide}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_patches_give_one_row_per_readable_image_and_list_the_unreadable(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--model", str(files["run"]), "--images", str(files["images"]),
                                 "--out", str(out), "--attention"])
    assert result.exit_code == 0, result.output
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,predicted,p_benign,p_malignant,model-data" and len(rows) == 1 + 4
    for row in rows[1:]:
        path, predicted, p0, p1, kind = row.split(",")
        assert predicted in ("benign", "malignant") and abs(float(p0) + float(p1) - 1) < 1e-5 and kind == "synthetic"
    assert (out / "skipped.txt").read_text().strip().endswith("broken.png")
    panels = sorted(p.name for p in (out / "attention").iterdir())
    assert panels == ["a-1.png", "a.png", "b.png", "c.png"]  # two a.png in different folders: both kept
    with Image.open(out / "attention" / "a.png") as img:
        assert img.size[0] > 2 * 64 and img.info["model-data"] == "synthetic"
    assert "SYNTHETIC" in result.stdout and "1 unreadable skipped" in result.stdout


def test_a_slide_gives_tiles_heatmap_geojson_and_a_summary_line(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--model", str(files["model"]), "--slide", str(files["slide"]),
                                 "--out", str(out), "--mpp", "2.0", "--threshold", "0"])
    assert result.exit_code == 0, result.output
    tiles = (1024 // 512) ** 2  # 64 px at 2 µm/px = 512 level-0 px a tile
    assert len((out / "tiles.csv").read_text().splitlines()) == 1 + tiles
    body = json.loads((out / "tiles.geojson").read_text())
    assert sum(f["properties"]["objectType"] == "detection" for f in body["features"]) == tiles  # threshold 0: all
    assert (out / "heatmap.png").is_file() and json.loads((out / "summary.json").read_text())["tiles"] == tiles
    assert f"{tiles} tissue tile(s) at 2 µm/px" in result.stdout and "SYNTHETIC" in result.stdout


@pytest.mark.parametrize(("case", "culprit", "words"), [
    ("not-histofed", "plain", "not a histofed model"),
    ("mismatch", "mismatch", "model card does not match the tensors"),
    ("unreadable-slide", "bad-slide", "OpenSlide cannot open"),
    ("no-tissue", "blank", "no tissue found"),
    ("mpp-too-fine", "slide", "cannot provide that resolution"),
    ("output-not-empty", "out", "output directory is not empty"),
    ("no-images", "images", "no image files"),
])
def test_bad_input_is_one_line_naming_the_file_exit_2_nothing_written(files: dict[str, Path], tmp_path: Path,
                                                                       case: str, culprit: str, words: str) -> None:
    # Prepare
    out, model, source = tmp_path / "out", files["model"], ["--slide", str(files["slide"])]
    paths = {**files, "out": out}
    if case == "not-histofed":
        model = files["plain"]
    elif case == "mismatch":  # the card of a 2-class model over the weights of an 8-class one
        cfg = RunConfig().override({**TINY, "model.image-size": 64, "model.num-classes": 8})
        from safetensors import safe_open

        with safe_open(str(files["model"]), framework="pt") as fh:
            meta = fh.metadata()
        model = paths["mismatch"] = tmp_path / "mismatch.safetensors"
        save_file({k: v.contiguous() for k, v in build_model_for(cfg.model, cfg.privacy).state_dict().items()},
                  str(model), metadata=meta)
    elif case in ("unreadable-slide", "no-tissue"):
        source = ["--slide", str(files[culprit])]
    elif case == "output-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no-images":
        paths["images"] = tmp_path / "empty"
        paths["images"].mkdir()
        source = ["--images", str(paths["images"])]
    extra = ["--mpp", "0.1"] if case == "mpp-too-fine" else ["--mpp", "1.0"]

    # Execute
    result = runner.invoke(app, ["predict", "--model", str(model), *source, "--out", str(out), *extra])

    # Assert
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and words in message and str(paths[culprit]) in message
    assert (not out.exists()) if case != "output-not-empty" else [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _leftovers(tmp_path)


def test_images_and_slide_together_or_neither_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    for source in (["--images", str(files["images"]), "--slide", str(files["slide"])], []):
        result = runner.invoke(app, ["predict", "--model", str(files["model"]), *source, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "either --images" in result.stderr


def test_a_failure_midway_leaves_nothing_behind(files: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import client.predict

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(client.predict, "heatmap", broken)  # after tiles.csv and tiles.geojson were written
    result = runner.invoke(app, ["predict", "--model", str(files["model"]), "--slide", str(files["slide"]),
                                 "--out", str(tmp_path / "out"), "--mpp", "2.0"])
    assert result.exit_code == 1 and "disk full" in result.stderr
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_export_writes_an_onnx_graph_with_the_card(files: dict[str, Path], tmp_path: Path) -> None:
    from common.onnx_export import read_onnx_card

    target = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(files["run"]), "--onnx", str(target)])
    assert result.exit_code == 0, result.output
    assert "max |onnxruntime - torch|" in result.stdout and "SYNTHETIC" in result.stdout
    assert read_onnx_card(target).image_size == 64
    again = runner.invoke(app, ["export", "--model", str(files["run"]), "--onnx", str(target)])
    assert again.exit_code == 2 and "already exists" in again.stderr
