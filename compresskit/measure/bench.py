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

from compresskit.measure.targets import Target
from compresskit.ops.latency import fmt_ms, median_ratio, summarize

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
    Raises ort.TargetUnavailable, ort.ModelFileError or ort.FeedError for what cannot run,
    and remote.RemoteError for a device that cannot be reached or cannot measure."""
    if target.remote is not None:
        return measure_remote(files, target, settings, feeds_for, work)[0]
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
        for bs in settings.batch_sizes:
            times = backend.time_interleaved(sessions, {k: f[bs] for k, f in feeds.items()},
                                             settings.runs, settings.warmup, settings.seconds)
            for label, path in paths.items():
                peak = backend.peak_rss_mb(path, target, threads, feeds[label][bs]) \
                    if settings.memory else None
                rows.append(_row(label, target, bs, threads, path, path.stat().st_size,
                                 times, cold[label], peak))
    return rows


def _row(label: str, target: Target, bs: int, threads: int, path: Path, size: int,
         times: dict[str, list[float]], cold: dict[str, float],
         peak: float | None) -> dict[str, Any]:
    """One measured row: statistics of the raw per-run timings, compared with the first file
    of the same interleaved rounds."""
    stats = summarize(times[label])
    first = next(iter(times))
    return {
        "artifact": label, "target": target.name, "batch_size": bs, "threads": threads,
        "runs": len(times[label]), "format": "ort" if path.suffix == ".ort" else "onnx",
        "file_bytes": size, "latency_ms": stats,
        "throughput_per_s": bs * 1000.0 / stats["mean"], "cold_start": cold,
        "peak_rss_mb": None if peak is None else round(peak, 2),
        "speedup_vs": first, "speedup": median_ratio(times[first], times[label]),
    }


def measure_remote(files: dict[str, Path], target: Target, settings: Settings,
                   feeds_for: Callable[[Any, int], Feeds], work: Path, eval_x: Any = None,
                   eval_batch_size: int = 256) -> tuple[list[dict[str, Any]],
                                                        dict[str, Any]]:
    """The same protocol on the target's device (backends/remote.py): inputs made here from
    each file's input signature, timed there; rows carry the device's description. With
    `eval_x`, also each file's outputs on it as the device computes them."""
    from compresskit.backends import ort as backend
    from compresskit.backends import remote
    from compresskit.measure.targets import TARGETS

    assert target.remote is not None
    paths = {k: backend.to_ort_format(p, work) if target.ort_format else p
             for k, p in files.items()}
    feeds = {}
    for label, path in files.items():
        probe = backend.session(path, TARGETS.get("cpu"), 1)  # input names and shapes only
        feeds[label] = {bs: feeds_for(probe, bs) for bs in settings.batch_sizes}
        del probe
    answer = remote.measure(
        target.remote, target.name, paths, {**target.to_json(), "remote": None},
        settings.threads or target.threads, settings.batch_sizes, settings.runs,
        settings.warmup, settings.seconds, settings.memory, feeds, eval_x, eval_batch_size)
    rows = []
    for bs in settings.batch_sizes:
        measured = [r for r in answer["rows"] if r["batch_size"] == bs]
        times = {r["artifact"]: r["times_ms"] for r in measured}
        for r in measured:
            rows.append({**_row(r["artifact"], target, bs, r["threads"], paths[r["artifact"]],
                                r["file_bytes"], times, r["cold_start"], r["peak_rss_mb"]),
                         "device": answer["device"]})
    return rows, answer["predictions"]


class BenchInputError(Exception):
    """Something `compresskit bench` was given that cannot be measured; one line says why."""


class DeviceError(Exception):
    """Remote targets could not measure; `rows` holds what the other targets measured."""

    def __init__(self, message: str, rows: list[dict[str, Any]]):
        super().__init__(message)
        self.rows = rows


def load_targets(path: Path) -> dict[str, Any]:
    """Targets defined in a YAML file, under `targets:` as in a pipeline file (a pipeline file
    itself works): name -> TargetConfig."""
    import yaml
    from pydantic import ValidationError

    from compresskit.config import TargetConfig

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BenchInputError(f"--targets-file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise BenchInputError(f"--targets-file {path} is not valid YAML: "
                              f"{str(e).splitlines()[0]}") from None
    section = data.get("targets") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not section:
        raise BenchInputError(f"--targets-file {path} has no 'targets:' mapping; write "
                              "targets: {pi: {ssh: user@host}}")
    out = {}
    for name, spec in section.items():
        try:
            out[str(name)] = TargetConfig.model_validate(spec or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BenchInputError(f"--targets-file {path}: targets.{name}"
                                  f"{'.' + where if where else ''}: {first['msg']}") from None
    return out


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
    from compresskit.backends import remote

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
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        for target in targets:
            try:
                rows += measure(labels, target, settings, feeds_for, Path(work) / target.name)
            except backend.TargetUnavailable as e:
                raise BenchInputError(f"target {target.name} is unavailable here: {e}") from None
            except (backend.ModelFileError, backend.FeedError) as e:
                raise BenchInputError(str(e)) from None
            except remote.RemoteError as e:  # the other targets still measure
                failed.append(str(e))
    if failed:
        raise DeviceError("; ".join(failed), rows)
    return rows


def describe_device(device: dict[str, Any]) -> str:
    """One line on what a remote measurement ran on."""
    from compresskit.report import device_line

    return f"device: {device_line(device)}"


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
