"""compresskit search on a tiny pipeline: the front, the cache reused across trials, the budget,
and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compresskit.engine.loader import load_pipeline
from compresskit.errors import ConfigError
from compresskit.search import parse_budget, run_search

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = {
    "name": "tiny-search", "data": {"source": "digits", "batch_size": 64},
    "input": {"shape": [1, 8, 8]},
    "teacher": {"source": f"{ROOT}/tests/fixtures/tiny_models.py:residual"},
    "stages": [
        {"type": "train", "model": "teacher", "epochs": 1, "lr": 0.01},
        {"type": "prune", "start_from": "teacher", "ratio": 0.3, "recover": 0,
         "latency_runs": 10, "round_to": 1},
        {"type": "export", "models": ["student"], "bundle": False},
        {"type": "ptq", "calibration_samples": 64},
        {"type": "benchmark", "targets": ["cpu"], "runs": 10, "warmup": 1, "memory": False},
    ],
    "search": {"space": {"stages.1.ratio": {"low": 0.1, "high": 0.6},
                         "artifact": {"choices": ["student.fp32.onnx",
                                                  "student.ptq.int8.onnx"]}},
               "objectives": ["accuracy", "latency"]},
}


def write(folder: Path, **changes: object) -> Path:
    data = {**PIPELINE, **changes}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_search_writes_the_front_and_trials_reuse_finished_stages(tmp_path):
    said: list[str] = []
    summary = run_search(write(tmp_path), 4, output_dir=tmp_path / "run", say=said.append,
                         budget="latency <= 100 ms")
    assert summary["trials"] == 4 and len(said) >= 4
    front = summary["front"]
    assert front and all(p["pareto"] for p in front)
    # Later trials start from an earlier trial's folder: the teacher is trained once.
    runs = [p["stages_run"] for p in summary["points"]]
    assert runs[0] == 5 and all(n <= 4 for n in runs[1:]), runs
    for p in front:  # each point is a pipeline that runs as it is
        loaded = load_pipeline(p["pipeline"])
        assert loaded.config.search is None
        assert loaded.config.stages[1].ratio == pytest.approx(p["params"]["stages.1.ratio"])
    html = (tmp_path / "run" / "search" / "report.html").read_text()
    assert "<img src='data:image/png;base64," in html and "Pareto front" in html
    pick = summary["budget"]
    assert pick["met"] and pick["accuracy"] == max(p["accuracy"] for p in summary["points"])
    # Asked again: the study is finished, nothing runs, the same front comes back.
    again = run_search(write(tmp_path), 4, output_dir=tmp_path / "run", say=said.append,
                       budget="latency <= 0.000001 ms")
    assert [p["trial"] for p in again["front"]] == [p["trial"] for p in front]
    closest = again["budget"]
    assert not closest["met"] and closest["over_by"] > 1 and "trial" in closest


def test_budgets_parse():
    assert parse_budget("latency <= 0.4x teacher on edge") == {
        "objective": "latency", "value": 0.4, "relative": True, "target": "edge",
        "text": "latency <= 0.4x teacher on edge"}
    assert parse_budget("latency <= 2 ms")["value"] == 2.0
    assert parse_budget("size<=500 kB")["value"] == 500_000
    for bad in ("latency < 2 ms", "speed <= 2", "size <= 3 ms", "latency <= 2 kb"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


@pytest.mark.parametrize("space, says", [
    ({"stages.1.ratoi": {"low": 0.1, "high": 0.5}}, "ratoi"),
    ({"stages.1.ratio": {"low": 0.5, "high": 0.5}}, "empty range"),
    ({"stages.9.ratio": {"low": 0.1, "high": 0.5}}, "stages.9.ratio"),
    ({"artifact": {"low": 0.1, "high": 0.5}}, "'artifact' takes choices"),
])
def test_bad_search_spaces_are_input_errors(tmp_path, space, says):
    path = write(tmp_path, search={"space": space})
    with pytest.raises(ConfigError, match=says):
        run_search(path, 2, output_dir=tmp_path / "run")


def test_a_pipeline_without_search_says_what_to_add(tmp_path):
    data = {k: v for k, v in PIPELINE.items() if k != "search"}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no 'search:' section"):
        run_search(path, 2, output_dir=tmp_path / "run")
