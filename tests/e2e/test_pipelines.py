"""Every example pipeline validates; the digits example meets its promises end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compresskit import api
from tests.conftest import ROOT

PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_example_pipeline_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    api.validate(path)
    header = path.read_text().splitlines()[:3]
    assert header[0].startswith("# ") and any(f"Run: compresskit run pipelines/{path.name}" in h
                                              for h in header)


@pytest.mark.slow
def test_digits_end_to_end(tmp_path):
    """The README's first command: teacher >= 0.98, exported student >= 0.97 and better than the
    same student trained without the teacher; all measured on the ONNX files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "compresskit", "run", "pipelines/digits.yaml",
                             "-o", str(tmp_path / "run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    distill = next(s for s in report["stages"] if s["type"] == "distill")["metrics"]
    assert distill["teacher_accuracy"] >= 0.98
    assert distill["accuracy"] > distill["baseline_accuracy"]
    onnx_acc = {(b["model"], b["batch_size"]): b["accuracy"] for b in report["benchmarks"]
                if b["precision"] == "fp32"}
    assert onnx_acc[("student", 1)] >= 0.97 and onnx_acc[("teacher", 1)] >= 0.98
    # Pruning and factorisation shrink the distilled student, costing at most 1 point.
    steps = {s["type"]: s["metrics"] for s in report["stages"] if "change" in s["metrics"]}
    assert set(steps) == {"prune", "lowrank"}
    assert steps["prune"]["change"]["macs_ratio"] < 0.8
    assert steps["lowrank"]["factorized"] and steps["lowrank"]["change"]["macs_ratio"] < 1.0
    fp32 = {(b["artifact"], b["batch_size"]): b["accuracy"] for b in report["benchmarks"]}
    assert fp32[("artifacts/student.fp32.onnx", 1)] >= distill["accuracy"] - 0.01
    # INT8 after QAT + KD: within 0.5 points of the FP32 student, integer kernels throughout.
    int8 = next(a for a in report["artifacts"] if a.get("method") == "qat+kd")
    assert int8["int8_coverage"] >= 0.95
    assert fp32[(int8["path"], 1)] >= fp32[("artifacts/student.fp32.onnx", 1)] - 0.005
    assert report["seconds"] < 180


DISTILL_EXAMPLES = sorted((ROOT / "pipelines").glob("distill_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", DISTILL_EXAMPLES, ids=[p.stem for p in DISTILL_EXAMPLES])
def test_distill_example_runs(path, tmp_path, monkeypatch):
    """Each distillation example runs end to end, trains a usable student, and reports what its
    mode is about."""
    monkeypatch.chdir(ROOT)
    report = api.run(path, output_dir=tmp_path / "run", show_progress=False)
    m = next(s for s in report["stages"] if s["type"] == "distill")["metrics"]
    assert m["accuracy"] >= 0.95, m
    expected = {"distill_features": "temperature_sweep", "distill_multi_teacher": "teachers",
                "distill_born_again": "generation_accuracy", "distill_ema": "ema_accuracy",
                "distill_mutual": "peer_accuracy", "distill_label_free": "teacher_agreement"}
    assert expected[path.stem] in m
    if path.stem == "distill_label_free":
        assert m["labels"] is False
    assert any(a["model"] == "student" for a in report["artifacts"])
    assert report["seconds"] < 120
