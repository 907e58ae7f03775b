"""Does `compresskit bench` report what a plain timing loop around InferenceSession.run sees?

Exports models/resnet.py (random weights; timing does not depend on them) and, in alternating
rounds, measures its batch-1 median latency twice on the same settings (cpu target, one thread,
sequential executor, ORT_ENABLE_ALL): with compresskit.measure.bench (the code behind `compresskit
bench` and the benchmark stage: cold start apart, warm-up, interleaved rounds) and with a
ten-line loop of time.perf_counter() around session.run. Prints each round's two medians, their
ratio, and the median ratio over rounds; the acceptance bound is 10%.

Run: python benchmarks/bench_vs_plain_loop.py [--rounds 5] [--runs 200] [--width 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit.backends.onnx_export import export_onnx  # noqa: E402
from compresskit.measure import bench  # noqa: E402
from compresskit.measure.targets import Target  # noqa: E402
from models.resnet import resnet  # noqa: E402


def plain_loop(path: Path, x: np.ndarray, runs: int, warmup: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "resnet.onnx"
    export_onnx(resnet(width=args.width).eval(), torch.zeros(1, 3, 32, 32), path, 17)
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    target = Target(name="cpu-1", description="cpu, one thread", threads=1)
    settings = bench.Settings(runs=args.runs, warmup=20, memory=False)
    print(f"resnet width {args.width}, batch 1, one thread, {args.runs} runs per measurement")
    print("| round | compresskit bench p50 ms | plain loop median ms | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for r in range(args.rounds):
        ours = bench.measure({"m": path}, target, settings,
                             lambda s, bs: {s.get_inputs()[0].name: x},
                             path.parent)[0]["latency_ms"]["p50"]
        plain = plain_loop(path, x, args.runs, 20)
        ratios.append(ours / plain)
        print(f"| {r} | {ours:.4f} | {plain:.4f} | {ours / plain:.3f} |")
    med = statistics.median(ratios)
    print(f"median ratio compresskit / plain loop: {med:.3f} "
          f"({'within' if abs(med - 1) <= 0.10 else 'OUTSIDE'} 10%)")


if __name__ == "__main__":
    main()
