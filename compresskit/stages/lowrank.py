"""`lowrank`: truncated-SVD factorisation of Linear and Conv2d layers, recovered by distillation.

Per layer the rank comes from `energy` or `rank_ratio` (optionally rounded up to `round_to`); the
layer is replaced only when the factorisation cuts its MACs by at least `min_reduction` and, with
`keep_if_slower`, when onnxruntime runs the factorised pair faster than the whole layer on the
input it gets in the model (rank 0 times; under torchrun the other ranks take its decision).

With a budget (`target_latency`, `latency_ms`, `target_size`) the ranks come from the measured
table of stages/_budget.py instead: each layer factorised alone to a half, a quarter and an
eighth of its MACs, the whole model exported and timed on the target; the plan with the least
predicted KD loss that meets the budget, checked by timing it.
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
from compresskit.measure.targets import resolve
from compresskit.models import structure
from compresskit.models.inputs import call
from compresskit.ops import lowrank as lr
from compresskit.ops.latency import fmt_ms
from compresskit.stages._budget import RANK_LEVELS, BudgetSearch, stage_target
from compresskit.stages._shrink import Shrink


def _shape(layer: nn.Module) -> tuple[str, int, int] | None:
    """(kind, out, fan_in) of a layer lowrank can factorise, else None."""
    if isinstance(layer, nn.Linear):
        return "linear", layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        return "conv", layer.out_channels, layer.in_channels * math.prod(layer.kernel_size)
    return None


def choose_rank(layer: nn.Module, cfg: LowRankConfig) -> tuple[int | None, str, float]:
    """The rank to factorise `layer` to, or None and the reason it stays whole; and the
    relative Frobenius error of the weight at that rank."""
    shape = _shape(layer)
    if shape is None:
        return None, ("grouped or depthwise" if isinstance(layer, nn.Conv2d)
                      else "not a Linear or Conv2d"), 0.0
    _, out, fan_in = shape
    s = lr.singular_values(layer.weight)  # type: ignore[arg-type]  # a Linear or Conv2d
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

    def record(name: str) -> Any:
        # The input as the layer gets it from a batch-1 forward (its leading dimension need not
        # be the batch: MobileViT feeds its attention patches x tokens). The hook returns None:
        # a forward pre-hook's return value replaces the layer's input.
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, args[0].detach().clone())
        return hook

    hooks = [modules[name].register_forward_pre_hook(record(name)) for name in pairs]
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


def rank_at(layer: nn.Module, level: float, round_to: int | None) -> int | None:
    """The rank whose factorised pair keeps `level` of the layer's MACs (rounded up to
    `round_to`), or None when there is none that saves anything."""
    shape = _shape(layer)
    if shape is None:
        return None
    _, out, fan_in = shape
    rank = math.floor(level * out * fan_in / (out + fan_in))
    if round_to:
        rank = round_to * math.ceil(rank / round_to)
    return rank if 1 <= rank and rank * (out + fan_in) < out * fan_in else None


def _factorised(layer: nn.Module, rank: int) -> nn.Module:
    return (lr.factorize_linear(layer, rank) if isinstance(layer, nn.Linear)
            else lr.factorize_conv(layer, rank))  # type: ignore[arg-type]


class BudgetFactoriser(BudgetSearch):
    """lowrank's budgets: each layer factorised at RANK_LEVELS of its MACs, in one step."""

    levels = RANK_LEVELS
    deep_steps = False  # a factorised pair is not factorised again
    largest_cut = "factorising every layer to an eighth of its MACs"
    nothing_to_cut = ("no layer of this model can be factorised on its own (no Linear or "
                      "ungrouped Conv2d outside 'ignore' and 'layers', or every one broke the "
                      "forward pass); a budget needs layers to factorise")

    def __init__(self, job: Shrink, cfg: LowRankConfig, ctx: StageContext, name: str,
                 ignored: set[str]):
        self.ignored, self.lowrank = ignored, cfg
        super().__init__(job, cfg, ctx, resolve(name, ctx.config.targets), self._recover)
        self.loss: float | None = None

    def _recover(self, step: int, steps: int) -> None:
        self.job.check_forward()
        self.loss = self.job.recover(self.lowrank.recover, "")

    def settings(self) -> Any:
        return [sorted(self.ignored), self.lowrank.layers, self.lowrank.round_to]

    def groups(self, model: nn.Module) -> list[str]:
        return [name for name, layer in model.named_modules()
                if name not in self.ignored and (shape := _shape(layer)) is not None
                and shape[0] in self.lowrank.layers
                and rank_at(layer, max(self.levels), self.lowrank.round_to) is not None]

    def ranks(self, model: nn.Module, plan: dict[str, float]) -> dict[str, tuple[str, int]]:
        """(kind, rank) of each layer in `plan`, on the model before factorising."""
        modules = dict(model.named_modules())
        out = {}
        for name, level in plan.items():
            rank = rank_at(modules[name], level, self.lowrank.round_to)
            shape = _shape(modules[name])
            if rank is not None and shape is not None:
                out[name] = (shape[0], rank)
        return out

    def apply(self, model: nn.Module, plan: dict[str, float]) -> nn.Module | None:
        ranks = self.ranks(model, plan)
        if len(ranks) < len(plan):
            return None
        trial = copy.deepcopy(model)
        for name, (_, rank) in ranks.items():
            structure.set_module(trial, name, _factorised(structure.get_module(trial, name),
                                                          rank))
        return None if _forward_error(trial, self.example) else trial


def _to_budget(cfg: LowRankConfig, ctx: StageContext, job: Shrink, ignored: set[str],
               key: str, amount: float) -> StageResult:
    name = stage_target(cfg, ctx)
    before = job.model
    search = BudgetFactoriser(job, cfg, ctx, name, ignored)
    budget = search.reach(key, amount, name)
    plan = budget["steps"][-1]["plan"] if budget["steps"] else {}
    layers = {}
    modules = dict(before.named_modules())
    for layer_name, (kind, rank) in search.ranks(before, plan).items():
        weight = modules[layer_name].weight
        s = lr.singular_values(weight)
        layers[layer_name] = {"kind": kind, "rank": rank,
                              "full_rank": min(weight.shape[0], weight[0].numel()),
                              "weight_error": round(lr.tail_norm(s, rank)
                                                    / max(float(s.norm()), 1e-30), 4)}
        ctx.log(f"{layer_name}: {kind} rank {rank} of {layers[layer_name]['full_rank']}")
    edit = structure.lowrank_edit({k: {"kind": v["kind"], "rank": v["rank"]}
                                   for k, v in layers.items()})
    return job.finish(edit, {"factorized": layers, "kept": {}, "budget": budget,
                             "recovery_loss": search.loss})


def run(cfg: LowRankConfig, ctx: StageContext) -> StageResult:
    job = Shrink(cfg, ctx)
    model = job.model
    ignored = set(job.ignored([]))
    asked = cfg.budget()
    if asked is not None:
        return _to_budget(cfg, ctx, job, ignored, *asked)
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
