"""What a distill stage reports about its teachers and student, for the known pitfalls of
distillation: an overconfident teacher (soft targets that are nearly one-hot), a capacity gap
too wide to bridge, and a student that does not actually follow its teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from compresskit.models.loading import count_params
from compresskit.ops import kd
from compresskit.train.loop import accuracy, predict

if TYPE_CHECKING:
    from torch import nn

    from compresskit.distill.objective import Teacher
    from compresskit.engine.context import StageContext

OVERCONFIDENT = 0.95
"""Mean top-1 probability at the chosen T above which the soft targets carry little more than
the labels do."""
CAPACITY_GAP = 0.05
"""Student/teacher parameter ratio below which, when distillation did not beat the baseline,
the report points at the capacity gap."""


def capacity_warning(metrics: dict[str, Any]) -> str | None:
    """When KD lost to (or tied) plain training and the student is much smaller than the
    teacher, say that the gap may be the cause and what to try."""
    ratio, gain = metrics.get("student_param_ratio"), metrics.get("gain_over_baseline")
    if ratio is None or gain is None or gain > 0 or ratio >= CAPACITY_GAP:
        return None
    return (f"distillation did not beat cross-entropy training ({100 * gain:+.1f} points) and "
            f"the student has 1/{1 / ratio:.0f} of the teacher's parameters; across a wide "
            "capacity gap distillation gains shrink (Mirzadeh et al. 2020): distil into a "
            "mid-sized model first and use it as the teacher, or raise the temperature")


def diagnostics(ctx: StageContext, student: nn.Module, teachers: dict[str, nn.Module],
                team: list[Teacher], confidence: bool) -> dict[str, Any]:
    """Teacher accuracy and confidence at T = 1 and at its T, parameter ratios, and the top-1
    agreement between the student and the combined teachers on the evaluation split."""
    data, bs = ctx.data(), ctx.config.data.eval_batch_size
    s_logits, labels = predict(student, data.eval, bs, ctx.device)
    s_params = count_params(student)
    logits: list[torch.Tensor] = []
    per: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for t in team:
        t_logits, _ = predict(teachers[t.name], data.eval, bs, ctx.device)
        logits.append(t_logits)
        t_params = count_params(teachers[t.name])
        per[t.name] = {
            "accuracy": accuracy(t_logits, labels),
            "mean_max_prob_t1": float(torch.softmax(t_logits, 1).amax(1).mean()),
            "mean_max_prob": float(torch.softmax(t_logits / t.temperature, 1).amax(1).mean()),
            "temperature": t.temperature, "weight": t.weight, "params": t_params,
            "student_param_ratio": s_params / max(1, t_params),
        }
        if per[t.name]["mean_max_prob"] > OVERCONFIDENT:
            warnings.append(
                f"teacher '{t.name}' is overconfident: its mean top-1 probability at T = "
                f"{t.temperature:g} is {per[t.name]['mean_max_prob']:.3f}, so its soft "
                "targets are nearly one-hot; raise the temperature (or use temperature: auto)")
    target = kd.combined_targets(logits, [t.weight for t in team],
                                 [t.temperature for t in team], confidence)
    first = per[team[0].name]
    return {
        "teachers": per, "teacher_accuracy": first["accuracy"],
        "student_param_ratio": first["student_param_ratio"],
        "teacher_agreement": float((s_logits.argmax(1) == target.argmax(1)).float().mean()),
        "warnings": warnings,
    }
