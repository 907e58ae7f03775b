"""Token-level distillation losses over a vocabulary, computed in chunks of positions.

Every divergence compares two distributions given as log-probabilities over the same buckets:
the whole vocabulary (a live teacher), or the teacher's top-k tokens plus one bucket for the
rest of the vocabulary (the top-k cache; Gemma 3 keeps 256). With the tail bucket the loss is
the exact divergence between the two coarse-grained distributions, so it is zero only when the
student puts the teacher's mass on the teacher's top tokens.

- forward KL, KL(p || q): mode covering (Hinton's KD at token level).
- reverse KL, KL(q || p): mode seeking (MiniLLM, Gu et al. 2024).
- generalized JSD with `beta` (GKD, Agarwal et al. 2024): beta KL(p || m) + (1 - beta)
  KL(q || m), m = beta p + (1 - beta) q.
- skew KL with `skew` (DistiLLM, Ko et al. 2024): KL(p || skew p + (1 - skew) q).

p is the teacher, q the student, both at the stage's temperature; the result is scaled by T^2
(Hinton) and averaged over the positions that count (mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


@dataclass(frozen=True)
class TopK:
    """The teacher's top-k at the stage's temperature, per position: log-probabilities (fp16 in
    the cache), token ids, and the log of the mass left to the rest of the vocabulary."""

    logp: torch.Tensor
    """[..., k]"""
    ids: torch.Tensor
    """[..., k] int"""
    log_tail: torch.Tensor
    """[...]"""


def top_k(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The top-k of softmax(logits / T) and the log of the mass outside it."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(values, ids, _log1mexp(torch.logsumexp(values, dim=-1)))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; -inf-safe (clamped at log 1e-12)."""
    x = x.clamp(max=-1e-12)
    out = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp(min=math.log(1e-12))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """Per-position divergence between teacher log-probs `log_p` and student's `log_q` (the
    last axis holds the buckets)."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        if beta <= 0.0:
            return (p * (log_p - log_q)).sum(-1)  # the limits: forward KL ...
        if beta >= 1.0:
            return (q * (log_q - log_p)).sum(-1)  # ... and reverse KL (GKD's convention)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if kind == "skew_kl":
        log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log(1 - skew)) \
            if skew > 0 else log_q
        return (p * (log_p - log_m)).sum(-1)
    raise ValueError(f"unknown divergence '{kind}'; one of {', '.join(DIVERGENCES)}")


def _student_buckets(logits: torch.Tensor, temperature: float,
                     teacher: TopK | None) -> torch.Tensor:
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    if teacher is None:
        return log_q
    picked = log_q.gather(-1, teacher.ids.long())
    rest = _log1mexp(torch.logsumexp(picked, dim=-1))
    return torch.cat([picked, rest.unsqueeze(-1)], dim=-1)


def _teacher_buckets(teacher: TopK | torch.Tensor, temperature: float) -> torch.Tensor:
    if isinstance(teacher, TopK):
        return torch.cat([teacher.logp.float(), teacher.log_tail.float().unsqueeze(-1)], dim=-1)
    return F.log_softmax(teacher.float() / temperature, dim=-1)


@dataclass(frozen=True)
class Objective:
    """What the student is trained on at each position: alpha x T^2 x divergence to the teacher
    + (1 - alpha) x next-token cross-entropy. alpha 0 is cross-entropy alone."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    skew: float = 0.1

    def chunk(self, hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
              mask: torch.Tensor, teacher: TopK | torch.Tensor | None) -> torch.Tensor:
        """The summed loss of one chunk of positions (hidden [n, d], targets [n] next tokens,
        mask [n] 1 where the position counts); logits are formed here and not kept."""
        logits = head(hidden)
        total = hidden.new_zeros(())
        if self.alpha < 1.0:
            ce = F.cross_entropy(logits.float(), targets, reduction="none")
            total = total + (1 - self.alpha) * (ce * mask).sum()
        if self.alpha > 0.0 and teacher is not None:
            top = teacher if isinstance(teacher, TopK) else None
            d = divergence(_teacher_buckets(teacher, self.temperature),
                           _student_buckets(logits, self.temperature, top), self.kind,
                           self.beta, self.skew)
            total = total + self.alpha * self.temperature ** 2 * (d * mask).sum()
        return total


def chunked_loss(objective: Objective, hidden: torch.Tensor, head: torch.nn.Module,
                 input_ids: torch.Tensor, mask: torch.Tensor,
                 teacher: TopK | torch.Tensor | None, chunk: int = 1024) -> torch.Tensor:
    """The mean per-token loss of a batch, from the student's last hidden states [b, t, d].

    Position i predicts token i + 1. Positions go through the head `chunk` at a time under
    activation checkpointing, so neither the forward nor the backward holds more than
    chunk x vocabulary logits (not batch x length x vocabulary)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    counted = (mask[:, :-1] * mask[:, 1:]).reshape(-1).to(h.dtype)
    t: TopK | torch.Tensor | None
    if isinstance(teacher, TopK):
        t = TopK(*(v[:, :-1].reshape(-1, *v.shape[2:]) for v in
                   (teacher.logp, teacher.ids, teacher.log_tail)))
    elif teacher is not None:
        t = teacher[:, :-1].reshape(-1, teacher.shape[-1])
    else:
        t = None
    total = h.new_zeros(())
    for s in range(0, h.shape[0], chunk):
        part = slice(s, s + chunk)
        sub = t if t is None else TopK(t.logp[part], t.ids[part], t.log_tail[part]) \
            if isinstance(t, TopK) else t[part]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(objective.chunk, h[part], head, targets[part],
                                       counted[part], sub, use_reentrant=False)
        else:
            total = total + objective.chunk(h[part], head, targets[part], counted[part], sub)
    return total / counted.sum().clamp(min=1)
