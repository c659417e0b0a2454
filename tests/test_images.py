"""Robust image reading: every PNG mode to uint8 RGB, corrupt files named, resize/crop to the input size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.datasets.images import BadImageError, read_rgb, to_square
from common.datasets.splits import FileSplit, collate_skipping


def _save(tmp_path, name: str, img: Image.Image):
    path = tmp_path / name
    img.save(path)
    return path


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (20, 10), (200, 100, 50, 128)),
        Image.new("L", (20, 10), 77),
        Image.new("LA", (20, 10), (77, 255)),
        Image.new("P", (20, 10), 3),
        Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)),
    ],
    ids=["rgba", "gray", "gray-alpha", "palette", "16-bit"],
)
def test_any_mode_becomes_uint8_rgb(tmp_path, img: Image.Image) -> None:
    out = read_rgb(_save(tmp_path, "x.png", img))
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path) -> None:
    path = _save(tmp_path, "x.png", Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)))
    assert abs(int(read_rgb(path)[0, 0, 0]) - 128) <= 1


def test_truncated_png_is_a_named_error(tmp_path) -> None:
    path = _save(tmp_path, "ok.png", Image.new("RGB", (64, 64), (10, 20, 30)))
    data = path.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated.png"):
        read_rgb(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="junk.png"):
        read_rgb(junk)


def test_to_square_resizes_short_side_and_centre_crops() -> None:
    img = np.zeros((460, 700, 3), dtype=np.uint8)
    img[:, 340:360] = 255  # a bright vertical band in the centre survives the crop
    out = to_square(img, 64)
    assert out.shape == (64, 64, 3) and out[:, 30:34].mean() > 100


def test_file_split_skips_and_counts_or_fails_strictly(tmp_path) -> None:
    _save(tmp_path, "a.png", Image.new("RGB", (40, 40), (200, 10, 10)))
    (tmp_path / "b.png").write_bytes(b"broken")
    split = FileSplit(tmp_path, ["a.png", "b.png"], [0, 1], image_size=32)
    images, labels, skipped = collate_skipping([split[0], split[1]])
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [0] and skipped == 1
    strict = FileSplit(tmp_path, ["b.png"], [1], image_size=32, strict=True)
    with pytest.raises(BadImageError, match="b.png"):
        strict[0]


def test_auto_loader_workers_decode_files_in_parallel_only_where_a_gpu_waits(tmp_path, monkeypatch) -> None:
    from common.datasets.splits import ArraySplit
    from common.training import loader_workers, make_loader

    files = FileSplit(tmp_path, ["a.png"], [0], 32)
    arrays = ArraySplit(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(-1, files, cuda=True) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(-1, files, cuda=True) == 1
    assert loader_workers(-1, files, cuda=False) == 0 and loader_workers(-1, arrays, cuda=True) == 0
    assert loader_workers(3, arrays, cuda=False) == 3  # an explicit count is kept
    loader = make_loader(files, 2, seed=0, num_workers=-1, pin_memory=True)
    assert loader.num_workers == 1 and loader.persistent_workers and loader.pin_memory
