"""Local DP-SGD: ε equals an independent Opacus accountant, the ledger survives engines, budget stop, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader

from common.config import RunConfig

from common.errors import ConfigError
from common.datasets.registry import get_dataset
from common.datasets.splits import ArraySplit
from common.finetune import collate_counted
from common.model import build_model_for
from common.training import to_input
from common.privacy import trainer as trainer_module
from common.privacy.accounting import epsilon, plan_local
from common.privacy.dp_model import make_dp_compatible
from common.privacy.ledger import LedgerError
from common.privacy.preflight import preflight
from common.privacy.trainer import train_private

CPU = torch.device("cpu")


@pytest.fixture
def dp_cfg(tiny_cfg: RunConfig) -> RunConfig:
    # batch 2 of 16 images: q = 1/8 (Opacus's RDP series converge slowly for large q; real sites have q << 0.1)
    return tiny_cfg.override({"privacy.mode": "local", "federation.rounds": 3, "train.batch-size": 2})


def _train_rounds(cfg: RunConfig, ledger: Path, rounds: int, site: str = "s0"):
    """Each round as deployment runs it: a freshly built model and engine, the history only from the ledger."""
    data = get_dataset(cfg.data.dataset).load_split(cfg, 0, "train")
    out = []
    for r in range(1, rounds + 1):
        model = build_model_for(cfg.model, cfg.privacy)
        out.append(train_private(model=model, data=data, cfg=cfg, device=CPU, seed=r, site=site, ledger_file=ledger,
                                 server_round=r))
    return out


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_after_rounds_equals_an_independent_opacus_accountant(dp_cfg, tmp_path, accountant) -> None:
    # Prepare
    cfg = dp_cfg.override({"privacy.accountant": accountant})
    # Execute
    results = _train_rounds(cfg, tmp_path / "s0.json", 3)
    # Assert: an accountant stepped one step at a time over the same σ, q and steps
    plan = results[-1].plan
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(3 * plan.steps_per_round):
        independent.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert [r.steps for r in results] == [plan.steps_per_round] * 3 and results[-1].total_steps == 3 * plan.steps_per_round
    assert results[-1].epsilon == pytest.approx(independent.get_epsilon(delta=plan.delta), rel=1e-9)
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon <= cfg.privacy.target_epsilon
    saved = json.loads((tmp_path / "s0.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2, 3] and all(r["status"] == "done" for r in saved["rounds"])


def test_recreated_engines_with_restored_history_match_one_long_lived_engine(dp_cfg, tmp_path) -> None:
    # Prepare: one long-lived PrivacyEngine over three rounds (what a process that never dies would do)
    cfg = dp_cfg
    data = get_dataset(cfg.data.dataset).load_split(cfg, 0, "train")
    plan = plan_local(cfg, len(data))
    engine = PrivacyEngine(accountant="rdp")
    model = build_model_for(cfg.model, cfg.privacy)
    for _ in range(3):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(data, batch_size=cfg.train.batch_size, collate_fn=collate_counted)
        hooks, dp_opt, dp_loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                       noise_multiplier=plan.noise_multiplier, max_grad_norm=1.0,
                                                       wrap_model=False)
        trainer_module._empty_batch_template(dp_loader)
        for images, labels, _ in dp_loader:
            dp_opt.zero_grad()
            if labels.numel() == 0:
                trainer_module._noise_only_step(dp_opt)
                continue
            torch.nn.functional.cross_entropy(model(to_input(images, CPU)), labels).backward()
            dp_opt.step()
        hooks.cleanup()
    # Execute: a new engine every round, history restored from the ledger on disk
    results = _train_rounds(cfg, tmp_path / "s0.json", 3)
    # Assert
    long_lived = engine.get_epsilon(delta=plan.delta)
    assert results[-1].epsilon == pytest.approx(long_lived, rel=1e-12)
    forgetful = epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], delta=plan.delta,
                        accountant="rdp")
    assert forgetful < 0.75 * long_lived  # Flower's example without a ledger reports this one-round value


def test_the_site_declines_when_the_next_round_would_exceed_its_budget(dp_cfg, tmp_path) -> None:
    # Prepare: σ calibrated for 2 rounds, then a third round is asked for (e.g. a longer run on the same ledger)
    cfg = dp_cfg.override({"federation.rounds": 2})
    ledger = tmp_path / "s0.json"
    # Execute
    results = _train_rounds(cfg, ledger, 3, site="hospital-a")
    # Assert
    assert [bool(r.declined) for r in results] == [False, False, True]
    third = results[2]
    assert third.train is None and third.steps == 0 and third.epsilon == pytest.approx(results[1].epsilon)
    assert "hospital-a declines round 3: privacy budget exhausted" in third.declined
    assert f"{results[1].epsilon:.3f}" in third.declined and "> budget 8" in third.declined
    assert len(json.loads(ledger.read_text())["rounds"]) == 2  # declining spends nothing


def test_the_ledger_counts_steps_before_training_so_a_crash_cannot_under_report(dp_cfg, tmp_path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(trainer_module, "dp_sgd", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _train_rounds(dp_cfg, tmp_path / "s0.json", 1)
    saved = json.loads((tmp_path / "s0.json").read_text())
    plan = plan_local(dp_cfg, dp_cfg.data.train_per_site)
    assert saved["history"] == [[plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]]
    assert saved["rounds"][0]["status"] == "training"


def test_a_damaged_ledger_is_refused_not_reset(dp_cfg, tmp_path) -> None:
    (tmp_path / "s0.json").write_text('{"history": [[1.0, 7.0, 3]]}')
    with pytest.raises(LedgerError, match="unreadable.*refuses to train"):
        _train_rounds(dp_cfg, tmp_path / "s0.json", 1)


def test_empty_poisson_batches_still_take_a_noisy_step(dp_cfg, tmp_path) -> None:
    # 3 images, batch 1: q = 1/3, so about 30 % of the Poisson batches are empty
    cfg = dp_cfg.override({"train.batch-size": 1, "train.local-epochs": 4, "privacy.noise-multiplier": 5.0})
    data = get_dataset("synthetic").load_split(cfg, 0, "train")
    small = ArraySplit(data.images[:3], data.labels[:3])
    model = build_model_for(cfg.model, cfg.privacy)
    result = train_private(model=model, data=small, cfg=cfg, device=CPU, seed=0, site="s", ledger_file=tmp_path / "s.json")
    assert result.steps == 4 * 3 and result.train is not None


def test_noise_is_not_reproducible_from_the_public_seed(dp_cfg, tmp_path) -> None:
    data = get_dataset("synthetic").load_split(dp_cfg, 0, "train")
    states = []
    for k in range(2):
        torch.manual_seed(0)
        model = build_model_for(dp_cfg.model, dp_cfg.privacy)
        train_private(model=model, data=data, cfg=dp_cfg, device=CPU, seed=0, site="s", ledger_file=tmp_path / f"{k}.json")
        states.append(model.state_dict())
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---- bad input: a one-line error naming the key, before any training ----

@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("privacy.noise-multiplier", "0", "σ must be > 0"),
        ("privacy.noise-multiplier", "-0.5", "σ must be > 0"),
        ("privacy.max-grad-norm", "0", "greater than 0"),
        ("privacy.max-grad-norm", "-1", "greater than 0"),
        ("privacy.clipping-norm", "0", "greater than 0"),
        ("privacy.target-epsilon", "0", "greater than 0"),
        ("privacy.delta", "1.0", "less than 1"),
        ("privacy.mode", "dp-sgd", "'off', 'local'"),
        ("privacy.accountant", "gdp", "'rdp' or 'prv'"),
    ],
)
def test_invalid_privacy_values_are_named(key: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().override({"privacy.mode": "local", key: value})
    assert f"'{key}'" in str(err.value) and fragment in str(err.value) and "\n" not in str(err.value)


def test_delta_at_or_above_one_over_n_is_refused(dp_cfg) -> None:
    n = dp_cfg.data.train_per_site
    cfg = dp_cfg.override({"privacy.delta": 1.0 / n})
    with pytest.raises(ConfigError, match=rf"'privacy.delta': δ must be below 1/N = 1/{n}"):
        preflight(cfg, num_examples=n)
    with pytest.raises(ConfigError, match="'privacy.delta'"):  # the site checks it too, before its first step
        _train_rounds(cfg, Path("/nonexistent/never-written.json"), 1)
    assert plan_local(dp_cfg, n).delta == pytest.approx(min(1e-5, 0.1 / n))  # the default is far below 1/N


def test_an_unreachable_epsilon_target_is_refused(dp_cfg) -> None:
    cfg = dp_cfg.override({"privacy.target-epsilon": 0.05, "federation.rounds": 200})
    with pytest.raises(ConfigError, match="'privacy.target-epsilon': ε = 0.05 .* is unreachable .*even σ = 50"):
        preflight(cfg, num_examples=cfg.data.train_per_site)


def test_a_fixed_sigma_that_overspends_in_one_round_is_refused(dp_cfg) -> None:
    cfg = dp_cfg.override({"privacy.noise-multiplier": 0.3, "privacy.target-epsilon": 1.0})
    with pytest.raises(ConfigError, match="'privacy.noise-multiplier': σ = 0.3 spends ε"):
        preflight(cfg, num_examples=cfg.data.train_per_site)


@pytest.mark.parametrize("architecture", ["densenet121", "alexnet"])
def test_dp_with_a_baseline_architecture_is_refused_before_training(dp_cfg, architecture) -> None:
    cfg = dp_cfg.override({"model.architecture": architecture, "model.image-size": 64})
    with pytest.raises(ConfigError, match=rf"'model.architecture'.*supports the hybrid only.*'{architecture}'"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="supports the hybrid only"):
        build_model_for(cfg.model, cfg.privacy)


def test_a_backbone_with_norm_layers_that_cannot_be_converted_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm3d(4))
    with pytest.raises(ConfigError, match="differential privacy cannot use this backbone 'x'.*privacy.mode=off"):
        make_dp_compatible(model, what="backbone 'x'")


def test_the_dp_model_has_no_batchnorm_no_buffers_and_the_same_keys_every_time(tiny_cfg) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "local"})
    a, b = build_model_for(cfg.model, cfg.privacy), build_model_for(cfg.model, cfg.privacy)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not list(a.buffers()) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
    assert type(a.gru).__name__ == "DPGRU"
    assert not any(getattr(m, "inplace", False) for m in a.modules())
    plain = build_model_for(cfg.model, cfg.privacy.model_copy(update={"mode": "off"}))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())  # the non-DP path keeps BatchNorm


def test_dp_sgd_feeds_nchw_even_when_training_is_channels_last(dp_cfg, tmp_path) -> None:
    # Opacus 1.6's stock Conv2d sampler is wrong on channels_last activations: DP-SGD must never give it any
    cfg = dp_cfg.override({"train.channels-last": True, "privacy.fast-depthwise": False})
    model = build_model_for(cfg.model, cfg.privacy).to(memory_format=torch.channels_last)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    data = get_dataset("synthetic").load_split(cfg, 0, "train")
    train_private(model=model, data=data, cfg=cfg, device=CPU, seed=0, site="s", ledger_file=tmp_path / "s.json")
    assert seen and all(seen)
