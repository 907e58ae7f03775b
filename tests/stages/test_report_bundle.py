"""A pipeline's per-target benchmark, its report (markdown, HTML that a real headless browser
renders, verdict lines, `compresskit report`), and its deployment bundle."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compresskit import api
from compresskit.cli import app
from compresskit.report import pareto, verdicts

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "models/digits.py"


def pipeline() -> dict:
    return {
        "name": "rb", "data": {"source": "digits", "batch_size": 64},
        "input": {"shape": [1, 8, 8]},
        "teacher": {"source": f"{DIGITS}:teacher", "kwargs": {"width": 8}},
        "student": {"source": f"{DIGITS}:student", "kwargs": {"width": 4}},
        "targets": {"two_threads": {"threads": 2, "arena": False, "optimization": "basic",
                                    "description": "a device of mine"}},
        "stages": [
            {"type": "train", "model": "teacher", "epochs": 2, "lr": 0.01},
            {"type": "distill", "epochs": 2, "lr": 0.01},
            {"type": "qat", "epochs": 1, "calibration_samples": 128},
            {"type": "export"},
            {"type": "benchmark", "targets": ["cpu", "edge", "cuda", "two_threads"],
             "batch_sizes": [1, 4], "runs": 20, "warmup": 2, "memory": False},
        ],
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rb") / "run"
    api.run(pipeline(), base_dir=ROOT, output_dir=out, show_progress=False)
    return out


def test_every_target_measures_every_artifact(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    rows = {(b["target"], b["artifact"], b["batch_size"]) for b in report["benchmarks"]}
    for target in ("cpu", "edge", "two_threads"):
        for artifact in ("artifacts/teacher.fp32.onnx", "artifacts/student.fp32.onnx",
                         "artifacts/student.qat.int8.onnx"):
            assert (target, artifact, 1) in rows and (target, artifact, 4) in rows
    edge = [b for b in report["benchmarks"] if b["target"] == "edge"]
    assert all(b["format"] == "ort" and b["threads"] == 1 for b in edge)
    mine = [b for b in report["benchmarks"] if b["target"] == "two_threads"]
    assert all(b["threads"] == 2 for b in mine)
    # accuracy is that of each file as the target runs it, from the evaluation split
    cpu = {b["artifact"]: b["accuracy"] for b in report["benchmarks"] if b["target"] == "cpu"}
    assert {b["artifact"]: b["accuracy"] for b in edge} == pytest.approx(cpu, abs=0.01)
    unavailable = report["stages"][4]["metrics"]["unavailable_targets"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "install onnxruntime-gpu" in unavailable["cuda"]


def test_report_markdown_verdicts_and_rebuild(run_dir):
    text = (run_dir / "report.md").read_text()
    assert "## Verdict" in text and "## Target edge" in text and "## Target cpu" in text
    report = json.loads((run_dir / "report.json").read_text())
    lines = verdicts(report)
    assert [line.split(":")[0] for line in lines] == ["cpu", "edge", "two_threads"]
    assert all(" ship " in line for line in lines)
    (run_dir / "report.md").unlink()
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.md").read_text() == text and (run_dir / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", str(run_dir / "nothing")])
    assert bad.exit_code == 2 and "no readable report.json" in bad.output


def test_html_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # opens without a network
    assert page.count("<img src='data:image/png;base64,") == 4  # 3 targets + sizes
    assert page.count("<table>") >= 6


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         (run_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    broken = re.search(r'data-images-broken="(\d+)"', dom)
    assert loaded and broken, dom[:500]
    assert int(loaded.group(1)) == 4 and int(broken.group(1)) == 0
    assert dom.count("<table>") >= 6 and "Verdict" in dom


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_screenshot_shows_the_page_and_its_plots(run_dir, tmp_path):
    """A screenshot of report.html as a person sees it: the page is drawn (not blank), as wide
    as the window, and the plots are there in colour (a few rows of saturated pixels)."""
    from matplotlib import image

    shot = tmp_path / "report.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,4000", f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 0.05  # text and tables, not an empty page
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 0.4).any(axis=1).sum() > 100  # coloured plot marks on many rows


def test_bundle_files_and_manifest(run_dir):
    folder = run_dir / "artifacts" / "bundle"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "manifest.json", "model.onnx", "model.ort",
                     "required_operators.config"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["from"] == "artifacts/student.qat.int8.onnx"
    assert manifest["model"]["precision"] == "int8" and manifest["model"]["opset"] == 17
    assert manifest["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8],
                                   "dtype": "float32"}]
    assert manifest["labels"] == [str(d) for d in range(10)]
    assert "pixels / 16" in manifest["preprocessing"]
    assert 0 < manifest["measured"]["accuracy"] <= 1
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    config = (folder / "required_operators.config").read_text()
    assert re.search(r"^ai\.onnx;\d+;.*Conv", config, re.M) or "QLinearConv" in config
    assert (run_dir / "artifacts" / "bundle.zip").stat().st_size > 0


def test_pareto_front_and_verdict_rules():
    assert pareto([(1.0, 0.90), (2.0, 0.95), (3.0, 0.94), (0.5, 0.80), (2.5, 0.99)]) == [
        3, 0, 1, 4]
    rows = [
        {"artifact": "t.onnx", "model": "teacher", "precision": "fp32", "target": "cpu",
         "batch_size": 1, "latency_ms": {"p50": 4.0}, "accuracy": 0.99, "bytes": 1000},
        {"artifact": "s.int8.onnx", "model": "student", "precision": "int8", "target": "cpu",
         "batch_size": 1, "latency_ms": {"p50": 1.0}, "accuracy": 0.985, "bytes": 100},
        {"artifact": "tiny.onnx", "model": "student", "precision": "int8", "target": "cpu",
         "batch_size": 1, "latency_ms": {"p50": 0.5}, "accuracy": 0.90, "bytes": 50},
    ]
    report = {"benchmarks": rows, "stages": [{"metrics": {"verdict_tolerance": 0.01}}]}
    assert verdicts(report) == [
        "cpu: ship s.int8.onnx: 4.00x faster than t.onnx at -0.5 points, 0.10x its size "
        "(batch 1: the fastest file within 1 point of the most accurate one)."]


def test_a_latency_difference_inside_the_noise_is_a_tie_won_by_the_smaller_file():
    """digits: student.qat-ce.int8.onnx beat student.qat.int8.onnx by 0.001 ms; that is noise
    (two standard errors of the difference of the medians), and the smaller file ships."""
    def row(name, p50, std, size, acc=0.98):
        return {"artifact": name, "model": "student", "precision": "int8", "target": "cpu",
                "batch_size": 1, "runs": 200, "accuracy": acc, "bytes": size,
                "latency_ms": {"p50": p50, "std": std}}

    teacher = {**row("t.onnx", 4.0, 0.1, 1000, 0.99), "model": "teacher", "precision": "fp32"}
    report = {"benchmarks": [teacher, row("a.int8.onnx", 0.100, 0.005, 120),
                             row("b.int8.onnx", 0.101, 0.005, 110)],
              "stages": [{"metrics": {"verdict_tolerance": 0.01}}]}
    (line,) = verdicts(report)
    assert line.startswith("cpu: ship b.int8.onnx: ")
    assert "as fast as a.int8.onnx within measurement noise, and the smallest" in line
    report["benchmarks"][2]["latency_ms"]["p50"] = 0.110  # 10 % slower: a real difference
    (line,) = verdicts(report)
    assert line.startswith("cpu: ship a.int8.onnx: ") and "noise" not in line
    # A few slow outliers inflate the std, not the quantiles the noise is read from.
    for b, p50 in zip(report["benchmarks"][1:], (0.100, 0.110), strict=True):
        b["latency_ms"] = {"p50": p50, "p90": p50 * 1.05, "std": 0.2}
    (line,) = verdicts(report)
    assert line.startswith("cpu: ship a.int8.onnx: ") and "noise" not in line


def test_warnings_are_listed_once_per_stage():
    from compresskit.report.findings import grouped_warnings

    report = {"stages": [
        {"name": "01-distill", "metrics": {"warnings": ["soft targets are nearly one-hot"]}},
        {"name": "02-prune", "metrics": {"change": {"warnings": ["latency did not follow MACs",
                                                                "latency did not follow MACs"]}},
         "over_budget": True, "time_budget": 60.0},
        {"name": "03-benchmark", "metrics": {"failed_targets": {"pi": "ssh could not log in"},
                                             "unavailable_targets": {}}}]}
    assert grouped_warnings(report) == [
        "01-distill: soft targets are nearly one-hot",
        "02-prune: latency did not follow MACs",
        "02-prune: took longer than its time_budget of 60 s",
        "03-benchmark: target pi: ssh could not log in"]
