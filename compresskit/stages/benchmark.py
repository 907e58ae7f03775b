"""`benchmark`: latency, cold start, throughput, peak memory and accuracy of every exported
artifact, measured with onnxruntime on each target (compresskit.measure.bench). Accuracy is that
of the file as the target runs it (ORT format on edge; a remote device's own outputs), on the
evaluation split."""

from __future__ import annotations

from typing import Any

from compresskit.backends import ort as ort_backend
from compresskit.backends import remote
from compresskit.config import BenchmarkConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure import bench, profile, quality
from compresskit.measure.targets import resolve
from compresskit.models import inputs
from compresskit.ops.latency import fmt_ms


def run(cfg: BenchmarkConfig, ctx: StageContext) -> StageResult:
    # The teacher's FP32 file first: it is the reference each speedup is measured against.
    artifacts = sorted((a for a in ctx.artifacts if a.get("format") == "onnx"),
                       key=lambda a: (a.get("model") != "teacher", a.get("precision") != "fp32"))
    x, y = profile.eval_arrays(ctx)
    held_out = profile.held_out_arrays(ctx)
    if cfg.verdict_on and cfg.verdict_on not in held_out:
        raise StageError(ctx.name, f"verdict_on names the held-out set '{cfg.verdict_on}', but "
                         f"the data source gives {', '.join(map(repr, held_out)) or 'none'}; "
                         "name one of those, or drop verdict_on")
    settings = bench.Settings(batch_sizes=tuple(cfg.batch_sizes), threads=cfg.threads,
                              warmup=cfg.warmup, runs=cfg.runs, seconds=cfg.seconds,
                              memory=cfg.memory)

    lengths: list[int | None] = list(cfg.lengths) if cfg.lengths else [None]
    metric = quality.primary(ctx.config.task)

    def feeds_at(length: int | None) -> Any:
        sized = x if length is None else inputs.resize(x, ctx.config.inputs, length)
        return lambda sess, bs: inputs.feeds(ort_backend.input_names(sess),
                                             ort_backend.batch_of(sized, bs))

    rows: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    failed: dict[str, str] = {}
    for name in cfg.targets:
        target = resolve(name, ctx.config.targets)
        work = ctx.work_dir / name
        files = {a["path"]: ctx.run_dir / a["path"] for a in artifacts}
        outputs: dict[str, Any] = {}
        try:
            measured = []
            for i, length in enumerate(lengths):
                if target.remote is not None:  # on the device, accuracy included
                    found, predicted = bench.measure_remote(
                        files, target, settings, feeds_at(length), work,
                        eval_x=x if i == 0 else None,
                        eval_batch_size=ctx.config.data.eval_batch_size)
                    outputs = outputs or predicted
                else:
                    found = bench.measure(files, target, settings, feeds_at(length), work)
                measured += [{**row, "length": length} if length else row for row in found]
        except ort_backend.TargetUnavailable as e:
            unavailable[name] = str(e)
            ctx.log(f"[yellow]target {name} unavailable:[/yellow] {e}; the other targets go on")
            continue
        except remote.RemoteError as e:
            failed[name] = str(e)
            ctx.log(f"[yellow]warning:[/yellow] {e}; the other targets go on, and this stage "
                    "runs again next time")
            continue
        except (ort_backend.ModelFileError, ort_backend.FeedError) as e:
            raise StageError(ctx.name, f"target {name}: {e}") from None
        held: dict[str, dict[str, dict[str, float]]] = {}
        if target.remote is not None:
            scores = {path: profile.score(ctx, out, y) for path, out in outputs.items()}
        else:
            threads = cfg.threads or target.resolved_threads()
            with ort_backend.pinned(target):
                scores = {}
                for a in artifacts:
                    sess = ort_backend.session(files[a["path"]], target, threads, work)
                    scores[a["path"]] = profile.score(ctx, ort_backend.predict(
                        sess, x, ctx.config.data.eval_batch_size), y)
                    held[a["path"]] = {name: profile.score(ctx, ort_backend.predict(
                        sess, hx, ctx.config.data.eval_batch_size), hy)
                        for name, (hx, hy) in held_out.items()}
        for row in measured:
            a = next(a for a in artifacts if a["path"] == row["artifact"])
            row.update({"model": a.get("model"), "method": a.get("method"),
                        "precision": a.get("precision"), "bytes": a["bytes"],
                        **scores[a["path"]]})
            if held.get(a["path"]):  # a remote target is scored on the evaluation split only
                row["held_out"] = held[a["path"]]
            rows.append(row)
            at = f" len={row['length']}" if row.get("length") else ""
            ctx.log(f"{name} bs={row['batch_size']}{at} {a['path']}: p50 "
                    f"{fmt_ms(row['latency_ms']['p50'])}, {quality.LABELS[metric]} "
                    f"{row[metric]:.4f}")
        if measured and measured[0].get("device"):
            ctx.log(f"{name}: {bench.describe_device(measured[0]['device'])}")
    if not rows:
        raise StageError(ctx.name, "no target could measure: " + "; ".join(
            f"{k}: {v}" for k, v in {**unavailable, **failed}.items()))
    return StageResult(metrics={"unavailable_targets": unavailable, "failed_targets": failed,
                                "verdict_tolerance": cfg.verdict_tolerance,
                                "verdict_metric": cfg.verdict_metric or metric,
                                "verdict_on": cfg.verdict_on,
                                "eval_split": ctx.data().eval_name,
                                "held_out": {name: len(hy) for name, (_, hy) in
                                             held_out.items()}}, benchmarks=rows,
                       incomplete="; ".join(failed.values()) or None)
