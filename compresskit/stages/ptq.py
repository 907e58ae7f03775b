"""`ptq`: post-training static quantization of the exported FP32 ONNX with onnxruntime.

QDQ format, uint8 activations and int8 weights (per channel, 7-bit with reduce_range): the only
combination onnxruntime fuses into integer kernels on x86 without VNNI (shared/facts.md).
"""

from __future__ import annotations

from compresskit.backends import quant
from compresskit.backends.ort import ModelFileError
from compresskit.config import PtqConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure import profile, quality
from compresskit.models import inputs
from compresskit.stages._int8 import calibration, hold_drop, onnx_logits, publish


def run(cfg: PtqConfig, ctx: StageContext) -> StageResult:
    source = next((a for a in reversed(ctx.artifacts) if a.get("model") == cfg.model
                   and a.get("precision") == "fp32" and a.get("format") == "onnx"), None)
    if source is None:  # validation requires an export; it may not have exported this model
        raise StageError(ctx.name, f"no FP32 ONNX of the {cfg.model} was exported before this "
                                   f"stage; add '{cfg.model}' to the export stage's models")
    fp32 = ctx.run_dir / source["path"]
    x, y = profile.eval_arrays(ctx)
    batches = [] if cfg.dynamic else [inputs.numpy(b, [i.dtype for i in ctx.config.inputs])
                                      for b in calibration(ctx, cfg.calibration_samples)]
    staged = ctx.work_dir / f"{cfg.model}.ptq.int8.onnx"
    try:
        quant.ptq(fp32, staged, batches, per_channel=cfg.per_channel,
                  reduce_range=cfg.reduce_range, dynamic=cfg.dynamic)
    except Exception as e:  # onnxruntime's quantizer raises bare exceptions on unsupported ops
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(ctx.name, f"onnxruntime could not quantize {source['path']} "
                                   f"({type(e).__name__}: {first})") from None
    try:
        reference = onnx_logits(fp32, x)
        fp32_scores = profile.score(ctx, reference, y)
        fallback = hold_drop(ctx, cfg, staged, fp32,
                             fp32_scores[quality.primary(ctx.config.task)], x, y, batches)
        metrics, artifact = publish(
            ctx, cfg, staged, f"artifacts/{cfg.model}.ptq.int8.onnx", fp32, x, y,
            {"method": "ptq", "dynamic": cfg.dynamic,
             **{f"fp32_{k}": v for k, v in fp32_scores.items()},
             "eval_split": ctx.data().eval_name,
             **({"float_fallback": fallback} if fallback else {})},
            reference=reference)
    except ModelFileError as e:
        raise StageError(ctx.name, f"{e}; nothing was written (dynamic: true quantizes only "
                         "the weights of MatMul, Gemm and Gather)") from None
    artifact["model"] = cfg.model
    return StageResult(metrics=metrics, artifacts=[artifact])
