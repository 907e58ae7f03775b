"""Measuring ONNX files on a target: what `compresskit bench` and the benchmark stage share.

The method follows onnxruntime_perf_test, OpenVINO's benchmark_app and MLPerf: session creation
and the first inference are timed apart (cold start); warm-up runs are not counted; then the
files are run round-robin (interleaved), so machine noise hits them alike, for a number of
rounds or of seconds; each file's p50/p90/p95/p99, mean, std and min are reported with its
throughput and its median paired ratio to the first file. Peak memory is measured in a fresh
child process per file. A target that pins cores pins the whole measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit.ops.latency import fmt_ms, median_ratio, summarize
from compresskit.targets import Target

if TYPE_CHECKING:
    import numpy as np

Feeds = dict[str, "np.ndarray"]


@dataclass(frozen=True)
class Settings:
    batch_sizes: tuple[int, ...] = (1,)
    threads: int | None = None
    warmup: int = 20
    runs: int = 200
    seconds: float | None = None
    memory: bool = True


def measure(files: dict[str, Path], target: Target, settings: Settings,
            feeds_for: Callable[[Any, int], Feeds], work: Path) -> list[dict[str, Any]]:
    """One row per file and batch size. `feeds_for(session, batch_size)` gives the inputs.
    Raises ort.TargetUnavailable, ort.ModelFileError or ort.FeedError for what cannot run."""
    from compresskit.backends import ort as backend

    ok, why = backend.available(target)
    if not ok:
        raise backend.TargetUnavailable(why)
    threads = settings.threads or target.resolved_threads()
    # Conversion to ORT format is not part of any timing.
    paths = {k: backend.to_ort_format(p, work) if target.ort_format else p
             for k, p in files.items()}
    rows: list[dict[str, Any]] = []
    with backend.pinned(target):
        sessions, cold, feeds = {}, {}, {}
        for label, path in paths.items():
            probe = backend.session(path, target, threads)
            feeds[label] = {bs: feeds_for(probe, bs) for bs in settings.batch_sizes}
            del probe
            sessions[label], cold[label] = backend.cold_start(
                path, target, threads, feeds[label][settings.batch_sizes[0]])
            for bs in settings.batch_sizes[1:]:
                backend.run_once(sessions[label], feeds[label][bs])
        first = next(iter(files))
        for bs in settings.batch_sizes:
            times = backend.time_interleaved(sessions, {k: f[bs] for k, f in feeds.items()},
                                             settings.runs, settings.warmup, settings.seconds)
            for label, path in paths.items():
                stats = summarize(times[label])
                rows.append({
                    "artifact": label, "target": target.name, "batch_size": bs,
                    "threads": threads, "runs": len(times[label]),
                    "format": "ort" if path.suffix == ".ort" else "onnx",
                    "file_bytes": path.stat().st_size,
                    "latency_ms": stats,
                    "throughput_per_s": bs * 1000.0 / stats["mean"],
                    "cold_start": cold[label],
                    "peak_rss_mb": round(backend.peak_rss_mb(path, target, threads,
                                                             feeds[label][bs]), 2)
                    if settings.memory else None,
                    "speedup_vs": first,
                    "speedup": median_ratio(times[first], times[label]),
                })
    return rows


class BenchInputError(Exception):
    """Something `compresskit bench` was given that cannot be measured; one line says why."""


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    """--input-shape values: '3,224,224' (key '' = the only input) or 'name=3,224,224'."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"--input-shape '{spec}' is not a list of positive integers such "
                             "as 3,224,224 or input=3,224,224")
        out[name] = shape
    return out


def run_files(files: list[Path], targets: list[Target], settings: Settings,
              shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """`compresskit bench`: every file on every target, with synthetic inputs."""
    import tempfile

    from compresskit.backends import ort as backend

    for f in files:
        if not f.is_file():
            raise BenchInputError(f"{f}: no such file")
    labels = {str(f): f for f in files}

    def feeds_for(sess: Any, bs: int) -> Feeds:
        named = dict(shapes)
        if "" in named:
            inputs = sess.get_inputs()
            if len(inputs) != 1:
                raise backend.FeedError(
                    "the model has inputs " + ", ".join(i.name for i in inputs) + "; name "
                    "each: --input-shape NAME=DIMS")
            named[inputs[0].name] = named.pop("")
        return backend.synthetic_feeds(sess, bs, named)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for target in targets:
            try:
                rows += measure(labels, target, settings, feeds_for, Path(work) / target.name)
            except backend.TargetUnavailable as e:
                raise BenchInputError(f"target {target.name} is unavailable here: {e}") from None
            except (backend.ModelFileError, backend.FeedError) as e:
                raise BenchInputError(str(e)) from None
    return rows


def table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="onnxruntime, interleaved rounds", title_justify="left")
    for col in ("file", "target", "batch", "p50", "p90", "p99", "per s", "cold start",
                "peak MB", "vs first"):
        t.add_column(col, justify="left" if col in ("file", "target") else "right",
                     no_wrap=True)
    for r in rows:
        lat, cold, mem = r["latency_ms"], r["cold_start"], r["peak_rss_mb"]
        t.add_row(Path(r["artifact"]).name, r["target"], str(r["batch_size"]),
                  fmt_ms(lat["p50"]), fmt_ms(lat["p90"]), fmt_ms(lat["p99"]),
                  f"{r['throughput_per_s']:.0f}",
                  fmt_ms(cold["session_ms"] + cold["first_run_ms"]),
                  "-" if mem is None else f"{mem:.1f}", f"{r['speedup']:.2f}x")
    return t
