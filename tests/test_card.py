"""The model card inside model.safetensors: round trip, rebuilt from the card alone, mismatches caught, server wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.card import CARD_KEY, ModelFileError, card_for_run, load_model, read_card, write_model
from common.config import RunConfig
from common.card import metadata
from common.model import build_model_for
from common.rundir import RunDirectory

CHECKPOINT_MODEL, MODEL_FILE = RunDirectory.CHECKPOINT_MODEL, RunDirectory.MODEL

HISTORY = [
    {"round": 0, "global": {"accuracy": 0.4}, "sites": {"a": {"support": 8.0}, "b": {"support": 6.0}}, "train": {}},
    {"round": 2, "global": {"accuracy": 0.75, "auc": float("nan")}, "sites": {"a": {"support": 8.0}},
     "train": {"a": {"examples": 16}, "b": {"examples": 12}}},
]


@pytest.mark.parametrize("mode", ["off", "local"])
def test_card_round_trip_rebuilds_the_same_model(tmp_path: Path, tiny_cfg: RunConfig, mode: str) -> None:
    # Prepare: a trained-looking model (perturbed weights) of each privacy variant and its card
    cfg = tiny_cfg.override({"privacy.mode": mode, "model.num-classes": 8})
    torch.manual_seed(3)
    model = build_model_for(cfg.model, cfg.privacy).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    report = {"sites": {"a": {"epsilon": 1.5, "delta": 1e-5}}} if mode == "local" else None
    card = card_for_run(cfg, data_kind="synthetic", history=HISTORY, privacy_report=report)
    path = write_model(tmp_path / "model.safetensors", model.state_dict(), card)

    # Execute: read the card, rebuild from it alone
    read = read_card(tmp_path)  # a run directory resolves to its model.safetensors
    rebuilt, _ = load_model(path)

    # Assert: the card says what the run was; the rebuilt model computes the same outputs
    assert read.model == cfg.model and read.privacy.mode == mode and read.data_kind == "synthetic"
    assert len(read.class_names) == 8 and read.class_names[4] == "ductal_carcinoma"
    assert read.sites["a"].train_images == 16 and read.sites["b"].test_images == 6
    assert read.rounds == 2 and read.metrics == {"accuracy": 0.75, "auc": None} and read.strategy == "fedavg"
    assert (read.sites["a"].epsilon == 1.5 and read.privacy.delta == 1e-5) if mode == "local" else read.sites["a"].epsilon is None
    assert "SYNTHETIC" in read.summary()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert type(rebuilt.gru).__name__ == ("DPGRU" if mode == "local" else "GRU")


def test_a_file_without_a_card_or_not_safetensors_is_not_a_histofed_model(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    for path, words in ((plain, "no model card"), (junk, "not a safetensors"), (tmp_path / "none.safetensors", "not found")):
        with pytest.raises(ModelFileError) as err:
            read_card(path)
        assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_a_card_that_does_not_match_its_tensors_names_the_tensor(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    # Prepare: the card of an 8-class model over the weights of a 2-class one
    small = build_model_for(tiny_cfg.model, tiny_cfg.privacy)
    big_cfg = tiny_cfg.override({"model.num-classes": 8})
    big = build_model_for(big_cfg.model, big_cfg.privacy)
    write_model(tmp_path / "big.safetensors", big.state_dict(), card_for_run(big_cfg, data_kind="real"))
    with safe_open(str(tmp_path / "big.safetensors"), framework="pt") as fh:
        card_json = fh.metadata()[CARD_KEY]
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(wrong), metadata={CARD_KEY: card_json})
    dropped = tmp_path / "dropped.safetensors"
    state = dict(big.state_dict())
    state.pop("classifier.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dropped), metadata={CARD_KEY: card_json})

    # Execute / Assert: one line naming the file and the first tensor that differs
    with pytest.raises(ModelFileError, match=r"wrong\.safetensors: model card does not match .*classifier\.weight"):
        load_model(wrong)
    with pytest.raises(ModelFileError, match=r"dropped\.safetensors: .*missing from the file \(first 'classifier\.bias'\)"):
        read_card(dropped)


def test_run_directory_writes_the_card_into_final_model_and_checkpoints(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    # Prepare: a run directory and the cards the server writes (server.federation.FederationRun.card)
    cfg = tiny_cfg.override({"output.run-dir": str(tmp_path)})
    run = RunDirectory.start(cfg, data_kind="synthetic")
    history: list[dict] = []
    card = lambda done: card_for_run(cfg, data_kind=run.data_kind, history=history, rounds=done)  # noqa: E731
    state = build_model_for(cfg.model, cfg.privacy).state_dict()

    # Execute: a checkpoint after round 1 (before its metrics exist), then the final model
    run.save_checkpoint(1, state, metadata(card(1), state))
    history.append(HISTORY[1])
    run.save_model(state, metadata(card(None), state))

    # Assert
    checkpoint, final = read_card(tmp_path / CHECKPOINT_MODEL), read_card(tmp_path / MODEL_FILE)
    assert checkpoint.rounds == 1 and checkpoint.metrics_round is None and checkpoint.metrics == {}
    assert final.rounds == 2 and final.metrics_round == 2 and final.metrics["accuracy"] == 0.75
    with safe_open(str(tmp_path / MODEL_FILE), framework="pt") as fh:
        assert json.loads(fh.metadata()[CARD_KEY])["data-kind"] == "synthetic"
    assert run.load_checkpoint()[0] == 1  # resume still reads the carded checkpoint
