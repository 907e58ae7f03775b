"""`train`: cross-entropy training of the teacher or the student."""

from __future__ import annotations

from compresskit.config import TrainConfig
from compresskit.context import StageContext, StageResult
from compresskit.errors import ConfigError, Problem, StageError
from compresskit.measure import snapshot
from compresskit.modelio import count_params
from compresskit.training import Diverged, cross_entropy_step, evaluate, fit, has_labels


def run(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    data = ctx.data()
    if not has_labels(data.train):
        raise ConfigError(Problem(
            "'train' uses cross-entropy, but the training split has no labels; distil from "
            "a teacher instead (type: distill)", key=f"stages[{ctx.index}].type"))
    model = ctx.model(cfg.model)
    bs = ctx.config.data.eval_batch_size
    try:
        history = fit(model, data.train, cfg, batch_size=ctx.config.data.batch_size,
                      step=cross_entropy_step, device=ctx.device, seed=ctx.seed,
                      progress=ctx.progress, desc=f"{ctx.name} {cfg.model}",
                      val=data.val, eval_batch_size=bs, resume=ctx.work_dir / "train.resume.pt")
    except Diverged as e:
        raise StageError(ctx.name, str(e)) from None
    acc = evaluate(model, data.eval, bs, ctx.device)
    ctx.log(f"{cfg.model} accuracy on {data.eval_name}: {acc:.4f}")
    return StageResult(
        metrics={"accuracy": acc, "model": cfg.model, "eval_split": data.eval_name,
                 "val_accuracy": history["val_accuracy"][-1], "final_loss": history["loss"][-1],
                 "measured": snapshot(model, ctx)},
        updated={cfg.model: model}, params=count_params(model))
