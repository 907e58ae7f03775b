"""prune to a measured budget (target_latency, latency_ms, target_size): the per-group table,
the plan with the least predicted damage, and the check by measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresskit import api
from compresskit.errors import ConfigError, StageError
from compresskit.stages._budget import BudgetPruner, Entry, _next_need, steps_for
from tests.stages.test_prune import ROOT, pipeline


def run(prune: dict, out: Path) -> dict:
    cfg = pipeline("residual", {"recover": 1, "latency_runs": 20, **prune})
    cfg["stages"] = cfg["stages"][:2]
    return api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False)


def test_the_plan_is_the_least_damage_that_saves_enough():
    table = [Entry("a", 0.25, 10, 1.0), Entry("a", 0.5, 20, 3.0), Entry("b", 0.25, 15, 0.5),
             Entry("b", 0.5, 30, 4.0), Entry("c", 0.25, 5, 0.1)]
    assert BudgetPruner.solve(table, 0) == ({}, 0.0)
    assert BudgetPruner.solve(table, 5) == ({"c": 0.25}, 5.0)
    assert BudgetPruner.solve(table, 14) == ({"b": 0.25}, 15.0)
    # 40: a 50% + b 25% + c (damage 3.6) beats a 25% + b 50% (5.0)
    plan, saved = BudgetPruner.solve(table, 40)
    assert plan == {"a": 0.5, "b": 0.25, "c": 0.25} and saved == 40
    # Out of reach: the plan that saves most.
    assert BudgetPruner.solve(table, 100) == ({"a": 0.5, "b": 0.5, "c": 0.25}, 55.0)


def test_the_next_ask_corrects_the_table_by_a_factor_or_between_two_tries():
    # Asked 0.5, measured 0.8 (cuts compound): ask 0.5 * 0.5 / 0.8 for 0.5.
    assert _next_need([(0.5, 0.8)], 0.5) == pytest.approx(0.3125)
    # Two tries bracket 0.5: interpolate between them.
    assert _next_need([(0.5, 0.8), (0.2, 0.3)], 0.5) == pytest.approx(0.32)
    assert _next_need([(0.4, 0.0)], 0.5) == pytest.approx(0.8)  # nothing measured: ask more


def test_deep_cuts_take_steps():
    assert [steps_for(f) for f in (0.8, 0.4, 0.39, 0.16, 0.15, 0.05)] == [1, 1, 2, 2, 3, 3]


def test_a_size_budget_is_met_as_measured_on_the_exported_file(tmp_path):
    report = run({"target_size": 15000}, tmp_path / "run")
    m = report["stages"][1]["metrics"]
    budget = m["budget"]
    assert budget["key"] == "target_size" and budget["kind"] == "bytes" and budget["met"]
    assert budget["measured"] <= 15000 * 1.1
    assert abs(budget["prediction_error"]) < 0.05  # bytes: the table is nearly exact
    step = budget["steps"][0]
    assert step["plan"] and step["table_entries"] >= len(step["plan"])
    assert m["after"]["onnx_bytes"] < m["before"]["onnx_bytes"]
    manifest = json.loads((tmp_path / "run" / "01-prune" / "manifest.json").read_text())
    assert manifest["metrics"]["budget"]["steps"][0]["plan"] == step["plan"]


def test_a_latency_budget_is_measured_and_its_prediction_error_reported(tmp_path):
    """The fixture is tiny (microseconds): this checks the route and the record, not the
    speed; benchmarks/prune_budget.py measures a real one."""
    report = run({"target_latency": 0.6}, tmp_path / "run")
    budget = report["stages"][1]["metrics"]["budget"]
    assert budget["kind"] == "latency" and budget["target"] == "cpu"
    assert 0 < budget["measured"] < 1.5 and "prediction_error" in budget
    assert len(budget["steps"]) == 1 and budget["steps"][0]["rounds"] >= 1


def test_budget_errors(tmp_path):
    with pytest.raises(ConfigError, match="not several"):
        run({"target_latency": 0.5, "target_size": 1000}, tmp_path / "a")
    with pytest.raises(StageError, match="target .cuda., which this machine cannot run"):
        run({"target_latency": 0.5, "target": "cuda"}, tmp_path / "b")


def lowrank(stage: dict, out: Path, targets: dict | None = None) -> dict:
    cfg = pipeline("residual", {"ratio": 0.25})
    cfg["stages"][1] = {"type": "lowrank", "start_from": "teacher", "recover": 1,
                        "latency_runs": 20, **stage}
    if targets:
        cfg["targets"] = targets
    return api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False)


def test_lowrank_meets_a_size_budget_with_ranks_from_the_table(tmp_path):
    report = lowrank({"target_size": 17000}, tmp_path / "run")
    m = report["stages"][1]["metrics"]
    budget = m["budget"]
    assert budget["kind"] == "bytes" and budget["met"], budget
    assert budget["measured"] <= 17000 * 1.1 < m["before"]["onnx_bytes"]
    assert m["factorized"] and set(m["factorized"]) == set(budget["steps"][0]["plan"])
    for spec in m["factorized"].values():
        assert 1 <= spec["rank"] < spec["full_rank"]
    assert m["after"]["onnx_bytes"] <= 17000 * 1.1
    # The export stage rebuilt the factorised student from the recorded structure.
    assert report["stages"][2]["status"] == "done"


def test_lowrank_times_a_latency_budget_on_a_remote_device(tmp_path):
    """A `command:` target (through env: this machine's Python stands for the device) times
    the table there; the budget records the device it was measured on."""
    import sys

    board = {"command": "env", "python": sys.executable, "workdir": str(tmp_path / "device")}
    report = lowrank({"target_latency": 0.7, "target": "board"}, tmp_path / "run",
                     {"board": board})
    budget = report["stages"][1]["metrics"]["budget"]
    assert budget["target"] == "board" and budget["kind"] == "latency"
    assert budget["device"]["python"] and 0 < budget["measured"] < 1.5
    assert (tmp_path / "device").is_dir()


def test_lowrank_budget_errors(tmp_path):
    with pytest.raises(ConfigError, match="not several"):
        lowrank({"target_latency": 0.5, "energy": 0.9}, tmp_path / "a")
    with pytest.raises(StageError, match="target .cuda., which this machine cannot run"):
        lowrank({"latency_ms": 0.01, "target": "cuda"}, tmp_path / "b")


def test_the_cost_table_is_cached_with_the_run_keyed_by_the_model_and_target(tmp_path):
    """A rerun that changes only recovery measures no table again: the same model, input and
    target give the same key; the plan follows from the same table."""
    first = run({"target_size": 15000}, tmp_path / "run")["stages"][1]["metrics"]["budget"]
    assert first["tables_from_cache"] == 0
    tables = list((tmp_path / "run" / "cache" / "budget").glob("*.json"))
    assert len(tables) == 1
    again = run({"target_size": 15000, "recover": 2}, tmp_path / "run")
    budget = again["stages"][1]["metrics"]["budget"]
    assert again["stages"][1]["status"] == "done"  # rerun, not taken from the stage cache
    assert budget["tables_from_cache"] == 1
    assert budget["steps"][0]["plan"] == first["steps"][0]["plan"]
    # Another budget kind is another table.
    run({"target_latency": 0.6}, tmp_path / "run")
    assert len(list((tmp_path / "run" / "cache" / "budget").glob("*.json"))) == 2
