"""`distill`: Hinton knowledge distillation of the student from the teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compresskit.config import DistillConfig
from compresskit.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.modelio import count_params
from compresskit.ops.kd import hinton_loss
from compresskit.training import Diverged, cross_entropy_step, evaluate, fit


def run(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    data = ctx.data()
    teacher = ctx.model("teacher").to(ctx.device).eval()
    student = ctx.model("student")
    initial = copy.deepcopy(student) if cfg.baseline else None
    bs = ctx.config.data.eval_batch_size

    def step(model: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            t_logits = teacher(x)
        return hinton_loss(model(x), t_logits, y, cfg.temperature, cfg.alpha)

    common = dict(batch_size=ctx.config.data.batch_size, device=ctx.device, seed=ctx.seed,
                  progress=ctx.progress, val=data.val, eval_batch_size=bs)
    try:
        history = fit(student, data.train, cfg, step=step, desc=f"{ctx.name} student",
                      resume=ctx.work_dir / "student.resume.pt", **common)  # type: ignore[arg-type]
    except Diverged as e:
        raise StageError(ctx.name, str(e)) from None
    metrics = {
        "accuracy": evaluate(student, data.eval, bs, ctx.device),
        "teacher_accuracy": evaluate(teacher, data.eval, bs, ctx.device),
        "eval_split": data.eval_name, "val_accuracy": history["val_accuracy"][-1],
        "final_loss": history["loss"][-1],
    }
    if initial is not None:
        try:
            fit(initial, data.train, cfg, step=cross_entropy_step,
                desc=f"{ctx.name} baseline (no teacher)",
                resume=ctx.work_dir / "baseline.resume.pt", **common)  # type: ignore[arg-type]
        except Diverged as e:
            raise StageError(ctx.name, f"baseline: {e}") from None
        metrics["baseline_accuracy"] = evaluate(initial, data.eval, bs, ctx.device)
        metrics["gain_over_baseline"] = metrics["accuracy"] - metrics["baseline_accuracy"]
    ctx.log(f"student accuracy on {data.eval_name}: {metrics['accuracy']:.4f} (teacher "
            f"{metrics['teacher_accuracy']:.4f}"
            + (f", without teacher {metrics['baseline_accuracy']:.4f})" if initial else ")"))
    return StageResult(metrics=metrics, updated={"student": student},
                       params=count_params(student))
