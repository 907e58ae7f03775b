"""`export` and `ptq` of a causal-lm pipeline: the KV-cache decoders and their INT8 and INT4
files (compresskit.lm.export), each checked against torch before it is published."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from compresskit.config import ExportConfig, PtqConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.lm import export as lm_export
from compresskit.lm import models as lm_models
from compresskit.lm.tokenizers import tokenizer_for


def _check_block(ctx: StageContext) -> torch.Tensor:
    ds = ctx.data().eval
    return torch.as_tensor(ds[0][0]).long()


def export_run(cfg: ExportConfig, ctx: StageContext) -> StageResult:
    artifacts, metrics = [], {}
    folder = ctx.run_dir / "artifacts"
    block = _check_block(ctx)
    for role in cfg.models:
        model = ctx.model(role)
        tok = tokenizer_for(ctx, role)
        hf_dir = ctx.work_dir / "hf" / role
        lm_models.save_folder(model, tok, hf_dir)
        out = folder / f"{role}.decoder-fp32"
        try:
            path = lm_export.build(hf_dir, out, "fp32")
        except lm_export.LMExportError as e:
            raise StageError(ctx.name, f"the {role}: {e}") from None
        check = lm_export.parity(model, path, block, cfg.atol)
        metrics[role] = {"parity": check, "hf_folder": f"{ctx.name}/hf/{role}"}
        ctx.log(f"{role}: FP32 decoder, max |ONNX - torch| {check['max_abs_diff']:.2e} "
                f"({check['max_abs_diff_with_past']:.2e} with past), greedy "
                f"{check['greedy_match']}/{check['greedy_tokens']} tokens equal")
        if not check["ok"]:
            shutil.rmtree(out, ignore_errors=True)
            raise StageError(ctx.name, f"the {role}'s ONNX decoder disagrees with torch: "
                             f"max |difference| {check['max_abs_diff']:.3g} without past, "
                             f"{check['max_abs_diff_with_past']:.3g} with past (atol "
                             f"{cfg.atol:g} x the logit scale {check['logit_scale']:.3g}), "
                             f"greedy tokens differ from token "
                             f"{check['greedy_first_mismatch']}; nothing was written")
        artifacts.append(lm_export.artifact(ctx.run_dir, path, "fp32", role, None,
                                            {"hf_folder": f"{ctx.name}/hf/{role}"}))
    return StageResult(metrics=metrics, artifacts=artifacts)


def _source(cfg: PtqConfig, ctx: StageContext) -> Any:
    found = [a for a in ctx.artifacts if a.get("format") == "decoder"
             and a.get("model") == cfg.model and a.get("precision") == "fp32"]
    if not found:
        raise StageError(ctx.name, f"no FP32 decoder of the {cfg.model} to quantize: list it "
                         "under an export stage's models before this stage")
    return found[-1]


def ptq_run(cfg: PtqConfig, ctx: StageContext) -> StageResult:
    src = _source(cfg, ctx)
    fp32 = ctx.run_dir / src["path"]
    folder = ctx.run_dir / "artifacts"
    if cfg.bits == 4:
        out = folder / f"{cfg.model}.decoder-int4"
        try:
            extra: dict[str, Any] = {"block_size": cfg.block_size}
            if cfg.int4_algorithm != "default":
                extra["algo_config"] = cfg.int4_algorithm
            path = lm_export.build(ctx.run_dir / src["hf_folder"], out, "int4", extra)
        except lm_export.LMExportError as e:
            raise StageError(ctx.name, f"the {cfg.model}: {e}") from None
        precision = "int4"
        method = f"int4 weight-only (MatMulNBits, block {cfg.block_size}, " \
            f"{cfg.int4_algorithm})"
    else:
        out = folder / f"{cfg.model}.decoder-int8"
        if out.exists():
            shutil.rmtree(out)
        path = lm_export.dynamic_int8(fp32, out)
        precision, method = "int8", "dynamic int8 (onnxruntime quantize_dynamic)"
    cover = lm_export.coverage(path)
    ctx.log(f"{cfg.model} {precision}: {cover['quantized_matmuls']} quantized MatMuls, "
            f"{len(cover['float_matmuls'])} float, {cover['weight_coverage']:.3f} of the "
            "MatMul weights quantized")
    if cover["weight_coverage"] < cfg.min_int8_coverage:
        shutil.rmtree(out, ignore_errors=True)
        raise StageError(ctx.name, f"only {cover['weight_coverage']:.3f} of the {cfg.model}'s "
                         f"MatMul weights are quantized (min_int8_coverage "
                         f"{cfg.min_int8_coverage}); float: "
                         f"{', '.join(cover['float_matmuls'][:5])}")
    art = lm_export.artifact(ctx.run_dir, path, precision, cfg.model, method,
                             {"int8_coverage": cover["weight_coverage"]})
    return StageResult(metrics={"coverage": cover, "method": method,
                                "bytes": art["bytes"], "fp32_bytes": src["bytes"]},
                       artifacts=[art])


def hf_folder_of(run_dir: Path, artifact: dict[str, Any]) -> Path | None:
    rel = artifact.get("hf_folder")
    return run_dir / rel if rel else None
