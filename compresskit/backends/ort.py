"""onnxruntime sessions, inference and timing for a Target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compresskit.targets import Target

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def available(target: Target) -> tuple[bool, str]:
    """Whether this machine can run the target, and if not, why."""
    have = ort.get_available_providers()
    missing = [p for p in target.providers if p not in have]
    if missing:
        return False, (f"onnxruntime here offers {', '.join(have)}, not {', '.join(missing)}"
                       + (" (install onnxruntime-gpu on a machine with an NVIDIA GPU)"
                          if "CUDAExecutionProvider" in missing else ""))
    return True, ""


def session_options(target: Target, threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if target.sequential
                         else ort.ExecutionMode.ORT_PARALLEL)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = target.arena
    so.log_severity_level = 3
    return so


def session(path: Path | str, target: Target, threads: int) -> ort.InferenceSession:
    providers: list[Any] = list(target.providers)
    if target.provider_options:
        providers = list(zip(target.providers, target.provider_options, strict=False))
    return ort.InferenceSession(str(path), sess_options=session_options(target, threads),
                                providers=providers)


def predict(sess: ort.InferenceSession, x: np.ndarray, batch_size: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def batch_of(x: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` real samples (repeated when the split is smaller)."""
    reps = -(-batch_size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size])


def time_interleaved(sessions: dict[str, ort.InferenceSession], feed: np.ndarray, runs: int,
                     warmup: int) -> dict[str, list[float]]:
    """Per-run latency (ms) of each session, run round-robin so machine noise hits all alike."""
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, {names[k]: feed})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {names[k]: feed})
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return times


def peak_rss_mb(path: Path, target: str, threads: int, shape: list[int], dtype: str,
                runs: int = 20) -> float:
    """Peak RSS of loading and running the model in a fresh process, minus that process's
    footprint after importing onnxruntime, so one model's arena does not pollute the next."""
    args = json.dumps({"path": str(path), "target": target, "threads": threads,
                       "shape": shape, "dtype": dtype, "runs": runs})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "compresskit.backends.memprobe", args],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])
