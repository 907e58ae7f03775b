"""`lowrank`: truncated-SVD factorisation of Linear and Conv2d layers, recovered by distillation.

Per layer the rank comes from `energy` or `rank_ratio` (optionally rounded up to `round_to`); the
layer is replaced only when the factorisation cuts its MACs by at least `min_reduction` and, with
`keep_if_slower`, when onnxruntime runs the factorised pair faster than the whole layer on the
input it gets in the model (rank 0 times; under torchrun the other ranks take its decision).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.config import LowRankConfig
from compresskit.engine import distributed as dist
from compresskit.engine.context import StageContext, StageResult
from compresskit.models import structure
from compresskit.models.inputs import call
from compresskit.ops import lowrank as lr
from compresskit.ops.latency import fmt_ms
from compresskit.stages._shrink import Shrink


def choose_rank(layer: nn.Module, cfg: LowRankConfig) -> tuple[int | None, str, float]:
    """The rank to factorise `layer` to, or None and the reason it stays whole; and the
    relative Frobenius error of the weight at that rank."""
    if isinstance(layer, nn.Linear):
        out, fan_in = layer.out_features, layer.in_features
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return None, "grouped or depthwise", 0.0
        out = layer.out_channels
        fan_in = layer.in_channels * math.prod(layer.kernel_size)
    else:
        return None, "not a Linear or Conv2d", 0.0
    s = lr.singular_values(layer.weight)
    if cfg.rank_ratio is not None:
        rank = lr.rank_for_ratio(out, fan_in, cfg.rank_ratio)
    else:
        rank = lr.rank_for_energy(s, 0.9 if cfg.energy is None else cfg.energy)
    if cfg.round_to:
        rank = cfg.round_to * math.ceil(rank / cfg.round_to)
    error = lr.tail_norm(s, rank) / max(float(s.norm()), 1e-30)
    limit = lr.max_useful_rank(out, fan_in, cfg.min_reduction)
    if rank > limit:
        return None, f"rank {rank} would cut its MACs by less than {cfg.min_reduction:.0%}", error
    return rank, "", error


def _time_layers(model: nn.Module, example: Any, pairs: dict[str, tuple[nn.Module, nn.Module]],
                 work: Path, runs: int) -> dict[str, dict[str, float]]:
    """Each layer whole and factorised, as two ONNX files of that layer alone on the input it
    gets in the model (batch 1), timed interleaved on one thread: onnxruntime's kernels, not
    MACs, say whether the factorised pair is faster."""
    from compresskit.backends import ort as ort_backend
    from compresskit.backends.onnx_export import export_onnx
    from compresskit.measure.targets import TARGETS
    from compresskit.ops.latency import median_ratio, summarize

    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, args[0].detach()[:1].clone()))
        for name in pairs]
    try:
        with torch.no_grad():
            call(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    work.mkdir(parents=True, exist_ok=True)
    cpu = TARGETS.get("cpu")
    out: dict[str, dict[str, float]] = {}
    for i, (name, (whole, factorised)) in enumerate(pairs.items()):
        x = seen.get(name)
        if x is None:  # not reached by the forward pass: nothing to time
            continue
        sessions = {}
        for label, module in (("whole", whole), ("factorised", factorised)):
            path = work / f"{i}.{label}.onnx"
            export_onnx(copy.deepcopy(module).eval(), x, path, 17)
            sessions[label] = ort_backend.session(path, cpu, threads=1)
        times = ort_backend.time_interleaved(sessions, x.numpy(), runs, warmup=max(5, runs // 10))
        out[name] = {"whole_ms": summarize(times["whole"])["p50"],
                     "factorised_ms": summarize(times["factorised"])["p50"],
                     "speedup": median_ratio(times["whole"], times["factorised"])}
    return out


def _forward_error(model: nn.Module, example: Any) -> str:
    """'' when the model runs on `example`, else the error's first line."""
    try:
        with torch.no_grad():
            call(model.eval(), example)
    except Exception as e:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]
    return ""


def run(cfg: LowRankConfig, ctx: StageContext) -> StageResult:
    job = Shrink(cfg, ctx)
    model = job.model
    ignored = set(job.ignored([]))
    layers: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    chosen: dict[str, tuple[nn.Linear | nn.Conv2d, nn.Module, str, int, float]] = {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear | nn.Conv2d) or name in ignored:
            continue
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        if kind not in cfg.layers:
            continue
        rank, why, error = choose_rank(layer, cfg)
        if rank is None:
            skipped[name] = why
            continue
        new: nn.Module = (lr.factorize_linear(layer, rank) if isinstance(layer, nn.Linear)
                          else lr.factorize_conv(layer, rank))
        chosen[name] = (layer, new, kind, rank, error)
    timings: dict[str, dict[str, float]] = {}
    if cfg.keep_if_slower and chosen:
        timings = dist.broadcast_object(
            _time_layers(model, job.example, {k: v[:2] for k, v in chosen.items()},
                         ctx.work_dir / "layers", cfg.latency_runs) if dist.is_main() else None)
    for name, (layer, new, kind, rank, error) in chosen.items():
        t = timings.get(name)
        if t is not None and t["speedup"] < 1.0:
            skipped[name] = (f"factorised it runs slower here ({fmt_ms(t['whole_ms'])} whole, "
                             f"{fmt_ms(t['factorised_ms'])} at rank {rank})")
            continue
        structure.set_module(model, name, new)
        broken = _forward_error(model, job.example)
        if broken:  # the model reads the layer's .weight itself (HF ViT's patch embedding)
            structure.set_module(model, name, layer)
            skipped[name] = f"the forward pass fails with it factorised ({broken})"
            continue
        layers[name] = {"kind": kind, "rank": rank,
                        "full_rank": min(layer.weight.shape[0], layer.weight[0].numel()),
                        "weight_error": round(error, 4), **({"timing": t} if t else {})}
    if layers:
        job.check_forward()
    else:
        slower = sum("slower" in why for why in skipped.values())
        reason = (f"{slower} would have run slower, the others saved less than min_reduction "
                  f"{cfg.min_reduction} or could not be factorised" if slower else
                  f"each would have saved less than min_reduction {cfg.min_reduction} or could "
                  "not be factorised")
        ctx.log(f"[yellow]warning:[/yellow] no layer was factorised ({reason}); the model is "
                "unchanged")
    for name, spec in layers.items():
        ctx.log(f"{name}: {spec['kind']} rank {spec['rank']} of {spec['full_rank']} "
                f"(relative weight error {spec['weight_error']:.3f})")
    for name, why in skipped.items():
        ctx.log(f"{name}: kept whole ({why})")
    loss = job.recover(cfg.recover, "") if layers else None
    edit = structure.lowrank_edit({k: {"kind": v["kind"], "rank": v["rank"]}
                                   for k, v in layers.items()})
    return job.finish(edit, {"factorized": layers, "kept": skipped, "recovery_loss": loss})
