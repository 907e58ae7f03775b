"""`distill`: knowledge distillation of the student, in four modes.

kd: from the pipeline's teachers (one or several), with any mix of kl, features, attention and
cosine terms. born_again: a trained copy of the student teaches a re-initialised student, for
`generations`. ema: a mean teacher, the moving average of the student's own weights. mutual:
the peers train together, each distilling from the others.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from compresskit.config import DistillConfig
from compresskit.distill import teacher_cache as teacher_outputs
from compresskit.distill.diagnostics import capacity_warning, diagnostics
from compresskit.distill.objective import Distiller, Objective, Teacher, problems, requested_modules
from compresskit.distill.teacher_cache import TeacherOutputs
from compresskit.engine.context import StageContext, StageResult
from compresskit.engine.loader import format_path
from compresskit.errors import ConfigError, Problem
from compresskit.measure import profile, quality
from compresskit.measure.profile import snapshot
from compresskit.models.inputs import call, to
from compresskit.models.loading import count_params, example_input
from compresskit.ops import kd
from compresskit.train.loop import (
    Batch,
    cross_entropy_step,
    evaluate,
    fit_stage,
    has_labels,
)
from compresskit.train.padding import Padding


def run(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    data = ctx.data()
    if cfg.baseline and not has_labels(data.train):
        raise _bad(ctx, ("baseline",), "baseline: true trains the student with cross-entropy, "
                   "but the training split has no labels; set baseline: false")
    if cfg.mode == "mutual":
        return _mutual(cfg, ctx)
    student = ctx.model("student").to(ctx.device)
    initial = copy.deepcopy(student)
    metrics: dict[str, Any] = {"mode": cfg.mode, "labels": has_labels(data.train),
                               "warnings": []}
    if ctx.config.task == "embed":
        metrics["initial"] = _scores(ctx, initial)
        ctx.log("student before distillation: " + _shown(metrics["initial"]))
    if cfg.mode == "kd":
        metrics.update(_kd(cfg, ctx, student))
    elif cfg.mode == "born_again":
        student, generations = _born_again(cfg, ctx, student)
        metrics["generation_accuracy"] = generations
    else:
        metrics["ema_accuracy"] = _ema(cfg, ctx, student)
    metrics.update({**_scores(ctx, student), "eval_split": data.eval_name,
                    "measured": snapshot(student, ctx)})
    if ctx.config.task == "embed":
        ctx.log(f"student on {data.eval_name}: {_shown(_scores(ctx, student))}")
        return StageResult(metrics=metrics, updated={"student": student},
                           params=count_params(student))
    if cfg.baseline:
        metrics["baseline_accuracy"] = _baseline(cfg, ctx, initial, cfg.epochs)
        metrics["gain_over_baseline"] = metrics["accuracy"] - metrics["baseline_accuracy"]
        gap = capacity_warning(metrics)
        if gap:
            metrics["warnings"].append(gap)
    ctx.log(f"student accuracy on {data.eval_name}: {metrics['accuracy']:.4f}"
            + (f" (teacher {metrics['teacher_accuracy']:.4f})"
               if "teacher_accuracy" in metrics else "")
            + (f", without a teacher {metrics['baseline_accuracy']:.4f}"
               if cfg.baseline else ""))
    for warning in metrics.get("warnings", []):
        ctx.log(f"[yellow]warning:[/yellow] {warning}")
    return StageResult(metrics=metrics, updated={"student": student},
                       params=count_params(student))


def _scores(ctx: StageContext, model: nn.Module) -> dict[str, float]:
    """The task's metrics of a torch model on the evaluation split."""
    if ctx.config.task == "embed":
        x, reference = profile.eval_arrays(ctx)
        return profile.score(ctx, profile.predict_torch(
            model, x, ctx.config.data.eval_batch_size), reference)
    return {"accuracy": evaluate(model, ctx.data().eval, ctx.config.data.eval_batch_size,
                                 ctx.device)}


def _shown(scores: dict[str, float]) -> str:
    return ", ".join(f"{quality.LABELS[k]} {v:.4f}" for k, v in scores.items())


def _bad(ctx: StageContext, key: tuple[Any, ...], message: str) -> ConfigError:
    return ConfigError(Problem(message, key=format_path(("stages", ctx.index, *key))))


def _check(cfg: DistillConfig, ctx: StageContext, student: nn.Module,
           teachers: dict[str, nn.Module]) -> None:
    example = to(example_input(ctx.config.inputs, batch=2), ctx.device)
    found = problems(cfg, student, {n: m.to(ctx.device) for n, m in teachers.items()}, example)
    if found:
        raise ConfigError([Problem(msg, key=format_path(("stages", ctx.index, *key)))
                           for key, msg in found])


def _train(cfg: DistillConfig, ctx: StageContext, student: nn.Module, source: TeacherOutputs,
           team: list[Teacher], temperature: float, epochs: int, tag: str,
           teacher_model: nn.Module, ema: nn.Module | None = None) -> dict[str, Any]:
    """Train `student` in place against `source`; returns fit's history."""
    example = to(example_input(ctx.config.inputs, batch=2), ctx.device)
    adapters = Objective.adapters(cfg, student, teacher_model, example)
    distiller = Distiller(student, adapters, ema).to(ctx.device)
    objective = Objective(cfg, distiller, source, team, temperature,
                          noise=cfg.noise if ema is not None else 0.0,
                          padding=Padding.of(ctx.config.inputs),
                          trimmed=ctx.config.data.group_by_length)
    after = (lambda: kd.ema_update(ema, student, cfg.ema_decay)) if ema is not None else None
    try:
        return fit_stage(ctx, distiller, cfg.options(epochs), objective, tag, resume=tag,
                         blame="" if tag == "student" else f"{tag}: ", after_step=after,
                         frozen_in=student)
    finally:
        objective.close()


def _kd(cfg: DistillConfig, ctx: StageContext, student: nn.Module) -> dict[str, Any]:
    teachers = {t.model: ctx.model(t.model) for t in cfg.teachers}
    _check(cfg, ctx, student, teachers)
    first = cfg.teachers[0].model
    source = teacher_outputs.for_stage(ctx, cfg, teachers, {first: requested_modules(cfg)[1]})
    metrics: dict[str, Any] = {}
    temperature = cfg.temperature
    if temperature == "auto":
        temperature, metrics["temperature_sweep"] = _sweep(cfg, ctx, student, source,
                                                           teachers[first])
        ctx.log(f"temperature: auto picked T = {temperature:g} "
                f"(validation accuracy by T: {metrics['temperature_sweep']})")
    team = _team(cfg, temperature)
    _train(cfg, ctx, student, source, team, temperature, cfg.epochs, "student", teachers[first])
    if ctx.config.task == "classify":
        metrics.update(diagnostics(ctx, student, teachers, team, cfg.confidence_weighting))
    metrics["temperature"] = temperature
    return metrics


def _team(cfg: DistillConfig, temperature: float) -> list[Teacher]:
    return [Teacher(t.model, t.weight, t.temperature or temperature) for t in cfg.teachers]


def _sweep(cfg: DistillConfig, ctx: StageContext, student: nn.Module, source: TeacherOutputs,
           first: nn.Module) -> tuple[float, dict[str, float]]:
    """Short runs from the same start at each candidate T; the best validation accuracy wins
    (ties go to the earlier candidate)."""
    epochs = cfg.auto_epochs or max(1, cfg.epochs // 5)
    scores: dict[str, float] = {}
    for t in cfg.auto_temperatures:
        trial = copy.deepcopy(student)
        history = _train(cfg, ctx, trial, source, _team(cfg, t), t, epochs, f"sweep-T{t:g}",
                         first)
        scores[f"{t:g}"] = round(float(history["val_accuracy"][-1]), 4)
    best = max(cfg.auto_temperatures, key=lambda t: scores[f"{t:g}"])
    return best, scores


def _reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy with fresh weights: every module's own reset_parameters(), seeded."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def _born_again(cfg: DistillConfig, ctx: StageContext,
                student: nn.Module) -> tuple[nn.Module, list[float]]:
    """Furlanello et al. 2018: generation k+1, re-initialised, learns from generation k."""
    data, bs = ctx.data(), ctx.config.data.eval_batch_size
    accuracies = [evaluate(student, data.eval, bs, ctx.device)]
    ctx.log(f"generation 0 (the student as it comes in) accuracy {accuracies[0]:.4f}")
    temperature = float(cfg.temperature)  # 'auto' is refused for this mode at validation
    _check(cfg, ctx, student, {"born_again": student})
    for g in range(1, cfg.generations + 1):
        name = f"born_again_gen{g - 1}"
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        source = teacher_outputs.for_stage(ctx, cfg, {name: teacher},
                                           {name: requested_modules(cfg)[1]})
        student = _reinitialised(student, ctx.seed * 100 + g)
        _train(cfg, ctx, student, source, [Teacher(name, 1.0, temperature)], temperature,
               cfg.epochs, f"generation{g}", teacher)
        accuracies.append(evaluate(student, data.eval, bs, ctx.device))
        ctx.log(f"generation {g} accuracy {accuracies[-1]:.4f}")
    return student, accuracies


def _ema(cfg: DistillConfig, ctx: StageContext, student: nn.Module) -> float:
    """Mean teacher (Tarvainen and Valpola 2017): the teacher is the moving average of the
    student's weights, updated after every step; returns the teacher's accuracy."""
    ema = copy.deepcopy(student)
    _check(cfg, ctx, student, {"ema": ema})
    source = TeacherOutputs({"ema": ema}, {"ema": requested_modules(cfg)[1]}, ctx.device)
    temperature = float(cfg.temperature)
    _train(cfg, ctx, student, source, [Teacher("ema", 1.0, temperature)], temperature,
           cfg.epochs, "student", ema, ema=ema)
    data = ctx.data()
    return evaluate(ema, data.eval, ctx.config.data.eval_batch_size, ctx.device)


class Cohort(nn.Module):
    """Peers trained together: stacked logits [peers, batch, classes] in training, the
    ensemble's mean logits in evaluation (what validation accuracy then measures)."""

    def __init__(self, peers: list[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([p(*x) for p in self.peers])
        return stacked if self.training else stacked.mean(dim=0)


def _mutual(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    peers = {name: ctx.model(name).to(ctx.device) for name in cfg.peers}
    example = to(example_input(ctx.config.inputs, batch=2), ctx.device)
    with torch.no_grad():
        classes = {n: int(call(m.eval(), example).shape[-1]) for n, m in peers.items()}
    if len(set(classes.values())) > 1:
        raise _bad(ctx, ("peers",), "mutual peers must give the same number of classes; they "
                   f"give {classes}")
    main = "student" if "student" in peers else cfg.peers[0]
    initial = copy.deepcopy(peers[main])
    temperature = float(cfg.temperature)

    def step(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = call(net, batch.x)
        total = logits.new_zeros(())
        terms: dict[str, float] = {}
        for name, soft, own in zip(peers, kd.mutual_terms(logits, temperature), logits,
                                   strict=True):
            loss, _ = kd.mix_with_labels(soft, own, batch.y, cfg.alpha, {})
            terms[name] = float(loss.detach())
            total = total + loss
        return total, terms

    cohort = Cohort(list(peers.values()))
    data, bs = ctx.data(), ctx.config.data.eval_batch_size
    fit_stage(ctx, cohort, cfg.options(cfg.epochs), step, "peers", resume="peers",
              blame="mutual: ")
    metrics: dict[str, Any] = {
        "mode": "mutual", "eval_split": data.eval_name,
        "peer_accuracy": {n: evaluate(m, data.eval, bs, ctx.device) for n, m in peers.items()},
        "ensemble_accuracy": evaluate(cohort, data.eval, bs, ctx.device)}
    metrics["accuracy"] = metrics["peer_accuracy"][main]
    metrics["measured"] = snapshot(peers[main], ctx)
    if cfg.baseline:
        metrics["baseline_accuracy"] = _baseline(cfg, ctx, initial, cfg.epochs)
        metrics["gain_over_baseline"] = metrics["accuracy"] - metrics["baseline_accuracy"]
    ctx.log("peer accuracy on " + data.eval_name + ": " + ", ".join(
        f"{n} {a:.4f}" for n, a in metrics["peer_accuracy"].items())
        + f"; ensemble {metrics['ensemble_accuracy']:.4f}"
        + (f"; the student without peers {metrics['baseline_accuracy']:.4f}"
           if cfg.baseline else ""))
    return StageResult(metrics=metrics, updated=peers, params=count_params(peers[main]))


def _baseline(cfg: DistillConfig, ctx: StageContext, model: nn.Module, epochs: int) -> float:
    """The same student from the same start, trained with cross-entropy alone."""
    fit_stage(ctx, model, cfg.options(epochs), cross_entropy_step, "baseline (no teacher)",
              resume="baseline", blame="baseline: ")
    data = ctx.data()
    return evaluate(model, data.eval, ctx.config.data.eval_batch_size, ctx.device)
