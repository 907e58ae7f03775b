"""The half of compresskit's measuring that runs on the device: onnxruntime sessions for a
target, cold start, interleaved timing, peak memory in a fresh process, predictions on the
evaluation split, and what the device is (onnxruntime version, CPU model, cores, ISA flags).

It needs nothing but Python 3.8+, numpy and onnxruntime, so compresskit copies this one file to
a remote target (over ssh, or through any command) and runs it there; the local targets use the
same functions, so a figure from a Raspberry Pi and one from this machine come from the same
protocol. The statistics (percentiles, paired ratios) are computed back home from the raw
per-run timings it returns.

On the device: `python device_runner.py WORKDIR JOB` reads the job (JSON; paths in it are
relative to WORKDIR, where models are kept by content hash under models/) and prints one JSON
line: {"device": ..., "have": [...]} for a probe, {"device": ..., "rows": [...],
"predictions": {...}} for a measurement, or {"error": KIND, "detail": ...}. The job's folder
is removed afterwards. `--memprobe JSON` is the child process that measures one model's peak
memory.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",  # x86
             "neon", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2")  # Arm
"""The instruction-set flags that decide which onnxruntime kernels a CPU gets."""


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    allowed = allowed or 1
    try:
        cores = set()
        phys = core = ""
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((phys, core))
        if cores:
            return max(1, min(allowed, len(cores)))
    except OSError:
        pass
    return allowed


def device_info() -> dict[str, Any]:
    """What the measurements ran on: onnxruntime and Python versions, OS, CPU and its flags."""
    info: dict[str, Any] = {"python": platform.python_version(), "system": platform.system(),
                            "release": platform.release(), "machine": platform.machine(),
                            "cpu": platform.processor() or platform.machine(),
                            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
                            "isa": []}
    flags: set = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "model", "cpu model") and value.strip():
                    info["cpu"] = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    info["isa"] = [f for f in ISA_FLAGS if f in flags]
    info["executable"] = sys.executable
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def session_options(target: dict[str, Any], threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if target.get("sequential", True)
                         else ort.ExecutionMode.ORT_PARALLEL)
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[target.get("optimization", "all")]
    so.enable_cpu_mem_arena = target.get("arena", True)
    so.log_severity_level = 3
    return so


def new_session(path: str, target: dict[str, Any], threads: int) -> Any:
    """An InferenceSession as the target describes it (providers, options, threads)."""
    import onnxruntime as ort

    providers: list[Any] = list(target.get("providers") or ["CPUExecutionProvider"])
    options = target.get("provider_options") or []
    if options:
        providers = list(zip(providers, options))  # noqa: B905  (3.8 has no strict)
    return ort.InferenceSession(str(path), sess_options=session_options(target, threads),
                                providers=providers)


@contextlib.contextmanager
def pinned(cores: int | None) -> Iterator[None]:
    """Pin this process to its first `cores` cores while measuring, then restore."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(sorted(before)[:cores]))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def interleaved(sessions: dict[str, Any], feeds: dict[str, dict[str, Any]], runs: int,
                warmup: int, seconds: float | None = None) -> dict[str, list[float]]:
    """Per-run latency (ms) of each session, run round-robin so machine noise hits all alike:
    `warmup` untimed rounds, then `runs` rounds, or with `seconds`, rounds until that much time
    has passed (at least 10)."""
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    rounds = 0
    while (rounds < runs) if seconds is None else \
            (rounds < 10 or time.perf_counter() - start < seconds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    return times


def cold_start(path: str, target: dict[str, Any], threads: int,
               feeds: dict[str, Any]) -> tuple:
    """A new session and its first inference, each timed (what an app pays at launch)."""
    t0 = time.perf_counter()
    sess = new_session(path, target, threads)
    t1 = time.perf_counter()
    sess.run(None, feeds)
    t2 = time.perf_counter()
    return sess, {"session_ms": (t1 - t0) * 1000, "first_run_ms": (t2 - t1) * 1000}


def peak_rss_mb(path: str, target: dict[str, Any], threads: int, feeds_npz: str,
                runs: int = 20, timeout: float = 600) -> float:
    """Peak RSS of loading and running the model in a fresh process, minus that process's
    footprint after importing onnxruntime, so one model's arena does not pollute the next."""
    args = json.dumps({"path": str(path), "target": target, "threads": threads,
                       "feeds": str(feeds_npz), "runs": runs})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memprobe", args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        if out.returncode in (-9, 137) or "MemoryError" in out.stderr or \
                "bad_alloc" in out.stderr:
            raise MemoryError(f"the memory probe of {os.path.basename(path)} ran out of memory")
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark (Linux), so a transient peak while importing does not
    hide the model's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memprobe(raw: str) -> None:
    import resource

    import numpy as np
    import onnxruntime  # noqa: F401  (the baseline includes the runtime itself)

    args = json.loads(raw)
    with np.load(args["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    with pinned(args["target"].get("pin_cores")):
        linux = _reset_peak() and status_kb("VmHWM") is not None
        base_kb = status_kb("VmRSS") if linux else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sess = new_session(args["path"], args["target"], args["threads"])
        for _ in range(args["runs"]):
            sess.run(None, feeds)
        peak_kb = status_kb("VmHWM") if linux else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": max(0, (peak_kb or 0) - (base_kb or 0)) / 1024.0}))


def _array_b64(a: Any) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def measure(job: dict[str, Any], workdir: str, scratch: str) -> dict[str, Any]:
    """The job compresskit sent: every file at every batch size, timed interleaved, with cold
    start and peak memory; then each file's outputs on the evaluation inputs, if sent."""
    import numpy as np

    target = job["target"]
    threads = job.get("threads") or target.get("threads") or physical_cores()
    files = {label: os.path.join(workdir, rel) for label, rel in job["files"].items()}
    with np.load(os.path.join(workdir, job["feeds"])) as data:
        arrays = {k: data[k] for k in data.files}
    # feeds.npz keys: "<file index>/<batch size>/<input name>"
    feeds: dict[str, dict[int, dict[str, Any]]] = {label: {} for label in files}
    labels = list(files)
    for key, value in arrays.items():
        index, bs, name = key.split("/", 2)
        feeds[labels[int(index)]].setdefault(int(bs), {})[name] = value
    sizes = job["batch_sizes"]
    rows: list[dict[str, Any]] = []
    predictions: dict[str, str] = {}
    with pinned(target.get("pin_cores")):
        sessions, cold = {}, {}
        for label, path in files.items():
            sessions[label], cold[label] = cold_start(path, target, threads,
                                                      feeds[label][sizes[0]])
            for bs in sizes[1:]:
                sessions[label].run(None, feeds[label][bs])
        for bs in sizes:
            times = interleaved(sessions, {k: f[bs] for k, f in feeds.items()}, job["runs"],
                                job["warmup"], job.get("seconds"))
            for label, path in files.items():
                peak = None
                if job.get("memory"):
                    npz = os.path.join(scratch, f"memfeeds-{labels.index(label)}-{bs}.npz")
                    np.savez(npz, **feeds[label][bs])
                    peak = peak_rss_mb(path, target, threads, npz)
                rows.append({"artifact": label, "batch_size": bs, "threads": threads,
                             "file_bytes": os.path.getsize(path), "times_ms": times[label],
                             "cold_start": cold[label], "peak_rss_mb": peak})
        if job.get("eval"):
            with np.load(os.path.join(workdir, job["eval"])) as data:
                x = [data[str(i)] for i in range(len(data.files))]
            step = job.get("eval_batch_size", 256)
            for label, sess in sessions.items():
                names = [i.name for i in sess.get_inputs()]
                outs = [sess.run(None, {n: np.ascontiguousarray(v[i:i + step])
                                        for n, v in zip(names, x)})[0]  # noqa: B905
                        for i in range(0, len(x[0]), step)]
                predictions[label] = _array_b64(np.concatenate(outs))
    return {"rows": rows, "predictions": predictions}


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--memprobe":
        _memprobe(argv[1])
        return 0
    workdir, job_path = argv[0], os.path.join(argv[0], argv[1])
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    info = device_info()
    if info["onnxruntime"] is None or info["numpy"] is None:
        missing = [m for m in ("onnxruntime", "numpy") if info[m] is None]
        out: dict[str, Any] = {"error": "missing-packages", "device": info, "missing": missing,
                               "detail": f"{sys.executable} cannot import {' or '.join(missing)}"}
    elif job["mode"] == "probe":
        models = os.path.join(workdir, "models")
        out = {"device": info, "have": sorted(os.listdir(models)) if os.path.isdir(models)
               else []}
    else:
        try:
            out = {"device": info, **measure(job, workdir, os.path.dirname(job_path))}
        except MemoryError as e:
            out = {"error": "out-of-memory", "device": info, "detail": str(e) or "MemoryError"}
        except Exception as e:  # reported home as one line, with onnxruntime's own words
            text = str(e).strip().splitlines()
            oom = any(t in str(e) for t in ("bad_alloc", "Failed to allocate memory"))
            kind = "out-of-memory" if oom else "failed"
            out = {"error": kind, "device": info,
                   "detail": f"{type(e).__name__}: {text[0] if text else ''}"}
    if os.path.basename(os.path.dirname(os.path.dirname(job_path))) == "jobs":
        import shutil

        shutil.rmtree(os.path.dirname(job_path), ignore_errors=True)
    print("\n" + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
