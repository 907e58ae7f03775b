"""`compresskit bench` on ONNX files compresskit did not make, the targets (edge pins one core
and runs the ORT format; cuda is reported unavailable without a GPU; pipeline-defined targets),
and bad input: one line each, exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from rich.console import Console
from typer.testing import CliRunner

from compresskit.backends import ort as backend
from compresskit.cli import app
from compresskit.measure import bench
from compresskit.measure.targets import TARGETS
from compresskit.ops.latency import median_ratio, summarize


def matmul_model(path: Path, features: int | str = "features", hidden: int = 32) -> Path:
    """x [batch, features] @ W [features?, hidden] -> relu: built by hand, not by compresskit.
    A symbolic `features` leaves a dynamic dimension that --input-shape must fix."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, hidden],
                           rng.standard_normal((16, hidden)).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "by_hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_any_onnx_file_with_json(tmp_path):
    small = matmul_model(tmp_path / "small.onnx")
    wide = matmul_model(tmp_path / "wide.onnx", hidden=512)
    out = tmp_path / "rows.json"
    result = invoke(str(small), str(wide), "--input-shape", "x=16", "-b", "1", "-b", "4",
                    "--runs", "30", "--warmup", "3", "--json", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["benchmarks"]
    assert [(Path(r["artifact"]).name, r["batch_size"]) for r in rows] == [
        ("small.onnx", 1), ("wide.onnx", 1), ("small.onnx", 4), ("wide.onnx", 4)]
    for r in rows:
        assert set(r["latency_ms"]) == {"p50", "p90", "p95", "p99", "mean", "std", "min"}
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        assert r["runs"] == 30 and r["target"] == "cpu" and r["format"] == "onnx"
        assert r["cold_start"]["session_ms"] > 0 and r["cold_start"]["first_run_ms"] > 0
        assert r["peak_rss_mb"] is not None and r["peak_rss_mb"] >= 0
        # Derived from the stored mean itself: nothing stored is rounded.
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] * 1000 / lat["mean"],
                                                      rel=1e-12)
    assert rows[0]["speedup"] == 1.0 and rows[0]["speedup_vs"] == str(small)


def test_microsecond_timings_are_stored_whole_and_shown_in_microseconds(tmp_path, monkeypatch):
    """A model that runs in a few microseconds: report rows keep every digit of what was
    timed (rounding to 0.1 us was 2% of the value), and the table shows three significant
    figures in us."""
    timed = {"a": [0.0045231, 0.0046119, 0.0044987], "b": [0.0091234, 0.0090001, 0.0093217]}
    monkeypatch.setattr(backend, "time_interleaved", lambda sessions, *a, **k: timed)
    a, b = matmul_model(tmp_path / "a.onnx", 16), matmul_model(tmp_path / "b.onnx", 16)
    rows = bench.measure({"a": a, "b": b}, TARGETS.get("cpu"),
                         bench.Settings(runs=3, warmup=1, memory=False),
                         lambda sess, bs: backend.synthetic_feeds(sess, bs), tmp_path / "w")
    for r in rows:
        assert r["latency_ms"] == summarize(timed[r["artifact"]])
        assert r["throughput_per_s"] == 1000 / summarize(timed[r["artifact"]])["mean"]
    assert rows[1]["speedup"] == median_ratio(timed["a"], timed["b"])
    console = Console(width=200, record=True)
    console.print(bench.table(rows))
    text = console.export_text()
    assert "4.52 µs" in text and "9.12 µs" in text, text


def test_seconds_instead_of_runs(tmp_path):
    model = matmul_model(tmp_path / "m.onnx", features=16)
    rows = bench.run_files([model], [TARGETS.get("cpu")],
                           bench.Settings(seconds=0.3, warmup=1, memory=False), {})
    assert rows[0]["runs"] >= 10


def test_edge_pins_one_core_and_runs_the_ort_format(tmp_path):
    model = matmul_model(tmp_path / "m.onnx", features=16)
    seen = []

    def feeds(sess, bs):
        seen.append(len(os.sched_getaffinity(0)))
        return backend.synthetic_feeds(sess, bs)

    before = os.sched_getaffinity(0)
    rows = bench.measure({"m": model}, TARGETS.get("edge"),
                         bench.Settings(runs=10, warmup=1), feeds, tmp_path / "work")
    assert seen == [1] and os.sched_getaffinity(0) == before
    assert rows[0]["format"] == "ort" and rows[0]["threads"] == 1
    assert (tmp_path / "work" / "m.ort").exists()


def test_cuda_is_unavailable_with_a_reason_here():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the cuda target is available")
    ok, why = backend.available(TARGETS.get("cuda"))
    assert not ok and "install onnxruntime-gpu" in why


@pytest.mark.parametrize("case", ["missing", "junk", "zero_batch", "negative_batch",
                                  "unknown_target", "cuda", "rejected_shape", "open_dims",
                                  "bad_shape_text"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    import onnxruntime as ort

    if case == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the cuda target is available here")
    model = str(matmul_model(tmp_path / "m.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    args, expected = {
        "missing": ([str(tmp_path / "none.onnx")], "no such file"),
        "junk": ([str(tmp_path / "junk.onnx")], "onnxruntime cannot load it as a model"),
        "zero_batch": ([model, "-b", "0"], "--batch-size must be at least 1"),
        "negative_batch": ([model, "-b", "-4"], "--batch-size must be at least 1"),
        "unknown_target": ([model, "-t", "edgy"], "unknown target 'edgy' (did you mean 'edge'"),
        "cuda": ([model, "-t", "cuda", "--input-shape", "16"], "target cuda is unavailable"),
        "rejected_shape": ([model, "--input-shape", "15"], "the model rejects inputs"),
        "open_dims": ([model], "input 'x' has dynamic dimensions [batch, features]"),
        "bad_shape_text": ([model, "--input-shape", "3,x"], "is not a list of positive"),
    }[case]
    result = invoke(*args, "--runs", "5", "--no-memory")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
