"""Distillation losses as pure functions."""

from __future__ import annotations

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


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor | None, temperature: float,
                alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * soft_kl + (1 - alpha) * cross-entropy; without labels only the soft term counts.

    Returns the loss and its terms (for logs and NaN diagnostics).
    """
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if targets is None or alpha >= 1.0:
        return soft, {"kd": float(soft.detach())}
    hard = F.cross_entropy(student_logits, targets)
    loss = alpha * soft + (1.0 - alpha) * hard
    return loss, {"kd": float(soft.detach()), "ce": float(hard.detach())}
