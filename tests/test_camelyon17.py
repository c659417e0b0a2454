"""Camelyon17-WILDS reader on a synthetic layout-faithful fixture: metadata, sites, patient splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import RunConfig

from common.errors import ConfigError
from common.datasets import camelyon17 as cam
from common.datasets.fixtures import write_camelyon17
from common.datasets.patients import ratio_split_sizes, split_by_ratio
from common.datasets.images import BadImageError
from common.errors import DatasetLayoutError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_camelyon17(tmp_path_factory.mktemp("cam"), patients_per_center=4)


def _cfg(root: Path, cache: Path, **extra: object) -> RunConfig:
    base = {"data.root": str(root), "data.centers": "0,1,2,3,4", "federation.num-sites": 5,
            "data.cache-dir": str(cache), "model.image-size": 32}
    return RunConfig().override({**base, **extra})


def _metadata_copy(root: Path, dest: Path, edit=lambda lines: lines) -> Path:
    """A copy of the fixture's metadata.csv (edited line by line) in dest, with the patches linked."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = (root / "metadata.csv").read_text().splitlines()
    (dest / "metadata.csv").write_text("\n".join(edit(lines)) + "\n")
    (dest / "patches").symlink_to(root / "patches")
    return dest


# ---- layout and metadata ----------------------------------------------------------------------


def test_fixture_round_trip_keeps_layout_and_zero_padded_patients(root: Path, tmp_path: Path) -> None:
    # Execute
    records = cam.read_metadata(root, cache_dir=tmp_path)
    # Assert
    assert (root / "metadata.csv").read_text().startswith(",patient,node,x_coord,y_coord,tumor,slide,center,split\n")
    assert len(records) == 5 * 4 * 6
    assert {r["patient"] for r in records if r["center"] == 0} == {"000", "001", "002", "003"}
    assert all(int(r["patient"]) // 20 == r["center"] for r in records)
    first = records[0]
    assert first["path"] == f"patches/patient_000_node_0/patch_patient_000_node_0_x_{first['x']}_y_{first['y']}.png"
    assert all((root / r["path"]).is_file() for r in records)
    assert 0.4 < np.mean([r["tumor"] for r in records]) < 0.6
    assert {r["split"] for r in records} == {0, 1}
    with Image.open(root / first["path"]) as img:
        assert img.mode == "RGBA" and img.size == (96, 96)


def test_rgba_patches_load_as_rgb_at_image_size(root: Path, tmp_path: Path) -> None:
    # Execute
    data = cam.load_split(_cfg(root, tmp_path), 0, "train")
    image, label = data[0]
    # Assert
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert label in (0, 1) and set(data.labels.tolist()) == {0, 1}


def test_metadata_cache_is_reused(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    builds = []
    parse = cam._parse_metadata
    monkeypatch.setattr(cam, "_parse_metadata", lambda meta: builds.append(meta) or parse(meta))
    # Execute
    first = cam.read_metadata(root, cache_dir=tmp_path)
    second = cam.read_metadata(root, cache_dir=tmp_path)
    # Assert
    assert first == second and len(builds) == 1
    assert len(list(tmp_path.glob("camelyon17-index-*.json"))) == 1


# ---- sites and splits -------------------------------------------------------------------------


def test_centers_map_to_sites_in_the_given_order(root: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(root, tmp_path, **{"data.centers": "3,0", "federation.num-sites": 2})
    # Execute
    names = cam.site_names(cfg)
    first_site = cam.load_split(cfg, 0, "train")
    # Assert
    assert names == ["center-3", "center-0"]
    assert all(p.startswith("patches/patient_06") for p in first_site.paths)


def test_partition_is_patient_disjoint_json_able_and_deterministic(root: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(root, tmp_path)
    # Execute
    record = json.loads(json.dumps(cam.partition(cfg)))
    # Assert
    assert record == json.loads(json.dumps(cam.partition(cfg)))
    assert record["dataset"] == "camelyon17" and record["centers"] == [0, 1, 2, 3, 4]
    assert list(record["sites"]) == [f"center-{c}" for c in range(5)]
    seen: set[str] = set()
    for c, site in enumerate(record["sites"].values()):
        splits = [set(site[s]) for s in ("train", "val", "test")]
        assert all(splits) and sum(map(len, splits)) == len(set().union(*splits)) == 4
        assert site["center"] == c and site["hospital"] == cam.CENTER_HOSPITALS[c]
        assert not seen & set().union(*splits)
        seen |= set().union(*splits)


def test_official_wilds_split(root: Path, tmp_path: Path) -> None:
    # Execute
    roles = cam.official_split(cam.read_metadata(root, cache_dir=tmp_path))
    held_out = cam.load_center(_cfg(root, tmp_path), 2)
    # Assert
    assert roles == {"train": [0, 3, 4], "val_ood": [1], "test": [2]}
    assert cam.partition(_cfg(root, tmp_path))["official_split"] == roles
    assert len(held_out) == 24 and all(p.startswith("patches/patient_04") for p in held_out.paths)


def test_patients_are_stratified_by_tumor_ratio() -> None:
    # Prepare: 10 patients with tumor ratios 0.0, 0.1, ... 0.9 (10 patches each)
    records = [{"patient": f"{p:03d}", "tumor": int(i < p)} for p in range(10) for i in range(10)]
    # Execute
    split = split_by_ratio(records, seed=(0, 0), val_fraction=0.2, test_fraction=0.2)
    # Assert
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    for s in ("val", "test"):
        assert abs(np.mean([int(p) / 10 for p in split[s]]) - 0.45) <= 0.1


@pytest.mark.parametrize("n, expected", [(1, (0, 0)), (2, (1, 0)), (3, (1, 1)), (10, (2, 2))])
def test_small_centers_keep_a_training_patient(n: int, expected: tuple[int, int]) -> None:
    assert ratio_split_sizes(n, val_fraction=0.15, test_fraction=0.2) == expected


def test_max_per_site_subsamples_deterministically_and_keeps_both_classes(root: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(root, tmp_path, **{"data.max-per-site": 6})
    # Execute
    a, b = cam.load_split(cfg, 1, "train"), cam.load_split(cfg, 1, "train")
    # Assert
    assert len(a) == 6 and a.paths == b.paths
    assert a.labels.sum() == 3


def test_config_errors_are_named(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="binary"):
        cam.load_split(_cfg(root, tmp_path, **{"model.num-classes": 8}), 0, "train")
    with pytest.raises(ConfigError, match="federation.num-sites \\(3\\).*data.centers \\(5"):
        cam.site_names(_cfg(root, tmp_path, **{"federation.num-sites": 3}))


# ---- bad input --------------------------------------------------------------------------------


def test_missing_root_and_metadata(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="root not found"):
        cam.read_metadata(tmp_path / "nowhere", cache_dir=tmp_path)
    with pytest.raises(DatasetLayoutError, match="metadata.csv not found"):
        cam.read_metadata(tmp_path, cache_dir=tmp_path)


@pytest.mark.parametrize("column", ["tumor", "center", "patient"])
def test_missing_column_is_named(root: Path, tmp_path: Path, column: str) -> None:
    # Prepare
    edit = lambda lines: [lines[0].replace(f",{column},", ",renamed,")] + lines[1:]  # noqa: E731
    data = _metadata_copy(root, tmp_path / "data", edit)
    # Execute / Assert
    with pytest.raises(DatasetLayoutError, match=f"missing column '{column}'"):
        cam.read_metadata(data, cache_dir=tmp_path)


@pytest.mark.parametrize("value, message", [
    ("abc", "row 2 column 'node': expected an integer, got 'abc'"),
    ("", "row 2 column 'node': expected an integer, got ''"),
])
def test_non_integer_value_names_row_and_column(root: Path, tmp_path: Path, value: str, message: str) -> None:
    # Prepare: row 2 = the second data line; its node (third field) is replaced
    def edit(lines: list[str]) -> list[str]:
        parts = lines[2].split(",")
        parts[2] = value
        return [*lines[:2], ",".join(parts), *lines[3:]]

    data = _metadata_copy(root, tmp_path / "data", edit)
    # Execute / Assert
    with pytest.raises(DatasetLayoutError, match=message):
        cam.read_metadata(data, cache_dir=tmp_path)


@pytest.mark.parametrize("field, value, message", [
    (7, "7", "'center': 7 is outside 0-4"),
    (5, "2", "'tumor': 2 is not 0 or 1"),
])
def test_out_of_range_center_and_tumor(root: Path, tmp_path: Path, field: int, value: str, message: str) -> None:
    # Prepare
    def edit(lines: list[str]) -> list[str]:
        parts = lines[1].split(",")
        parts[field] = value
        return [lines[0], ",".join(parts), *lines[2:]]

    data = _metadata_copy(root, tmp_path / "data", edit)
    # Execute / Assert
    with pytest.raises(DatasetLayoutError, match=message):
        cam.read_metadata(data, cache_dir=tmp_path)


def test_corrupt_patch_is_skipped_and_counted_or_raises_when_strict(tmp_path: Path) -> None:
    # Prepare
    data = write_camelyon17(tmp_path / "own", patients_per_center=2, patches_per_node=4, size=48)
    cfg = _cfg(data, tmp_path)
    train = cam.load_split(cfg, 0, "train")
    broken = data / train.paths[0]
    broken.write_bytes(broken.read_bytes()[:60])
    # Execute
    summaries = cam.check(cfg)
    # Assert
    assert len(summaries) == 15
    flagged = [(s.site, s.split, s.unreadable) for s in summaries if s.unreadable]
    assert flagged == [("center-0", "train", [train.paths[0]])]
    assert train[0][0] is None
    with pytest.raises(BadImageError):
        cam.load_split(_cfg(data, tmp_path, **{"data.strict": True}), 0, "train")[0]


def test_site_with_zero_images_is_named(root: Path, tmp_path: Path) -> None:
    # Prepare: drop every center-2 row; 2-patient centers have no val patients
    edit = lambda lines: [line for line in lines if not line.endswith((",2,0", ",2,1"))]  # noqa: E731
    data = _metadata_copy(root, tmp_path / "data", edit)
    small = write_camelyon17(tmp_path / "small", patients_per_center=2, patches_per_node=2, size=32)
    # Execute / Assert
    with pytest.raises(DatasetLayoutError, match="site center-2 has no 'test' patches"):
        cam.load_split(_cfg(data, tmp_path), 2, "test")
    with pytest.raises(DatasetLayoutError, match="site center-1 has no 'val' patches"):
        cam.load_split(_cfg(small, tmp_path), 1, "val")
    assert [s.images for s in cam.check(_cfg(small, tmp_path)) if s.split == "val"] == [0] * 5
