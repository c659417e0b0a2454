"""The typed run config: defaults in one place, unknown keys and bad values named, Flower's table in sync."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, parse_assignments

from common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_flower_config_equals_the_typed_defaults() -> None:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    flat = {f"{section}.{key}": value for section, body in app["config"].items() for key, value in body.items()}
    assert flat == RunConfig().to_flat()


def test_flat_round_trip() -> None:
    cfg = RunConfig().override({"train.lr": "0.01", "model.bidirectional": "false", "federation.rounds": "7"})
    assert cfg.train.lr == 0.01 and cfg.model.bidirectional is False and cfg.federation.rounds == 7
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize("key", ["model.colour", "nosection.x", "train", "train.learning-rate"])
def test_unknown_keys_are_named(key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown configuration key '{key}'"):
        RunConfig().override({key: "1"})


def test_unknown_nested_key_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'model.colour'"):
        RunConfig.validate_nested({"model": {"colour": "red"}})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("train.lr", "-1", "greater than 0"),
        ("train.lr", "fast", "valid number"),
        ("model.num-classes", "3", "2 or 8"),
        ("model.backbone", "resnet9000", "unknown backbone 'resnet9000'"),
        ("data.dataset", "mnist", "unknown dataset 'mnist'"),
        ("model.dropout", "1.5", "less than 1"),
        ("train.device", "tpu", "'auto', 'cpu' or 'cuda'"),
    ],
)
def test_invalid_values_are_named(key: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().override({key: value})
    message = str(err.value)
    assert f"'{key}'" in message and fragment in message and "\n" not in message


def test_minimum_sites_cannot_exceed_sites() -> None:
    with pytest.raises(ConfigError, match="min-train-sites .3. exceeds the 2 training sites"):
        RunConfig().override({"federation.num-sites": 2, "federation.min-train-sites": 3})


def test_assignments_parse_and_reject_garbage() -> None:
    assert parse_assignments(["train.lr=0.1", " model.backbone = x "]) == {"train.lr": "0.1", "model.backbone": "x"}
    with pytest.raises(ConfigError, match="bad --set 'oops'"):
        parse_assignments(["oops"])


def test_holdout_site_leaves_the_training_sites() -> None:
    cfg = RunConfig().override({"federation.holdout-site": 1})
    assert cfg.federation.training_sites == [0, 2]
    with pytest.raises(ConfigError, match="holdout-site .3. must be below num-sites .3."):
        RunConfig().override({"federation.holdout-site": 3})
    assert RunConfig().override({"federation.holdout-site": 0}).with_sites(2).federation.min_train_sites == 1
