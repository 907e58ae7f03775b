"""`benchmark`: latency, throughput, peak memory and accuracy of every exported artifact, measured
with onnxruntime on each target. Artifacts are timed interleaved, so noise hits them alike."""

from __future__ import annotations

from compresskit.backends import ort as ort_backend
from compresskit.config import BenchmarkConfig
from compresskit.context import StageContext, StageResult
from compresskit.measure import eval_arrays
from compresskit.ops.latency import median_ratio, summarize
from compresskit.targets import TARGETS


def run(cfg: BenchmarkConfig, ctx: StageContext) -> StageResult:
    # The teacher's FP32 file first: it is the reference each speedup is measured against.
    artifacts = sorted((a for a in ctx.artifacts if a.get("format") == "onnx"),
                       key=lambda a: (a.get("model") != "teacher", a.get("precision") != "fp32"))
    x, y = eval_arrays(ctx)
    rows: list[dict] = []
    unavailable: dict[str, str] = {}
    for name in cfg.targets:
        target = TARGETS.get(name)
        ok, reason = ort_backend.available(target)
        if not ok:
            unavailable[name] = reason
            ctx.log(f"target {name} unavailable: {reason}")
            continue
        threads = cfg.threads or target.resolved_threads()
        sessions = {a["path"]: ort_backend.session(ctx.run_dir / a["path"], target, threads)
                    for a in artifacts}
        accuracy = {
            k: float((ort_backend.predict(s, x, ctx.config.data.eval_batch_size).argmax(1)
                      == y).mean())
            for k, s in sessions.items()}
        for bs in cfg.batch_sizes:
            feed = ort_backend.batch_of(x, bs)
            times = ort_backend.time_interleaved(sessions, feed, cfg.runs, cfg.warmup)
            reference = artifacts[0]["path"]
            for a in artifacts:
                ms = times[a["path"]]
                stats = summarize(ms)
                row = {
                    "artifact": a["path"], "model": a.get("model"), "method": a.get("method"),
                    "precision": a.get("precision"), "target": name, "batch_size": bs,
                    "threads": threads, "runs": cfg.runs,
                    "latency_ms": {k: round(v, 4) for k, v in stats.items()},
                    "throughput_per_s": round(bs * 1000.0 / stats["mean"], 2),
                    "peak_rss_mb": None, "accuracy": accuracy[a["path"]], "bytes": a["bytes"],
                    "speedup_vs": reference,
                    "speedup": round(median_ratio(times[reference], ms), 3),
                }
                if cfg.memory:
                    row["peak_rss_mb"] = round(ort_backend.peak_rss_mb(
                        ctx.run_dir / a["path"], name, threads, list(feed.shape),
                        ctx.config.input.dtype), 2)
                rows.append(row)
                ctx.log(f"{name} bs={bs} {a['path']}: p50 {stats['p50']:.3f} ms, "
                        f"acc {accuracy[a['path']]:.4f}")
    return StageResult(metrics={"unavailable_targets": unavailable}, benchmarks=rows)
