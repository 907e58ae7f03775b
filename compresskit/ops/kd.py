"""Distillation losses as pure functions: tensors in, a scalar loss (or a target) out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al. 2015): the
    gradient w.r.t. the student logits is T * (softmax(s/T) - softmax(t/T)) / batch.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * (t * t)


def kl_to_target(student_logits: torch.Tensor, target: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(student/T)) for a given target distribution (rows sum to 1),
    e.g. several teachers' combined soft targets. Equals soft_kl when target = softmax(t/T)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    kl = F.kl_div(log_p_student, target.detach(), reduction="batchmean")
    return kl * (t * t)


def combined_targets(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float],
                     temperatures: Sequence[float], confidence: bool = False) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions softmax(t_k / T_k).

    With `confidence`, teacher k's weight for a sample is also multiplied by its top-1
    probability at T = 1 on that sample, so a teacher that is unsure there counts less. The
    weights are normalised per sample, so the result is a distribution.
    """
    if not (len(teacher_logits) == len(weights) == len(temperatures)) or not teacher_logits:
        raise ValueError("one weight and one temperature per teacher, at least one teacher")
    probs = torch.stack([F.softmax(t.detach().float() / temp, dim=-1)
                         for t, temp in zip(teacher_logits, temperatures, strict=True)])
    w = torch.tensor(list(weights), dtype=probs.dtype, device=probs.device)[:, None]
    w = w.expand(len(weights), probs.shape[1])  # [teachers, batch]
    if confidence:
        top1 = torch.stack([F.softmax(t.detach().float(), dim=-1).amax(dim=-1)
                            for t in teacher_logits])
        w = w * top1
    w = w / w.sum(dim=0, keepdim=True)
    return (w[..., None] * probs).sum(dim=0)


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor | None, temperature: float,
                alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * soft_kl + (1 - alpha) * cross-entropy; without labels only the soft term counts.

    Returns the loss and its terms (for logs and NaN diagnostics).
    """
    soft = soft_kl(student_logits, teacher_logits, temperature)
    return mix_with_labels(soft, student_logits, targets, alpha, {"kd": float(soft.detach())})


def mix_with_labels(distill: torch.Tensor, student_logits: torch.Tensor,
                    targets: torch.Tensor | None, alpha: float,
                    terms: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * distill + (1 - alpha) * CE(student, labels); the distillation term alone when
    there are no labels (label-free distillation) or alpha is 1."""
    if targets is None or alpha >= 1.0:
        return distill, terms
    hard = F.cross_entropy(student_logits, targets)
    return alpha * distill + (1.0 - alpha) * hard, {**terms, "ce": float(hard.detach())}


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """FitNets' hint loss between two feature tensors of the same shape: mean squared error,
    mean absolute error, or 1 - cosine similarity of the flattened per-sample features. With
    `mask` ([batch, tokens], for [batch, tokens, width] sequences) only real tokens count, and
    cosine compares each token's vector (TinyBERT's hidden-state loss, padding left out)."""
    teacher = teacher.detach()
    if mask is not None and student.dim() == 3 and mask.shape == student.shape[:2]:
        keep = mask.to(student.dtype)
        tokens = keep.sum().clamp(min=1.0)
        if kind == "cosine":
            per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        elif kind in ("mse", "l1"):
            diff = student - teacher
            per_token = (diff.pow(2) if kind == "mse" else diff.abs()).mean(dim=-1)
        else:
            raise ValueError(f"unknown feature distance {kind!r}")
        return (per_token * keep).sum() / tokens
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "l1":
        return F.l1_loss(student, teacher)
    if kind == "cosine":
        return cosine_loss(student.flatten(1), teacher.flatten(1))
    raise ValueError(f"unknown feature distance {kind!r}")


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko and Komodakis' spatial attention: mean over channels of F^2, flattened and
    L2-normalised per sample. [batch, C, H, W] -> [batch, H * W]."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the paper's code); when spatial
    sizes differ, the larger map is average-pooled to the smaller first."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError("attention transfer needs 4-D [batch, C, H, W] feature maps")
    hs, ht = student.shape[-2:], teacher.detach().shape[-2:]
    if hs != ht:
        size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        student = F.adaptive_avg_pool2d(student, size)
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


def pooled(x: torch.Tensor) -> torch.Tensor:
    """An embedding per sample: 4-D maps averaged over space, 3-D sequences over tokens."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher), averaged over the batch (DistilBERT's cosine-embedding loss
    with every pair a positive one)."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def mutual_terms(logits: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    """Deep mutual learning (Zhang et al. 2018): for stacked peer logits [peers, batch,
    classes], each peer's mean soft KL from every other peer's (detached) prediction."""
    k = logits.shape[0]
    return [torch.stack([soft_kl(logits[i], logits[j], temperature)
                         for j in range(k) if j != i]).mean() for i in range(k)]


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for parameters and float buffers
    (BatchNorm statistics); integer buffers such as step counters are copied."""
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        target = t_state[name]
        if target.dtype.is_floating_point:
            target.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
        else:
            target.copy_(value)


def self_relations(x: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(X_h X_h^T / sqrt(d)) per relation head h: x [B, L, D] is split into `heads`
    slices of D / heads; padded keys (mask 0) get no probability. Returns [B, heads, L, L]."""
    b, n, d = x.shape
    xh = x.reshape(b, n, heads, d // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        # A finite fill: padded keys get exp(fill) = 0 and no NaN reaches the gradient.
        scores = scores.masked_fill(~mask.bool()[:, None, None, :],
                                    torch.finfo(scores.dtype).min / 4)
    return F.log_softmax(scores, dim=-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLMv2 (Wang et al. 2021): KL(teacher || student) between the self-relations of one
    projection (queries, keys or values) of a teacher layer and of a student layer, averaged
    over relation heads and real query positions. The widths may differ; `heads` must divide
    both."""
    log_s = self_relations(student, heads, mask)
    log_t = self_relations(teacher.detach(), heads, mask)
    p_t = log_t.exp()
    kl = (p_t * (log_t - log_s)).sum(-1)  # [B, heads, L]
    if mask is None:
        return kl.mean()
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()
