"""report.md (what people read): the verdict, the findings and the tables; report.html renders
the same sections."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compresskit.measure import quality
from compresskit.ops.latency import fmt_ms
from compresskit.report.findings import delta, metric_key, metric_label


def _seconds(stage: dict[str, Any]) -> str:
    """'12.3', or against a time budget: '12.3 of 60' and, over it, 'OVER: 95.2 of 60'."""
    shown = _fmt(stage["seconds"], 1)
    budget = stage.get("time_budget")
    if budget is None:
        return shown
    took = stage.get("computed_seconds") or stage["seconds"]
    text = f"{_fmt(took, 1)} of {budget:g}"
    if stage["status"] == "cached":
        text = f"{shown} (cached; {text})"
    return f"OVER: {text}" if stage.get("over_budget") else text


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _at(b: dict[str, Any]) -> str:
    return f"batch {b['batch_size']}" + (f", length {b['length']}" if b.get("length") else "")


def _pace(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _by_target_and_batch(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for b in rows:
        groups.setdefault((b["target"], b["batch_size"], b.get("length") or 0), []).append(b)
    return [groups[k] for k in sorted(groups)]


def quantization_rows(report: dict[str, Any]) -> list[list[str]]:
    """INT8 artifacts against the FP32 file of the same model, at the first target's batch 1
    (or smallest batch): what QAT with and without distillation and PTQ each bought."""
    out = []
    k = metric_key(report)
    groups = _by_target_and_batch(report["benchmarks"])
    first = groups[0][0] if groups else {}
    for group in groups:
        if (group[0]["target"], group[0]["batch_size"]) != (first["target"],
                                                            first["batch_size"]):
            continue
        fp32 = {b["model"]: b for b in group if b.get("precision") == "fp32"}
        for q in group:
            base = fp32.get(q.get("model"))
            if q.get("precision") != "int8" or base is None:
                continue
            art: dict[str, Any] = next(
                (a for a in report["artifacts"] if a["path"] == q["artifact"]), {})
            out.append([q["model"], str(q.get("method")), str(q.get("length") or "-"),
                        _fmt(base[k]), _fmt(q[k]), delta(report, q[k], base[k]),
                        f"{fmt_ms(base['latency_ms']['p50'])} -> {fmt_ms(q['latency_ms']['p50'])}",
                        f"{base['latency_ms']['p50'] / q['latency_ms']['p50']:.2f}x",
                        f"{q['bytes'] / max(1, base['bytes']):.2f}",
                        _fmt(art.get("int8_coverage"), 3)])
    return out


def distill_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per teacher of each kd distill stage: what the pitfalls need to be judged."""
    rows = []
    for s in report["stages"]:
        for name, t in s["metrics"].get("teachers", {}).items():
            rows.append([s["name"], name, _fmt(t["weight"], 2), f"{t['temperature']:g}",
                         _fmt(t["accuracy"]), _fmt(t["mean_max_prob_t1"], 3),
                         _fmt(t["mean_max_prob"], 3), _fmt(t["params"]),
                         f"1/{1 / t['student_param_ratio']:.0f}",
                         _fmt(s["metrics"].get("teacher_agreement"), 3)])
    return rows


FINDINGS = 10
"""Lines under "Findings" at most; the rest of the comparisons go to the appendix."""


def headline(report: dict[str, Any]) -> list[str]:
    """Plain-words findings drawn only from measured numbers: each stage's own (its
    descriptor's `findings`), then the files against each other per target and batch."""
    return _stage_findings(report) + [line for group in _comparisons(report) for line in group]


def findings(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The findings a reader sees first (each stage's, then the comparisons on the first
    target at its first batch, at most FINDINGS lines) and the appendix (every other
    comparison)."""
    if report.get("task") == "causal-lm":
        from compresskit.report import lm

        return lm.findings(report), []
    first, *rest = _comparisons(report) or [[]]
    main = _stage_findings(report) + first
    extra = [line for group in rest for line in group]
    return main[:FINDINGS], main[FINDINGS:] + extra


def _stage_findings(report: dict[str, Any]) -> list[str]:
    from compresskit.stages import STAGES

    lines = []
    for s in report["stages"]:
        stage = STAGES.get(s["type"]) if s["type"] in STAGES else None
        if stage is not None and stage.findings is not None:
            lines += stage.findings(s, report)
    return lines


def _comparisons(report: dict[str, Any]) -> list[list[str]]:
    """Per target and batch (and length): the student against the teacher, each INT8 file
    against its FP32 file and the INT8 student against the FP32 teacher."""
    k = metric_key(report)
    out = []
    for group in _by_target_and_batch(report["benchmarks"]):
        lines: list[str] = []
        out.append(lines)
        fp32 = {b["model"]: b for b in group if b.get("precision") == "fp32"}
        b, t = fp32.get("student"), fp32.get("teacher")
        if b is not None and t is not None:
            speedup = (b["speedup"] if b.get("speedup_vs") == t["artifact"]
                       else t["latency_ms"]["p50"] / b["latency_ms"]["p50"])
            lines.append(
                f"On {b['target']} at {_at(b)}, the student ONNX runs {_pace(speedup)} than the "
                f"teacher ONNX (p50 {fmt_ms(b['latency_ms']['p50'])} vs "
                f"{fmt_ms(t['latency_ms']['p50'])}) at {delta(report, b[k], t[k])}, in a "
                f"{t['bytes'] / max(1, b['bytes']):.1f}x smaller file.")
        for q in group:
            base = fp32.get(q.get("model"))
            if q.get("precision") != "int8" or base is None:
                continue
            lines.append(
                f"On {q['target']} at {_at(q)}, the INT8 {q['model']} "
                f"({q.get('method')}) runs "
                f"{_pace(base['latency_ms']['p50'] / q['latency_ms']['p50'])} than its FP32 "
                f"file (p50 {fmt_ms(q['latency_ms']['p50'])} vs "
                f"{fmt_ms(base['latency_ms']['p50'])}) "
                f"at {delta(report, q[k], base[k])}, in "
                f"{q['bytes'] / max(1, base['bytes']):.2f}x the bytes.")
            teacher = fp32.get("teacher")
            if q.get("model") == "student" and teacher is not None:
                lines.append(
                    f"On {q['target']} at {_at(q)}, the INT8 student runs "
                    f"{_pace(teacher['latency_ms']['p50'] / q['latency_ms']['p50'])} than the "
                    f"FP32 teacher at {delta(report, q[k], teacher[k])}, in "
                    f"{q['bytes'] / max(1, teacher['bytes']):.2f}x its bytes.")
    return out


@dataclass
class Section:
    """A titled table (and optional notes) that both report.md and report.html render."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def sections(report: dict[str, Any]) -> list[Section]:
    if report.get("task") == "causal-lm":
        from compresskit.report import lm

        return lm.sections(report, Section)  # type: ignore[no-any-return]
    k, label = metric_key(report), metric_label(report)
    out = [Section("Stages", ["stage", "status", "seconds", "params", "MACs", "ONNX KiB",
                              "batch-1 p50, 1 thread", label], [
        [f"{s['index']:02d}-{s['type']}", s["status"], _seconds(s), _fmt(s["params"]),
         *_measured(s["metrics"]), _fmt(s["metrics"].get(k))]
        for s in report["stages"]],
        ["MACs, size and latency of each stage's result, measured on an ONNX export of it "
         "(FP32; for qat and ptq the INT8 file) with onnxruntime, batch 1, one thread; "
         "per-target figures of the final files are in the tables below.",
         *(["Seconds: this invocation's (0 when cached); 'of N' is the stage's time_budget, "
            "against the time computing it took."]
           if any(s.get("time_budget") for s in report["stages"]) else [])])]
    teacher_rows = distill_rows(report)
    if teacher_rows:
        sweeps = [f"Temperature sweep ({s['name']}): validation accuracy " + ", ".join(
            f"T={t}: {a:.4f}" for t, a in s["metrics"]["temperature_sweep"].items())
            + f"; picked T = {s['metrics']['temperature']:g}." for s in report["stages"]
            if "temperature_sweep" in s["metrics"]]
        out.append(Section("Distillation (teachers measured on the evaluation split)",
                           ["stage", "teacher", "weight", "T", "accuracy",
                            "mean top-1 prob T=1", "mean top-1 prob at T", "params",
                            "student/teacher params", "student-teacher top-1 agreement"],
                           teacher_rows, sweeps))
    from compresskit.config import CompressOptions
    from compresskit.stages import STAGES

    steps = [s for s in report["stages"] if s["type"] in STAGES and "change" in s["metrics"]
             and issubclass(STAGES.get(s["type"]).config, CompressOptions)]
    if steps:
        rows = []
        for s in steps:
            before, after = s["metrics"]["before"], s["metrics"]["after"]
            rows.append([
                s["name"], f"{before['params']:,} -> {after['params']:,}",
                f"{before['macs']:,} -> {after['macs']:,}",
                f"{before['onnx_bytes'] / 1024:.1f} -> {after['onnx_bytes'] / 1024:.1f}",
                f"{fmt_ms(before['latency_ms'])} -> {fmt_ms(after['latency_ms'])} "
                f"({s['metrics']['change']['latency_speedup']:.2f}x)",
                f"{before[k]:.4f} -> {after[k]:.4f}"])
        out.append(Section("Compression steps (before -> after, measured on FP32 ONNX exports)",
                           ["stage", "params", "MACs", "ONNX KiB", "batch-1 p50, 1 thread",
                            label], rows))
    quant_rows = quantization_rows(report)
    if quant_rows:
        first = report["benchmarks"][0]
        out.append(Section(f"INT8 against FP32 ({first['target']}, batch "
                           f"{first['batch_size']}, measured on the files)",
                           ["model", "method", "length", f"FP32 {label}", f"INT8 {label}",
                            "change",
                            "p50 FP32 -> INT8", "speedup", "size ratio", "int8_coverage"],
                           quant_rows))
    if report["artifacts"]:
        out.append(Section("Artifacts", ["path", "precision", "bytes", "sha256"], [
            [f"`{a['path']}`", a["precision"], _fmt(a["bytes"]), a["sha256"][:12]]
            for a in report["artifacts"]]))
    metrics = quality.METRICS[report.get("task", "classify")]
    for target in dict.fromkeys(b["target"] for b in report["benchmarks"]):
        lengths = any(b.get("length") for b in report["benchmarks"])
        held = list(dict.fromkeys(h for b in report["benchmarks"] if b["target"] == target
                                  for h in b.get("held_out") or {}))
        rows = [[f"`{b['artifact']}`", str(b["batch_size"]),
                 *([str(b.get("length") or "-")] if lengths else []), str(b["threads"]),
                 fmt_ms(b["latency_ms"]["p50"]), fmt_ms(b["latency_ms"]["p90"]),
                 fmt_ms(b["latency_ms"]["p99"]), _fmt(b["throughput_per_s"], 1),
                 _cold(b), _fmt(b["peak_rss_mb"], 1),
                 *[_fmt(b.get(m)) for m in metrics],
                 *[_fmt((b.get("held_out") or {}).get(h, {}).get(m))
                   for h in held for m in metrics],
                 _fmt(b.get("file_bytes", b.get("bytes")))]
                for b in report["benchmarks"] if b["target"] == target]
        device = next((b["device"] for b in report["benchmarks"]
                       if b["target"] == target and b.get("device")), None)
        out.append(Section(f"Target {target} (onnxruntime, measured on the files)",
                           ["artifact", "batch", *(["length"] if lengths else []), "threads",
                            "p50", "p90", "p99", "throughput/s",
                            "cold start (session + first run)", "peak RSS MB",
                            *[quality.LABELS[m] for m in metrics],
                            *[f"{quality.LABELS[m]} ({h})" for h in held for m in metrics],
                            "bytes"], rows,
                           [f"Measured on the device; {device_line(device)}."] if device else []))
    unavailable = {k: v for s in report["stages"]
                   for key in ("unavailable_targets", "failed_targets")
                   for k, v in s["metrics"].get(key, {}).items()}
    if unavailable:
        out.append(Section("Unavailable targets", ["target", "why"],
                           [[k, v] for k, v in unavailable.items()]))
    return out


def device_line(d: dict[str, Any]) -> str:
    isa = ", ".join(d.get("isa") or []) or "none reported"
    return (f"{d.get('cpu')} ({d.get('machine')}, {d.get('physical_cores')} cores; ISA "
            f"flags {isa}), onnxruntime {d.get('onnxruntime')}, Python {d.get('python')}")


def _measured(m: dict[str, Any]) -> list[str]:
    after = m.get("after") or m.get("measured")
    if isinstance(after, dict):
        return [_fmt(after.get("macs")), _fmt(after["onnx_bytes"] / 1024, 1),
                fmt_ms(after.get("latency_ms"))]
    if "int8_bytes" in m:
        latency = m.get("latency_ms", {})
        return ["-", _fmt(m["int8_bytes"] / 1024, 1), fmt_ms(latency.get("int8"))]
    return ["-", "-", "-"]


def _cold(b: dict[str, Any]) -> str:
    c = b.get("cold_start")
    return f"{fmt_ms(c['session_ms'])} + {fmt_ms(c['first_run_ms'])}" if c else "-"


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two measured rows' p50 latencies differ by no more than measurement noise: two
    standard errors of the difference of two medians (1.253 sigma / sqrt(runs) each), with
    sigma read robustly from the spread p90 - p50 (= 1.2816 sigma for a normal law): a few
    slow outliers inflate the standard deviation, not the quantiles."""
    def se2(row: dict[str, Any]) -> float | None:
        lat = row["latency_ms"]
        sigma = (lat["p90"] - lat["p50"]) / 1.2816 if "p90" in lat else lat.get("std")
        return None if sigma is None or not row.get("runs") else \
            (1.253 * sigma) ** 2 / row["runs"]

    sa, sb = se2(a), se2(b)
    if sa is None or sb is None:
        return False
    return abs(a["latency_ms"]["p50"] - b["latency_ms"]["p50"]) <= 2 * math.sqrt(sa + sb)


def verdicts(report: dict[str, Any]) -> list[str]:
    """Per target, at its smallest batch: the fastest artifact whose accuracy is within the
    benchmark stage's verdict_tolerance of the most accurate one, and why. Files as fast as it
    within measurement noise tie with it, and the smallest of them is shipped."""
    if report.get("task") == "causal-lm":
        from compresskit.report import lm

        return lm.verdicts(report)
    bench: dict[str, Any] = next((s["metrics"] for s in report["stages"]
                  if "verdict_tolerance" in s["metrics"]), {})
    tol = bench.get("verdict_tolerance", 0.01)
    k = bench.get("verdict_metric") or metric_key(report)
    on = bench.get("verdict_on")
    lines = []
    label = quality.LABELS.get(k, k) + (f" on {on}" if on else "")

    def value(b: dict[str, Any]) -> float:
        return float(b["held_out"][on][k] if on else b[k])

    def change(new: float, old: float) -> str:
        return f"{100 * (new - old):+.1f} points" if k == "accuracy" else \
            f"{new - old:+.4f} {label}"

    for target in dict.fromkeys(b["target"] for b in report["benchmarks"]):
        rows = [b for b in report["benchmarks"] if b["target"] == target]
        bs = min(b["batch_size"] for b in rows)
        rows = [b for b in rows if b["batch_size"] == bs]
        # With several sequence lengths, judge at the longest: where the cost is.
        longest = max((b.get("length") or 0) for b in rows)
        rows = [b for b in rows if (b.get("length") or 0) == longest]
        if on and not all(on in (b.get("held_out") or {}) for b in rows):
            lines.append(f"{target}: no verdict: {on} was not measured on this target")
            continue
        best = max(value(b) for b in rows)
        good = [b for b in rows if value(b) >= best - tol - 1e-12]
        fastest = min(good, key=lambda b: b["latency_ms"]["p50"])
        ties = [b for b in good if b is fastest or tied(b, fastest)]
        pick = min(ties, key=lambda b: (b["bytes"], b["artifact"]))
        ref = next((b for b in rows if b.get("model") == "teacher"
                    and b.get("precision") == "fp32"), rows[0])
        name = Path(pick["artifact"]).name
        others = [Path(b["artifact"]).name for b in ties if b is not pick]
        tie = (f"; as fast as {', '.join(others)} within measurement noise, and the smallest"
               if others else "")
        within = f"{100 * tol:g} point{'' if tol == 0.01 else 's'}" if k == "accuracy" \
            else f"{tol:g} {label}"
        best_one = "the most accurate one" if k == "accuracy" else "the best one"
        if pick is ref:
            lines.append(f"{target}: ship {name}: no other file is as fast within {within} "
                         f"of {best_one} ({_at(pick)}{tie}).")
            continue
        pace = _pace(ref["latency_ms"]["p50"] / pick["latency_ms"]["p50"])
        lines.append(
            f"{target}: ship {name}: {pace} than {Path(ref['artifact']).name} at "
            f"{change(value(pick), value(ref))}, "
            f"{pick['bytes'] / max(1, ref['bytes']):.2f}x "
            f"its size ({_at(pick)}: the fastest file within {within} of {best_one}{tie}).")
    return lines


def markdown(report: dict[str, Any]) -> str:
    parts = [f"# compresskit report: {report['name']}", "",
             f"compresskit {report['compresskit_version']}, pipeline `{report['pipeline']}`, "
             f"{report['created']}, this invocation took {report['seconds']:.1f} s.", ""]
    ship = verdicts(report)
    if ship:
        parts += ["## Verdict", ""] + [f"- {line}" for line in ship] + [""]
    found, appendix = findings(report)
    if found:
        parts += ["## Findings", ""] + [f"- {line}" for line in found] + [""]
    for sec in sections(report):
        parts += [f"## {sec.title}", "", _table(sec.header, sec.rows), ""]
        parts += [*sec.notes, ""] if sec.notes else []
    if appendix:
        parts += ["## Appendix: every comparison", ""] + [f"- {line}" for line in appendix]
    return "\n".join(parts)
