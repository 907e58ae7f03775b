"""`distill` for task causal-lm: token-level KD of a decoder, over the data source's text blocks
and the completions of earlier `generate` stages (sequence-level KD).

loss = alpha x T^2 x divergence(teacher || student) + (1 - alpha) x next-token CE, per
position, averaged over the positions that count (all tokens of a text block; a generated
record's completion). With `cache_teacher` the teacher runs once over the training rows and
keeps its top-k (compresskit.lm.topk); on-policy batches (`on_policy`, GKD's lambda) are written
by the student and scored by the live teacher. `baseline: true` trains a copy of the student
from the same start with cross-entropy alone on the same rows and reports it beside.

Under torchrun each rank trains on its share of the rows and the gradients are averaged.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import nn

from compresskit.config import DistillConfig, KLTerm
from compresskit.engine import distributed as dist
from compresskit.engine.context import StageContext, StageResult
from compresskit.engine.loader import format_path
from compresskit.errors import StageError
from compresskit.lm import models as lm_models
from compresskit.lm.losses import Objective, TopK, chunked_loss
from compresskit.lm.rows import Rows, rows
from compresskit.lm.tokenizers import tokenizer_for
from compresskit.lm.topk import teacher_top_k
from compresskit.train.loop import check_freeze, frozen


def perplexity(model: nn.Module, ds: Any, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over a split of blocks, in torch."""
    m = lm_models.unwrap(model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            ids = torch.stack([torch.as_tensor(ds[i][0])
                               for i in range(s, min(s + batch_size, len(ds)))]).long()
            h = lm_models.hidden_states(m, ids)
            loss = chunked_loss(Objective(alpha=0.0), h, m.get_output_embeddings(), ids,
                                torch.ones_like(ids), None)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(loss) * n
            count += n
    return math.exp(total / max(count, 1))


def _objective(cfg: DistillConfig) -> Objective:
    term = next(t for t in cfg.losses if isinstance(t, KLTerm))
    temperature = float(cfg.temperature) if cfg.temperature != "auto" else 1.0
    return Objective(term.divergence, temperature, cfg.alpha, term.beta, term.skew)


def _sample(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tokens: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy rows: the first half of each row as prompt, then `tokens` the student samples
    (temperature 1); only the sampled tokens count."""
    m = lm_models.unwrap(model)
    half = max(1, min(ids.shape[1] - tokens, ids.shape[1] // 2))
    prompt = ids[:, :half]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    was = m.training
    m.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    m.train(was)
    counted = torch.zeros_like(out)
    counted[:, half - 1:] = 1
    return out, counted


def train(ctx: StageContext, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None,
          data: Rows, objective: Objective, cache: TopK | None, label: str) -> dict[str, Any]:
    """Train `student` in place on `data`, but for the parameters `freeze` names; the loss
    history and the seconds it took."""
    with frozen(student, cfg.freeze):
        return _train(ctx, cfg, student, teacher, data, objective, cache, label)


def _train(ctx: StageContext, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None,
           data: Rows, objective: Objective, cache: TopK | None, label: str) -> dict[str, Any]:
    m = lm_models.unwrap(student)
    m.train()
    head = m.get_output_embeddings()
    world, rank = dist.world_size(), dist.rank()
    gen = torch.Generator().manual_seed(ctx.seed)
    batch = ctx.config.data.batch_size
    share = len(data) // world  # every rank the same number of rows, so of steps
    steps_per_epoch = math.ceil(share / batch)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        mine = order[rank::world][:share]
        for s in range(0, len(mine), batch):
            pick = mine[s:s + batch]
            ids, mask = data.ids[pick], data.mask[pick]
            target: TopK | torch.Tensor | None = None
            on_policy = teacher is not None and cfg.on_policy > 0 and \
                float(torch.rand((), generator=gen)) < cfg.on_policy
            if on_policy:
                ids, mask = _sample(student, ids, mask, cfg.on_policy_tokens, gen)
            if objective.alpha > 0 and teacher is not None:
                if cache is not None and not on_policy:
                    target = TopK(cache.logp[pick], cache.ids[pick], cache.log_tail[pick])
                else:
                    with torch.no_grad():
                        target = lm_models.logits(teacher, ids)
            h = lm_models.hidden_states(m, ids)
            loss = chunked_loss(objective, h, head, ids, mask, target, cfg.loss_chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == total:
                ctx.log(f"{label} epoch {epoch + 1}/{cfg.epochs} step {step}/{total} "
                        f"loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    m.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1),
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def _scores(model: nn.Module, ctx: StageContext) -> dict[str, float]:
    splits = ctx.data()
    out = {"val_perplexity": perplexity(model, splits.val)}
    if splits.test is not None:
        out["test_perplexity"] = perplexity(model, splits.test)
    return out


def run(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    role = cfg.teachers[0].model
    teacher = ctx.model(role)
    student = ctx.model("student")
    for name, model in (("teacher", teacher), ("student", student)):
        if not lm_models.is_causal_lm(model):
            raise StageError(ctx.name, f"the {name} is not a causal LM (no output embeddings "
                             "to predict tokens with); load it with kwargs: {auto_class: "
                             "AutoModelForCausalLM}")
    t_tok, s_tok = tokenizer_for(ctx, role), tokenizer_for(ctx, "student")
    lm_models.check_same_vocabulary(teacher, student, t_tok, s_tok, ctx.name)
    check_freeze(student, cfg.freeze, format_path(("stages", ctx.index, "freeze")))
    lm_models.unwrap(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    pad = t_tok.eos_token_id if t_tok.eos_token_id is not None else 0
    data = rows(ctx, pad)
    objective = _objective(cfg)
    metrics: dict[str, Any] = {
        "objective": {"divergence": objective.kind, "temperature": objective.temperature,
                      "alpha": objective.alpha, "on_policy": cfg.on_policy},
        "train_rows": len(data), "train_tokens": int(data.mask.sum()),
        "generated_rows": len(data) - len(ctx.data().train)}  # type: ignore[arg-type]
    main = dist.is_main()
    if main:
        metrics["teacher"] = _scores(teacher, ctx)
        metrics["before"] = _scores(student, ctx)
        ctx.log(f"before: student test perplexity {metrics['before'].get('test_perplexity')}")
    start_state = copy.deepcopy(lm_models.unwrap(student).state_dict()) if cfg.baseline \
        else None
    cache = None
    if cfg.cache_teacher and objective.alpha > 0:
        cache = teacher_top_k(ctx, teacher, data, cfg.cache_top_k, objective.temperature)
        metrics["teacher_cache"] = {"top_k": cfg.cache_top_k}
    metrics["training"] = train(ctx, cfg, student, teacher, data, objective, cache, "kd")
    if main:
        metrics["after"] = _scores(student, ctx)
        metrics["test_perplexity"] = metrics["after"].get("test_perplexity")
        metrics["perplexity"] = metrics["test_perplexity"]
        ctx.log(f"after: student test perplexity {metrics['test_perplexity']:.2f}")
    if start_state is not None:
        baseline = copy.deepcopy(lm_models.unwrap(student))
        baseline.load_state_dict(start_state)
        metrics["baseline_training"] = train(ctx, cfg, baseline, None, data,
                                             Objective(alpha=0.0), None, "ce baseline")
        if main:
            metrics["baseline"] = _scores(baseline, ctx)
            ctx.log(f"cross-entropy baseline: test perplexity "
                    f"{metrics['baseline'].get('test_perplexity', float('nan')):.2f}")
            kd, ce = metrics["after"].get("test_perplexity"), \
                metrics["baseline"].get("test_perplexity")
            if kd and ce:
                metrics["kd_vs_ce"] = round(1 - kd / ce, 4)
    return StageResult(metrics=metrics, updated={"student": student},
                       params=sum(p.numel() for p in student.parameters()))
