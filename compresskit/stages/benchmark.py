"""`benchmark`: latency, cold start, throughput, peak memory and accuracy of every exported
artifact, measured with onnxruntime on each target (compresskit.bench). Accuracy is that of the
file as the target runs it (ORT format on edge), on the evaluation split."""

from __future__ import annotations

from typing import Any

from compresskit import bench
from compresskit.backends import ort as ort_backend
from compresskit.config import BenchmarkConfig
from compresskit.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure import eval_arrays
from compresskit.targets import resolve


def run(cfg: BenchmarkConfig, ctx: StageContext) -> StageResult:
    # The teacher's FP32 file first: it is the reference each speedup is measured against.
    artifacts = sorted((a for a in ctx.artifacts if a.get("format") == "onnx"),
                       key=lambda a: (a.get("model") != "teacher", a.get("precision") != "fp32"))
    x, y = eval_arrays(ctx)
    settings = bench.Settings(batch_sizes=tuple(cfg.batch_sizes), threads=cfg.threads,
                              warmup=cfg.warmup, runs=cfg.runs, seconds=cfg.seconds,
                              memory=cfg.memory)

    def feeds(sess: Any, bs: int) -> dict[str, Any]:
        return {sess.get_inputs()[0].name: ort_backend.batch_of(x, bs)}

    rows: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    for name in cfg.targets:
        target = resolve(name, ctx.config.targets)
        work = ctx.work_dir / name
        files = {a["path"]: ctx.run_dir / a["path"] for a in artifacts}
        try:
            measured = bench.measure(files, target, settings, feeds, work)
        except ort_backend.TargetUnavailable as e:
            unavailable[name] = str(e)
            ctx.log(f"[yellow]target {name} unavailable:[/yellow] {e}; the other targets go on")
            continue
        except (ort_backend.ModelFileError, ort_backend.FeedError) as e:
            raise StageError(ctx.name, f"target {name}: {e}") from None
        threads = cfg.threads or target.resolved_threads()
        with ort_backend.pinned(target):
            accuracy = {}
            for a in artifacts:
                sess = ort_backend.session(files[a["path"]], target, threads, work)
                accuracy[a["path"]] = float((ort_backend.predict(
                    sess, x, ctx.config.data.eval_batch_size).argmax(1) == y).mean())
        for row in measured:
            a = next(a for a in artifacts if a["path"] == row["artifact"])
            row.update({"model": a.get("model"), "method": a.get("method"),
                        "precision": a.get("precision"), "bytes": a["bytes"],
                        "accuracy": accuracy[a["path"]]})
            rows.append(row)
            ctx.log(f"{name} bs={row['batch_size']} {a['path']}: p50 "
                    f"{row['latency_ms']['p50']:.3f} ms, acc {row['accuracy']:.4f}")
    if not rows:
        raise StageError(ctx.name, "no target could run here: " + "; ".join(
            f"{k}: {v}" for k, v in unavailable.items()))
    return StageResult(metrics={"unavailable_targets": unavailable,
                                "verdict_tolerance": cfg.verdict_tolerance}, benchmarks=rows)
