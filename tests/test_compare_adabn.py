"""`flower-sim compare`: AdaBN rows at the held-out hospital, personalised rows with FedBN, bad input refused (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import RunConfig
from simulations.cli import app
from simulations.compare import CompareOptions, run_compare, summarise
from simulations.planning import RunOptions

TINY_SETS = ("model.image-size=32", "model.token-dim=8", "model.hidden-size=8", "data.train-per-site=16",
             "data.test-per-site=8", "train.batch-size=8")


def test_adabn_adds_a_held_out_row_per_mode(tmp_path: Path) -> None:
    options = CompareOptions(RunOptions("synthetic-tiny", sites=3, sets=TINY_SETS), seeds=(0,), modes=("pooled",),
                             holdout=2, out_dir=tmp_path / "c", adabn=True)
    summary = run_compare(options, log=lambda _: None)
    rows = {(r["mode"], r["scope"]): r for r in summary["rows"]}
    assert ("pooled + AdaBN", "held-out") in rows and ("pooled", "held-out") in rows
    assert [scope for mode, scope in rows if mode == "pooled + AdaBN"] == ["held-out"]
    run = json.loads((tmp_path / "c" / "compare.json").read_text())["runs"]["hybrid"]["pooled"][0]
    assert run["holdout-adabn"]["support"] == run["holdout"]["support"] == 8  # the same test split, adapted model
    assert run["holdout-adabn"]["loss"] != run["holdout"]["loss"]


def test_personalised_results_become_rows_beside_the_global_model() -> None:
    metrics = {"accuracy": 0.5, "auc": 0.6}
    run = {"train-sites": {"global": metrics, "sites": {"a": metrics, "b": metrics}},
           "personalised": {"global": {"accuracy": 0.9}, "sites": {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.8}}}}
    cfg = RunConfig().override({"federation.num-sites": 2})
    summary = summarise({"hybrid": {"federated": [run, run]}}, cfg, CompareOptions(RunOptions("synthetic-tiny"), seeds=(0, 1)))
    rows = {(r["mode"], r["scope"]): r for r in summary["rows"]}
    assert rows[("federated", "global")]["accuracy"]["mean"] == 0.5
    assert rows[("federated (personalised)", "global")]["accuracy"]["mean"] == 0.9
    assert rows[("federated (personalised)", "a")]["accuracy"]["mean"] == 1.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["compare", "synthetic-tiny", "--adabn"], "--holdout"),
        (["compare", "synthetic-tiny", "--adabn", "--holdout", "0", "--set", "privacy.mode=local"],
         "privacy.mode='local'"),
        (["compare", "synthetic-tiny", "--adabn", "--holdout", "0", "--models", "alexnet", "--set",
          "model.image-size=64"], "model.architecture='alexnet'"),
        (["run", "synthetic-tiny", "--set", "federation.strategy=fedsomething"], "'federation.strategy'"),
        (["run", "synthetic-tiny", "--set", "federation.strategy=scaffold", "--set", "train.optimizer=sgd",
          "--set", "train.momentum=0", "--set", "privacy.mode=central-fixed-server"], "privacy.mode"),
        (["run", "synthetic-tiny", "--set", "federation.strategy=scaffold"], "train.optimizer=sgd"),
    ],
)
def test_bad_strategy_and_adabn_input_is_one_line_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(app, [*args, *(["--run-dir"] if args[0] == "run" else ["--out-dir"]), str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_adabn_on_the_group_norm_hybrid_names_model_norm(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", "synthetic-tiny", "--adabn", "--holdout", "0", "--set", "model.norm=group",
                                      "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.norm='group'" in result.output, result.output
