"""What the structure-changing stages (prune, lowrank) share: taking the model to compress,
resolving `ignore` patterns, recovery by distillation, and the before/after record."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch
from torch import nn

from compresskit.backends.onnx_export import ExportError
from compresskit.config import CompressOptions, TrainingOptions
from compresskit.distill import teacher_cache as teacher_outputs
from compresskit.engine import distributed as dist
from compresskit.engine.artifacts import Structure
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import ConfigError, Problem, StageError
from compresskit.measure import profile, quality
from compresskit.models.inputs import call
from compresskit.models.loading import example_input
from compresskit.ops.kd import cosine_loss, hinton_loss
from compresskit.ops.latency import fmt_ms
from compresskit.registry import closest
from compresskit.train.loop import Batch, cross_entropy_step, fit_stage, has_labels


class Shrink:
    """One compressing stage's model, its recorded structure and its measurements."""

    def __init__(self, cfg: CompressOptions, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.kind: str = getattr(cfg, "type", "compression")
        source = ctx.model(cfg.start_from)
        self.structure = copy.deepcopy(ctx.structure(cfg.start_from))
        self.model: nn.Module = copy.deepcopy(source).cpu().eval()
        self.example = example_input(ctx.config.inputs, batch=1)
        self.teacher = ctx.model("teacher") if ctx.config.teacher is not None else None
        self.x, self.y = profile.eval_arrays(ctx)
        self.metric = quality.primary(ctx.config.task)
        # Under torchrun every rank shrinks the same way; rank 0 alone measures, so the others
        # neither slow its latency runs nor repeat work whose numbers are dropped.
        self.measured = dist.is_main()
        self.before = self._profile("before") if self.measured else {}

    def _profile(self, label: str) -> dict[str, Any]:
        try:
            return profile.profile(self.model, self.ctx.work_dir / f"{label}.fp32.onnx",
                                   self.x, self.y, task=self.ctx.config.task,
                                   specs=self.ctx.config.inputs)
        except ExportError as e:
            raise StageError(self.ctx.name, f"the model {label} {self.kind} cannot be "
                                            f"measured: {e}") from None

    def ignored(self, always: list[str]) -> list[str]:
        """Names of the modules matched by `ignore` patterns, plus `always` (kept by default)."""
        return list(dict.fromkeys([*always, *matching(self.cfg.ignore, self.model, self.ctx)]))

    def check_forward(self) -> None:
        """The changed model still runs, else the stage fails naming the module that broke."""
        names = {m: n for n, m in self.model.named_modules()}
        stack: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda m, i: stack.append(names[m]))
                 for m in self.model.modules()]
        try:
            with torch.no_grad():
                out = call(self.model.eval(), self.example)
        except Exception as e:
            where = stack[-1] if stack and stack[-1] else type(self.model).__name__
            first = str(e).splitlines()[0] if str(e) else ""
            raise StageError(self.ctx.name, f"after {self.kind}, the forward pass fails in "
                             f"module '{where}' ({type(e).__name__}: {first}); it probably "
                             f"hard-codes a size. Add '{where}' (or its parent) to 'ignore'"
                             ) from None
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise StageError(self.ctx.name, "the compressed model no longer returns one "
                                            "[batch, outputs] tensor")

    def recover(self, epochs: int, tag: str) -> float | None:
        """Distil the changed model from the teacher (CE without one); the final loss."""
        if epochs <= 0:
            return None
        cfg = self.cfg
        return fine_tune(self.ctx, self.model, cfg.options(epochs), self.teacher, cfg,
                         f"recover{tag}", f"student{tag}")

    def finish(self, edit: dict[str, Any], metrics: dict[str, Any]) -> StageResult:
        """Measure the result against the model as it came in; record the edit."""
        structure: Structure = {"base": self.structure["base"],
                                "edits": [*self.structure["edits"], edit]}
        if not self.measured:
            return StageResult(metrics=metrics, updated={"student": self.model},
                               structure={"student": structure})
        after = self._profile("after")
        work = self.ctx.work_dir
        timing = profile.latency({"before": work / "before.fp32.onnx",
                                  "after": work / "after.fp32.onnx"}, self.x, self.cfg.latency_runs)
        for label, record in (("before", self.before), ("after", after)):
            (work / f"{label}.fp32.onnx").unlink(missing_ok=True)
            record["latency_ms"] = timing["p50_ms"][label]
        change = profile.compare(self.before, after, timing["speedup"]["after"], self.metric)
        for w in change["warnings"]:
            self.ctx.log(f"[yellow]warning:[/yellow] {w}")
        self.ctx.log(
            f"params {self.before['params']:,} -> {after['params']:,}, MACs "
            f"{self.before['macs']:,} -> {after['macs']:,}, batch-1 latency "
            f"{fmt_ms(self.before['latency_ms'])} -> {fmt_ms(after['latency_ms'])} "
            f"({change['latency_speedup']:.2f}x), {quality.LABELS[self.metric]} "
            f"{self.before[self.metric]:.4f} -> {after[self.metric]:.4f}")
        return StageResult(
            metrics={**metrics, self.metric: after[self.metric], "before": self.before,
                     "after": after, "change": change, "eval_split": self.ctx.data().eval_name},
            updated={"student": self.model}, structure={"student": structure},
            params=after["params"])


def fine_tune(ctx: StageContext, model: nn.Module, opts: TrainingOptions,
              teacher: nn.Module | None, kd_opts: Any, what: str, resume: str,
              hint: str = "") -> float:
    """Train `model` in place by distillation from `teacher` (cross-entropy without one) on the
    pipeline's data, resumably; returns the final loss, or fails the stage if it diverges.
    `kd_opts` carries temperature, alpha and the teacher-cache options (cache_teacher,
    cache_precision): with the cache, the teacher's logits come from the files an earlier stage
    or run wrote for the same teacher and data."""
    data = ctx.data()
    source = None
    if teacher is not None:
        source = teacher_outputs.for_stage(ctx, kd_opts, {"teacher": teacher})
    elif not has_labels(data.train):
        raise ConfigError(Problem(
            f"{what} needs labels or a teacher: the training split has no labels and the "
            "pipeline has no teacher to distil from", key=f"stages[{ctx.index}]"))

    def kd_step(m: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        t_out = source(batch)["teacher"]  # type: ignore[misc]
        if ctx.config.task == "embed":  # embeddings: match the teacher's direction
            loss = cosine_loss(call(m, batch.x), t_out)
            return loss, {"cosine": float(loss.detach())}
        return hinton_loss(call(m, batch.x), t_out, batch.y, kd_opts.temperature,
                           kd_opts.alpha)

    history = fit_stage(ctx, model, opts, kd_step if teacher is not None else cross_entropy_step,
                        what, resume=resume, blame=f"{what}: ", hint=hint)
    model.cpu().eval()
    return float(history["loss"][-1])


def matching(patterns: list[str], model: nn.Module, ctx: StageContext) -> list[str]:
    """Names of `model`'s modules that the glob `patterns` (a stage's `ignore`) match; a
    pattern that matches none is a warning naming the closest module names."""
    names = [n for n, _ in model.named_modules() if n]
    hits: list[str] = []
    for pattern in patterns:
        found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            close = closest(pattern, names, n=3, cutoff=0.4)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            ctx.log(f"[yellow]warning:[/yellow] ignore pattern '{pattern}' matches no "
                    f"module{hint}")
        hits += found
    return hits


def first_and_last(order: list[str]) -> list[str]:
    return list(dict.fromkeys([order[0], order[-1]])) if order else []

