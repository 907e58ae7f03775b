"""What the INT8 stages (qat, ptq) share: the checks an INT8 file must pass before it is written,
and its measurements against the FP32 file of the same model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compresskit.backends import ort as ort_backend
from compresskit.backends import quant
from compresskit.backends.onnx_export import ExportError, check_model
from compresskit.config import Int8Options
from compresskit.engine.artifacts import Artifact, atomic_path, sha256_file
from compresskit.engine.context import StageContext
from compresskit.errors import StageError
from compresskit.measure import profile, quality
from compresskit.measure.targets import TARGETS
from compresskit.ops.latency import fmt_ms


def calibration(ctx: StageContext, samples: int) -> list[torch.Tensor]:
    """The first `samples` training inputs, in batches, in a fixed order."""
    from compresskit.models.inputs import as_tensors, count, take
    from compresskit.train.loop import loader, unpack

    out, n = [], 0
    for sample in loader(ctx.data().train, ctx.config.data.batch_size, shuffle=False, seed=0):
        x = as_tensors(unpack(sample)[0])
        out.append(take(x, slice(0, samples - n)))
        n += count(out[-1])
        if n >= samples:
            break
    return out


def onnx_logits(path: Path, x: Any, *, simulate: bool = False) -> np.ndarray:
    """What onnxruntime computes from the file: with its integer kernels, or with `simulate`
    unoptimised, so each QuantizeLinear/DequantizeLinear pair runs as written, in float."""
    target = TARGETS.get("cpu")
    if simulate:
        target = dataclasses.replace(target, optimization="disable")
    sess = ort_backend.session(path, target, threads=1)
    try:
        return ort_backend.predict(sess, x, 256).astype(np.float32)
    except Exception as e:  # onnxruntime's own errors: a file it loads but cannot run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ort_backend.ModelFileError(f"onnxruntime cannot run {path.name}: {first}"
                                         ) from None


def agreement(logits: np.ndarray, reference: np.ndarray, tol: float | None) -> dict[str, Any]:
    """How far `logits` are from `reference`: the largest difference, also as a share of the
    reference's range, and the 99th percentile over samples of each sample's largest difference
    (a rounding step that cascades through a deep network moves one sample in a few hundred;
    a wrong kernel moves them all; below 200 samples, the difference that leaves CASCADES
    samples out); top-1 agreement on all samples, and on the decisive ones,
    whose top two reference logits differ by more than `tol` of the range (closer ones are ties
    that integer rounding may flip, common in a barely trained model).

    With `tol` given, a decisive sample that flipped among the samples the 99th percentile
    leaves out (a rounding cascade, which logit_tol accepts) is excused, not counted: the two
    checks accept the same cascades. timm's rexnet_100 had 18 decisive samples of 160 and one
    of them flipped, the sample that moved most (0.11 of the range, p99 0.07): 0.944 against
    min_agreement 0.97 from one rounding cascade."""
    diff = np.abs(logits - reference)
    spread = float(reference.max() - reference.min()) or 1.0
    per_sample = diff.reshape(len(diff), -1).max(axis=1)
    tail = float(np.quantile(per_sample, _tail(len(per_sample))))
    same = logits.argmax(1) == reference.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else None
    decisive = (top2[:, 1] - top2[:, 0] > (tol or 0.0) * spread) if top2 is not None \
        else np.ones(len(same), bool)
    excused = decisive & ~same & (per_sample > tail) if tol is not None \
        else np.zeros(len(same), bool)
    counted = decisive & ~excused
    return {"max_abs_diff": float(diff.max()), "max_diff_of_range": float(diff.max()) / spread,
            "p99_diff_of_range": tail / spread,
            "top1_agreement": float(same.mean()),
            "decisive_top1_agreement": float(same[counted].mean()) if counted.any() else 1.0,
            "decisive_samples": int(counted.sum()), "excused_flips": int(excused.sum()),
            "samples": len(logits)}


CASCADES = 2
"""Samples a rounding cascade may move, however few the samples: on 160 the 99th percentile is
the second-largest difference, which one cascade too many would decide."""


def _tail(n: int) -> float:
    """The quantile of per-sample differences logit_tol holds at: the 99th percentile, or with
    fewer than 200 samples the one that leaves CASCADES samples out."""
    return max(0.5, min(0.99, 1.0 - CASCADES / max(n, 1)))


def shown(found: dict[str, Any], logit_tol: float | None, min_agreement: float | None) -> str:
    return (f"top-1 agreement {found['decisive_top1_agreement']:.4f} on the "
            f"{found['decisive_samples']} samples that are no near-ties (min_agreement "
            f"{min_agreement}), logit difference {found['p99_diff_of_range']:.3g} of the logit "
            f"range at the 99th percentile of samples (logit_tol {logit_tol}), "
            f"{found['max_diff_of_range']:.3g} at most")


def agrees(found: dict[str, Any], logit_tol: float | None, min_agreement: float | None) -> bool:
    return not ((logit_tol is not None and found["p99_diff_of_range"] > logit_tol) or (
        min_agreement is not None and found["decisive_top1_agreement"] < min_agreement))


def publish(ctx: StageContext, cfg: Int8Options, staged: Path, rel: str, fp32: Path,
            x: Any, y: np.ndarray, extra: dict[str, Any],
            reference: np.ndarray | None = None, logit_tol: float | None = None,
            min_agreement: float | None = None) -> tuple[dict[str, Any], Artifact]:
    """Check an INT8 file (onnx.checker, integer coverage, parity with `reference` logits when
    given), measure it against `fp32`, then move it to run_dir/rel. Nothing is written on
    failure, so earlier artifacts stay as they were."""
    try:
        check_model(staged)
        ort_backend.session(staged, TARGETS.get("cpu"), threads=1)
    except (ExportError, ort_backend.ModelFileError) as e:
        raise StageError(ctx.name, str(e)) from None
    # MACs counted on the FP32 graph: a dynamically quantized file has no MatMul left to count.
    coverage = quant.int8_coverage(fp32, quant.optimized_graph(
        staged, ctx.work_dir / "int8.optimized.onnx"))
    if coverage["int8_coverage"] < cfg.min_int8_coverage:
        floats = ", ".join(coverage["float_nodes"][:8]) or "none found"
        raise StageError(ctx.name, (
            f"only {coverage['int8_coverage']:.1%} of the MACs run in integer kernels after "
            f"onnxruntime's optimisation (min_int8_coverage {cfg.min_int8_coverage}); still "
            f"float: {floats}. Layers in 'ignore', or ops between a conv and its activation "
            "that onnxruntime cannot fuse, keep a layer float; lower min_int8_coverage to "
            "accept it"))
    logits = onnx_logits(staged, x)
    metric = quality.primary(ctx.config.task)
    metrics: dict[str, Any] = {**extra, **{k: coverage[k] for k in (
        "int8_coverage", "float_nodes", "op_counts")}, **profile.score(ctx, logits, y)}
    if reference is not None:
        parity = metrics["parity"] = agreement(logits, reference, logit_tol)
        if not agrees(parity, logit_tol, min_agreement):
            raise StageError(ctx.name, (
                "onnxruntime's integer kernels disagree with the file's own QDQ graph: "
                + shown(parity, logit_tol, min_agreement) + ". On CPUs without VNNI keep "
                "reduce_range: true; nothing was written"))
    timing = profile.latency({"fp32": fp32, "int8": staged}, x, 100)
    metrics.update({
        "fp32_bytes": fp32.stat().st_size, "int8_bytes": staged.stat().st_size,
        "size_ratio": round(staged.stat().st_size / fp32.stat().st_size, 4),
        "latency_ms": timing["p50_ms"], "speedup_vs_fp32": timing["speedup"]["int8"]})
    final = ctx.run_dir / rel
    with atomic_path(final) as tmp:
        shutil.copyfile(staged, tmp)
    staged.unlink()
    ctx.log(f"{rel}: int8_coverage {metrics['int8_coverage']:.3f}, {quality.LABELS[metric]} "
            f"{metrics[metric]:.4f}, {metrics['size_ratio']:.2f}x the FP32 file, batch-1 "
            f"{fmt_ms(timing['p50_ms']['fp32'])} -> {fmt_ms(timing['p50_ms']['int8'])} "
            f"({metrics['speedup_vs_fp32']:.2f}x)")
    artifact: Artifact = {"path": rel, "format": "onnx", "precision": "int8", "model": None,
                "method": extra.get("method"), "bytes": final.stat().st_size,
                "sha256": sha256_file(final), "int8_coverage": metrics["int8_coverage"]}
    return metrics, artifact



TIMED_CANDIDATES = 16
"""At most this many layers (those whose float version regains most) are timed for max_drop."""


def hold_drop(ctx: StageContext, cfg: Int8Options, staged: Path, fp32: Path, fp32_score: float,
              x: Any, y: np.ndarray, batches: list[Any],
              trained_score: float | None = None) -> dict[str, Any] | None:
    """`max_drop`: when the INT8 file loses more than `cfg.max_drop` points of the task's
    metric against the FP32 model on the evaluation split, keep layers in float, greedily by
    error regained per measured millisecond, until the drop holds; `staged` is rewritten.

    Which layers, and in what order, is decided on training inputs (the calibration samples):
    each layer alone in float, its outputs' squared error to the FP32 file's, and its latency
    timed against the all-INT8 file, interleaved. The evaluation split only says when to stop.
    Layers that would take the INT8 coverage under `min_int8_coverage` are passed over; the
    stage fails when no allowed choice holds the drop. `trained_score`: QAT's model as it
    trained, fake-quantized in torch; when that alone loses more than the budget, the failure
    says so (training moved the model, which no layer in float undoes)."""
    if cfg.max_drop is None:
        return None
    from compresskit.models import inputs

    task = ctx.config.task
    metric = quality.primary(task)

    def drop(path: Path) -> float:
        return (fp32_score - quality.main(task, onnx_logits(path, x), y)) * 100

    before = drop(staged)
    found: dict[str, Any] = {"max_drop": cfg.max_drop, "drop_before": before, "drop": before,
                             "kept_float": []}
    if before <= cfg.max_drop:
        return found
    xs = inputs.numpy(inputs.cat(batches), [i.dtype for i in ctx.config.inputs])
    reference = onnx_logits(fp32, xs)
    scale = max(float(np.mean(reference.astype(np.float64) ** 2)), 1e-12)

    def error(path: Path) -> float:
        return float(np.mean((onnx_logits(path, xs) - reference) ** 2)) / scale

    work = ctx.work_dir / "float-fallback"
    work.mkdir(parents=True, exist_ok=True)
    base_error = error(staged)
    variants: dict[str, Path] = {}
    regained: dict[str, float] = {}
    for i, layer in enumerate(quant.integer_layers(staged)):
        variants[layer] = work / f"layer{i}.onnx"
        quant.keep_float(staged, variants[layer], [layer])
        regained[layer] = base_error - error(variants[layer])
    helpful = sorted((k for k, v in regained.items() if v > 0), key=regained.__getitem__,
                     reverse=True)[:TIMED_CANDIDATES]
    if not helpful:
        raise StageError(ctx.name, (
            f"the INT8 file loses {before:.2f} points of {quality.LABELS[metric]} (max_drop "
            f"{cfg.max_drop}) and no single layer in float brings its outputs closer to the "
            "FP32 file's; raise max_drop, or train longer"))
    timing = profile.latency({"int8": staged, **{k: variants[k] for k in helpful}}, x, 50)
    base_ms = timing["p50_ms"]["int8"]
    cost = {k: max(timing["p50_ms"][k] - base_ms, 0.01 * base_ms) for k in helpful}
    order = sorted(helpful, key=lambda k: regained[k] / cost[k], reverse=True)
    kept: list[str] = []
    trial = work / "trial.onnx"
    now = before
    for layer in order:
        quant.keep_float(staged, trial, [*kept, layer])
        coverage = quant.int8_coverage(fp32, quant.optimized_graph(
            trial, work / "trial.optimized.onnx"))["int8_coverage"]
        if coverage < cfg.min_int8_coverage:
            continue
        kept.append(layer)
        now = drop(trial)
        if now <= cfg.max_drop:
            break
    if now > cfg.max_drop:
        shutil.rmtree(work, ignore_errors=True)
        raise StageError(ctx.name, (
            f"the INT8 file loses {before:.2f} points of {quality.LABELS[metric]} (max_drop "
            f"{cfg.max_drop}); with {len(kept)} layer(s) kept in float "
            f"({', '.join(kept) or 'none'}) it still loses {now:.2f} and the coverage floor "
            f"(min_int8_coverage {cfg.min_int8_coverage}) allows no more; "
            + (f"QAT's model as it trained (fake-quantized in torch) already loses "
               f"{(fp32_score - trained_score) * 100:.2f}: training moved it, which no layer "
               "in float undoes; fewer QAT epochs or a smaller lr keep it closer; "
               if trained_score is not None
               and (fp32_score - trained_score) * 100 > cfg.max_drop else
               "raise max_drop, lower min_int8_coverage, or train longer; ")
            + "nothing was written"))
    quant.keep_float(staged, trial, kept)
    timed = profile.latency({"all_int8": staged, "kept_float": trial}, x, 100)["p50_ms"]
    shutil.move(str(trial), str(staged))
    shutil.rmtree(work, ignore_errors=True)
    found.update(drop=now, latency_ms=timed, kept_float=[
        {"layer": k, "error_regained": regained[k] / max(base_error, 1e-12),
         "ms": cost[k]} for k in kept])
    ctx.log(f"max_drop {cfg.max_drop}: the all-INT8 file lost {before:.2f} points; kept in "
            f"float: {', '.join(kept)}; it now loses {now:.2f}, batch-1 "
            f"{fmt_ms(timed['all_int8'])} -> {fmt_ms(timed['kept_float'])}")
    return found
