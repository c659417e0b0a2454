"""The preview grid command: one cell per subtype and lab, written as a PNG."""

from __future__ import annotations

from PIL import Image

from simulations import preview


def test_preview_grid_has_a_cell_per_subtype_and_lab(tmp_path) -> None:
    out = preview.main(["--out", str(tmp_path / "grid.png"), "--size", "32", "--scale", "1"])
    image = Image.open(out)
    assert image.mode == "RGB"
    assert image.width >= 8 * 32 and image.height >= 4 * 32  # 8 subtypes x (3 hospitals + an outlier lab)
