"""BreakHis reader on a synthetic layout-faithful tree: names, index, cache, patient partition, splits, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.config import RunConfig
from common.datasets import breakhis
from common.datasets.breakhis import (
    SUBTYPE_CODES, SUBTYPE_DIRS, check, load_split, parse_name, partition, scan, site_names,
)
from common.datasets.fixtures import write_breakhis as write_fixture
from common.datasets.patients import patient_classes, split_patients
from common.datasets.registry import load_site
from common.datasets.images import BadImageError
from common.errors import DatasetLayoutError
from common.datasets.synthetic import SUBTYPES

PPS, IPM, SIZE = 2, 2, (70, 46)  # patients per subtype, images per magnification, (w, h)
PATIENTS = 8 * PPS - 1  # slide 14-13412 is filed under DC and LC but is one patient


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only fixture tree shared by the module; tests that damage it use `own_tree`."""
    root = tmp_path_factory.mktemp("bh")
    return write_fixture(root, patients_per_subtype=PPS, images_per_magnification=IPM, size=SIZE)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bh_big")
    return write_fixture(root, patients_per_subtype=6, images_per_magnification=1, size=(20, 14))


@pytest.fixture
def own_tree(tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tree, tmp_path / "copy" / "BreaKHis_v1"))


def _cfg(root: Path | str, cache: Path, **over: Any) -> RunConfig:
    pairs = {"data.root": str(root), "data.cache-dir": str(cache), "model.image-size": 32}
    return RunConfig().override({**pairs, **{k.replace("__", ".").replace("_", "-"): v for k, v in over.items()}})


def _site_patients(audit: dict[str, Any]) -> list[set[str]]:
    return [{p for split in site.values() for p in split} for site in audit["sites"].values()]


def _first_image(root: Path, audit: dict[str, Any], site: str = "breakhis-site-0", split: str = "train") -> Path:
    patient = audit["sites"][site][split][0]
    return sorted(root.rglob(f"*-{patient}-200-*.png"))[0]


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "fields", "patient"),
    [
        ("SOB_B_A-14-22549AB-100-001.png", ("SOB", "B", "A", "14", "22549AB", 100, 1), "14-22549AB"),
        ("SOB_M_DC-14-13412-200-010.png", ("SOB", "M", "DC", "14", "13412", 200, 10), "14-13412"),
        ("a/b/SOB_B_PT-15-9133-40-1.PNG", ("SOB", "B", "PT", "15", "9133", 40, 1), "15-9133"),
    ],
)
def test_parse_name_real_style(filename: str, fields: tuple, patient: str) -> None:
    # Execute
    name = parse_name(filename)
    # Assert
    got = (name.procedure, name.tumor_class, name.subtype, name.year, name.slide, name.magnification, name.seq)
    assert got == fields
    assert name.patient == patient


@pytest.mark.parametrize(
    ("filename", "words"),
    [
        ("IMG_0001.png", "cannot parse"),
        ("SOB_B_A-14-22549AB-100-001.jpg", "cannot parse"),
        ("SOB_B_XX-14-22549-100-001.png", "unknown subtype 'XX'"),
        ("SOB_B_DC-14-22549-100-001.png", "disagrees"),
        ("SOB_X_A-14-22549-100-001.png", "neither B"),
        ("SOB_B_A-14-22549-300-001.png", "magnification 300"),
    ],
)
def test_parse_name_rejects_bad_names(filename: str, words: str) -> None:
    # Execute
    with pytest.raises(DatasetLayoutError) as err:
        parse_name(filename)
    # Assert
    assert filename in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_constants_agree_with_synthetic_subtypes() -> None:
    # Assert
    assert SUBTYPE_CODES == ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
    assert [SUBTYPE_DIRS[c] for c in SUBTYPE_CODES] == [m.name for m in SUBTYPES]
    assert [m.malignant for m in SUBTYPES] == [False] * 4 + [True] * 4


# ---- fixture and index ----------------------------------------------------------------------


def test_fixture_and_scan_counts(tree: Path, tmp_path: Path) -> None:
    # Execute
    records = scan(tree, tmp_path)
    # Assert
    assert tree.name == "BreaKHis_v1" and len(records) == 8 * PPS * 4 * IPM
    for mag in ("40X", "100X", "200X", "400X"):
        assert sum(r["mag"] == mag for r in records) == 8 * PPS * IPM
    for label8, code in enumerate(SUBTYPE_CODES):
        mine = [r for r in records if r["subtype"] == code]
        assert len(mine) == PPS * 4 * IPM and {r["label8"] for r in mine} == {label8}
        assert {r["binary"] for r in mine} == {int(label8 >= 4)}
    patients = {r["patient"] for r in records}
    assert len(patients) == PATIENTS and "14-22549AB" in patients
    assert {r["subtype"] for r in records if r["patient"] == "14-13412"} == {"DC", "LC"}
    first = tree / records[0]["path"]
    with Image.open(first) as img:
        assert img.mode == "RGB" and img.size == SIZE and img.format == "PNG"


def test_fixture_is_deterministic(tree: Path, tmp_path: Path) -> None:
    # Prepare
    again = write_fixture(tmp_path, patients_per_subtype=1, images_per_magnification=1, size=SIZE)
    rel = "histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png"
    # Assert
    assert (again / rel).read_bytes() == (tree / rel).read_bytes()


def test_scan_reuses_the_cache(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    calls = []
    walk = breakhis._index_tree
    monkeypatch.setattr(breakhis, "_index_tree", lambda *a: calls.append(1) or walk(*a))
    # Execute
    first, second = scan(tree, tmp_path), scan(tree, tmp_path)
    # Assert
    assert first == second and len(calls) == 1
    assert len(list(tmp_path.glob("breakhis-index-*.json"))) == 1


def test_root_may_be_parent_or_breast_folder(tree: Path, tmp_path: Path) -> None:
    # Execute
    for root in (tree, tree.parent, tree / "histology_slides" / "breast"):
        records = scan(root, tmp_path)
        # Assert
        assert len(records) == 8 * PPS * 4 * IPM and (root / records[0]["path"]).is_file()


def test_non_png_and_hidden_files_are_ignored(own_tree: Path, tmp_path: Path) -> None:
    # Prepare
    mag_dir = next(own_tree.rglob("200X"))
    for junk in (".DS_Store", "._SOB_B_A-14-1-200-001.png", "Thumbs.db", "notes.txt"):
        (mag_dir / junk).write_bytes(b"junk")
    # Execute
    records = scan(own_tree, tmp_path)
    # Assert
    assert len(records) == 8 * PPS * 4 * IPM


# ---- partition and splits -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "quantity-skew"])
def test_partition_is_patient_disjoint_and_json(tree: Path, tmp_path: Path, scheme: str) -> None:
    # Prepare
    cfg = _cfg(tree, tmp_path, data__partition=scheme, data__dirichlet_alpha=0.3)
    # Execute
    audit = partition(cfg)
    # Assert
    assert json.loads(json.dumps(audit)) == audit and audit["dataset"] == "breakhis"
    assert (audit["scheme"], audit["magnifications"]) == (scheme, ["200X"])
    assert list(audit["sites"]) == site_names(cfg) == [f"breakhis-site-{i}" for i in range(3)]
    sites = _site_patients(audit)
    assert all(sites) and sum(map(len, sites)) == len(set().union(*sites)) == PATIENTS
    for splits in audit["sites"].values():
        train, val, test = (set(splits[s]) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test) and train


def test_partition_deterministic_and_seeded(tree: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tree, tmp_path, data__partition="label-skew")
    # Execute
    a, b, c = partition(cfg), partition(cfg), partition(cfg.override({"data.seed": 1}))
    # Assert
    assert a == b and a["sites"] != c["sites"]


def test_label_skew_is_more_skewed_than_iid(big_tree: Path, tmp_path: Path) -> None:
    # Prepare
    classes = patient_classes(scan(big_tree, tmp_path))
    overall = np.mean(list(classes.values()))

    def skew(scheme: str, seed: int) -> float:
        cfg = _cfg(big_tree, tmp_path, data__partition=scheme, data__dirichlet_alpha=0.1,
                   data__seed=seed, federation__num_sites=4)
        sites = _site_patients(partition(cfg))
        return float(np.mean([abs(np.mean([classes[p] for p in s]) - overall) for s in sites]))

    # Execute
    iid, skewed = ([skew(scheme, seed) for seed in range(3)] for scheme in ("iid", "label-skew"))
    # Assert
    assert max(iid) < 0.1 and np.mean(skewed) > 0.3


def test_split_patients_stratified_and_small_groups() -> None:
    # Prepare
    records = [{"patient": f"b{i}", "binary": 0} for i in range(10)]
    records += [{"patient": f"m{i}", "binary": 1} for i in range(20)]
    # Execute
    splits = split_patients(records, seed=0, val_fraction=0.15, test_fraction=0.2)
    other = split_patients(records, seed=1, val_fraction=0.15, test_fraction=0.2)
    tiny = split_patients(records[:2] + records[10:11], seed=0, val_fraction=0.15, test_fraction=0.2)
    one = split_patients(records[:1], seed=0, val_fraction=0.15, test_fraction=0.2)
    # Assert
    assert sorted(sum(splits.values(), [])) == sorted(r["patient"] for r in records)
    for split in ("val", "test"):
        assert {p[0] for p in splits[split]} == {"b", "m"}
    assert (len(splits["test"]), len(splits["val"])) == (6, 5)
    assert splits == split_patients(records[::-1], seed=0, val_fraction=0.15, test_fraction=0.2) and splits != other
    assert sorted(sum(tiny.values(), [])) == ["b0", "b1", "m0"] and tiny["train"] and tiny["test"]
    assert one == {"train": ["b0"], "val": [], "test": []}


def test_duplicate_slide_is_one_unit_with_folder_labels(tree: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tree, tmp_path, model__num_classes=8, data__magnifications="40X,100X,200X,400X")
    audit = partition(cfg)
    site, split = next((s, sp) for s, body in audit["sites"].items() for sp, ps in body.items() if "14-13412" in ps)
    # Execute
    data = load_split(cfg, site_names(cfg).index(site), split)
    labels = {p.split("/")[4]: int(y) for p, y in zip(data.paths, data.labels) if "-13412-" in p}
    # Assert
    assert sum(ps.count("14-13412") for body in audit["sites"].values() for ps in body.values()) == 1
    assert labels == {"ductal_carcinoma": 4, "lobular_carcinoma": 5}


def test_load_split_items_and_labels(tree: Path, tmp_path: Path) -> None:
    # Prepare
    binary, eight = _cfg(tree, tmp_path), _cfg(tree, tmp_path, model__num_classes=8)
    # Execute
    data = load_split(binary, 0, "train")
    image, label = data[0]
    labels8 = np.concatenate([load_split(eight, s, "train").labels for s in range(3)])
    # Assert
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label in (0, 1)
    assert set(data.labels.tolist()) <= {0, 1} and set(labels8.tolist()) <= set(range(8))
    assert len(set(labels8.tolist())) > 2 and all("/200X/" in p for p in data.paths)
    assert data.transform is None and data.strict is False


def test_magnification_filter(tree: Path, tmp_path: Path) -> None:
    # Prepare
    one, two = _cfg(tree, tmp_path), _cfg(tree, tmp_path, data__magnifications="40X,400X")
    # Execute
    single, double = load_split(one, 1, "test"), load_split(two, 1, "test")
    # Assert
    assert {p.split("/")[-2] for p in double.paths} == {"40X", "400X"}
    assert len(double) == 2 * len(single)


def test_max_per_site_and_stain_transform(tree: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tree, tmp_path, data__max_per_site=3, data__magnifications="40X,100X,200X,400X",
               data__stain_augment=0.05, data__dataset="breakhis")
    # Execute
    a, b, test = load_site(cfg, 0, "train"), load_site(cfg, 0, "train"), load_site(cfg, 0, "test")
    # Assert
    assert len(a) == 3 and a.paths == b.paths and set(a.labels.tolist()) == {0, 1}
    assert a.transform is not None and test.transform is None
    assert a[0][0].shape == (32, 32, 3)


# ---- bad input ------------------------------------------------------------------------------


def test_missing_root_and_wrong_layouts(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()
    (tmp_path / "nohs" / "BreaKHis_v1" / "breast" / "benign").mkdir(parents=True)
    (tmp_path / "noimg" / "histology_slides" / "breast" / "benign").mkdir(parents=True)
    cases = {
        "nope": "data root not found", "empty": "no histology_slides/breast",
        "nohs": "no histology_slides/breast", "noimg": "no BreakHis images",
    }
    # Execute / Assert
    for name, words in cases.items():
        with pytest.raises(DatasetLayoutError, match=words):
            scan(tmp_path / name, tmp_path / "cache")
    with pytest.raises(DatasetLayoutError, match="data.root is not set"):
        partition(_cfg("", tmp_path))


def test_unparseable_name_in_tree_is_an_error(own_tree: Path, tmp_path: Path) -> None:
    # Prepare
    bad = next(own_tree.rglob("100X")) / "scan 0001.png"
    shutil.copy(next(own_tree.rglob("*.png")), bad)
    # Execute
    with pytest.raises(DatasetLayoutError) as err:
        scan(own_tree, tmp_path)
    # Assert
    assert "scan 0001.png" in str(err.value) and "cannot parse" in str(err.value)


@pytest.mark.parametrize(("source", "target"), [("ductal_carcinoma", "lobular_carcinoma"), ("/40X/", "/100X/")])
def test_file_in_wrong_folder_is_an_error(own_tree: Path, tmp_path: Path, source: str, target: str) -> None:
    # Prepare
    src = next(p for p in sorted(own_tree.rglob("*.png")) if source in p.as_posix())
    moved = Path(next(p for p in sorted(own_tree.rglob("*.png")) if target in p.as_posix()).parent, src.name)
    src.rename(moved)
    # Execute
    with pytest.raises(DatasetLayoutError) as err:
        scan(own_tree, tmp_path)
    # Assert
    assert src.name in str(err.value) and "not where its name puts it" in str(err.value)


def test_a_file_added_later_inside_a_magnification_folder_is_seen(own_tree: Path, tmp_path: Path) -> None:
    # Prepare: the index is cached, then a benign image is copied (misplaced) into a malignant 100X folder
    before = scan(own_tree, tmp_path)
    benign = next(p for p in sorted(own_tree.rglob("*.png")) if "/benign/" in p.as_posix())
    target = next(p for p in sorted(own_tree.rglob("100X")) if "/malignant/" in p.as_posix())
    shutil.copy(benign, target / benign.name)
    # Execute / Assert: the cache key changed, the tree is walked again and the misplaced file refused
    with pytest.raises(DatasetLayoutError, match="not where its name puts it"):
        scan(own_tree, tmp_path)
    (target / benign.name).unlink()
    assert scan(own_tree, tmp_path) == before


def test_corrupt_png_is_counted_or_raises_when_strict(own_tree: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(own_tree, tmp_path)
    victim = _first_image(own_tree, partition(cfg))
    victim.write_bytes(victim.read_bytes()[:60])
    rel = victim.relative_to(own_tree).as_posix()
    # Execute
    summaries = check(cfg)
    data = load_split(cfg, 0, "train")
    strict = load_split(cfg.override({"data.strict": True}), 0, "train")
    # Assert
    assert len(summaries) == 9 and [s.unreadable for s in summaries if s.unreadable] == [[rel]]
    assert sum(s.images for s in summaries) == 8 * PPS * IPM
    assert data[data.paths.index(rel)][0] is None
    with pytest.raises(BadImageError):
        strict[strict.paths.index(rel)]


def test_gray_rgba_and_16bit_pngs_load_as_rgb(own_tree: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(own_tree, tmp_path, data__magnifications="40X,100X,200X,400X")
    paths = sorted(own_tree.rglob("SOB_B_A-14-22549AB-*-001.png"))[:3]
    gray = np.tile(np.linspace(0, 255, SIZE[0], dtype=np.uint8), (SIZE[1], 1))
    Image.fromarray(gray, "L").save(paths[0])
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 128)]), "RGBA").save(paths[1])
    Image.fromarray(gray.astype(np.uint16) * 257).save(paths[2])
    site, split = next((i, sp) for i, body in enumerate(partition(cfg)["sites"].values())
                       for sp, ps in body.items() if "14-22549AB" in ps)
    data = load_split(cfg, site, split)
    # Execute
    images = [data[data.paths.index(p.relative_to(own_tree).as_posix())][0] for p in paths]
    # Assert
    for image in images:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.max() > 0


def test_empty_site_split_and_too_many_sites(tree: Path, tmp_path: Path) -> None:
    # Prepare
    one_each = _cfg(tree, tmp_path, federation__num_sites=PATIENTS)
    # Execute / Assert
    with pytest.raises(DatasetLayoutError, match=r"site breakhis-site-\d+ has no 'test' images at 200X"):
        load_split(one_each, 0, "test")
    with pytest.raises(ValueError, match="num-sites"):
        partition(_cfg(tree, tmp_path, federation__num_sites=PATIENTS + 1))
    with pytest.raises(ValueError, match="unknown split"):
        load_split(_cfg(tree, tmp_path), 0, "holdout")
