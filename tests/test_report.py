"""Run reports: valid PNGs, an HTML page that parses and references them, attention overlays at input size."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from common.attention import attention_maps, overlay
from common.config import RunConfig
from common.metrics import EvalResult, patient_summary, pooled_report, pooled_scores, score_histograms
from common.model import build_model, build_model_for
from common.rundir import RunDirectory
from simulations.run_report import build_report


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.alts: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.alts.append(str(a.get("alt")))
            assert str(a.get("src")).startswith("data:image/png;base64,")  # self-contained
        if tag == "a" and not str(a.get("href")).startswith("#"):  # contents links stay inside the page
            self.links.append(str(a.get("href")))


def _fake_run(tmp_path: Path, tiny_cfg: RunConfig, *, num_classes: int = 2, sites: int = 2,
              patients: bool = True, name: str = "run", privacy: bool = False) -> Path:
    """A run directory as a federation writes it (rounds, score histograms, model), without running one."""
    cfg = tiny_cfg.override({"output.run-dir": str(tmp_path / name), "model.num-classes": num_classes,
                             "federation.num-sites": sites})
    run = RunDirectory.start(cfg, data_kind="synthetic")
    rng = np.random.default_rng(0)
    names = [f"synthetic-hospital-{i}" for i in range(sites)]
    for rnd in range(3):
        per_site = {}
        for site in reversed(names):  # replies arrive in any order; the report puts sites in order
            y = rng.integers(0, num_classes, 40)
            p = rng.random((40, num_classes)) + 0.7 * rnd * np.eye(num_classes)[y]
            p /= p.sum(1, keepdims=True)
            cm = np.bincount(y * num_classes + p.argmax(1), minlength=num_classes**2).reshape(num_classes, num_classes)
            sums = patient_summary(rng.integers(0, 6, 40).astype(str), p.argmax(1) == y) if patients else (0, 0.0, None)
            per_site[site] = EvalResult(0.5, 40, cm, score_histograms(y, np.log(p)), 1, *sums)
        train = {s: {"loss": 0.4, "seconds": 1.0, "examples": 16, "skipped-images": 0} for s in names} if rnd else {}
        spent = {s: {"epsilon": 0.5 * rnd * (i + 1), "delta": 1e-5} for i, s in enumerate(names)} if privacy and rnd else {}
        run.log_round({"round": rnd, **pooled_report(per_site), "train": train, **({"privacy": spent} if spent else {})})
        if spent:
            run.write_privacy({"mode": cfg.privacy.mode, "budget-epsilon": 8.0, "unit": "one training image",
                               "sites": {s: {**e, "rounds": [{"round": rnd, **e}]} for s, e in spent.items()}})
        run.write_scores(rnd, pooled_scores(per_site))
    run.save_model({k: v.detach().clone() for k, v in build_model_for(cfg.model, cfg.privacy).state_dict().items()})
    run.write_status("completed")
    return run.path


def test_report_files_are_valid_and_referenced(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    run_dir = _fake_run(tmp_path, tiny_cfg)
    page = build_report(run_dir)
    pngs = sorted((run_dir / "report").glob("*.png"))
    assert {p.name for p in pngs} == {"curves.png", "confusion.png", "roc.png", "sites.png", "patients.png",
                                      "attention.png"}
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    parser = _Images()
    parser.feed(page.read_text())
    assert sorted(parser.alts) == sorted(f"report/{p.name}" for p in pngs)
    assert all((run_dir / link).is_file() for link in parser.links)
    assert "SYNTHETIC" in page.read_text()


def test_attention_overlays_have_the_input_size(tiny_cfg: RunConfig) -> None:
    model = build_model(tiny_cfg.model)
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    heat, probs = attention_maps(model, images)
    assert heat.shape == (3, 64, 64) and probs.shape == (3, 2)
    blended = overlay(images[0], heat[0])
    assert blended.shape == images[0].shape and blended.dtype == np.uint8


def test_report_of_an_empty_run_is_an_error(tmp_path: Path) -> None:
    cfg = RunConfig().override({"output.run-dir": str(tmp_path / "run")})
    RunDirectory.start(cfg, data_kind="synthetic")
    try:
        build_report(tmp_path / "run")
    except ValueError as err:
        assert "no rounds" in str(err)
    else:
        raise AssertionError("expected a ValueError")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "running"


def test_checkpoint_round_trip_and_resume_keeps_history(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    import torch

    from common.rundir import RunDirectory as RD

    cfg = tiny_cfg.override({"output.run-dir": str(tmp_path / "run")})
    run = RD.start(cfg, data_kind="synthetic")
    run.log_round({"round": 0, "global": {}, "sites": {}})
    state = build_model(cfg.model).state_dict()
    run.save_checkpoint(2, state)
    resumed = RD.start(cfg.override({"output.resume": True}), data_kind="synthetic")
    done, loaded = resumed.load_checkpoint()
    assert done == 2 and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # history kept


def test_strategy_state_keeps_zero_dimensional_arrays(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    import numpy as np

    from common.rundir import RunDirectory as RD

    run = RD.start(tiny_cfg.override({"output.run-dir": str(tmp_path / "run")}), data_kind="synthetic")
    moments = {"m_t/bn.num_batches_tracked": np.array(3.0), "v_t/w": np.arange(6.0).reshape(2, 3)[:, ::2]}
    run.save_strategy_state(moments)
    loaded = run.load_strategy_state()
    assert {k: v.shape for k, v in loaded.items()} == {"m_t/bn.num_batches_tracked": (), "v_t/w": (2, 2)}
    assert all(np.array_equal(loaded[k], v) for k, v in moments.items())
