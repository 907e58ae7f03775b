"""`qat`: quantization-aware training with NNCF and distillation, written as INT8 ONNX.

BatchNorm is folded into its convolution first, so onnxruntime can fuse every quantized conv into
QLinearConv; NNCF inserts and calibrates fake quantizers; our training loop fine-tunes with the
KD loss; `nncf.strip` leaves torch fake-quantize ops that the TorchScript exporter writes as
QuantizeLinear/DequantizeLinear pairs; the weights are then stored as int8. The FP32 student is
not changed: `export` still writes it, and the benchmark compares the two files. The weights
written are the trained ones, or the calibrated ones from before training when training lowered
validation accuracy beyond chance (`keep: better`, a sign test on the samples the two disagree
on) or lost more than `max_drop` on the evaluation split.

Under torchrun every rank quantizes and trains (DistributedDataParallel starts them from rank
0's quantizers and averages gradients); rank 0 alone exports, checks and writes the file.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from compresskit.backends import quant
from compresskit.backends.onnx_export import ExportError, export_onnx
from compresskit.backends.ort import ModelFileError
from compresskit.config import QatConfig
from compresskit.engine import distributed as dist
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure import profile, quality
from compresskit.models import inputs
from compresskit.models.loading import example_input
from compresskit.stages._int8 import (
    agreement,
    agrees,
    calibration,
    hold_drop,
    onnx_logits,
    publish,
    shown,
)
from compresskit.stages._shrink import fine_tune, matching
from compresskit.train.loop import has_labels, predict


def run(cfg: QatConfig, ctx: StageContext) -> StageResult:
    x, y = profile.eval_arrays(ctx)
    student = copy.deepcopy(ctx.model(cfg.model)).cpu().eval()
    if dist.is_main():
        matching(cfg.ignore, student, ctx)  # warns about patterns that match nothing
    folded = quant.fold_batchnorm(student, inputs.apply(inputs.take(x, slice(0, 8)),
                                                        torch.from_numpy))
    batches = calibration(ctx, cfg.calibration_samples)
    try:
        model = quant.nncf_quantize(student, batches,
                                    preset=cfg.preset, ignore=cfg.ignore,
                                    overflow_fix=cfg.reduce_range, per_channel=cfg.per_channel)
    except quant.QuantError as e:
        raise StageError(ctx.name, str(e)) from None
    teacher = None if not cfg.distill else ctx.model("teacher") if cfg.kd_from == "teacher" \
        else copy.deepcopy(ctx.model(cfg.model)).cpu().eval()  # its own FP32 self
    # The calibrated weights, kept for `keep: better` and for `max_drop`.
    calibrated = copy.deepcopy(model.state_dict()) if cfg.epochs and (
        cfg.keep == "better" or cfg.max_drop is not None) else None
    judge = calibrated is not None and cfg.keep == "better" and \
        ctx.config.task == "classify" and has_labels(ctx.data().val)
    before = _val_correct(ctx, model) if judge else None
    loss = fine_tune(ctx, model, cfg.options(cfg.epochs), teacher, cfg, cfg.model, cfg.model,
                     hint="; QAT wants a small lr (1e-4)") if cfg.epochs else None
    kept = None
    if before is not None and calibrated is not None:
        # Every rank holds the same weights after training and scores the whole split, so all
        # ranks choose alike. Training is kept unless it lost beyond chance: on a small split a
        # sample or two either way is noise, and choosing on it is a coin toss.
        after = _val_correct(ctx, model)
        worse, test = quality.worse_beyond_chance(before, after)
        kept = {"kept": "calibrated" if worse else "trained", "by": "validation",
                "val_accuracy_calibrated": float(before.mean()),
                "val_accuracy_trained": float(after.mean()),
                "val_samples_lost": test["lost"], "val_samples_gained": test["gained"],
                "p_value": test["p_value"]}
        if worse:
            model.load_state_dict(calibrated)
            ctx.log(f"QAT's training lowered validation accuracy beyond chance "
                    f"({before.mean():.4f} calibrated, {after.mean():.4f} trained; "
                    f"{test['lost']} samples lost, {test['gained']} gained, "
                    f"p={test['p_value']:.3g}): the calibrated weights are kept (keep: better)")
    if not dist.is_main():  # the other ranks' part ends with the training
        return StageResult(metrics={})
    if cfg.max_drop is not None and calibrated is not None and \
            (kept is None or kept["kept"] == "trained"):
        kept = _budget_weights(cfg.max_drop, cfg, ctx, model, calibrated, x, y) or kept
    ranks = dist.world_size()
    with dist.alone():
        try:
            result = _write(cfg, ctx, model, x, y, folded, batches, loss)
        except ModelFileError as e:
            raise StageError(ctx.name, f"{e}; nothing was written") from None
    result.metrics["trained_on_ranks"] = ranks
    if kept is not None:
        result.metrics["kept_weights"] = kept
    return result


def _val_correct(ctx: StageContext, model: torch.nn.Module) -> np.ndarray:
    """Per sample of the validation split, whether the model's top-1 class is its label."""
    logits, labels = predict(model.to(ctx.device), ctx.data().val,
                             ctx.config.data.eval_batch_size, ctx.device)
    model.cpu().eval()
    return (logits.argmax(dim=1) == labels).numpy()


def _budget_weights(budget: float, cfg: QatConfig, ctx: StageContext, model: torch.nn.Module,
                    calibrated: dict[str, torch.Tensor], x: Any, y: Any) -> dict[str, Any] | None:
    """`max_drop`, first lever: when the fake-quantized model as trained loses more than the
    budget against the FP32 model on the evaluation split (the split max_drop is measured on),
    and the calibrated weights, before training, lose less, those are written instead (what
    running QAT with fewer epochs would give). Layers kept in float, the second lever, come
    after, in `hold_drop`."""
    task = ctx.config.task

    def score(m: torch.nn.Module) -> float:
        with torch.no_grad():
            out = inputs.call(m.cpu().eval(), inputs.apply(x, torch.from_numpy))
        return quality.main(task, out.float().numpy(), y)

    fp32 = score(copy.deepcopy(ctx.model(cfg.model)))
    trained = score(model)
    if (fp32 - trained) * 100 <= budget:
        return None
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict(calibrated)
    before = score(model)
    if before <= trained:
        model.load_state_dict(state)
        return None
    metric = quality.LABELS[quality.primary(task)]
    ctx.log(f"QAT's training lost {(fp32 - trained) * 100:.2f} points of {metric} on the "
            f"evaluation split (max_drop {budget}); the calibrated weights, before "
            f"training, lose {(fp32 - before) * 100:.2f}: those are written")
    return {"kept": "calibrated", "by": "max_drop", "eval_drop_trained": (fp32 - trained) * 100,
            "eval_drop_calibrated": (fp32 - before) * 100}


def _write(cfg: QatConfig, ctx: StageContext, model: torch.nn.Module, x: Any, y: Any,
           folded: list[str], batches: list[torch.Tensor], loss: float | None) -> StageResult:
    """Rank 0: the FP32 file to compare with, the INT8 file, its checks, and publishing it."""
    work = ctx.work_dir
    fp32_path = work / f"{cfg.model}.fp32.onnx"
    try:
        fp32 = profile.profile(copy.deepcopy(ctx.model(cfg.model)).cpu().eval(), fp32_path,
                               x, y, cfg.opset, task=ctx.config.task, specs=ctx.config.inputs)
    except ExportError as e:
        raise StageError(ctx.name, f"the FP32 {cfg.model} cannot be exported: {e}") from None
    model.cpu().eval()
    example = example_input(ctx.config.inputs, batch=2)
    stripped = quant.strip(model, example)
    with torch.no_grad():
        reference = inputs.call(stripped, inputs.apply(x, torch.from_numpy)).float().numpy()
    staged = work / f"{cfg.model}.int8.onnx"
    try:
        export_onnx(stripped, example, staged, cfg.opset, ctx.config.inputs)
    except ExportError as e:
        raise StageError(ctx.name, f"the quantized {cfg.model} cannot be exported: {e}"
                         ) from None
    quant.drop_identity_batchnorms(staged)
    try:
        fake_quantize = quant.fake_quantize_as_qdq(staged)
    except quant.QuantError as e:
        raise StageError(ctx.name, str(e)) from None
    rewritten = quant.int8_weights(staged)
    saturated = quant.drop_saturated_activations(staged)
    unsigned = quant.unsigned_activations(staged)
    # The file says what the fake-quantized torch model computes (exported faithfully)...
    try:
        simulated = onnx_logits(staged, x, simulate=True)
    except ModelFileError as e:
        raise StageError(ctx.name, f"the quantized {cfg.model} was exported, but {e}") from None
    fidelity = agreement(simulated, reference, cfg.logit_tol)
    if not agrees(fidelity, cfg.logit_tol, cfg.min_agreement):
        raise StageError(ctx.name, "the exported QDQ graph disagrees with the fake-quantized "
                         f"torch model: {shown(fidelity, cfg.logit_tol, cfg.min_agreement)}; "
                         "nothing was written")
    # ... then quantizers NNCF did not place are added, and `publish` checks that onnxruntime's
    # integer kernels compute what the final graph says.
    closed = quant.close_qdq(staged, batches)
    quant.shapes_past_quantizers(staged)
    method = ("qat+kd" if cfg.kd_from == "teacher" else "qat+self-kd") if cfg.distill else "qat"
    metric = quality.primary(ctx.config.task)
    fallback = hold_drop(ctx, cfg, staged, fp32_path, fp32[metric], x, y, batches,
                         trained_score=quality.main(ctx.config.task, reference, y))
    metrics, artifact = publish(
        ctx, cfg, staged, cfg.artifact(), fp32_path, x, y,
        {"method": method, f"fp32_{metric}": fp32[metric],
         f"fake_quant_{metric}": quality.main(ctx.config.task, reference, y),
         "folded_batchnorm": folded, "int8_weight_tensors": rewritten, "final_loss": loss,
         "dropped_activations": saturated, "unsigned_activation_quantizers": unsigned,
         "added_quantizers": closed, "export_fidelity": fidelity,
         "fake_quantize_rewritten": fake_quantize,
         "eval_split": ctx.data().eval_name,
         **({"float_fallback": fallback} if fallback else {})},
        reference=onnx_logits(staged, x, simulate=True), logit_tol=cfg.logit_tol,
        min_agreement=cfg.min_agreement)
    fp32_path.unlink(missing_ok=True)
    artifact["model"] = cfg.model
    if not np.isfinite(metrics[metric]):
        raise StageError(ctx.name, "the INT8 model produced no finite outputs")
    return StageResult(metrics=metrics, artifacts=[artifact])
