"""A tiny pipeline through the real CLI: report contract, cache, partial reruns, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, without_timings, workspace_with_models


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compresskit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = workspace_with_models(tmp_path_factory.mktemp("tiny"))
    (tmp / "pipe.yaml").write_text(TINY)
    return tmp, cli("run", "pipe.yaml", cwd=tmp)


def test_run_writes_the_report_contract(first_run):
    tmp, result = first_run
    assert result.returncode == 0, result.stderr
    run = tmp / "runs" / "tiny"
    report = json.loads((run / "report.json").read_text())
    assert {"name", "compresskit_version", "seconds", "stages", "artifacts",
            "benchmarks"} <= set(report)
    assert [s["status"] for s in report["stages"]] == ["done"] * 4
    for s in report["stages"]:
        assert {"index", "type", "status", "seconds", "params", "metrics"} <= set(s)
    assert report["stages"][1]["metrics"]["accuracy"] > 0.2  # trained (chance is 0.1)
    for a in report["artifacts"]:
        assert {"path", "format", "precision", "bytes", "sha256"} <= set(a)
        assert (run / a["path"]).stat().st_size == a["bytes"]
    assert len(report["benchmarks"]) == 2
    for b in report["benchmarks"]:
        assert {"artifact", "target", "batch_size", "threads", "latency_ms", "throughput_per_s",
                "peak_rss_mb", "accuracy"} <= set(b)
        assert set(b["latency_ms"]) >= {"p50", "p90", "p99", "mean", "std"}
        assert 0 < b["latency_ms"]["p50"] <= b["latency_ms"]["p99"]
    for name in ("resolved.yaml", "report.md", "00-train/teacher.pt", "01-distill/student.pt",
                 "02-export/manifest.json", "03-benchmark/manifest.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*"))  # no temp files or partial stage folders left
    assert "00-train" in result.stderr and "report:" in result.stdout


def test_the_terminal_shows_stages_one_comparison_per_target_and_the_verdict(first_run):
    _, result = first_run
    lines = result.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines[:-1]), max(lines, key=len)  # last: the path
    logs = result.stderr.splitlines()  # stage logs and progress wrap at 100 columns too
    assert all(len(line) <= 100 for line in logs), max(logs, key=len)
    assert any(line.startswith("cpu, batch 1: against teacher.fp32.onnx") for line in lines)
    assert any("speed-up" in line and "points" in line for line in lines)
    assert sum(line.startswith("cpu: ship ") for line in lines) == 1


def test_second_run_is_all_cached(first_run):
    tmp, _ = first_run
    run = tmp / "runs" / "tiny"
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/*") if p.parent.name[:2].isdigit()}
    result = cli("run", "pipe.yaml", cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["cached"] * 4
    # Nothing a stage made was rewritten (not a timing, which would depend on the CPU).
    assert stamps and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_time_budgets_are_reported_against_and_change_no_result(first_run):
    """A budget is not part of a stage's hash: the cached stages are reported against theirs;
    a stage that runs over its budget finishes and is flagged."""
    tmp, _ = first_run
    run = tmp / "runs" / "tiny"
    result = cli("run", "pipe.yaml", "stages.1.time_budget=0.001", "stages.2.time_budget=3600",
                 "stages.3.time_budget=0.001", "stages.3.runs=11", cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["cached"] * 3 + ["done"]
    assert [s["over_budget"] for s in report["stages"]] == [None, True, False, True]
    assert "03-benchmark took" in result.stderr and "over its time_budget of 0.001 s" in \
        result.stderr
    assert "01-distill took" not in result.stderr  # cached: nothing ran over now
    md = (run / "report.md").read_text()
    assert "OVER: " in md and " of 3600" in md


def test_changing_stage_k_reruns_k_and_later_only(first_run):
    tmp, _ = first_run
    run = tmp / "runs" / "tiny"
    before = (run / "artifacts" / "student.fp32.onnx").read_bytes()
    result = cli("run", "pipe.yaml", "stages.1.temperature=2", cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["cached", "done", "done", "done"]
    assert (run / "artifacts" / "student.fp32.onnx").read_bytes() != before
    # and back: the original settings are recomputed (one cache entry per stage folder)
    result = cli("run", "pipe.yaml", cwd=tmp)
    assert (run / "artifacts" / "student.fp32.onnx").read_bytes() == before


def test_same_seed_gives_identical_metrics_and_onnx_bytes(first_run, tmp_path):
    tmp, _ = first_run
    result = cli("run", "pipe.yaml", "--output-dir", str(tmp_path / "again"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    a = json.loads((tmp / "runs" / "tiny" / "report.json").read_text())
    b = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [without_timings(s["metrics"]) for s in a["stages"][:3]] == \
        [without_timings(s["metrics"]) for s in b["stages"][:3]]
    def onnx_files(report: dict) -> list[tuple[str, str]]:  # .ort bytes vary (test_reliability)
        return [(x["path"], x["sha256"]) for x in report["artifacts"]
                if x["path"].endswith(".onnx")]

    assert onnx_files(a) == onnx_files(b) and len(onnx_files(a)) == 3  # + bundle/model.onnx


def test_diverging_stage_exits_1_and_keeps_earlier_stages(first_run, tmp_path):
    tmp, _ = first_run
    (tmp / "models" / "nan.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class NaN(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1)) * float('nan')\n\n"
        "def student():\n    return NaN()\n")
    (tmp / "nan.yaml").write_text(TINY.replace("models/digits.py:student, kwargs: {width: 2}",
                                               "models/nan.py:student"))
    result = cli("run", "nan.yaml", "-o", str(tmp_path / "nan"), cwd=tmp)
    assert result.returncode == 1, result.stderr
    assert "stage 01-distill failed: the loss is nan on the first batch, before any update" \
        in result.stderr
    assert "no learning rate changes that" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "nan" / "00-train" / "manifest.json").is_file()
    assert not (tmp_path / "nan" / "01-distill").exists()
    report = json.loads((tmp_path / "nan" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done", "failed"]


def test_bad_input_exits_2_without_traceback(first_run):
    tmp, _ = first_run
    (tmp / "bad.yaml").write_text(TINY.replace("epochs: 1,", "epochs: 0,", 1))
    result = cli("run", "bad.yaml", cwd=tmp)
    assert result.returncode == 2
    assert "bad.yaml:8: stages[0].epochs: input should be greater than or equal to 1" in \
        result.stderr
    assert "Traceback" not in result.stderr


def test_changing_the_student_does_not_retrain_the_teacher(first_run, tmp_path):
    import shutil

    tmp, _ = first_run
    shutil.copytree(tmp / "runs" / "tiny", tmp_path / "w", dirs_exist_ok=True)
    result = cli("run", "pipe.yaml", "student.kwargs.width=3", "-o", str(tmp_path / "w"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["cached", "done", "done", "done"]


def test_third_party_logs_stay_out_of_the_terminal_unless_verbose(tmp_path):
    """NNCF's INFO lines and progress bars, torchao's 'Failed to load' and torch's pytree
    deprecation warnings are not our users' business; --verbose lets them through."""
    workspace_with_models(tmp_path)
    qat = "  - {type: qat, epochs: 1, lr: 0.0001, calibration_samples: 64}\n"
    (tmp_path / "pipe.yaml").write_text(TINY.replace("  - {type: export}\n", qat)
                                        .replace("  - {type: benchmark", "  # "))
    quiet = cli("run", "pipe.yaml", "-o", "quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    shown = quiet.stdout + quiet.stderr
    for noise in ("INFO:nncf", "Statistics collection", "Fast Bias correction",
                  "Failed to load", "_pytree"):
        assert noise not in shown, noise
    loud = cli("run", "pipe.yaml", "-o", "loud", "--verbose", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "Statistics collection" in loud.stdout + loud.stderr
