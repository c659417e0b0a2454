"""flower-sim export-data: the synthetic hospitals as an ImageFolder tree with labels.csv; bad targets refused."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from common.config import RunConfig
from common.datasets import synthetic
from common.datasets.fixtures import SYNTHETIC_MARKER
from simulations.export_data import export

TINY = {"federation.num-sites": 2, "model.image-size": 32, "data.patients-per-site": 6,
        "data.train-per-site": 10, "data.test-per-site": 6}


def test_export_round_trips_counts_labels_and_patients(tmp_path) -> None:
    cfg = RunConfig().override({**TINY, "data.cache-dir": str(tmp_path / "cache")})
    out = tmp_path / "export"
    counts = export(cfg, out)
    rows = list(csv.DictReader((out / "labels.csv").open()))
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert counts == {"train": 20, "val": 12, "test": 12} and len(pngs) == len(rows) == 44
    assert sorted(r["path"] for r in rows) == pngs
    assert (out / SYNTHETIC_MARKER).is_file() and "SYNTHETIC" in (out / "README.txt").read_text()
    audit = synthetic.partition(cfg)
    for row in rows:
        site, split, label, name = row["path"].split("/")
        assert (site, split, label) == (row["site"], row["split"], row["label"]) and name.startswith(row["patient"] + "-")
        assert row["patient"] in audit["sites"][site][split]
        assert row["class"] == ("malignant" if row["subtype"].endswith("carcinoma") else "benign") == row["label"]
    first = next(r for r in rows if r["site"] == "synthetic-hospital-1" and r["split"] == "test")
    data = synthetic.load_split(cfg, 1, "test")
    assert np.array_equal(np.asarray(Image.open(out / first["path"])), data.images[0])  # lossless, same order


def _cli(*args: str):
    from typer.testing import CliRunner

    from simulations.cli import app

    return CliRunner().invoke(app, ["export-data", *args])  # in process: the same typer command, no start-up


def test_non_empty_folder_and_bad_keys_are_refused(tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = _cli("synthetic-tiny", "--out", str(taken))
    assert result.exit_code == 2 and str(taken) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    fresh = tmp_path / "fresh"
    result = _cli("synthetic-tiny", "--out", str(fresh), "--set", "data.label-noise=0.5")
    assert result.exit_code == 2 and "data.label-noise" in result.stderr and not fresh.exists()
    assert not list(tmp_path.glob(".fresh*"))  # no staging folder left behind
