"""The DP benchmark plans every run of issue 14's table and reports every goal with its margin (runs stubbed: no Flower)."""

from __future__ import annotations

import json

import pytest

from simulations import bench_dp


def _stub(size, run, run_dir):
    """A run's figures as a function of what it is (private runs lose accuracy with ε), so the summary can be checked."""
    private = run.variant != "non-DP"
    eps = float(run.variant.split("=")[1].split()[0]) if private else 0.0
    base = {"pretrained": 0.95, "scratch": 0.90}.get(run.group, 0.80) + 0.01 * run.seed
    out = {"accuracy": base - (0.05 / eps if private else 0.0), "f1": 0.5, "auc": 0.5, "rounds": 1, "wall-s": 1.0,
           "train-img-s": 100.0}
    if private:
        out.update(epsilon=eps * 0.999, delta=1e-5, **{"noise-multiplier": 1.0})
    return out


def test_the_benchmark_runs_every_cell_of_the_table_and_reports_each_goal(monkeypatch, capsys) -> None:
    # Prepare
    monkeypatch.setattr(bench_dp, "federated", _stub)
    # Execute
    result = bench_dp.main(["--tiny", "--no-throughput", "--seeds", "2"])
    out = capsys.readouterr().out
    # Assert: every planned cell is summarised over its seeds
    size = bench_dp.SIZES["tiny"]
    expected = {f"pretrained {v}" for v in ("non-DP", *(f"ε={e:g}" for e in size.epsilons))}
    expected |= {f"pretrained ε={size.ablation_epsilon:g} {name}" for name in size.ablations}
    expected |= {f"scratch {v}" for v in ("non-DP", *(f"ε={e:g}" for e in size.scratch_epsilons))}
    expected |= {f"central-{size.central_sites} non-DP", f"central-{size.central_sites} ε=8"}
    rows = result["accuracy"]
    assert set(rows) == expected
    assert rows["pretrained non-DP"]["seeds"] == 2 and rows["scratch ε=8"]["seeds"] == min(2, size.scratch_dp_seeds)
    assert rows["pretrained ε=8"]["mean"] == pytest.approx(0.95 + 0.005 - 0.05 / 8, abs=1e-4)  # rounded to 4 places
    # ... and each goal with its value, target and verdict (the throughput goal unmeasured here)
    goals = result["goals"]
    assert goals["ε=8 gap"]["value"] == pytest.approx(-0.05 / 8, abs=1e-4) and goals["ε=8 gap"]["met"]
    assert goals["pretrained − scratch (no DP)"]["value"] == pytest.approx(0.05, abs=1e-4)
    assert goals["recipe DP/no-DP img/s"]["met"] is None
    for name in ("ε=8 gap", "ε=3 gap", "pretrained − scratch (no DP)", "recipe DP/no-DP img/s"):
        assert f"goal {name}:" in out
    assert "| scratch |" in out and "| pretrained |" in out and "central-3" in out


def test_a_missed_goal_is_reported_as_missed_with_its_value() -> None:
    rows = {"pretrained non-DP": {"mean": 0.9}, "pretrained ε=8": {"mean": 0.8}, "pretrained ε=3": {"mean": 0.89},
            "scratch non-DP": {"mean": 0.95}}
    goals = bench_dp.goals(rows, {"recipe-dp/recipe": 0.5})
    assert goals["ε=8 gap"] == {"value": pytest.approx(-0.1), "target": -0.03, "met": False}
    assert goals["ε=3 gap"]["met"] and not goals["pretrained − scratch (no DP)"]["met"]
    assert not goals["recipe DP/no-DP img/s"]["met"]


def test_an_interrupted_benchmark_resumes_from_its_json_without_rerunning(monkeypatch, tmp_path) -> None:
    # Prepare: the first attempt dies on its third run, after writing two to --out
    out, calls = tmp_path / "dp.json", []

    def dying(size, run, run_dir):
        calls.append((run.group, run.variant, run.seed))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return _stub(size, run, run_dir)

    monkeypatch.setattr(bench_dp, "federated", dying)
    with pytest.raises(RuntimeError):
        bench_dp.main(["--tiny", "--no-throughput", "--groups", "pretrained", "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and len(partial["runs"]) == 2
    # Execute: resume
    calls.clear()
    monkeypatch.setattr(bench_dp, "federated", lambda size, run, run_dir: calls.append(run.variant) or _stub(size, run, run_dir))
    result = bench_dp.main(["--tiny", "--no-throughput", "--groups", "pretrained", "--out", str(out), "--resume", str(out)])
    # Assert: only the missing runs ran, only the pretrained group, and the file is complete
    planned = [r for r in bench_dp.plan_runs(bench_dp.SIZES["tiny"], 1) if r.group == "pretrained"]
    assert len(calls) == len(planned) - 2
    assert {row["group"] for row in result["accuracy"].values()} == {"pretrained"}
    assert json.loads(out.read_text())["complete"] is True


def test_an_unknown_group_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        bench_dp.main(["--tiny", "--no-throughput", "--groups", "pretrained,nope"])
    assert err.value.code == 2 and "--groups: unknown group nope" in capsys.readouterr().err
