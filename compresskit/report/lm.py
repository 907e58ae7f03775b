"""The report of a causal-lm pipeline: decoders by perplexity, agreement with the teacher,
time to first token, tokens per second, memory and bytes; the distilled student against its
cross-entropy baseline; the greedy samples; and a verdict from those numbers alone."""

from __future__ import annotations

from typing import Any


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in report["benchmarks"] if b.get("kind") == "lm"]


def _name(b: dict[str, Any]) -> str:
    return f"{b['model']} {b['precision']}"


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The files no other file beats on both decode speed and perplexity."""
    return [r for r in rows if not any(
        o is not r and o["decode_tokens_per_s"] >= r["decode_tokens_per_s"]
        and o["perplexity"] <= r["perplexity"]
        and (o["decode_tokens_per_s"] > r["decode_tokens_per_s"]
             or o["perplexity"] < r["perplexity"]) for o in rows)]


def verdicts(report: dict[str, Any]) -> list[str]:
    """The fastest student file on the Pareto front whose perplexity is within 10% of the FP32
    student's (or the fastest file on the front when there is no student), against the
    teacher's FP32 file; and which files the front holds."""
    rows = _rows(report)
    if not rows:
        return []
    front = pareto(rows)
    teacher = next((r for r in rows if r["model"] == "teacher" and r["precision"] == "fp32"),
                   None)
    student_fp32 = next((r for r in rows if r["model"] == "student"
                         and r["precision"] == "fp32"), None)
    pool = [r for r in front if r["model"] == "student"
            and (student_fp32 is None or r["perplexity"] <= 1.1 * student_fp32["perplexity"])]
    pick = max(pool or front, key=lambda r: r["decode_tokens_per_s"])
    line = (f"cpu: ship `{pick['artifact']}`: {pick['decode_tokens_per_s']:.1f} tokens/s on 1 "
            f"thread, perplexity {pick['perplexity']:.2f}, {pick['bytes'] / 1e6:.1f} MB")
    if teacher is not None and pick is not teacher:
        line += (f"; the FP32 teacher decodes {teacher['decode_tokens_per_s']:.1f} tokens/s "
                 f"({pick['decode_tokens_per_s'] / teacher['decode_tokens_per_s']:.2f}x) at "
                 f"perplexity {teacher['perplexity']:.2f} in "
                 f"{teacher['bytes'] / 1e6:.1f} MB ({pick['bytes'] / teacher['bytes']:.2f}x)")
    out = [line]
    out.append("Pareto front (decode tokens/s against perplexity): "
               + ", ".join(f"{_name(r)} ({r['decode_tokens_per_s']:.1f} tokens/s, "
                           f"{r['perplexity']:.2f})"
                           for r in sorted(front, key=lambda r: -r["decode_tokens_per_s"]))
               + "; off it: " + (", ".join(_name(r) for r in rows if r not in front) or "none"))
    return out


def findings(report: dict[str, Any]) -> list[str]:
    out = []
    for s in report["stages"]:
        m = s["metrics"]
        if s["type"] == "distill" and "after" in m:
            before, after = m["before"].get("test_perplexity"), m["after"].get("test_perplexity")
            line = (f"{s['name']}: {m['objective']['divergence']} at T "
                    f"{m['objective']['temperature']:g}, alpha {m['objective']['alpha']:g}, "
                    f"{m['training']['steps']} steps on {m['train_tokens']:,} tokens: test "
                    f"perplexity {before:.2f} -> {after:.2f}")
            if "baseline" in m:
                ce = m["baseline"]["test_perplexity"]
                line += (f"; the same student trained with cross-entropy alone: {ce:.2f} "
                         f"(distillation {100 * (1 - after / ce):+.1f}% lower perplexity)")
            out.append(line + f"; teacher {m['teacher'].get('test_perplexity', 0):.2f}.")
        if s["type"] == "generate" and "prompts" in m:
            out.append(f"{s['name']}: the {m['model']} wrote {m['completion_tokens']:,} tokens "
                       f"for {m['prompts']} prompts ({'greedy' if m['greedy'] else 'sampled'}).")
    return out


def sections(report: dict[str, Any], section: Any) -> list[Any]:
    rows = _rows(report)
    out = []
    if rows:
        cores = rows[0].get("threads_all", 1)
        prompt = next((s["metrics"].get("prompt") for s in report["stages"]
                       if s["type"] == "benchmark"), None)
        out.append(section(
            "Decoders (onnxruntime, a plain KV-cache loop, measured on the files)",
            ["artifact", "MB", "x teacher bytes", "perplexity (test)", "perplexity (val)",
             "agreement with teacher", "TTFT ms (1 thread)", "tokens/s (1 thread)",
             f"tokens/s ({cores} threads)", "x teacher tokens/s", "peak RSS MB"],
            [[f"`{r['artifact']}`", f"{r['bytes'] / 1e6:.1f}",
              f"{r.get('bytes_vs_teacher', float('nan')):.3f}", f"{r['perplexity']:.2f}",
              f"{r['val_perplexity']:.2f}",
              "-" if r["agreement"] is None else f"{r['agreement']:.3f}",
              f"{r['ttft_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
              f"{r[f'threads_{cores}']['decode_tokens_per_s']:.1f}",
              f"{r.get('speedup_vs_teacher', float('nan')):.2f}", f"{r['peak_rss_mb']:.0f}"]
             for r in rows],
            [f"Perplexity: exp of the mean next-token cross-entropy over the evaluation blocks "
             f"(test: text from another source than training; val: held-out training text). "
             f"Agreement: share of those positions whose top-1 token is the FP32 teacher "
             f"file's. TTFT: a {rows[0]['prompt_tokens']}-token prompt; tokens/s: "
             f"{rows[0]['new_tokens']} greedy tokens after it; each a fresh process, the files "
             f"interleaved in 3 rounds, medians; peak RSS of those processes."]))
        out.append(section("Greedy samples (32 tokens, the same prompt for every file)",
                           ["artifact", "continuation"],
                           [[f"`{r['artifact']}`", " ".join(r["sample"].split())
                             or f"{r['sample']!r} (whitespace only)"] for r in rows],
                           [f"Prompt: {prompt!r}."] if prompt else []))
    kd = [s for s in report["stages"] if s["type"] == "distill" and "after" in s["metrics"]]
    if kd:
        table = []
        for s in kd:
            m = s["metrics"]
            for label, scores in (("teacher", m["teacher"]), ("student before training",
                                                             m["before"]),
                                  ("distilled student", m["after"]),
                                  ("cross-entropy baseline", m.get("baseline"))):
                if scores:
                    table.append([s["name"], label,
                                  f"{scores.get('test_perplexity', float('nan')):.2f}",
                                  f"{scores['val_perplexity']:.2f}"])
        out.append(section("Distillation (torch, the same blocks)",
                           ["stage", "model", "perplexity (test)", "perplexity (val)"], table))
    if report["artifacts"]:
        out.append(section("Artifacts", ["path", "precision", "bytes", "sha256"], [
            [f"`{a['path']}`", str(a["precision"]), f"{a['bytes']:,}", a["sha256"][:12]]
            for a in report["artifacts"]]))
    return out


def plot(report: dict[str, Any]) -> Any:
    """Decode tokens/s against perplexity, one point per file, the front joined; None when
    there is nothing to draw."""
    rows = _rows(report)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["decode_tokens_per_s"], r["perplexity"],
                   marker="o" if r["model"] == "student" else "s")
        ax.annotate(_name(r), (r["decode_tokens_per_s"], r["perplexity"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted(pareto(rows), key=lambda r: r["decode_tokens_per_s"])
    ax.plot([r["decode_tokens_per_s"] for r in front], [r["perplexity"] for r in front],
            "--", linewidth=1)
    ax.set_xlabel("decode tokens/s, 1 thread")
    ax.set_ylabel("perplexity (test)")
    ax.set_yscale("log")
    fig.tight_layout()
    return fig
