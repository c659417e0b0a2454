"""The README's heatmap picture: a SYNTHETIC slide mosaic of generated patches, predicted with a federated model.

Usage: python -m simulations.demo_slide --model RUN_DIR [--out docs/heatmap.png] [--work DIR]
The slide is 64 x 40 generated patches at the model's input size (benign subtypes on an elliptic piece of
tissue, a malignant region at its left, glass around), written as a pyramidal tiled TIFF; it is predicted
with `flower-client predict --slide ... --level 0` (one generated patch per tile) and heatmap.png is copied
to --out (800 px wide, 256 colours). Everything in the picture is synthetic: generated tissue, a model trained on generated data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common.card import read_card
from common.datasets.synthetic import SUBTYPES, hospital, render
from common.slide_fixture import GLASS

COLS, ROWS = 64, 40


def mosaic(size: int, seed: int = 0) -> np.ndarray:
    """ROWS x COLS generated patches: tissue inside an ellipse, malignant subtypes in a disc on its left."""
    rng = np.random.default_rng(seed)
    site = hospital(0, 3, seed)
    image = np.empty((ROWS * size, COLS * size, 3), np.uint8)
    image[:] = GLASS
    for r in range(ROWS):
        for c in range(COLS):
            u, v = (c + 0.5) / COLS * 2 - 1, (r + 0.5) / ROWS * 2 - 1
            if u * u / 0.85 + v * v / 0.7 > 1:
                continue
            malignant = (u + 0.35) ** 2 + (v + 0.1) ** 2 < 0.09
            subtype = int(rng.integers(4, 8)) if malignant else int(rng.integers(0, 4))
            image[r * size:(r + 1) * size, c * size:(c + 1) * size] = render(rng, size, SUBTYPES[subtype], site)
    return image


def write_mosaic(path: Path, image: np.ndarray, levels: int = 3) -> Path:
    """A pyramidal tiled TIFF of an in-memory image (2 x 2 box downsampling per level), deflate tiles."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        level = image
        for i in range(levels):
            tw.write(level, tile=(256, 256), photometric="rgb", compression="deflate", subfiletype=1 if i else 0)
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


def main(argv: list[str] | None = None) -> Path:
    """Build the mosaic slide, predict it with the model, copy the heatmap."""
    from typer.testing import CliRunner

    from client.cli import app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors or a run directory")
    parser.add_argument("--out", type=Path, default=Path("docs/heatmap.png"))
    parser.add_argument("--work", type=Path, default=None, help="keep the slide and outputs here")
    args = parser.parse_args(argv)
    card = read_card(args.model)
    with tempfile.TemporaryDirectory(prefix="histofed-demo-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide = write_mosaic(work / "synthetic-slide.tif", mosaic(card.image_size))
        result = CliRunner().invoke(app, ["predict", "--model", str(args.model), "--slide", str(slide), "--level", "0",
                                          "--out", str(work / "prediction")])
        print(result.output.strip())
        if result.exit_code != 0:
            raise SystemExit(result.exit_code)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(work / "prediction" / "heatmap.png") as img:  # 800 px, 256 colours: small for the README
            small = img.resize((800, round(img.height * 800 / img.width)), Image.LANCZOS)
            small.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG).save(
                args.out, optimize=True)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
