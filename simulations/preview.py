"""Preview grid of the SYNTHETIC H&E generator: the 8 subtypes (benign | malignant) across the hospitals and an outlier lab.

    python -m simulations.preview --out docs/synthetic-preview.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.datasets.cohort import hospital, slide_stain
from common.datasets.tissue import SUBTYPES, UM_PER_PX, render_patch, sample_biology

SHORT = ("adenosis", "fibroadenoma", "phyllodes", "tub. adenoma", "ductal", "lobular", "mucinous", "papillary")


def grid(*, sites: int = 3, size: int = 64, scale: int = 2, seed: int = 0, outlier: bool = True) -> Image.Image:
    """Rows: hospitals (plus an outlier lab); columns: the 8 subtypes, benign first; one patient per cell."""
    labs = [(f"hospital {i}", hospital(i, sites, seed)) for i in range(sites)]
    if outlier:
        labs.append(("outlier lab", hospital(sites, sites + 1, seed, outlier=True)))
    cell, gap, left, top = size * scale, 4, 96, 34
    width = left + len(SUBTYPES) * (cell + gap) + gap
    height = top + len(labs) * (cell + gap) + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    split = left + 4 * (cell + gap) + gap // 2
    draw.text((left + 2 * (cell + gap) - 20, 2), "benign", fill="black")
    draw.text((split + 2 * (cell + gap) - 28, 2), "malignant", fill="black")
    draw.line([(split, 0), (split, height - 16)], fill="black", width=1)
    for j, name in enumerate(SHORT):
        draw.text((left + j * (cell + gap) + gap, 18), name, fill="black")
    for i, (label, lab) in enumerate(labs):
        y = top + i * (cell + gap)
        draw.text((6, y + cell // 2 - 6), label, fill="black")
        for j, sub in enumerate(SUBTYPES):
            rng = np.random.default_rng([seed, 4242, i, j])
            bio = sample_biology(rng, sub.malignant)
            patch = render_patch(rng, size, j, bio, slide_stain(rng, lab.stain), lab.scanner)
            tile = Image.fromarray(patch).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + j * (cell + gap) + gap, y))
    draw.text((6, height - 14), f"SYNTHETIC - {size} px patches ({size * UM_PER_PX * 64 / size:.0f} um across, "
                                f"{UM_PER_PX} um/px at 64 px), shown x{scale}", fill="black")
    return canvas


def main(argv: list[str] | None = None) -> Path:
    """Write the preview PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic-preview.png"))
    parser.add_argument("--size", type=int, default=64, help="patch size in pixels (the model's input)")
    parser.add_argument("--scale", type=int, default=2, help="display magnification")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(size=args.size, scale=args.scale, seed=args.seed).save(args.out, format="PNG", optimize=True)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
