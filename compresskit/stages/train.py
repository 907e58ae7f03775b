"""`train`: cross-entropy training of the teacher or the student."""

from __future__ import annotations

from compresskit.config import TrainConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import ConfigError, Problem
from compresskit.measure.profile import snapshot
from compresskit.models.loading import count_params
from compresskit.train.loop import cross_entropy_step, evaluate, fit_stage, has_labels


def run(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    data = ctx.data()
    if not has_labels(data.train):
        raise ConfigError(Problem(
            "'train' uses cross-entropy, but the training split has no labels; distil from "
            "a teacher instead (type: distill)", key=f"stages[{ctx.index}].type"))
    model = ctx.model(cfg.model)
    bs = ctx.config.data.eval_batch_size
    history = fit_stage(ctx, model, cfg, cross_entropy_step, cfg.model, resume="train")
    acc = evaluate(model, data.eval, bs, ctx.device)
    ctx.log(f"{cfg.model} accuracy on {data.eval_name}: {acc:.4f}")
    return StageResult(
        metrics={"accuracy": acc, "model": cfg.model, "eval_split": data.eval_name,
                 "val_accuracy": history["val_accuracy"][-1], "final_loss": history["loss"][-1],
                 "measured": snapshot(model, ctx)},
        updated={cfg.model: model}, params=count_params(model))
