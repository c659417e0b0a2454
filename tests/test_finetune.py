"""Fine-tuning recipes: the prefix/tail split, folded BatchNorm, frozen parts under DP-SGD, per-sample gradients, ledger, cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.layers import DPGRU
from timm.layers.norm_act import BatchNormAct2d
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import feature_cache
from common.config import RunConfig
from common.datasets.registry import get_dataset
from common.errors import ConfigError
from common.finetune import average_view_gradients, evaluate_site, train_finetune
from common.model import build_model, build_model_for
from common.privacy.grad_sampler import FastGRU, gru_grad_sample
from common.privacy.trainer import train_private
from common.trainable import FrozenNormAct, apply_trainable, check_private_trainable, make_split, update_keys

CPU = torch.device("cpu")
PARTS = ["classifier", "head", "head+norm", "last-stage"]


@pytest.fixture
def ft_cfg(tiny_cfg: RunConfig, tmp_path) -> RunConfig:
    return tiny_cfg.override({"data.cache-dir": str(tmp_path / "cache"), "model.dropout": 0.0, "train.batch-size": 4,
                              "federation.rounds": 2})


def _private(cfg: RunConfig, part: str, **extra) -> RunConfig:
    return cfg.override({"model.trainable": part, "privacy.mode": "local", "privacy.noise-multiplier": 1.0,
                         "privacy.target-epsilon": 50.0, **extra})


@pytest.mark.parametrize("part", ["all", *PARTS])
def test_the_frozen_prefix_then_the_tail_is_the_whole_forward(ft_cfg, part) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(ft_cfg.model.model_copy(update={"trainable": part})).eval()
    x = torch.randn(3, 3, 32, 32)
    split = make_split(model, part, 32)
    # Execute
    with torch.no_grad():
        whole, parts = model(x), split.tail(split.prefix(x))
    # Assert
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert split.cacheable == (part in ("classifier", "head", "last-stage"))


def test_a_folded_batchnorm_computes_the_eval_mode_batchnorm(ft_cfg) -> None:
    # Prepare: statistics that are not the initial ones
    torch.manual_seed(0)
    model = build_model(ft_cfg.model).train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    reference = model.eval()(x := torch.randn(4, 3, 32, 32))
    # Execute
    folded = apply_trainable(copy.deepcopy(model), "head+norm").eval()
    # Assert
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), reference, rtol=1e-4, atol=1e-5)


def test_under_dp_only_trainable_layers_are_converted(ft_cfg) -> None:
    classifier = build_model_for(_private(ft_cfg, "classifier").model, _private(ft_cfg, "classifier").privacy)
    head = build_model_for(_private(ft_cfg, "head").model, _private(ft_cfg, "head").privacy)
    last = build_model_for(_private(ft_cfg, "last-stage").model, _private(ft_cfg, "last-stage").privacy)
    assert type(classifier.gru) is nn.GRU  # a frozen GRU needs no per-sample gradients
    assert type(head.gru) is FastGRU and not isinstance(head.gru, DPGRU)  # nn.GRU's keys, fast per-sample gradients
    assert any(isinstance(m, BatchNormAct2d) for m in head.backbone.modules())  # frozen BatchNorm stays, eval mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in last.backbone.blocks[-1].modules())
    assert any(isinstance(m, FrozenNormAct) for m in last.backbone.blocks[-1].modules())
    assert any(isinstance(m, BatchNormAct2d) for m in last.backbone.blocks[0].modules())
    head.train()
    assert not head.backbone.training and head.gru.training  # frozen parts stay in eval mode


@pytest.mark.parametrize("part", PARTS)
def test_frozen_parameters_are_bit_identical_after_dp_finetuning(ft_cfg, tmp_path, part) -> None:
    # Prepare
    cfg = _private(ft_cfg, part, **{"train.augment-multiplicity": 2, "train.ema-decay": 0.5})
    torch.manual_seed(0)
    model = build_model_for(cfg.model, cfg.privacy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = get_dataset("synthetic").load_split(cfg, 0, "train")
    # Execute
    result = train_private(model, data, cfg, CPU, seed=0, site="s0", ledger_file=tmp_path / "s0.json")
    # Assert
    trained = set(update_keys(model, part))
    after = model.state_dict()
    assert result.train is not None and trained and len(trained) < len(after)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in trained)  # weights and statistics
    assert any(not torch.equal(after[k], before[k]) for k in trained)


@pytest.mark.parametrize("part", ["head", "last-stage", "head+norm"])
def test_per_sample_gradients_of_the_trainable_part_match_batch_of_one(ft_cfg, part) -> None:
    # Prepare: B images × K views as rows, the DP model and an unhooked copy for exact gradients
    cfg = _private(ft_cfg, part)
    torch.manual_seed(0)
    model = build_model_for(cfg.model, cfg.privacy).train()
    exact_model = copy.deepcopy(model)
    split, exact_split = make_split(model, part, 32), make_split(exact_model, part, 32)
    b, k = 3, 2
    with torch.no_grad():
        rows = torch.randn(b * k, 3, 32, 32)
        rows = split.prefix(rows) if split.cacheable else rows
    y = torch.tensor([0, 1, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(torch.zeros(b, 1)), batch_size=b)
    hooks, _, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1), data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, wrap_model=False)
    # Execute: Opacus's per-row gradients averaged over each image's views
    F.cross_entropy(split.tail(rows), y.repeat_interleave(k)).backward()
    average_view_gradients(params, k)
    samples = [p.grad_sample.detach().clone() for p in params]
    hooks.cleanup()
    # Assert: equal to the gradient of each image's own loss (mean over its K views), one image at a time
    exact_params = [p for p in exact_model.parameters() if p.requires_grad]
    for i in range(b):
        loss = F.cross_entropy(exact_split.tail(rows[i * k:(i + 1) * k]), y[i:i + 1].repeat(k))
        grads = torch.autograd.grad(loss, exact_params)
        for sample, g in zip(samples, grads):
            torch.testing.assert_close(sample[i], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fast_gru_per_sample_gradients_are_exact(bidirectional) -> None:
    # Prepare
    torch.manual_seed(0)
    gru = FastGRU(6, 4, batch_first=True, bidirectional=bidirectional)
    x, out_grad = torch.randn(3, 5, 6), torch.randn(3, 5, 8 if bidirectional else 4)
    # Execute
    samples = gru_grad_sample(gru, [x], out_grad)
    # Assert
    for i in range(3):
        grads = torch.autograd.grad((gru(x[i:i + 1])[0] * out_grad[i:i + 1]).sum(), list(gru.parameters()))
        for p, g in zip(gru.parameters(), grads):
            torch.testing.assert_close(samples[p][i], g, rtol=1e-4, atol=1e-6)


def test_the_ledger_of_a_finetune_equals_an_independent_opacus_accountant(ft_cfg, tmp_path) -> None:
    # Prepare: augmentation multiplicity, weight averaging and physical batches of 2 (BatchMemoryManager)
    cfg = _private(ft_cfg, "head", **{"train.augment-multiplicity": 3, "train.ema-decay": 0.9,
                                      "privacy.physical-batch-size": 2, "privacy.noise-multiplier": "auto",
                                      "privacy.target-epsilon": 8.0})
    data = get_dataset("synthetic").load_split(cfg, 0, "train")
    # Execute: two rounds, a fresh model and engine each, as deployment runs them
    results = []
    for r in (1, 2):
        model = build_model_for(cfg.model, cfg.privacy)
        results.append(train_private(model, data, cfg, CPU, seed=r, site="s0", ledger_file=tmp_path / "s0.json",
                                     server_round=r))
    # Assert: logical steps only (physical batches are not steps), ε as an accountant stepped one step at a time
    plan = results[-1].plan
    independent = RDPAccountant()
    for _ in range(2 * plan.steps_per_round):
        independent.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert [r.steps for r in results] == [plan.steps_per_round] * 2
    assert results[-1].epsilon == pytest.approx(independent.get_epsilon(delta=plan.delta), rel=1e-9)
    assert results[-1].epsilon <= 8.0


def test_frozen_features_are_cached_per_site_and_recomputed_when_the_frozen_weights_change(ft_cfg, monkeypatch) -> None:
    # Prepare
    cfg = ft_cfg.override({"model.trainable": "head"})
    data = get_dataset("synthetic").load_split(cfg, 0, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    calls = []
    real = feature_cache.compute_features
    monkeypatch.setattr(feature_cache, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    # Execute
    train_finetune(model, data, cfg, CPU, seed=0, site="s0")
    train_finetune(model, data, cfg, CPU, seed=1, site="s0")
    first = len(calls)
    with torch.no_grad():
        model.backbone.conv_stem.weight.add_(0.01)  # new frozen weights (e.g. another pretrained file)
    train_finetune(model, data, cfg, CPU, seed=2, site="s0")
    # Assert
    assert first == 1 and len(calls) == 2
    split = make_split(model, "head", 32)
    cached = feature_cache.cached_features(model, split, data, views=8, device=CPU, cache_dir=ft_cfg_cache(cfg),
                                           name="s0-train", trainable=update_keys(model, "head"))
    x = torch.as_tensor(data.images[:2]).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model.train()
    with torch.no_grad():
        for view in (0, 5):
            expected = split.prefix(feature_cache.dihedral(x, view))
            torch.testing.assert_close(cached.features[view, :2].float(), expected, rtol=2e-3, atol=2e-3)
    assert len(calls) == 2  # the last call was served from the file


def ft_cfg_cache(cfg: RunConfig):
    from common.datasets.index_cache import default_cache_dir

    return default_cache_dir(cfg.data.cache_dir)


def test_cached_evaluation_equals_pixel_evaluation(ft_cfg) -> None:
    cfg = ft_cfg.override({"model.trainable": "classifier"})
    data = get_dataset("synthetic").load_split(cfg, 0, "test")
    model = build_model(cfg.model)
    cached = evaluate_site(model, data, cfg, CPU, site="s0")
    pixels = evaluate_site(model, data, cfg.override({"train.feature-cache": "off"}), CPU, site="s0")
    assert (cached.confusion == pixels.confusion).all() and cached.loss == pytest.approx(pixels.loss, rel=1e-3)


def test_a_trainable_layer_that_keeps_statistics_is_refused_under_dp(ft_cfg) -> None:
    model = build_model(ft_cfg.model.model_copy(update={"trainable": "head"}))
    model.backbone.bn1.weight.requires_grad_(True)  # a frozen BatchNorm whose weights would need per-sample gradients
    with pytest.raises(ConfigError, match=r"model\.trainable=head, 'backbone\.bn1' keeps running statistics"):
        check_private_trainable(model, "head")
