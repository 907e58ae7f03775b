"""Before/after measurements of a compressing stage, taken on exported ONNX files.

Params come from torch; MACs from the ONNX graph (backends/onnx_graph); size is the FP32 file;
latency is onnxruntime on the CPU at batch 1 with one thread, the two models timed interleaved;
accuracy is onnxruntime's on the evaluation split. Nothing here is estimated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from compresskit.backends import ort as ort_backend
from compresskit.backends.onnx_export import check_model, export_onnx
from compresskit.backends.onnx_graph import total_macs
from compresskit.measure import quality
from compresskit.measure.targets import TARGETS
from compresskit.models import inputs
from compresskit.models.loading import count_params
from compresskit.ops.latency import median_ratio, summarize

if TYPE_CHECKING:
    from torch import nn

    from compresskit.engine.context import StageContext


def eval_arrays(ctx: StageContext) -> tuple[Any, np.ndarray]:
    """The evaluation split as (inputs, target) arrays, inputs in the configured dtypes (a
    tuple for several inputs). The target is the integer labels for task classify, the
    teacher's embeddings of the same samples for task embed."""
    return _arrays(ctx, ctx.data().eval, ctx.data().eval_name)


def held_out_arrays(ctx: StageContext) -> dict[str, tuple[Any, np.ndarray]]:
    """The data source's other evaluation sets (`Splits.held_out`), as `eval_arrays` gives the
    evaluation split."""
    return {name: _arrays(ctx, ds, f"held_out:{name}")
            for name, ds in ctx.data().held_out.items()}


def _arrays(ctx: StageContext, ds: Any, name: str) -> tuple[Any, np.ndarray]:
    from compresskit.train.loop import unpack

    pairs = [unpack(ds[i]) for i in range(len(ds))]
    x = inputs.numpy(inputs.stack([p[0] for p in pairs]), [i.dtype for i in ctx.config.inputs])
    if ctx.config.task == "embed":
        return x, teacher_embeddings(ctx, x, name)
    return x, np.array([int(p[1]) for p in pairs])  # type: ignore[arg-type]  # checked labels


def teacher_embeddings(ctx: StageContext, x: Any, split: str = "eval") -> np.ndarray:
    """The teacher's outputs on the inputs of one evaluation set (torch, FP32), computed once
    per teacher weights and kept with the data splits."""
    from compresskit.distill.teacher_cache import weights_digest

    teacher = ctx.model("teacher")
    memo = ctx.data().memo
    key = f"teacher_embeddings:{split}:" + weights_digest(teacher)
    if key not in memo:
        memo[key] = predict_torch(teacher, x, ctx.config.data.eval_batch_size)
    return memo[key]  # type: ignore[no-any-return]


@torch.no_grad()
def predict_torch(model: nn.Module, x: Any, batch_size: int) -> np.ndarray:
    """Outputs of a torch model on the CPU for numpy inputs, in batches."""
    model = copy.deepcopy(model).cpu().eval()
    n = inputs.count(x)
    outs = [inputs.call(model, inputs.apply(inputs.take(x, slice(i, i + batch_size)),
                                            torch.from_numpy)).float().numpy()
            for i in range(0, n, batch_size)]
    return np.concatenate(outs)


def score(ctx: StageContext, outputs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return quality.score(ctx.config.task, outputs, target)


def profile(model: nn.Module, path: Path, x: Any, y: np.ndarray, opset: int = 17, *,
            task: str = "classify", specs: Any = None) -> dict[str, Any]:
    """Export `model` to `path` and measure what does not need a second model."""
    model = copy.deepcopy(model).cpu().eval()
    export_onnx(model, inputs.apply(inputs.take(x, slice(0, 2)), torch.from_numpy), path,
                opset, specs)
    check_model(path)
    sess = ort_backend.session(path, TARGETS.get("cpu"), threads=1)
    sizes = {name: spec.shape[axis] for spec in specs or [] for axis, name in spec.dynamic.items()}
    return {"params": count_params(model), "macs": total_macs(path, sizes),
            "onnx_bytes": path.stat().st_size,
            **quality.score(task, ort_backend.predict(sess, x, 256), y)}


def latency(paths: dict[str, Path], x: np.ndarray, runs: int) -> dict[str, Any]:
    """Batch-1, one-thread p50 of each file, timed round-robin; and the median of paired
    ratios of the first file's time to each other's."""
    cpu = TARGETS.get("cpu")
    sessions = {k: ort_backend.session(p, cpu, threads=1) for k, p in paths.items()}
    times = ort_backend.time_interleaved(sessions, inputs.take(x, slice(0, 1)), runs,
                                         warmup=max(5, runs // 10))
    first = next(iter(paths))
    return {"p50_ms": {k: summarize(t)["p50"] for k, t in times.items()},
            "speedup": {k: median_ratio(times[first], t) for k, t in times.items()
                        if k != first}}


def compare(before: dict[str, Any], after: dict[str, Any], speedup: float,
            metric: str = "accuracy") -> dict[str, Any]:
    """Relative changes, and a plain-words warning when latency did not follow MACs."""
    macs_cut = 1.0 - after["macs"] / max(1, before["macs"])
    latency_cut = 1.0 - 1.0 / speedup
    out: dict[str, Any] = {
        "params_ratio": round(after["params"] / max(1, before["params"]), 4),
        "macs_ratio": round(after["macs"] / max(1, before["macs"]), 4),
        "size_ratio": round(after["onnx_bytes"] / max(1, before["onnx_bytes"]), 4),
        "latency_speedup": speedup,
        f"{metric}_change": round(after[metric] - before[metric], 4),
        "warnings": [],
    }
    if macs_cut >= 0.2 and latency_cut < macs_cut / 2:
        out["warnings"].append(
            f"MACs {-100 * macs_cut:.0f}%, latency {-100 * latency_cut:+.0f}%: latency did not "
            "follow MACs. Channel counts that are not multiples of the kernels' channel block "
            "(prune's round_to; unset, it follows the target's CPU), or layers bound by memory "
            "rather than arithmetic, are the usual causes; compress the largest layers only")
    elif latency_cut < -0.03:
        out["warnings"].append(f"latency rose by {-100 * latency_cut:.0f}% (batch 1, one thread)")
    return out


def snapshot(model: nn.Module, ctx: StageContext, runs: int = 50) -> dict[str, Any] | None:
    """What a training stage's result measures as an ONNX file (MACs, FP32 bytes, batch-1
    one-thread p50), for the report's per-stage table; None when it cannot be exported here
    (the export stage then says why) or on ranks other than 0."""
    from compresskit.backends.onnx_export import ExportError
    from compresskit.engine import distributed as dist

    if not dist.is_main():
        return None
    x, y = eval_arrays(ctx)
    path = ctx.work_dir / "measured.fp32.onnx"
    try:
        found = profile(model, path, x, y, task=ctx.config.task, specs=ctx.config.inputs)
    except ExportError:
        return None
    found["latency_ms"] = latency({"model": path}, x, runs)["p50_ms"]["model"]
    path.unlink(missing_ok=True)
    return {k: found[k] for k in ("macs", "onnx_bytes", "latency_ms")}
