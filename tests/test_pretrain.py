"""Public pretraining: it reads only the public tissue corpus (no site, no malignancy label); its file loads by key; bad files fail early."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from common.config import RunConfig
from common.datasets import public_corpus, registry, synthetic
from common.datasets.public_corpus import TISSUE_TYPES, load_public_corpus
from common.model import build_model
from common.pretrain import pretrain
from common.weights import save_state_dict

SMALL = {"pretrain.corpus-size": 40, "pretrain.epochs": 1, "pretrain.batch-size": 8}


@pytest.fixture
def pre_cfg(tiny_cfg: RunConfig, tmp_path) -> RunConfig:
    return tiny_cfg.override({"data.cache-dir": str(tmp_path / "cache"), **SMALL})


def _site_people(cfg: RunConfig) -> set[str]:
    """Every patient or lab id the sites' partition record names (any key mentioning patients or labs)."""
    found: set[str] = set()

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and any(word in key for word in ("patient", "lab")):
            found.add(node)

    walk(json.loads(json.dumps(registry.get_dataset(cfg.data.dataset).partition(cfg), default=str)))
    return found


def test_pretraining_reads_only_the_public_corpus_never_a_site_or_the_malignancy_label(pre_cfg, tmp_path,
                                                                                       monkeypatch) -> None:
    # Prepare: any read of a site's data fails; the corpus pretraining reads is recorded
    def no_site(*args, **kwargs):
        raise AssertionError("pretraining read a site's data")

    for module, name in ((registry, "load_site"), (synthetic, "load_split"), (synthetic, "generate")):
        monkeypatch.setattr(module, name, no_site)
    seen = []
    monkeypatch.setattr("common.pretrain.load_public_corpus",
                        lambda cfg, n, seed: seen.append(load_public_corpus(cfg, n, seed)) or seen[-1])
    out = tmp_path / "public.safetensors"
    # Execute
    result = pretrain(pre_cfg, out, log=lambda line: None)
    # Assert: the corpus is tissue types of public people only
    corpus = seen[0]
    assert len(corpus) == 40 and corpus.names == TISSUE_TYPES == result.tissues
    assert set(np.unique(corpus.labels)) <= set(range(len(TISSUE_TYPES)))
    forbidden = {"benign", "malignant", *(s.name for s in synthetic.SUBTYPES)}
    assert not forbidden & set(corpus.names)
    assert all(p.startswith("public-p") for p in corpus.patients) and all(lab.startswith("public-lab-") for lab in corpus.labs)
    monkeypatch.undo()
    assert not (set(corpus.patients) | set(corpus.labs)) & _site_people(pre_cfg)
    # ... and the file holds every hybrid weight but the classifier
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    model = build_model(pre_cfg.model)
    assert keys == {k for k in model.state_dict() if not k.startswith("classifier.")}
    assert meta["task"] == "tissue-type+morphometry" and meta["data"] == "synthetic"
    assert meta["measures"].split(",") == list(corpus.measures) and not forbidden & set(corpus.measures)
    assert corpus.morphometry.shape == (40, len(corpus.measures)) and np.isfinite(corpus.morphometry).all()
    assert result.holdout_r2 <= 1.0 and np.isfinite(result.holdout_r2)


def test_the_public_corpus_is_deterministic_and_its_people_come_from_their_own_seed_space(pre_cfg) -> None:
    a = load_public_corpus(pre_cfg, 30, 1)
    b = public_corpus._render_corpus(n=30, image_size=pre_cfg.model.image_size, seed=1)
    other = public_corpus._render_corpus(n=30, image_size=pre_cfg.model.image_size, seed=2)
    assert np.array_equal(a.images, b["images"]) and not np.array_equal(a.images, other["images"])
    assert a.images.dtype == np.uint8 and a.images.shape == (30, 32, 32, 3)
    site = synthetic.generate.__wrapped__(site=0, num_sites=2, split="train", n=4, image_size=32, num_classes=2, seed=1,
                                          patients=8)
    assert not any(np.array_equal(site.images[0], img) for img in a.images)


def test_a_pretrained_hybrid_file_loads_into_the_model_with_a_fresh_classifier(pre_cfg, tmp_path) -> None:
    out = tmp_path / "public.safetensors"
    pretrain(pre_cfg, out, log=lambda line: None)
    cfg = pre_cfg.override({"model.pretrained-path": str(out), "model.trainable": "head"})
    with safe_open(str(out), "pt") as f:
        stem = f.get_tensor("backbone.conv_stem.weight")
        gru = f.get_tensor("gru.weight_hh_l0")
    model = build_model(cfg.model)
    assert torch.equal(model.backbone.conv_stem.weight, stem) and torch.equal(model.gru.weight_hh_l0, gru)


def _sim(*args: str):
    from simulations.cli import app

    return CliRunner().invoke(app, ["run", "synthetic-tiny", *args])


def _one_line_exit_2(result, *fragments: str) -> None:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.stdout + result.stderr
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_pretrained_file_that_does_not_fit_is_refused_before_flower_starts(tmp_path) -> None:
    # Prepare: the tiny test backbone's weights for EfficientNetV2-B0, and a hybrid file with one stray key
    cfg = RunConfig().override({"model.backbone": "test_efficientnet"})
    other = tmp_path / "other.safetensors"
    save_state_dict(build_model(cfg.model).backbone.state_dict(), other)
    stray = tmp_path / "stray.safetensors"
    state = {k: v for k, v in build_model(cfg.model).state_dict().items() if not k.startswith("classifier.")}
    save_state_dict({**state, "gru.extra_weight": torch.zeros(1)}, stray)
    # Execute / Assert
    wrong = _sim("--set", f"model.pretrained-path={other}", "--set", "model.backbone=tf_efficientnetv2_b0",
                 "--run-dir", str(tmp_path / "a"))
    _one_line_exit_2(wrong, str(other), "does not fit backbone", "missing keys (first: 'blocks.")
    odd = _sim("--set", f"model.pretrained-path={stray}", "--set", "model.token-dim=64", "--set", "model.hidden-size=128",
               "--run-dir", str(tmp_path / "b"))
    _one_line_exit_2(odd, str(stray), "unexpected", "gru.extra_weight")
    assert not (tmp_path / "a" / "flower.log").exists() and not (tmp_path / "b" / "flower.log").exists()


def test_an_unknown_trainable_part_is_refused_naming_the_key(tmp_path) -> None:
    result = _sim("--set", "model.trainable=backbone-only", "--run-dir", str(tmp_path / "run"))
    _one_line_exit_2(result, "'model.trainable'", "backbone-only", "head+norm")


def test_flower_server_pretrain_refuses_to_overwrite_and_bad_keys(tmp_path) -> None:
    from server.cli import app

    existing = tmp_path / "w.safetensors"
    existing.write_bytes(b"x")
    taken = CliRunner().invoke(app, ["pretrain", "--out", str(existing)])
    bad = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "n.safetensors"), "--set", "pretrain.epochs=0"])
    _one_line_exit_2(taken, str(existing), "--force")
    _one_line_exit_2(bad, "'pretrain.epochs'")
    assert existing.read_bytes() == b"x" and not Path(tmp_path / "n.safetensors").exists()
