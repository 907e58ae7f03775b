"""What one stage's record says in plain words (each stage descriptor's `findings`), and the
small helpers that name a pipeline's quality metric."""

from __future__ import annotations

from typing import Any

from compresskit.measure import quality
from compresskit.ops.latency import fmt_ms


def metric_key(report: dict[str, Any]) -> str:
    """The quality metric results are ranked by (accuracy, or cosine to the teacher)."""
    return str(report.get("metric", "accuracy"))


def metric_label(report: dict[str, Any]) -> str:
    return quality.LABELS.get(metric_key(report), metric_key(report))


def delta(report: dict[str, Any], new: float, old: float) -> str:
    """A change in the metric: points for accuracy, a plain difference otherwise."""
    if metric_key(report) == "accuracy":
        return f"{100 * (new - old):+.1f} points"
    return f"{new - old:+.4f} {metric_label(report)}"


def _distill_line(m: dict[str, Any]) -> str:
    mode, split = m.get("mode", "kd"), m.get("eval_split")
    if mode == "born_again":
        line = (f"Born-again student, accuracy on the {split} split by generation: "
                + " -> ".join(f"{a:.4f}" for a in m["generation_accuracy"]))
    elif mode == "ema":
        line = (f"Student distilled from its own moving average: {m['accuracy']:.4f} on the "
                f"{split} split (the moving-average teacher {m['ema_accuracy']:.4f})")
    elif mode == "mutual":
        line = ("Mutual distillation, accuracy on the " f"{split} split: " + ", ".join(
            f"{n} {a:.4f}" for n, a in m["peer_accuracy"].items())
            + f" (their ensemble {m['ensemble_accuracy']:.4f})")
    else:
        line = (f"Distilled student: {m['accuracy']:.4f} accuracy on the {split} split "
                f"(teacher {m['teacher_accuracy']:.4f}, T = {m['temperature']:g}, top-1 "
                f"agreement {m['teacher_agreement']:.3f}, 1/{1 / m['student_param_ratio']:.0f} "
                "of its parameters)")
    if "baseline_accuracy" in m:
        line += (f"; the same student trained without a teacher: {m['baseline_accuracy']:.4f} "
                 f"({100 * m['gain_over_baseline']:+.1f} points from distillation)")
    return line + "."


def distill_findings(s: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """A distill stage: the student against its teachers (and the baseline), or for
    embeddings the cosine and neighbour agreement gained; the diagnostics' warnings."""
    m, lines = s["metrics"], []
    if "accuracy" in m:
        lines.append(_distill_line(m))
        lines += [f"Warning ({s['name']}): {w}." for w in m.get("warnings", [])]
    if "cosine" in m:
        start = m.get("initial", {})
        lines.append(
            f"Distilled student on the {m.get('eval_split')} split: cosine to the teacher's "
            f"embeddings {start.get('cosine', float('nan')):.4f} -> {m['cosine']:.4f}, "
            f"top-1 nearest-neighbour agreement {start.get('nn_agreement', float('nan')):.4f}"
            f" -> {m['nn_agreement']:.4f} (torch, FP32).")
    return lines


def shrink_findings(s: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """A prune or lowrank stage: MACs, parameters, latency and quality before and after."""
    m, k = s["metrics"], metric_key(report)
    if "change" not in m:  # nothing was changed (a model left whole)
        return []
    c = m["change"]
    return [
        f"{s['type'].capitalize()} ({s['name']}): MACs x{c['macs_ratio']:.2f}, params "
        f"x{c['params_ratio']:.2f}, batch-1 latency {fmt_ms(m['before']['latency_ms'])} -> "
        f"{fmt_ms(m['after']['latency_ms'])} (x{1 / c['latency_speedup']:.2f}), "
        f"{metric_label(report)} {m['before'][k]:.4f} -> {m['after'][k]:.4f}"
        f" ({delta(report, m['after'][k], m['before'][k])}).",
        *(f"Warning ({s['name']}): {w}." for w in c["warnings"])]


def grouped_warnings(report: dict[str, Any]) -> list[str]:
    """Every warning of a run once, by stage: what the distillation diagnostics and the
    compression measurements flagged, stages over their time budget, targets that could not
    measure."""
    out = []
    for s in report["stages"]:
        m = s["metrics"]
        found = [*m.get("warnings", []), *m.get("change", {}).get("warnings", [])]
        if s.get("over_budget"):
            found.append(f"took longer than its time_budget of {s['time_budget']:g} s")
        for key in ("unavailable_targets", "failed_targets"):
            found += [f"target {t}: {why}" for t, why in m.get(key, {}).items()]
        out += [f"{s['name']}: {w}" for w in dict.fromkeys(found)]
    return out
