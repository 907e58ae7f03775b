"""`prune`: structured pruning through torch-pruning's dependency graph, recovered by distillation.

The model is pruned on a copy, so a failure leaves the previous checkpoint as it was. With
`target_macs`/`target_params`, the per-group ratio that reaches the target is found by bisection
on one-shot trial prunes, then applied in `steps` slices with recovery in between.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compresskit.backends import pruning
from compresskit.config import PruneConfig
from compresskit.config.stages import BUDGETS
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.measure.targets import channel_block, resolve
from compresskit.models import structure
from compresskit.models.inputs import as_tensors, call
from compresskit.stages._budget import LEVELS, BudgetPruner, stage_target
from compresskit.stages._shrink import Shrink, first_and_last


def _first_batches(ctx: StageContext, batches: int) -> Iterator[tuple[Any, Any]]:
    """(inputs, labels or None) of the first training batches, in order."""
    from compresskit.train.loop import loader, unpack

    for i, sample in enumerate(loader(ctx.data().train, ctx.config.data.batch_size,
                                      shuffle=False, seed=ctx.seed)):
        if i >= batches:
            break
        x, y = unpack(sample)
        yield as_tensors(x), y


def _taylor_gradients(model: nn.Module, ctx: StageContext, batches: int) -> None:
    """Gradients of the cross-entropy on the first training batches, for Taylor importance;
    on unlabelled data, against the model's own top-1 predictions."""
    model.train().zero_grad()
    for x, y in _first_batches(ctx, batches):
        logits = call(model, x)
        target = torch.as_tensor(y) if y is not None else logits.detach().argmax(dim=1)
        torch.nn.functional.cross_entropy(logits, target).backward()
    model.eval()


def _calibration_feed(ctx: StageContext, batches: int) -> pruning.Feed:
    """Runs the first training batches through a model, for 'activation' importance."""
    def feed(model: nn.Module) -> None:
        model.eval()
        for x, _ in _first_batches(ctx, batches):
            call(model, x)
    return feed


def _empty_layers(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        if isinstance(width, int) and width == 0:
            out.append(name)
    return out


def _round_to(cfg: PruneConfig, ctx: StageContext, model: nn.Module,
              ignored: list[str]) -> tuple[int, str]:
    """The channel multiple to keep: as given, else the channel block of the kernels on the
    stage's target (the benchmark stage's first target, else cpu), halved while rounding to it
    would empty a layer or remove a quarter more, or a quarter less, than asked. torch-pruning
    rounds the channels kept down: a 16-channel layer pruned by a quarter keeps 12 at round_to
    4, 8 at 8 and none at 16."""
    if cfg.round_to is not None:
        return cfg.round_to, "given"
    block, why = channel_block(resolve(stage_target(cfg, ctx), ctx.config.targets))
    key, amount = cfg.amount()
    if key == "ratio":
        ratio = amount
    elif key in ("target_macs", "target_params", "target_latency"):
        ratio = 1 - amount ** 0.5  # MACs, params and (roughly) time go as width^2
    else:  # an absolute budget: its cuts start at the table's smallest level
        ratio = LEVELS[0]
    widths = [w for n, m in model.named_modules() if n not in ignored
              for w in [getattr(m, "out_channels", getattr(m, "out_features", None))]
              if isinstance(w, int) and w > 1]
    wanted = sum(w * ratio for w in widths)

    def fits(b: int) -> bool:
        kept = [b * math.floor(w * (1 - ratio) / b) for w in widths]
        return min(kept, default=1) > 0 and abs(sum(widths) - sum(kept) - wanted) <= 0.25 * wanted

    chosen = block
    while chosen > 1 and not fits(chosen):
        chosen //= 2
    if chosen != block:
        why += (f"; {chosen} here: rounding these layers' widths to {block} would prune far "
                "more or less than asked")
    ctx.log(f"round_to {chosen}: {why}")
    return chosen, why


def run(cfg: PruneConfig, ctx: StageContext) -> StageResult:
    job = Shrink(cfg, ctx)
    model, example = job.model, job.example
    keep = first_and_last(pruning.leaf_order(model, example))
    ignored = job.ignored(keep)
    round_to, why = _round_to(cfg, ctx, model, ignored)
    args: dict[str, Any] = dict(
        criterion=cfg.importance, ignored=ignored, global_ranking=cfg.global_ranking,
        max_layer_ratio=cfg.max_layer_ratio, round_to=round_to if round_to > 1 else None,
        heads=cfg.heads,
        feed=_calibration_feed(ctx, cfg.calibration_batches)
        if cfg.importance == "activation" else None)
    key, amount = cfg.amount()
    search = {k: v for k, v in args.items() if k != "ignored"}
    before = structure.snapshot(model)
    try:
        with pruning.time_limit(cfg.trace_seconds, "tracing and trial-pruning the model"):
            left_whole = pruning.unsafe_layers(
                model, example, amount if key == "ratio" else 0.5, args["ignored"],
                **{**search, "criterion": "l2"})  # structure alone: no gradients needed
            args["ignored"] = [*args["ignored"], *left_whole]
            if key in BUDGETS:  # measured, outside the trace time limit (below)
                ratio = 0.0
            elif key == "ratio":
                ratio = amount
            else:
                index = 0 if key == "target_macs" else 1

                def measured(m: nn.Module) -> float:
                    return pruning.count(m, example)[index]

                ratio, kept = pruning.ratio_for_target(model, example, measured, amount, **args)
                ctx.log(f"{key} {amount:.2f}: ratio {ratio:.3f} per group keeps {kept:.3f}")
            if key not in BUDGETS:
                pruner = pruning.make_pruner(model, example, ratio=ratio, steps=cfg.steps,
                                             **args)
    except pruning.TraceError as e:
        # Nothing can be pruned safely: the model goes on whole, and the report says why.
        ctx.log(f"[yellow]warning:[/yellow] the model is left whole: {e}")
        return job.finish(structure.reshape_edit(before, before), {
            "ratio": 0.0, "mode": key, "round_to": round_to, "round_to_from": why,
            "requested": amount, "steps": 0,
            "importance": cfg.importance, "kept_whole": keep,
            "left_whole": {"(whole model)": str(e)}, "recovery_loss": None})
    except pruning.PruneError as e:
        raise StageError(ctx.name, str(e)) from None
    by_group: dict[str, list[str]] = {}
    for layer, broken in left_whole.items():
        by_group.setdefault(broken, []).append(layer)
    for broken, layers in by_group.items():  # one line per group, not per layer
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        ctx.log(f"[yellow]left whole:[/yellow] {shown} (unsafe to prune: {broken})")
    if key in BUDGETS:
        try:
            return _to_budget(cfg, ctx, job, args, key, amount, before, keep, left_whole,
                              round_to, why)
        except pruning.PruneError as e:
            raise StageError(ctx.name, str(e)) from None
    losses = []
    for i in range(cfg.steps):
        if cfg.importance == "taylor":
            _taylor_gradients(model, ctx, cfg.calibration_batches)
        try:
            pruning.step(pruner, model)
        except (pruning.UnsafeGroup, pruning.TraceError) as e:  # one the l2 trial did not meet
            raise StageError(ctx.name, f"pruning by {cfg.importance} failed ({e}); add the "
                             "group's layers to 'ignore', or use importance: l2") from None
        model.zero_grad(set_to_none=True)
        empty = _empty_layers(model)
        if empty:
            raise StageError(ctx.name, f"ratio {ratio:.2f} removes every channel of "
                                       f"{', '.join(empty)}; lower the ratio or add them to "
                                       "'ignore'")
        job.check_forward()
        tag = f".step{i + 1}" if cfg.steps > 1 else ""
        losses.append(job.recover(cfg.recover, tag))
    edit = structure.reshape_edit(before, structure.snapshot(model))
    return job.finish(edit, {"ratio": round(ratio, 4), "mode": key, "requested": amount,
                             "round_to": round_to, "round_to_from": why,
                             "steps": cfg.steps, "importance": cfg.importance,
                             "kept_whole": keep, "left_whole": left_whole,
                             "recovery_loss": losses[-1]})


def _to_budget(cfg: PruneConfig, ctx: StageContext, job: Shrink, args: dict[str, Any],
               key: str, amount: float, before: Any, keep: list[str],
               left_whole: dict[str, str], round_to: int, why: str) -> StageResult:
    """target_latency, latency_ms, target_size: measured on the stage's target (stages/
    _budget.py), in steps with recovery."""
    name = stage_target(cfg, ctx)
    target = resolve(name, ctx.config.targets)
    if cfg.importance == "taylor":
        _taylor_gradients(job.model, ctx, cfg.calibration_batches)
    losses: list[float | None] = []

    def recover(step: int, steps: int) -> None:
        job.check_forward()
        losses.append(job.recover(cfg.recover, f".step{step}" if steps > 1 else ""))

    budget = BudgetPruner(job, cfg, ctx, args, target, recover).reach(key, amount, name)
    edit = structure.reshape_edit(before, structure.snapshot(job.model))
    return job.finish(edit, {"mode": key, "requested": amount, "round_to": round_to,
                             "round_to_from": why, "importance": cfg.importance,
                             "kept_whole": keep, "left_whole": left_whole, "budget": budget,
                             "steps": len(budget["steps"]),
                             "recovery_loss": losses[-1] if losses else None})
