"""`export`: FP32 ONNX with a dynamic batch axis, checked by onnx.checker and for parity with
torch on real evaluation inputs. A model that fails either check leaves no file behind."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from compresskit.backends import ort as ort_backend
from compresskit.backends.onnx_export import (
    OUTPUT_NAME,
    ExportError,
    check_model,
    export_onnx,
)
from compresskit.config import ExportConfig
from compresskit.data.sources import describe_source
from compresskit.engine.artifacts import Artifact, atomic_path, sha256_file
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure import quality
from compresskit.measure.profile import eval_arrays
from compresskit.measure.targets import TARGETS
from compresskit.models import inputs
from compresskit.report import bundle


def eval_inputs(ctx: StageContext, n: int) -> Any:
    from compresskit.train.loop import unpack

    ds = ctx.data().eval
    n = min(n, len(ds))  # type: ignore[arg-type]  # map-style, checked by data.load_data
    return inputs.numpy(inputs.stack([unpack(ds[i])[0] for i in range(n)]),
                        [i.dtype for i in ctx.config.inputs])


def parity(model: torch.nn.Module, onnx_path: object, x: Any, atol: float,
           rtol: float) -> dict[str, float | bool]:
    """Compare torch and onnxruntime outputs on the same real inputs. Each sample's outputs
    may differ by atol + rtol x the largest of them: float error follows the size of the
    values a sample computes with, so a logit near zero in a vector of logits near 20 is held
    to the vector's scale, not to its own (it would fail on rounding alone)."""
    with torch.no_grad():
        ref = inputs.call(model, inputs.apply(x, torch.from_numpy)).float().numpy()
    sess = ort_backend.session(onnx_path, TARGETS.get("cpu"), threads=1)  # type: ignore[arg-type]
    got = ort_backend.predict(sess, x, batch_size=256).astype(np.float32)
    diff = np.abs(got - ref)
    scale = np.abs(ref).reshape(len(ref), -1).max(axis=1).reshape((-1,) + (1,) * (ref.ndim - 1))
    return {
        "max_abs_diff": float(diff.max()),
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "min_cosine": float(min(quality.mean_cosine(got[i:i + 1], ref[i:i + 1])
                                for i in range(len(got)))),
        "within_tolerance": bool(np.all(diff <= atol + rtol * scale)),
        "samples": inputs.count(x),
    }


def run(cfg: ExportConfig, ctx: StageContext) -> StageResult:
    x = eval_inputs(ctx, cfg.parity_samples)
    example = inputs.apply(inputs.take(x, slice(0, 2)), torch.from_numpy)
    artifacts: list[Artifact] = []
    checks: dict[str, Any] = {}
    for role in cfg.models_needed:
        model = copy.deepcopy(ctx.model(role)).cpu().eval()
        rel = f"artifacts/{role}.fp32.onnx"
        path = ctx.run_dir / rel
        try:
            with atomic_path(path) as tmp:
                export_onnx(model, example, tmp, cfg.opset, ctx.config.inputs)
                check_model(tmp)
                result = parity(model, tmp, x, cfg.atol, cfg.rtol)
                if not result["within_tolerance"]:
                    raise ExportError(
                        f"onnxruntime's output differs from torch's by up to "
                        f"{result['max_abs_diff']:.3g} (atol {cfg.atol}, rtol {cfg.rtol}, top-1 "
                        f"agreement {result['top1_agreement']:.4f}); nothing was written")
        except ExportError as e:
            raise StageError(ctx.name, f"{role}: {e}") from None
        checks[role] = result
        agree = f"top-1 agreement {result['top1_agreement']:.4f}" \
            if ctx.config.task == "classify" else f"lowest cosine {result['min_cosine']:.6f}"
        ctx.log(f"{rel}: {path.stat().st_size / 1024:.1f} KiB, parity max |diff| "
                f"{result['max_abs_diff']:.2e}, {agree}")
        artifacts.append({
            "path": rel, "format": "onnx", "precision": "fp32", "model": role,
            "bytes": path.stat().st_size, "sha256": sha256_file(path), "opset": cfg.opset,
            "input": [i.name for i in ctx.config.inputs], "output": OUTPUT_NAME,
        })
    metrics: dict[str, object] = {"parity": checks}
    if cfg.bundle:
        role = cfg.bundle_model or ("student" if "student" in cfg.models else cfg.models[0])
        int8 = bundle.pick(ctx.artifacts, role) if cfg.bundle_precision == "int8" else None
        source = int8 or next(
            (a for a in artifacts if a["model"] == role), None)
        if source is None:
            raise StageError(ctx.name, f"bundle_model '{role}' was not exported; add it to "
                                       "'models' or set bundle: false")
        xs, ys = eval_arrays(ctx)
        data = ctx.data()
        records = bundle.build(ctx.run_dir, source, ctx.work_dir, xs, ys, {
            "name": ctx.config.name, "split": data.eval_name, "labels": data.labels,
            "task": ctx.config.task,
            "preprocessing": describe_source(ctx.config.data.source)})
        artifacts += records
        metrics["bundle"] = {"from": source["path"], "files": [r["path"] for r in records]}
        ctx.log(f"artifacts/bundle.zip: {source['path']} as ONNX and ORT format, operator "
                "config, manifest.json, README.md")
    return StageResult(metrics=metrics, artifacts=artifacts)
